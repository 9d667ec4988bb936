"""Knowledge distillation: a handbook the model cannot know, and questions with exact answers.

Where it sits in the flow: :func:`opcd.tasks.build_task` makes a :class:`KnowledgeTask`
for ``task.name: knowledge``. The context c is a whole document, by default the handbook
of a fictional organisation (``data/knowledge_handbook.md``, the Brackenloft Tool Library,
35 checkable facts), placed in the teacher's system message. The student sees only a
question ("Who is the treasurer of the Brackenloft Tool Library? Answer in a few words.");
the teacher scores the student's tokens with the handbook in front of it. Training moves
the handbook's *facts* into the weights, which the held-out questions then measure.

Questions (``data/knowledge_questions.jsonl``, or ``task.prompts``): one JSON object per
line, ``{"id", "fact", "split", "question", "answers"}``. ``split`` is ``train`` or
``eval``; the splits come from the file, not from a random draw, because a held-out
question must be *phrased differently* from the training questions about the same fact
(else the eval split measures memorised question text). The packaged file has, for every
fact, two training questions and one differently worded held-out question. The loader
refuses (:class:`~opcd.errors.DataError`, naming the file, the line and the fix): missing
or mistyped fields, an unknown split, an empty answer, duplicate ids, a question asked
twice (in particular a held-out question identical to a training one, after case, spacing
and punctuation are ignored), and a file without a train or an eval question.

Scoring (:func:`answer_matches`): an answer is right when any accepted variant appears in
it as a run of whole tokens after :func:`normalise_tokens`: case and accents, punctuation
and spacing ignored; thousands separators dropped (``1,240`` is ``1240``); numbers compared
as whole numbers with leading zeros ignored (``19`` never matches ``1987``; ``07:30`` is
``7:30``); number words read as digits (``four`` is ``4``, ``forty-five`` is ``45``,
``first`` and ``1st`` are ``1``); a final plural ``s`` ignored (``Tuesdays``). Matching
is containment, so an answer that lists several candidates gets the credit: the prompt
asks for a few words, and :meth:`KnowledgeTask.score_details` reports ``mean_words`` so
hedging shows. ``score_details`` also gives ``accuracy/<fact>`` for every fact scored.

Config (see docs/tasks.md): ``task.context`` / ``task.context_file`` replace the handbook
(the file is read whole, blank lines kept, unlike other tasks' context files) and then
need ``task.prompts`` too, since the packaged questions are about the packaged handbook.
``task.placement`` / ``task.user_template`` work as for every task. ``task.eval_fraction``
is refused when changed from its default (the file's ``split`` field decides), as are
``task.behaviour``, ``task.families`` and the split sizes; ``task.seed`` is not used
(the examples keep the file's order).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opcd.errors import ConfigError, DataError
from opcd.tasks.base import Example, Placement, Task
from opcd.tasks.system_prompt import DATA_DIR, _is_text, read_jsonl_objects

_log = logging.getLogger(__name__)

HANDBOOK_PATH = DATA_DIR / "knowledge_handbook.md"
QUESTIONS_PATH = DATA_DIR / "knowledge_questions.jsonl"
INSTRUCTION = "Answer in a few words."
"""Appended to every question, for student and teacher alike."""
FILE_SPLITS = ("train", "eval")
"""The values of a question's ``split`` field (the task's splits)."""
FIELDS = ("id", "fact", "split", "question", "answers")
_EXAMPLE_ROW = (
    '{"id": "founding-year-eval", "fact": "founding-year", "split": "eval", '
    '"question": "Since which year has the cooperative existed?", "answers": ["1993"]}'
)

# --------------------------------------------------------------------------- normalisation

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
         "eighty": 80, "ninety": 90}
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
             "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10}
_ORDINAL_SUFFIXES = frozenset({"st", "nd", "rd", "th"})
# A comma, apostrophe or thin / no-break space between a digit and exactly three digits.
_THOUSANDS = re.compile(r"(?<=\d)[,'\u2019\u00a0\u202f\u2009](?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\d+|[^\W\d_]+")


def normalise_tokens(text: str) -> list[str]:
    """The tokens answers are compared on: lower-case words and whole numbers.

    Accents are removed and case folded; punctuation and spacing only separate tokens;
    thousands separators are dropped; a number loses its leading zeros unless it follows
    ``.`` or ``:`` after a digit (the ``05`` of ``7.05`` stays); number words up to 99
    and the ordinals ``first`` to ``tenth`` become digits, and ``st`` / ``nd`` / ``rd`` /
    ``th`` glued to a number is dropped; a final ``s`` of a word longer than three letters
    is dropped.
    """
    text = _THOUSANDS.sub("", text)  # before NFKD, which turns thin spaces into spaces
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    raw: list[str] = []
    for m in _TOKEN.finditer(text):
        tok, start = m.group(), m.start()
        if tok.isdigit():
            fraction = start >= 2 and text[start - 1] in ".:" and text[start - 2].isdigit()
            raw.append(tok if fraction else str(int(tok)))
        elif tok in _ORDINAL_SUFFIXES and start > 0 and text[start - 1].isdigit():
            continue
        else:
            raw.append(tok)
    out: list[str] = []
    i = 0
    while i < len(raw):
        tok = raw[i]
        if tok in _TENS:
            value = _TENS[tok]
            if i + 1 < len(raw) and raw[i + 1] in _UNITS and 0 < _UNITS[raw[i + 1]] < 10:
                value += _UNITS[raw[i + 1]]
                i += 1
            out.append(str(value))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        elif tok in _ORDINALS:
            out.append(str(_ORDINALS[tok]))
        elif len(tok) > 3 and tok.endswith("s") and not tok.isdigit():
            out.append(tok[:-1])
        else:
            out.append(tok)
        i += 1
    return out


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` is a contiguous run of ``haystack`` (an empty needle never is)."""
    n = len(needle)
    if n == 0:
        return False
    return any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def answer_matches(response: str, answers: Sequence[str]) -> bool:
    """Whether any accepted answer appears in ``response`` as whole tokens (see
    :func:`normalise_tokens`)."""
    tokens = normalise_tokens(response)
    return any(_contains(tokens, normalise_tokens(a)) for a in answers)


