"""The knowledge task: packaged data integrity, the exact-answer scorer, building from a
config, where the handbook goes, and bad input."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import build_tokenizer

from opcd.config import TaskConfig
from opcd.errors import ConfigError, DataError
from opcd.tasks import TASKS, build_task
from opcd.tasks.chat import encode_chat, student_messages, teacher_messages
from opcd.tasks.knowledge import (
    HANDBOOK_PATH,
    INSTRUCTION,
    QUESTIONS_PATH,
    KnowledgeTask,
    answer_matches,
    load_handbook,
    load_questions,
    normalise_tokens,
)


def _rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in QUESTIONS_PATH.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold()))


# ============================================================================ packaged data


def test_packaged_questions_load_and_cover_every_fact_in_both_splits() -> None:
    questions = load_questions(QUESTIONS_PATH)
    assert len(questions) == len(_rows())
    by_fact: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "eval": 0})
    for q in questions:
        by_fact[q.fact][q.split] += 1
    assert len(by_fact) >= 30
    for fact, counts in by_fact.items():
        assert counts["train"] >= 2, fact
        assert counts["eval"] >= 1, fact


def test_held_out_questions_are_phrased_differently() -> None:
    questions = load_questions(QUESTIONS_PATH)
    train = [q for q in questions if q.split == "train"]
    train_texts = {" ".join(sorted(_words(q.question))) for q in train}
    for q in questions:
        if q.split != "eval":
            continue
        assert " ".join(sorted(_words(q.question))) not in train_texts, q.id
        for t in train:
            if t.fact == q.fact:
                a, b = _words(q.question), _words(t.question)
                overlap = len(a & b) / len(a | b)
                assert overlap < 0.5, (q.id, t.id, overlap)  # another wording, not a paraphrase


def test_every_question_names_the_organisation_and_answers_are_short_and_consistent() -> None:
    answers_by_fact: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for row in _rows():
        # the student sees only the question: it must say what it is about
        assert "brackenloft" in row["question"].casefold(), row["id"]
        for a in row["answers"]:
            assert len(a.split()) <= 3 and len(a) <= 24, (row["id"], a)
        answers_by_fact[row["fact"]].add(tuple(row["answers"]))
    assert all(len(v) == 1 for v in answers_by_fact.values())  # one fact, one answer set


def test_every_answer_is_in_the_handbook() -> None:
    """The facts are in the context: every accepted answer appears in the handbook."""
    handbook = load_handbook(HANDBOOK_PATH)
    tokens = normalise_tokens(handbook)
    for row in _rows():
        for a in row["answers"]:
            assert _contains(tokens, normalise_tokens(a)), (row["id"], a)
    assert 600 <= len(handbook.split()) <= 900


def test_canonical_answers_are_distinct_facts() -> None:
    """No two facts share an answer, so a right answer to one question is never the right
    answer to another fact's question by accident."""
    first = {}
    for row in _rows():
        first.setdefault(row["fact"], row["answers"][0])
    assert len(set(first.values())) == len(first)


# ============================================================================ scorer


