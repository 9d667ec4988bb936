"""Math tasks: answer extraction and grading, GSM8K parsing, splits, the gsm_symbolic guard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from opcd.config import TaskConfig
from opcd.errors import ConfigError, DataError
from opcd.tasks import TASKS, build_task
from opcd.tasks.base import Example
from opcd.tasks.math_problems import (
    MathTask,
    check_families,
    extract_boxed,
    grade_math,
    gsm8k_gold,
    last_number,
    load_gsm8k,
    math_prompt,
)

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then, correcting myself, \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed { 7 }", "7"),
        ("\\boxed{3} and a broken \\boxed{4", "3"),
        ("no box here: 42", None),
        ("\\boxed", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_grade_right_wrong_and_unparseable() -> None:
    right = grade_math("3 + 4 = 7, so \\boxed{7}", "7")
    assert right.correct and right.parsed
    assert grade_math("\\boxed{7.0}", "7").correct  # numerically equal
    assert grade_math("\\boxed{1,000}", "1000").correct
    wrong = grade_math("\\boxed{8}", "7")
    assert not wrong.correct and wrong.parsed
    for unreadable in ("the answer is 7", "\\boxed{}", "\\boxed{" + "9" * 300 + "}"):
        g = grade_math(unreadable, "7")
        assert not g.correct and not g.parsed, unreadable


class _ExactChecker:
    """Stands in for a reasoning-gym dataset's score_answer."""

    def score_answer(self, answer: str | None, entry: dict) -> float:
        return 1.0 if answer == entry["answer"] else 0.01


def test_generator_checker_is_authoritative_for_non_numeric_answers() -> None:
    entry = {"answer": "138/583"}
    assert grade_math("\\boxed{138/583}", "138/583", _ExactChecker(), entry).correct
    # Numerically equal but not in lowest terms: the generator's criterion says wrong.
    g = grade_math("\\boxed{276/1166}", "138/583", _ExactChecker(), entry)
    assert not g.correct and g.parsed
    # For plain numbers math-verify may still accept an equivalent form.
    assert grade_math("\\boxed{-4.0}", "-4", _ExactChecker(), {"answer": "-4"}).correct