def _question_key(text: str) -> str:
    """A question's text with case, accents, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(re.findall(r"\w+", text))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Question:
    """One row of a questions file."""

    id: str
    fact: str
    split: str
    question: str
    answers: tuple[str, ...]
    line: int


def load_handbook(path: str | Path) -> str:
    """A handbook file's whole text (layout kept, outer blank space stripped).

    A missing, unreadable, non-UTF-8 or blank file is a :class:`DataError` naming it: a
    blank context would make the teacher the student.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(
            f"Handbook {str(p)!r} does not exist. Point task.context_file at a text file "
            "holding the document to distil (or leave it unset for the packaged handbook)."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"Handbook {str(p)!r} is not UTF-8 text (bad byte at offset {e.start}). Save it "
            "as UTF-8."
        ) from None
    except OSError as e:
        raise DataError(f"Handbook {str(p)!r} cannot be read: {e.strerror or e}.") from None
    return check_handbook(text, str(p))


def check_handbook(text: str, where: str) -> str:
    """``text`` stripped; a DataError naming ``where`` when it is blank or holds a NUL."""
    if not text.strip():
        raise DataError(
            f"Handbook {where!r} is empty. Write the document whose facts the questions ask "
            "about into it; an empty context would make the teacher the student."
        )
    if "\x00" in text:
        raise DataError(f"Handbook {where!r} contains a NUL character; is it a text file?")
    return text.strip()