@pytest.mark.parametrize(
    ("response", "answers", "expected"),
    [
        ("It was founded in 1993.", ["1993"], True),
        ("It was founded in 1987.", ["1993"], False),
        ("Since 1987", ["19"], False),  # numbers match whole
        ("19", ["1987"], False),
        ("In 11993?", ["1993"], False),
        ("It opens at 17:30.", ["7:30"], False),
        ("It opens at 07:30 a.m.", ["7:30"], True),
        ("7.30", ["7:30"], True),
        ("The treasurer is IFEOMA   KARLSVIK!", ["Ifeoma Karlsvik", "Karlsvik"], True),
        ("Ms. Karlsvik handles that.", ["Ifeoma Karlsvik", "Karlsvik"], True),
        ("Ifeoma handles that.", ["Ifeoma Karlsvik", "Karlsvik"], False),
        ("1,240 members", ["1240"], True),
        ("1 240 members", ["1240"], False),  # a plain space is not a thousands separator
        ("1\u202f240 members", ["1240"], True),
        ("four tools", ["4"], True),
        ("Up to 4.", ["four"], True),
        ("forty-five minutes", ["45 minutes"], True),
        ("45 min", ["45 minutes"], False),
        ("on the 1st Sunday of the month", ["first Sunday"], True),
        ("Closed on Tuesdays.", ["Tuesday"], True),
        ("Closed on Thursday.", ["Tuesday"], False),
        ("copperfinch-42", ["copperfinch42"], True),
        ("copperfinch4", ["copperfinch42"], False),
        ('"The Sprocket"', ["The Sprocket", "Sprocket"], True),
        ("Margery Old", ["Old Margery"], False),
        ("", ["1993"], False),
        ("Mireille Dunstablé", ["Mireille Dunstable"], True),
    ],
)
def test_answer_matches(response: str, answers: list[str], expected: bool) -> None:
    assert answer_matches(response, answers) is expected


def test_normalise_tokens() -> None:
    assert normalise_tokens("Zoë's 1,240 CAFÉS, 007!") == ["zoe", "s", "1240", "cafe", "7"]
    assert normalise_tokens("7.05 and 7.5") == ["7", "05", "and", "7", "5"]  # fractions keep zeros
    assert normalise_tokens("twenty one, ninety") == ["21", "90"]


def test_score_details_per_fact_accuracy() -> None:
    task = build_task(TaskConfig(name="knowledge"))
    assert isinstance(task, KnowledgeTask)
    train = task.examples("train")
    year = [ex for ex in train if ex.meta["fact"] == "founding-year"]
    town = [ex for ex in train if ex.meta["fact"] == "town"]
    assert len(year) == 2 and len(town) == 2
    examples = year + town
    responses = ["1993.", "It was 1992.", "Osterwick", "In Osterwick, by the river."]
    assert [task.score(ex, r) for ex, r in zip(examples, responses, strict=True)] == [1, 0, 1, 1]
    details = task.score_details(examples, responses)
    assert details["score"] == pytest.approx(0.75)
    assert details["n"] == 4
    assert details["accuracy/founding-year"] == pytest.approx(0.5)
    assert details["accuracy/town"] == pytest.approx(1.0)
    assert details["mean_words"] == pytest.approx((1 + 3 + 1 + 5) / 4)
    assert not any(k.startswith("accuracy/") and k[9:] not in ("founding-year", "town")
                   for k in details)
    with pytest.raises(ValueError, match="4 examples but 3 responses"):
        task.score_details(examples, responses[:3])


# ============================================================================ the task


def test_task_builds_from_config_with_file_splits() -> None:
    assert "knowledge" in TASKS
    task = build_task(TaskConfig(name="knowledge"))
    rows = _rows()
    train, held = task.examples("train"), task.examples("eval")
    assert [ex.id for ex in train] == [r["id"] for r in rows if r["split"] == "train"]
    assert [ex.id for ex in held] == [r["id"] for r in rows if r["split"] == "eval"]
    assert {ex.meta["fact"] for ex in held} <= {ex.meta["fact"] for ex in train}
    for ex in train + held:
        assert ex.prompt == f"{ex.meta['question']} {INSTRUCTION}"
        assert ex.context is None
    with pytest.raises(ConfigError, match="its splits are train, eval"):
        task.examples("test")
    assert task.unsupported == []
    assert "35 facts" in task.describe()
    # the order is the file's: task.seed changes nothing
    other = build_task(TaskConfig(name="knowledge", seed=7))
    assert [ex.id for ex in other.examples("train")] == [ex.id for ex in train]


