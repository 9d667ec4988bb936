"""Behaviour scorers of system-prompt tasks, and the built-in behaviour suite.

A system-prompt task (:mod:`opcd.tasks.system_prompt`) scores each response by the rule
its system prompt asks for, named in ``task.behaviour`` by a spec ``name`` or
``name:argument``: ``lowercase``, ``max_words:50``, ``closing:Hope this helps!``. This
module is the registry of those rules (:data:`BEHAVIOURS`; each check maps a response to
met / not met, scored 1 / 0), the parser of specs, and :class:`BehaviourRules`, which
combines several specs (``task.behaviour`` given as a YAML list): a response scores 1 when
it meets every rule, and :meth:`BehaviourRules.rates` reports each rule's rate and
``all_rules``. Unknown names and bad arguments are :class:`~opcd.errors.ConfigError`\\ s
that list the valid forms.

Conventions shared by the checks: a blank response meets no rule (an empty answer follows
no instruction); text comparisons (``opening``, ``closing``, ``contains``, ``persona``,
``forbidden_words``) ignore case, and ``opening`` / ``closing`` also ignore runs of
whitespace; the rules on how prose is written (``lowercase``, ``uppercase``,
``no_commas``) skip fenced and inline code, whose identifiers and syntax a model cannot
change; word counts count every word, code included.

The suite (``data/behaviour_suite.jsonl``, :func:`load_suite`) pairs a realistic system
prompt with the spec that scores it; the ``suite`` task trains on one entry by name.

The checks are written here rather than taken from the IFEval checkers of ``lm-eval``
(``lm_eval.tasks.ifeval.instructions``) because, measured with lm-eval 0.4.13, installing
it pulls 65 packages (+729 MB next to torch: datasets, pyarrow, pandas, scikit-learn, ...),
importing the checkers needs most of them (``langdetect``, ``immutabledict`` and ``nltk``
alone do not suffice), the import tries to download NLTK's ``punkt_tab`` (refused offline,
after which the sentence checks raise ``LookupError``), and its case checks also require
``langdetect`` to call the text English ("HELLO THERE" fails the capital-letters check).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError, DataError

__all__ = [
    "BEHAVIOURS",
    "SUITE_PATH",
    "Behaviour",
    "BehaviourRules",
    "SuiteEntry",
    "build_check",
    "build_rules",
    "count_words",
    "describe_rules",
    "json_answer",
    "load_suite",
    "parse_spec",
    "suite_entry",
]

Check = Callable[[str], bool]
"""A rule on one response: met (True) or not."""

SUITE_PATH = Path(__file__).parent / "data" / "behaviour_suite.jsonl"

# A fenced code block (``` or ~~~), or an opening fence never closed (a cut-off answer).
_FENCED = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# A whole answer that is one fenced block, optionally tagged json: ```json\n...\n```
_WHOLE_FENCE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)
# A word: letters or digits, joined by apostrophes or hyphens (don't, well-known).
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_BULLET = re.compile(r"\A {0,3}[-*•][ \t]+\S")
_CONTINUATION = re.compile(r"\A(?: {2,}|\t)\S")
_COMMAS = (",", "，", "、")  # ASCII, full-width and ideographic commas
# Characters that may follow a final question mark: closing quotes, brackets, emphasis.
_TRAILING_MARKS = "\"'”’»)]*_ \t\n"
_MARKDOWN = (
    re.compile(r"^ {0,3}#{1,6}[ \t]", re.MULTILINE),  # heading
    re.compile(r"^[ \t]*[-*•+][ \t]+\S", re.MULTILINE),  # bullet
    re.compile(r"^[ \t]*\d+[.)][ \t]+\S", re.MULTILINE),  # numbered item
    re.compile(r"```|~~~"),  # code fence
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"\*\*\S|\S\*\*|__\w|\w__"),  # bold
    re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.MULTILINE),  # table row
)


# -- text helpers -------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """``text`` with whitespace runs collapsed to one space and case folded."""
    return " ".join(text.split()).casefold()


def _prose(text: str) -> str:
    """``text`` without fenced or inline code."""
    return _INLINE_CODE.sub(" ", _FENCED.sub(" ", text))


def count_words(text: str) -> int:
    """Words in ``text``: runs of letters or digits (``don't`` and ``well-known`` are one)."""
    return len(_WORD.findall(text))


def json_answer(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when the whole answer is JSON, bare or in one ``` / ```json fence."""
    body = text.strip()
    fenced = _WHOLE_FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Match ``phrase`` as whole words, any case, any whitespace between its words."""
    words = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


# -- the checks ---------------------------------------------------------------------------


def is_lowercase(text: str) -> bool:
    """Some lower-case letter and no capital, outside code."""
    prose = _prose(text)
    return any(c.islower() for c in prose) and not any(c.isupper() for c in prose)


def is_uppercase(text: str) -> bool:
    """Some capital letter and no lower-case letter, outside code."""
    prose = _prose(text)
    return any(c.isupper() for c in prose) and not any(c.islower() for c in prose)


def has_no_commas(text: str) -> bool:
    """No comma (ASCII, full-width or ideographic) outside code."""
    prose = _prose(text)
    return not any(comma in prose for comma in _COMMAS)


def is_json(text: str) -> bool:
    """The whole answer is one JSON value (a ```json fence around it is allowed)."""
    return json_answer(text)[0]


def is_bullet_list(text: str, count: int | None = None) -> bool:
    """At least two bullets (``- ``, ``* ``, ``• ``), or exactly ``count``, and little else.

    Indented lines after a bullet continue it (wrapped text, sub-bullets); besides the
    bullets at most one other non-blank line is allowed (a lead-in or a closing line).
    """
    bullets = others = 0
    in_item = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if _BULLET.match(line):
            bullets += 1
            in_item = True
        elif in_item and _CONTINUATION.match(line):
            continue
        else:
            others += 1
            in_item = False
    enough = bullets >= 2 if count is None else bullets == count
    return enough and others <= 1


def ends_with_question(text: str) -> bool:
    """The last character, past closing quotes, brackets and emphasis, is a question mark."""
    return text.rstrip(_TRAILING_MARKS).endswith(("?", "？"))


def is_plain_text(text: str) -> bool:
    """No markdown: headings, lists, code, bold markers or table rows."""
    return not any(pattern.search(text) for pattern in _MARKDOWN)


# -- argument parsing ---------------------------------------------------------------------


def _positive_int(spec: str, arg: str, behaviour: Behaviour) -> int:
    try:
        value = int(arg.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise _bad_argument(spec, behaviour, f"{arg.strip()!r} is not a whole number of 1 or more")
    return value


def _items(spec: str, arg: str, behaviour: Behaviour) -> list[str]:
    """A comma-separated argument: its items, stripped, non-empty and distinct."""
    items = [item.strip() for item in arg.split(",")]
    if not all(items):
        raise _bad_argument(spec, behaviour, "an item of the comma-separated list is empty")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise _bad_argument(spec, behaviour, f"{duplicates[0]!r} is listed twice")
    return items


def _bad_argument(spec: str, behaviour: Behaviour, problem: str) -> ConfigError:
    return ConfigError(
        f"Behaviour {spec!r}: {problem}. Write it as {behaviour.form} "
        f"({behaviour.summary}), e.g. {behaviour.example}."
    )


# -- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """A named rule: how its argument is written, and how to build its check from it."""

    name: str
    arg: str | None
    """The argument's form, e.g. ``<N>`` (None: the behaviour takes none)."""
    summary: str
    example: str
    build: Callable[[str, str, Behaviour], Check]
    """``(spec, argument, self) -> check``; raises ConfigError on a bad argument."""
    arg_optional: bool = False

    @property
    def form(self) -> str:
        if self.arg is None:
            return self.name
        if self.arg_optional:
            return f"{self.name}[:{self.arg}]"
        return f"{self.name}:{self.arg}"


def _no_arg(check: Check) -> Callable[[str, str, Behaviour], Check]:
    return lambda spec, arg, behaviour: check


def _build_language(spec: str, arg: str, behaviour: Behaviour) -> Check:
    from opcd.tasks.language import LANGUAGES, is_language

    lang = arg.strip().lower()
    if lang not in LANGUAGES:
        raise _bad_argument(spec, behaviour, f"{arg!r} is not one of {', '.join(LANGUAGES)}")
    return lambda text: is_language(text, lang)


def _build_contains(spec: str, arg: str, behaviour: Behaviour) -> Check:
    needle = arg.lower()
    return lambda text: needle in text.lower()


def _build_opening(spec: str, arg: str, behaviour: Behaviour) -> Check:
    start = _normalise(arg)
    return lambda text: _normalise(text).startswith(start)


def _build_closing(spec: str, arg: str, behaviour: Behaviour) -> Check:
    end = _normalise(arg)
    return lambda text: _normalise(text).endswith(end)


def _build_json_keys(spec: str, arg: str, behaviour: Behaviour) -> Check:
    keys = _items(spec, arg, behaviour)

    def check(text: str) -> bool:
        ok, value = json_answer(text)
        return ok and isinstance(value, dict) and all(k in value for k in keys)

    return check


def _build_max_words(spec: str, arg: str, behaviour: Behaviour) -> Check:
    limit = _positive_int(spec, arg, behaviour)
    return lambda text: count_words(text) <= limit


def _build_min_words(spec: str, arg: str, behaviour: Behaviour) -> Check:
    least = _positive_int(spec, arg, behaviour)
    return lambda text: count_words(text) >= least


def _build_bullets(spec: str, arg: str, behaviour: Behaviour) -> Check:
    count = _positive_int(spec, arg, behaviour) if arg.strip() else None
    return lambda text: is_bullet_list(text, count)


def _build_persona(spec: str, arg: str, behaviour: Behaviour) -> Check:
    if not re.search(r"\w", arg):
        raise _bad_argument(spec, behaviour, "the name has no letters")
    pattern = _phrase_pattern(arg)
    return lambda text: pattern.search(text) is not None


def _build_forbidden_words(spec: str, arg: str, behaviour: Behaviour) -> Check:
    patterns = [_phrase_pattern(word) for word in _items(spec, arg, behaviour)]
    return lambda text: not any(p.search(text) for p in patterns)


BEHAVIOURS: dict[str, Behaviour] = {
    b.name: b
    for b in (
        Behaviour("language", "<iso code>", "the answer is in that language, by langid",
                  "language:fr", _build_language),
        Behaviour("contains", "<text>", "the text appears somewhere, any case",
                  "contains:Paris", _build_contains),
        Behaviour("opening", "<text>", "the answer starts with the text", "opening:Hello there!",
                  _build_opening),
        Behaviour("closing", "<sentence>", "the answer ends with the sentence",
                  "closing:Hope this helps!", _build_closing),
        Behaviour("lowercase", None, "no capital letters outside code", "lowercase",
                  _no_arg(is_lowercase)),
        Behaviour("uppercase", None, "no lower-case letters outside code", "uppercase",
                  _no_arg(is_uppercase)),
        Behaviour("json", None, "the whole answer is JSON, a ```json fence allowed", "json",
                  _no_arg(is_json)),
        Behaviour("json_keys", "<key1,key2,...>", "the answer is a JSON object with those keys",
                  "json_keys:answer,confidence", _build_json_keys),
        Behaviour("max_words", "<N>", "at most N words", "max_words:50", _build_max_words),
        Behaviour("min_words", "<N>", "at least N words", "min_words:100", _build_min_words),
        Behaviour("bullets", "<N>", "a bullet list, of exactly N bullets if N is given",
                  "bullets:3", _build_bullets, arg_optional=True),
        Behaviour("no_commas", None, "no commas outside code", "no_commas",
                  _no_arg(has_no_commas)),
        Behaviour("persona", "<name>", "the answer names the persona", "persona:Ada",
                  _build_persona),
        Behaviour("forbidden_words", "<word1,word2,...>", "none of the words appears",
                  "forbidden_words:basically,literally", _build_forbidden_words),
        Behaviour("end_with_question", None, "the answer ends with a question",
                  "end_with_question", _no_arg(ends_with_question)),
        Behaviour("plain_text", None, "no markdown: headings, lists, code, bold, tables",
                  "plain_text", _no_arg(is_plain_text)),
    )
}
"""Every behaviour a spec may name, by name."""


def _valid_forms() -> str:
    return "; ".join(f"{b.form} ({b.summary})" for b in BEHAVIOURS.values())


def parse_spec(spec: str) -> tuple[Behaviour, str]:
    """Split ``name:argument`` and look the name up; ConfigError lists the valid forms."""
    if not isinstance(spec, str):
        raise ConfigError(
            f"A behaviour spec must be a string such as max_words:50, not {type(spec).__name__}."
        )
    name, has_arg, arg = spec.partition(":")
    name = name.strip()
    behaviour = BEHAVIOURS.get(name)
    if behaviour is None:
        close = difflib.get_close_matches(name, list(BEHAVIOURS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown behaviour {spec!r}.{hint} Valid behaviours: {_valid_forms()}."
        )
    if behaviour.arg is None and arg.strip():
        raise ConfigError(
            f"Behaviour {spec!r}: {name} takes no argument. Write it as {name}."
        )
    if behaviour.arg is not None and not behaviour.arg_optional and not arg.strip():
        raise _bad_argument(spec, behaviour, "the argument is missing")
    return behaviour, arg


def build_check(spec: str) -> Check:
    """The check a single spec names; a blank response never meets it."""
    behaviour, arg = parse_spec(spec)
    check = behaviour.build(spec, arg, behaviour)
    return lambda text: bool(text.strip()) and check(text)


def _spec_list(behaviour: str | Sequence[str]) -> tuple[str, ...]:
    """``task.behaviour`` as a tuple of specs (one string, or a list of them)."""
    if not isinstance(behaviour, (str, list, tuple)):
        raise ConfigError(
            "task.behaviour must be a spec such as max_words:50 or a list of specs, not "
            f"{type(behaviour).__name__}."
        )
    specs = (behaviour,) if isinstance(behaviour, str) else tuple(behaviour)
    if not specs:
        raise ConfigError(
            "task.behaviour is an empty list; name at least one behaviour, e.g. [lowercase]."
        )
    seen: set[str] = set()
    for spec in specs:
        if isinstance(spec, str) and spec in seen:
            raise ConfigError(f"task.behaviour lists {spec!r} twice; keep one.")
        seen.add(spec)
    return specs


class BehaviourRules:
    """One or more behaviour specs; a response scores 1 when it meets all of them."""

    def __init__(self, behaviour: str | Sequence[str]) -> None:
        self.specs = _spec_list(behaviour)
        self._checks = [build_check(spec) for spec in self.specs]

    def check(self, text: str) -> dict[str, bool]:
        """Whether ``text`` meets each rule, keyed by its spec."""
        return {spec: check(text) for spec, check in zip(self.specs, self._checks, strict=True)}

    def __call__(self, text: str) -> float:
        return float(all(check(text) for check in self._checks))

    def rates(self, responses: Sequence[str]) -> dict[str, float]:
        """Each rule's share of ``responses`` meeting it, and ``all_rules`` (all met)."""
        n = len(responses)
        met = {spec: 0 for spec in self.specs}
        every = 0
        for text in responses:
            verdicts = self.check(text)
            every += all(verdicts.values())
            for spec, ok in verdicts.items():
                met[spec] += ok
        rates = {spec: count / n if n else 0.0 for spec, count in met.items()}
        rates["all_rules"] = every / n if n else 0.0
        return rates

    def __repr__(self) -> str:
        return f"BehaviourRules({list(self.specs)!r})"


def build_rules(behaviour: str | Sequence[str]) -> BehaviourRules:
    """The scorer ``task.behaviour`` names: one spec, or a list whose rules must all hold."""
    return BehaviourRules(behaviour)


def describe_rules(behaviour: str | Sequence[str]) -> str:
    """One line for logs: the specs joined by `` & ``."""
    return behaviour if isinstance(behaviour, str) else " & ".join(behaviour)


# -- the suite ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteEntry:
    """A built-in behaviour: a realistic system prompt and the spec(s) that score it."""

    name: str
    system_prompt: str
    behaviour: str | tuple[str, ...]


def _suite_row(row: Any, where: str) -> SuiteEntry:
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object with name, system_prompt and behaviour.")
    name, prompt, behaviour = row.get("name"), row.get("system_prompt"), row.get("behaviour")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(f"{where}: name must be a lower-case identifier such as lowercase_replies.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: system_prompt must be a non-empty string.")
    if isinstance(behaviour, list):
        behaviour = tuple(behaviour)
    try:
        BehaviourRules(behaviour)
    except ConfigError as e:
        raise DataError(f"{where}: behaviour is not a valid spec or list of specs: {e}") from None
    return SuiteEntry(name, prompt, behaviour)


def load_suite(path: str | Path = SUITE_PATH) -> dict[str, SuiteEntry]:
    """The suite's entries by name, each checked (its specs parse); errors name the line."""
    p = Path(path)
    entries: dict[str, SuiteEntry] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"Behaviour suite {str(p)!r} line {lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where} is not valid JSON: {e}.") from None
        entry = _suite_row(row, where)
        if entry.name in entries:
            raise DataError(f"{where}: name {entry.name!r} appears twice.")
        entries[entry.name] = entry
    return entries


def suite_entry(name: Any, path: str | Path = SUITE_PATH) -> SuiteEntry:
    """The suite entry called ``name``; a ConfigError lists the entries otherwise."""
    entries = load_suite(path)
    listing = "; ".join(f"{e.name} ({describe_rules(e.behaviour)})" for e in entries.values())
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"task.name=suite needs task.behaviour set to the name of a suite entry. "
            f"Entries: {listing}."
        )
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown suite entry {name!r}.{hint} Entries: {listing}.")
    return entries[name]