def _field_error(where: str, name: str, need: str) -> DataError:
    return DataError(f"{where}: field {name!r} must be {need}. A line looks like {_EXAMPLE_ROW}.")


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a questions file (see the module docstring); errors name the file,
    the line and the fix."""
    p = Path(path)
    rows = read_jsonl_objects(
        p, setting="task.prompts", shape=_EXAMPLE_ROW,
        fields='"id", "fact", "split", "question" and "answers" fields',
    )
    questions: list[Question] = []
    ids: dict[str, int] = {}
    texts: dict[str, Question] = {}
    for lineno, row in rows:
        where = f"Questions file {str(p)!r} line {lineno}"
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise DataError(
                f"{where} has no field " + ", ".join(repr(k) for k in missing)
                + f". Every line needs {', '.join(FIELDS)}, e.g. {_EXAMPLE_ROW}."
            )
        raw_id = row["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise _field_error(where, "id", "a non-empty string or an integer")
        for name in ("fact", "question"):
            if not isinstance(row[name], str) or not row[name].strip():
                raise _field_error(where, name, "a non-empty string")
        if row["split"] not in FILE_SPLITS:
            raise _field_error(where, "split", f"one of {', '.join(map(repr, FILE_SPLITS))} "
                               f"(eval: held out), not {str(row['split'])[:40]!r}")
        answers = row["answers"]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise _field_error(where, "answers", 'a non-empty list of non-empty strings, '
                               'e.g. ["1993"] or ["Tamsin Achterberg", "Achterberg"]')
        for name, value in [("id", raw_id), ("fact", row["fact"]), ("question", row["question"]),
                            *(("answers", a) for a in answers)]:
            if isinstance(value, str) and (not _is_text(value) or "\x00" in value):
                raise DataError(
                    f"{where}: field {name!r} is not valid Unicode text (a lone surrogate "
                    "escape such as \\ud800, or a NUL character)."
                )
        for a in answers:
            if not normalise_tokens(a):
                raise DataError(
                    f"{where}: answer {a[:40]!r} has no letter or digit, so no response could "
                    "match it. Write the answer itself (a number, a name, a word or two)."
                )
        q = Question(str(raw_id), row["fact"].strip(), row["split"], row["question"].strip(),
                     tuple(a.strip() for a in answers), lineno)
        if q.id in ids:
            raise DataError(
                f"{where}: id {q.id[:80]!r} appears twice (first on line {ids[q.id]}). "
                "Give each question its own id."
            )
        ids[q.id] = lineno
        key = _question_key(q.question)
        if key in texts:
            other = texts[key]
            if other.split != q.split:
                raise DataError(
                    f"{where}: the {q.split} question {q.id!r} is the same text as the "
                    f"{other.split} question {other.id!r} on line {other.line} (case, spacing "
                    "and punctuation ignored). A held-out question must be phrased differently "
                    "from the training questions, or the eval split measures memorised "
                    "question text; reword it."
                )
            raise DataError(
                f"{where}: question {q.id!r} repeats question {other.id!r} on line "
                f"{other.line} (case, spacing and punctuation ignored). Remove one or reword it."
            )
        texts[key] = q
        questions.append(q)
    for split in FILE_SPLITS:
        if not any(q.split == split for q in questions):
            raise DataError(
                f"Questions file {str(p)!r} has no question with \"split\": \"{split}\". It "
                "needs training questions and held-out (eval) questions about the same facts."
            )
    return questions


# --------------------------------------------------------------------------- task


def question_prompt(question: str) -> str:
    """The user turn for ``question`` (the same for student and teacher)."""
    return f"{question.strip()} {INSTRUCTION}"


class KnowledgeTask(Task):
    """Distil a document's facts; score exact short answers to questions about them."""

    splits = FILE_SPLITS

    def __init__(
        self,
        name: str,
        handbook: str,
        questions: Sequence[Question],
        *,
        placement: Placement = "system",
        user_template: str = "{context}\n\n{prompt}",
        source: str = "packaged",
    ) -> None:
        if not handbook or not handbook.strip():
            raise ConfigError("The knowledge task's handbook (task.context) is empty.")
        self.name = name
        self.handbook = handbook
        self.placement = placement
        self.user_template = user_template
        self.source = source
        self._splits: dict[str, list[Example]] = {s: [] for s in FILE_SPLITS}
        for q in questions:
            self._splits[q.split].append(Example(
                id=q.id, prompt=question_prompt(q.question),
                meta={"fact": q.fact, "answers": list(q.answers), "question": q.question},
            ))
        self.facts = sorted({q.fact for q in questions})
        hand_tokens = normalise_tokens(handbook)
        self.unsupported = [q.id for q in questions
                            if not any(_contains(hand_tokens, normalise_tokens(a)) for a in q.answers)]
        """Ids of questions none of whose answers appears in the handbook."""
        if self.unsupported:
            _log.warning(
                "%d of %d knowledge questions have no accepted answer in the handbook (%s%s): "
                "the context cannot teach them. Check the handbook and task.prompts match.",
                len(self.unsupported), len(questions), ", ".join(self.unsupported[:5]),
                ", ..." if len(self.unsupported) > 5 else "",
            )

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        return self._splits[split]

    def context(self, example: Example) -> str | None:
        return example.context if example.context is not None else self.handbook

    def score(self, example: Example, response: str) -> float:
        return float(answer_matches(response, example.meta["answers"]))

    def score_details(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
        """Accuracy (``score``), ``n``, ``mean_words`` (long answers hedge: matching is
        containment), and ``accuracy/<fact>`` for each fact among ``examples``."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        hits = [self.score(ex, r) for ex, r in zip(examples, responses, strict=True)]
        n = len(hits)
        out = {
            "score": sum(hits) / n if n else 0.0,
            "n": float(n),
            "mean_words": sum(len(r.split()) for r in responses) / n if n else 0.0,
        }
        by_fact: dict[str, list[float]] = {}
        for ex, h in zip(examples, hits, strict=True):
            by_fact.setdefault(str(ex.meta.get("fact", ex.id)), []).append(h)
        for fact, fact_hits in sorted(by_fact.items()):
            out[f"accuracy/{fact}"] = sum(fact_hits) / len(fact_hits)
        return out

    def describe(self) -> str:
        return (
            f"{self.name} ({self.source} handbook, {len(self.handbook.split())} words; "
            f"{len(self.facts)} facts; {len(self._splits['train'])} train / "
            f"{len(self._splits['eval'])} held-out questions)"
        )


def build_knowledge_task(
    *,
    context: str | None,
    context_file: str | None,
    prompts: str | None,
    placement: Placement | None,
    user_template: str,
) -> KnowledgeTask:
    """The task from ``task.*`` values (the config checks are the caller's, see
    :func:`opcd.tasks.build_task`)."""
    if context is not None and context_file is not None:
        raise ConfigError("Set task.context or task.context_file, not both.")
    if (context is not None or context_file is not None) and prompts is None:
        key = "task.context" if context is not None else "task.context_file"
        raise ConfigError(
            f"task.name=knowledge with your own handbook ({key}) needs your own questions "
            "too: set task.prompts to a JSONL file of questions about it (the packaged "
            "questions are about the packaged handbook). See docs/tasks.md."
        )
    if context_file is not None:
        handbook, source = load_handbook(context_file), f"{context_file!r}"
    elif context is not None:
        handbook, source = check_handbook(context, "task.context"), "task.context"
    else:
        handbook, source = load_handbook(HANDBOOK_PATH), "packaged"
    questions = load_questions(prompts if prompts is not None else QUESTIONS_PATH)
    return KnowledgeTask("knowledge", handbook, questions, placement=placement or "system",
                         user_template=user_template, source=source)


__all__ = [
    "HANDBOOK_PATH",
    "INSTRUCTION",
    "QUESTIONS_PATH",
    "KnowledgeTask",
    "Question",
    "answer_matches",
    "build_knowledge_task",
    "check_handbook",
    "load_handbook",
    "load_questions",
    "normalise_tokens",
    "question_prompt",
]