def test_teacher_sees_the_handbook_and_the_student_does_not() -> None:
    task = build_task(TaskConfig(name="knowledge"))
    handbook = load_handbook(HANDBOOK_PATH)
    ex = task.examples("eval")[0]
    s_msgs, t_msgs = student_messages(ex), teacher_messages(task, ex)
    assert s_msgs == [{"role": "user", "content": ex.prompt}]
    assert t_msgs == [{"role": "system", "content": handbook},
                      {"role": "user", "content": ex.prompt}]
    assert "\n\n## Who's who\n\n" in handbook  # read whole: paragraphs kept
    tok = build_tokenizer()
    s_text = tok.decode(encode_chat(tok, s_msgs))
    t_text = tok.decode(encode_chat(tok, t_msgs))
    assert "Ifeoma Karlsvik" in t_text and "Ifeoma Karlsvik" not in s_text
    assert ex.prompt in s_text and ex.prompt in t_text


def test_user_placement_puts_the_handbook_in_the_user_turn() -> None:
    task = build_task(TaskConfig(name="knowledge", placement="user",
                                 user_template="Handbook:\n{context}\n\nQuestion: {prompt}"))
    ex = task.examples("train")[0]
    (msg,) = teacher_messages(task, ex)
    assert msg["role"] == "user"
    assert msg["content"].startswith("Handbook:\n# Brackenloft Tool Library")
    assert msg["content"].endswith(f"\n\nQuestion: {ex.prompt}")


