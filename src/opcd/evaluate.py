"""Evaluation: score a model's responses on a task split, with or without the context.

Responses are sampled in batches with a fixed seed inside a forked RNG (evaluating in the
middle of training never changes the training run's random stream). The result is the
mean score with its standard error and every response, so runs can be compared and read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opcd import rollout
from opcd.chat import encode_chat, student_messages, teacher_messages
from opcd.tasks.base import Task


@dataclass
class EvalResult:
    """Mean score, its standard error, and the scored responses."""

    task: str
    split: str
    with_context: bool
    score: float
    stderr: float
    n: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        where = "with context" if self.with_context else "without context"
        return f"{self.task}/{self.split} {where}: {self.score:.3f} ± {self.stderr:.3f} (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: str = "eval",
    with_context: bool = False,
    size: int | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 1234,
    batch_size: int = 16,
) -> EvalResult:
    """Sample one response per example of ``split`` (the first ``size``) and score it."""
    examples = task.examples(split)
    if size is not None:
        examples = examples[:size]
    build = (lambda ex: teacher_messages(task, ex)) if with_context else student_messages
    prompts = [encode_chat(tokenizer, build(ex)) for ex in examples]
    with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
        torch.manual_seed(seed)
        out = rollout.sample(
            model, tokenizer, prompts, n=1, temperature=temperature, top_p=1.0,
            max_new_tokens=max_new_tokens, batch_size=batch_size,
        )
    records = []
    scores = []
    for i, text in zip(out.prompt_index, out.texts, strict=True):
        s = float(task.score(examples[i], text))
        scores.append(s)
        records.append({"id": examples[i].id, "prompt": examples[i].prompt, "response": text, "score": s})
    mean, se = mean_stderr(scores)
    return EvalResult(task.name, split, with_context, mean, se, len(scores), records)
