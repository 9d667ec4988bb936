"""Math word and arithmetic problems: reasoning-gym generators, and the GSM8K test set.

Two tasks share this module:

- ``math``: train / eval / test problems from a few reasoning-gym generator families
  (default :data:`DEFAULT_FAMILIES`, easy enough for a 0.5B model). Each split is drawn
  from the generators with its own seeds (derived from ``task.seed``), and a problem text
  already in one split is never repeated in another.
- ``gsm8k``: the same train / eval problems, and the real GSM8K test set (1,319 problems)
  as ``test``, read out of a pinned wheel (:data:`opcd.tasks.fetch.GSM8K_TEST`).

reasoning-gym's ``gsm_symbolic`` generator builds its templates from the GSM8K *test* set,
so a model trained on it has seen GSM8K test problems in disguise: the ``gsm8k`` task
refuses ``gsm_symbolic`` among its families (:class:`ConfigError`).

The prompt asks for brief reasoning and the final answer inside ``\\boxed{}``; the scorer
takes the last ``\\boxed{...}`` of the response. A reasoning-gym problem is right when the
generator's own checker gives it full marks, or, when the reference answer is a plain
number, when math-verify finds the two numerically equal. A GSM8K problem is checked with
math-verify alone. A response without a ``\\boxed{}`` answer, or whose answer cannot be
parsed, is wrong and counted in :attr:`MathTask.parse_failures`.

The context (what the teacher sees and the student does not) is experiential knowledge,
as in the paper: a list of ``- EXPERIENCE ITEM:`` lines placed in the user turn through
:data:`EXPERIENCE_TEMPLATE`. ``task.context`` replaces the short built-in
:data:`DEFAULT_EXPERIENCE`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError, DataError
from opcd.tasks.base import Example, Placement, Task, derive_seed

DEFAULT_FAMILIES = (
    "basic_arithmetic",
    "chain_sum",
    "leg_counting",
    "gcd",
    "lcm",
    "simple_equations",
)
"""Generators whose problems a 0.5B instruction model solves sometimes, not always."""

GSM_SYMBOLIC = "gsm_symbolic"
"""The reasoning-gym family derived from GSM8K's test set (never train on it for GSM8K)."""

DEFAULT_SIZES = {"train": 1000, "eval": 100, "test": 500}
"""Generated splits; the ``gsm8k`` task's test split is all of GSM8K test by default."""

GSM8K_TEST_SIZE = 1319

MATH_INSTRUCTION = (
    "Solve the following problem. Reason briefly, then give only the final answer inside "
    "\\boxed{}, for example \\boxed{42}.\n\nProblem: "
)

EXPERIENCE_TEMPLATE = (
    "Given previous learned experience:\n# Experience\n{context}\n\n"
    "Solve the new problem and explain what part of the experience you use and how.\n\n{prompt}"
)
"""The teacher's user turn (the paper's math template, in substance)."""

DEFAULT_EXPERIENCE = "\n".join(
    [
        "- EXPERIENCE ITEM: Restate what is asked and list the given numbers before computing.",
        "- EXPERIENCE ITEM: In a chain of additions and subtractions, go left to right and keep "
        "a running total; subtracting a negative number adds it.",
        "- EXPERIENCE ITEM: To count a total over groups (legs of animals, items in boxes), "
        "multiply each count by its amount per item, then add the products.",
        "- EXPERIENCE ITEM: For an equation, undo the operations on the unknown one at a time, "
        "then substitute the result back to check it.",
        "- EXPERIENCE ITEM: For a greatest common divisor use Euclid's algorithm; the least "
        "common multiple is the product divided by the greatest common divisor.",
        "- EXPERIENCE ITEM: Put only the final number inside \\boxed{}, with no units or words.",
    ]
)

MAX_ANSWER_CHARS = 200
"""A boxed answer longer than this is not parsed (counted as a parse failure)."""

_log = logging.getLogger(__name__)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


# --------------------------------------------------------------------------- answers


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        start = text.rfind("\\boxed", 0, start)  # unbalanced or bare: try an earlier one
    return None