def _write_questions(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _q(id_: str, split: str, question: str, answers: list[str], fact: str = "f") -> dict[str, Any]:
    return {"id": id_, "fact": fact, "split": split, "question": question, "answers": answers}


OWN = [
    _q("a1", "train", "What colour is the Zeltwick gate?", ["teal"], "gate"),
    _q("a2", "eval", "Visitors to Zeltwick pass a gate painted which shade?", ["teal"], "gate"),
]


def test_own_handbook_file_and_questions(tmp_path: Path) -> None:
    hb = tmp_path / "handbook.md"
    hb.write_text("# Zeltwick\n\nThe gate is teal.\n\nThe well is 30 metres deep.\n",
                  encoding="utf-8")
    qs = _write_questions(tmp_path / "q.jsonl", OWN)
    task = build_task(TaskConfig(name="knowledge", context_file=str(hb), prompts=str(qs)))
    ex = task.examples("eval")[0]
    assert task.context(ex) == "# Zeltwick\n\nThe gate is teal.\n\nThe well is 30 metres deep."
    assert task.score(ex, "Teal.") == 1.0
    inline = build_task(TaskConfig(name="knowledge", context="The gate is teal.", prompts=str(qs)))
    assert inline.context(ex) == "The gate is teal."


def test_questions_the_handbook_cannot_answer_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    qs = _write_questions(tmp_path / "q.jsonl", OWN)
    with caplog.at_level(logging.WARNING, logger="opcd.tasks.knowledge"):
        task = build_task(TaskConfig(name="knowledge", context="The gate is red.", prompts=str(qs)))
    assert isinstance(task, KnowledgeTask)
    assert task.unsupported == ["a1", "a2"]
    assert "2 of 2 knowledge questions have no accepted answer in the handbook" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"eval_fraction": 0.5}, "task.eval_fraction"),
        ({"behaviour": "contains:x"}, "task.behaviour"),
        ({"train_size": 10}, "task.train_size"),
        ({"families": ["gcd"]}, "task.families"),
        ({"context": "Some handbook."}, "needs your own questions too"),
        ({"context_file": "handbook.md"}, "needs your own questions too"),
        ({"context": "x", "context_file": "y", "prompts": "z"}, "not both"),
    ],
)
def test_config_keys_it_does_not_use_are_refused(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_task(TaskConfig(name="knowledge", **overrides))


# ============================================================================ bad input


def test_empty_handbook_is_refused(tmp_path: Path) -> None:
    hb = tmp_path / "empty.md"
    hb.write_text("\n  \n", encoding="utf-8")
    qs = _write_questions(tmp_path / "q.jsonl", OWN)
    with pytest.raises(DataError, match=r"Handbook '.*empty\.md' is empty\. Write the document"):
        build_task(TaskConfig(name="knowledge", context_file=str(hb), prompts=str(qs)))
    with pytest.raises(DataError, match="does not exist. Point task.context_file"):
        build_task(TaskConfig(name="knowledge", context_file=str(tmp_path / "nope.md"),
                              prompts=str(qs)))
    with pytest.raises(DataError, match="'task.context' is empty"):
        build_task(TaskConfig(name="knowledge", context="   ", prompts=str(qs)))


def _bad(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_questions(path)
    text = str(e.value)
    assert "bad.jsonl" in text
    return text


GOOD_TRAIN = json.dumps(OWN[0])
GOOD_EVAL = json.dumps(OWN[1])


def test_missing_field(tmp_path: Path) -> None:
    row = {k: v for k, v in OWN[1].items() if k != "answers"}
    text = _bad(tmp_path, [GOOD_TRAIN, json.dumps(row)])
    assert "line 2 has no field 'answers'" in text
    assert "Every line needs id, fact, split, question, answers" in text


def test_duplicate_ids(tmp_path: Path) -> None:
    row = dict(OWN[1], id="a1")
    text = _bad(tmp_path, [GOOD_TRAIN, "", json.dumps(row)])
    assert "line 3: id 'a1' appears twice (first on line 1)" in text
    assert "Give each question its own id" in text


def test_held_out_question_identical_to_a_training_question(tmp_path: Path) -> None:
    row = dict(OWN[1], question="what colour is the ZELTWICK gate")  # case, punctuation differ
    text = _bad(tmp_path, [GOOD_TRAIN, json.dumps(row)])
    assert "line 2: the eval question 'a2' is the same text as the train question 'a1' on line 1" in text
    assert "must be phrased differently" in text


def test_repeated_training_question(tmp_path: Path) -> None:
    row = dict(OWN[0], id="a3")
    text = _bad(tmp_path, [GOOD_TRAIN, json.dumps(row), GOOD_EVAL])
    assert "line 2: question 'a3' repeats question 'a1' on line 1" in text


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"split": "test"}, "field 'split' must be one of 'train', 'eval'"),
        ({"answers": []}, "field 'answers' must be a non-empty list"),
        ({"answers": "teal"}, "field 'answers' must be a non-empty list"),
        ({"answers": ["teal", 3]}, "field 'answers' must be a non-empty list"),
        ({"answers": ["?!"]}, "has no letter or digit"),
        ({"question": "  "}, "field 'question' must be a non-empty string"),
        ({"fact": None}, "field 'fact' must be a non-empty string"),
        ({"id": True}, "field 'id' must be a non-empty string or an integer"),
        ({"question": "Which \ud800?"}, "not valid Unicode"),
    ],
)
def test_bad_fields(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    text = _bad(tmp_path, [GOOD_TRAIN, json.dumps(dict(OWN[1], **change))])
    assert "line 2" in text and needle in text


def test_bad_file_shape(tmp_path: Path) -> None:
    assert "line 2 is not valid JSON" in _bad(tmp_path, [GOOD_TRAIN, "{oops", GOOD_EVAL])
    assert "line 1 is a list, not a JSON object" in _bad(tmp_path, ["[1]"])
    assert 'no question with "split": "eval"' in _bad(tmp_path, [GOOD_TRAIN])
    assert 'no question with "split": "train"' in _bad(tmp_path, [GOOD_EVAL])
    with pytest.raises(DataError, match="does not exist. Point task.prompts"):
        load_questions(tmp_path / "missing.jsonl")


def test_bad_questions_file_through_the_config(tmp_path: Path) -> None:
    qs = _write_questions(tmp_path / "q.jsonl", [OWN[0], dict(OWN[1], id="a1")])
    with pytest.raises(DataError, match=r"q\.jsonl' line 2: id 'a1' appears twice"):
        build_task(TaskConfig(name="knowledge", prompts=str(qs)))