def test_gsm8k_gold_and_loader(tmp_path: Path) -> None:
    assert gsm8k_gold("3 + 4 = <<3+4=7>>7\n#### 7") == "7"
    assert gsm8k_gold("... #### 1,234") == "1234"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")
    path = tmp_path / "test.jsonl"
    rows = [
        {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "Half of 10?", "answer": "#### 5"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    examples = load_gsm8k(path)
    assert [e.meta["answer"] for e in examples] == ["7", "5"]
    assert examples[0].id == "gsm8k-0000"
    assert examples[0].prompt == math_prompt(rows[0]["question"])
    assert "\\boxed{}" in examples[0].prompt


@pytest.mark.parametrize(
    "line",
    ['{"question": "q"}', "not json", '["a list"]', '{"question": "q", "answer": "no marker"}'],
)
def test_gsm8k_loader_refuses_bad_rows(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        load_gsm8k(path)


def test_gsm8k_split_from_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(
        "\n".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"})
                  for i in range(5)),
        encoding="utf-8",
    )
    task = MathTask("gsm8k", test_set="gsm8k", gsm8k_path=path)
    test = task.examples("test")
    assert len(test) == 5
    assert task.score(test[2], "\\boxed{3}") == 1.0
    assert task.score(test[2], "3") == 0.0
    assert task.parse_failures == 1
    details = task.score_details(test[:2], ["\\boxed{1}", "I think 2"])
    assert details["score"] == 0.5 and details["parse_failures"] == 1.0
    assert details["accuracy/gsm8k"] == 0.5
    # the unboxed "I think 2" is right on its last number: loose, never strict
    assert details["loose_accuracy"] == 1.0
    details = task.score_details(test[:3], ["\\boxed{7}", "so 1,000 apples, then 2", "no number"])
    assert details["score"] == 0.0 and details["loose_accuracy"] == 1 / 3
    # a wrong boxed answer is not rescued by a right number elsewhere in the text
    assert task.score_details(test[:1], ["1 is it? \\boxed{5}"])["loose_accuracy"] == 0.0


def test_last_number() -> None:
    assert last_number("It costs 1,250 dollars, so 3.5 each") == "3.5"
    assert last_number("a total of 12,345") == "12345"
    assert last_number("points (1,2) and -7") == "-7"
    assert last_number("no digits") is None


# --------------------------------------------------------------------------- guards and registry


def test_gsm_symbolic_is_refused_with_gsm8k_test() -> None:
    with pytest.raises(ConfigError, match="gsm_symbolic.*GSM8K"):
        build_task(TaskConfig(name="gsm8k", families=["basic_arithmetic", "gsm_symbolic"]))
    # With held-out generator seeds as the test set, gsm_symbolic is allowed.
    assert check_families(["gsm_symbolic"], gsm8k_test=False) == ("gsm_symbolic",)
    with pytest.raises(ConfigError, match="more than once"):
        check_families(["gcd", "gcd"], gsm8k_test=False)
    with pytest.raises(ConfigError, match="empty"):
        check_families([], gsm8k_test=False)


def test_registry_errors() -> None:
    assert {"math", "gsm8k", "frozenlake", "sokoban", "safety"} <= set(TASKS)
    with pytest.raises(ConfigError, match="Did you mean 'math'"):
        build_task(TaskConfig(name="maths"))
    with pytest.raises(ConfigError, match="Unknown split 'valid' for task 'math'.*train, eval, test"):
        build_task(TaskConfig(name="math")).examples("valid")
    with pytest.raises(ConfigError, match="Unknown split 'test' for task 'french'"):
        build_task(TaskConfig(name="french")).examples("test")
    with pytest.raises(ConfigError, match="task.prompts"):
        build_task(TaskConfig(name="math", prompts="x.jsonl"))
    with pytest.raises(ConfigError, match="task.families"):
        build_task(TaskConfig(name="sokoban", families=["gcd"]))
    with pytest.raises(ConfigError, match="task.test_size"):
        build_task(TaskConfig(name="french", test_size=5))
    with pytest.raises(ConfigError, match="at least 1"):
        build_task(TaskConfig(name="math", eval_size=0))


def test_context_goes_into_the_user_turn_by_the_paper_template() -> None:
    from opcd.tasks.chat import teacher_messages

    task = build_task(TaskConfig(name="math", context="- EXPERIENCE ITEM: check your work"))
    ex = Example(id="x", prompt=math_prompt("1+1?"), meta={"answer": "2", "family": "gsm8k"})
    (msg,) = teacher_messages(task, ex)
    assert msg["role"] == "user"
    assert msg["content"].startswith("Given previous learned experience:\n# Experience\n")
    assert "- EXPERIENCE ITEM: check your work" in msg["content"]
    assert msg["content"].endswith(ex.prompt)
    custom = build_task(TaskConfig(name="math", user_template="XP {context} / {prompt}"))
    assert teacher_messages(custom, ex)[0]["content"].startswith("XP - EXPERIENCE ITEM:")


# --------------------------------------------------------------------------- generated splits

needs_reasoning_gym = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym needs Python >= 3.11"
)


def _small(seed: int = 0, **kw) -> MathTask:
    return MathTask(
        families=kw.pop("families", ("basic_arithmetic", "gcd", "leg_counting")),
        sizes={"train": 30, "eval": 9, "test": 12}, seed=seed, **kw,
    )


@needs_reasoning_gym
def test_generated_splits_are_deterministic_disjoint_and_sized() -> None:
    a, b = _small(), _small()
    for split, size in (("train", 30), ("eval", 9), ("test", 12)):
        xs, ys = a.examples(split), b.examples(split)
        assert len(xs) == size
        assert [(x.id, x.prompt) for x in xs] == [(y.id, y.prompt) for y in ys]
    questions = {s: {e.meta["question"] for e in a.examples(s)} for s in a.splits}
    assert not questions["train"] & questions["eval"]
    assert not questions["train"] & questions["test"]
    assert not questions["eval"] & questions["test"]
    ids = [e.id for s in a.splits for e in a.examples(s)]
    assert len(ids) == len(set(ids))
    assert {e.meta["family"] for e in a.examples("train")} == {"basic_arithmetic", "gcd", "leg_counting"}
    other = _small(seed=1)
    assert [e.prompt for e in other.examples("test")] != [e.prompt for e in a.examples("test")]


@needs_reasoning_gym
def test_generated_problems_are_scored_with_the_generator() -> None:
    task = _small()
    ex = task.examples("eval")[0]
    gold = ex.meta["answer"]
    assert task.score(ex, f"Reasoning... \\boxed{{{gold}}}") == 1.0
    assert task.score(ex, "\\boxed{not a number at all ???}") == 0.0
    assert task.score(ex, f"The answer is {gold}.") == 0.0  # no box: wrong, counted
    assert task.parse_failures >= 1
    details = task.score_details(task.examples("eval"), ["\\boxed{" + e.meta["answer"] + "}"
                                                         for e in task.examples("eval")])
    assert details["score"] == 1.0 and details["parse_failures"] == 0.0


@needs_reasoning_gym
def test_unknown_family_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown reasoning-gym family.*'gcdd'.*did you mean 'gcd'"):
        _small(families=("gcdd",)).examples("train")


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_real_gsm8k_test_set() -> None:
    task = build_task(TaskConfig(name="gsm8k", train_size=6, eval_size=6))
    test = task.examples("test")
    assert len(test) == 1319
    assert test[0].meta["answer"] == "18"  # Janet's ducks
    assert all(e.meta["answer"] for e in test)
    assert task.score(test[0], "She makes \\boxed{18} dollars.") == 1.0