def gsm8k_gold(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after the last ``####``, no commas."""
    if "####" not in solution:
        raise ValueError("no '####' answer marker")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError("empty answer after '####'")
    return answer


def _math_verify_equal(gold: str, answer: str) -> bool | None:
    """math-verify's verdict on ``answer`` against ``gold``; None if ``answer`` is unparseable."""
    from math_verify import parse, verify

    # math-verify times out through signal.alarm, which works only in the main thread.
    main = threading.current_thread() is threading.main_thread()
    limit = 5 if main else None
    if not main:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=limit)
        parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=limit)
        if not parsed:
            return None
        return bool(verify(gold_parsed, parsed, timeout_seconds=limit))
    except Exception as e:  # a checker failure marks this answer, never the whole run
        _log.debug("math-verify failed on %r: %s", answer[:80], e)
        return None


@dataclass(frozen=True)
class MathGrade:
    """One graded response: right or wrong, and whether its answer could be read at all."""

    correct: bool
    parsed: bool
    answer: str | None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands commas dropped), or None."""
    found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    return found[-1] if found else None


def grade_math(
    response: str, gold: str, checker: Any = None, entry: Any = None, *, loose: bool = False
) -> MathGrade:
    """Grade ``response`` against the reference answer ``gold``.

    ``checker`` (a reasoning-gym dataset) and ``entry`` (its item) add the generator's own
    check: full marks from ``checker.score_answer(answer, entry)`` count as right.
    ``loose``: a response without ``\\boxed{}`` is graded on its last number instead (the
    ``loose_accuracy`` of :meth:`MathTask.score_details`; never the task's score).
    """
    answer = extract_boxed(response)
    if answer is None and loose:
        answer = last_number(response)
    if answer is None or not answer or len(answer) > MAX_ANSWER_CHARS:
        return MathGrade(False, False, answer)
    if checker is not None:
        try:
            if float(checker.score_answer(answer, entry)) >= 1.0:
                return MathGrade(True, True, answer)
        except Exception as e:  # a checker bug on odd input is this answer's, not the run's
            _log.debug("checker failed on %r: %s", answer[:80], e)
        if not _NUMBER.fullmatch(gold.strip()):
            # Non-numeric references (fractions in lowest terms, lists, ...): the generator's
            # criterion is the only one; numeric equality could accept a wrong form.
            return MathGrade(False, True, answer)
    verdict = _math_verify_equal(gold, answer)
    if verdict is None:
        return MathGrade(False, False, answer)
    return MathGrade(verdict, True, answer)


# --------------------------------------------------------------------------- data


def math_prompt(problem: str) -> str:
    """The student's user turn for ``problem``."""
    return MATH_INSTRUCTION + problem.strip()


def load_gsm8k(path: str | Path) -> list[Example]:
    """Read GSM8K JSONL (``{"question": ..., "answer": "... #### 42"}`` per line)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"GSM8K file {str(p)!r} cannot be read: {e}.") from None
    examples: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise DataError(f"GSM8K file {str(p)!r} line {lineno} is not valid JSON.") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(
            row.get("answer"), str
        ):
            raise DataError(
                f"GSM8K file {str(p)!r} line {lineno} needs string fields 'question' and 'answer'."
            )
        try:
            gold = gsm8k_gold(row["answer"])
        except ValueError as e:
            raise DataError(f"GSM8K file {str(p)!r} line {lineno}: {e}.") from None
        examples.append(
            Example(
                id=f"gsm8k-{len(examples):04d}",
                prompt=math_prompt(row["question"]),
                meta={"family": "gsm8k", "answer": gold, "question": row["question"]},
            )
        )
    if not examples:
        raise DataError(f"GSM8K file {str(p)!r} holds no problems.")
    return examples


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(
            "The math tasks generate problems with reasoning-gym, which is not installed "
            "(it needs Python >= 3.11): pip install reasoning-gym."
        ) from None
    return reasoning_gym


def check_families(families: Sequence[str], *, gsm8k_test: bool) -> tuple[str, ...]:
    """Refuse an empty or duplicated family list and gsm_symbolic when GSM8K is the test set."""
    fams = tuple(f.strip() for f in families)
    if not fams or any(not f for f in fams):
        raise ConfigError("task.families is empty; name at least one reasoning-gym generator.")
    dupes = sorted(f for f, c in Counter(fams).items() if c > 1)
    if dupes:
        raise ConfigError(f"task.families names {', '.join(dupes)} more than once.")
    if gsm8k_test and GSM_SYMBOLIC in fams:
        raise ConfigError(
            "task.families includes gsm_symbolic, whose templates are derived from the GSM8K "
            "test set, so GSM8K test would not be held out. Remove gsm_symbolic, or use "
            "task.name=math (its test split is held-out generator seeds)."
        )
    return fams


class MathTask(Task):
    """Generated math problems (train / eval / test), or GSM8K as the test set."""

    placement: Placement = "user"
    user_template = EXPERIENCE_TEMPLATE
    splits = ("train", "eval", "test")

    def __init__(
        self,
        name: str = "math",
        *,
        families: Sequence[str] = DEFAULT_FAMILIES,
        sizes: dict[str, int] | None = None,
        seed: int = 0,
        test_set: str = "heldout",
        context: str | None = None,
        placement: Placement = "user",
        user_template: str | None = None,
        gsm8k_path: str | Path | None = None,
    ) -> None:
        if test_set not in ("heldout", "gsm8k"):
            raise ConfigError(f"test_set must be 'heldout' or 'gsm8k', not {test_set!r}.")
        self.name = name
        self.test_set = test_set
        self.families = check_families(families, gsm8k_test=test_set == "gsm8k")
        self.sizes = {**DEFAULT_SIZES, **(sizes or {})}
        if test_set == "gsm8k" and "test" not in (sizes or {}):
            self.sizes["test"] = GSM8K_TEST_SIZE  # all of it
        for split, n in self.sizes.items():
            if n < 1:
                raise ConfigError(f"task.{split}_size={n} must be at least 1.")
        self.seed = seed
        self.experience = context if context is not None else DEFAULT_EXPERIENCE
        if not self.experience.strip():
            raise ConfigError("task.context is empty; give the experience text, or leave it unset.")
        self.placement = placement
        self.user_template = user_template or EXPERIENCE_TEMPLATE
        self.gsm8k_path = gsm8k_path
        self._splits: dict[str, list[Example]] = {}
        self._checkers: dict[str, Any] = {}
        self.parse_failures = 0
        """Responses scored so far whose answer could not be read (no box, unparseable)."""

    # ------------------------------------------------------------------ splits

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split not in self._splits:
            if split == "test" and self.test_set == "gsm8k":
                self._splits["test"] = self._load_gsm8k()[: self.sizes["test"]]
            else:
                self._generate()
        return self._splits[split]

    def _load_gsm8k(self) -> list[Example]:
        if self.gsm8k_path is not None:
            return load_gsm8k(self.gsm8k_path)
        from opcd.tasks.fetch import GSM8K_TEST, fetch_data_file

        return load_gsm8k(fetch_data_file(GSM8K_TEST))

    def _generate(self) -> None:
        """Draw every generated split at once, so no problem text repeats across splits."""
        rg = _reasoning_gym()
        unknown = [f for f in self.families if f not in rg.factory.DATASETS]
        if unknown:
            import difflib

            names = sorted(rg.factory.DATASETS)
            hints = []
            for f in unknown:
                close = difflib.get_close_matches(f, names, n=1)
                hints.append(f"{f!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"Unknown reasoning-gym famil{'y' if len(unknown) == 1 else 'ies'}: "
                f"{', '.join(hints)}. Easy ones: {', '.join(DEFAULT_FAMILIES)}."
            )
        order = ("test", "eval", "train") if self.test_set == "heldout" else ("eval", "train")
        seen: set[str] = set()
        for split in order:
            if split not in self._splits:
                self._splits[split] = self._generate_split(rg, split, self.sizes[split], seen)
            else:  # already loaded: still reserve its problems
                seen.update(ex.meta["question"] for ex in self._splits[split])

    def _generate_split(self, rg: Any, split: str, size: int, seen: set[str]) -> list[Example]:
        count = len(self.families)
        out: list[Example] = []
        for i, family in enumerate(self.families):
            quota = size // count + (1 if i < size % count else 0)
            got: list[dict[str, Any]] = []
            for attempt in range(8):
                if len(got) >= quota:
                    break
                data_seed = derive_seed(self.seed, "math", split, family, attempt)
                try:
                    dataset = rg.create_dataset(family, size=quota + quota // 4 + 4, seed=data_seed)
                except Exception as e:
                    raise ConfigError(
                        f"reasoning-gym could not build {family!r}: {type(e).__name__}: {e}"
                    ) from e
                self._checkers.setdefault(family, dataset)
                for item in dataset:
                    q = item["question"]
                    if q in seen:
                        continue
                    seen.add(q)
                    got.append(item)
                    if len(got) >= quota:
                        break
            if len(got) < quota:
                raise DataError(
                    f"reasoning-gym's {family!r} produced only {len(got)} distinct new problems "
                    f"for the {split} split (wanted {quota}); lower task.{split}_size or add "
                    "families."
                )
            for k, item in enumerate(got):
                out.append(
                    Example(
                        id=f"{family}-{split}-{k:05d}",
                        prompt=math_prompt(item["question"]),
                        meta={
                            "family": family,
                            "answer": str(item["answer"]),
                            "question": item["question"],
                            "entry": item,
                        },
                    )
                )
        random.Random(derive_seed(self.seed, "math", split, "order")).shuffle(out)
        return out

    # ------------------------------------------------------------------ context and scoring

    def context(self, example: Example) -> str | None:
        return example.context if example.context is not None else self.experience

    def _checker(self, family: str) -> Any:
        if family == "gsm8k":
            return None
        if family not in self._checkers:
            self._checkers[family] = _reasoning_gym().create_dataset(family, size=1, seed=0)
        return self._checkers[family]

    def grade(self, example: Example, response: str, *, loose: bool = False) -> MathGrade:
        """Grade without touching the counters (``loose``: see :func:`grade_math`)."""
        family = example.meta.get("family", "gsm8k")
        entry = example.meta.get("entry")
        checker = self._checker(family) if entry is not None else None
        return grade_math(response, example.meta["answer"], checker, entry, loose=loose)

    def score(self, example: Example, response: str) -> float:
        g = self.grade(example, response)
        if not g.parsed:
            self.parse_failures += 1
        return float(g.correct)

    def score_details(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
        """Accuracy, parse failures (count and rate), accuracy per family, and
        ``loose_accuracy``: unboxed responses graded on their last number (small models
        often solve a problem and never box the answer; this tells the two apart)."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        grades = [self.grade(ex, r) for ex, r in zip(examples, responses, strict=True)]
        n = len(grades)
        loose = [g if g.parsed else self.grade(ex, r, loose=True)
                 for ex, r, g in zip(examples, responses, grades, strict=True)]
        out = {
            "score": sum(g.correct for g in grades) / n if n else 0.0,
            "n": float(n),
            "parse_failures": float(sum(not g.parsed for g in grades)),
            "loose_accuracy": sum(g.correct for g in loose) / n if n else 0.0,
        }
        out["parse_failure_rate"] = out["parse_failures"] / n if n else 0.0
        by_family: dict[str, list[bool]] = {}
        for ex, g in zip(examples, grades, strict=True):
            by_family.setdefault(ex.meta.get("family", "gsm8k"), []).append(g.correct)
        for family, hits in sorted(by_family.items()):
            out[f"accuracy/{family}"] = sum(hits) / len(hits)
        return out

    def describe(self) -> str:
        test = "GSM8K test" if self.test_set == "gsm8k" else "held-out generator seeds"
        return f"{self.name} (reasoning-gym: {', '.join(self.families)}; test: {test})"
