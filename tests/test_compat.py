"""opcd's calls into transformers and peft use the installed version's names: no deprecations.

Sampling (the key/value cache loop), the teacher's prefix-cache scoring and the student's
setup (LoRA + activation checkpointing) run on a tiny random model with every Python
warning an error and transformers' logger watched for deprecation messages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from opcd.runtime.compat import (
    NEW_CACHE,
    OLD_CACHE,
    cache_kwarg,
    enable_activation_checkpointing,
    output_cache,
    quiet_library_warnings,
)


class _Handler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def strict() -> Iterator[list[str]]:
    """Warnings raise; yields the messages transformers' logger emits meanwhile."""
    logger = logging.getLogger("transformers")
    handler = _Handler()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()  # a message already logged once in this process would be skipped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _no_deprecation(messages: list[str]) -> None:
    bad = [m for m in messages if "deprecat" in m.lower()]
    assert not bad, f"transformers logged: {bad}"


def _library_name() -> str:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return NEW_CACHE if NEW_CACHE in BaseModelOutputWithPast.__dataclass_fields__ else OLD_CACHE


class _New(nn.Module):
    def forward(self, input_ids: Any = None, cache: Any = None) -> Any:
        return cache


class _Old(nn.Module):
    def forward(self, input_ids: Any = None, past_key_values: Any = None) -> Any:
        return past_key_values


class _Wrapper(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return kwargs


def test_cache_kwarg_follows_the_forward_signature(tiny) -> None:
    assert cache_kwarg(_New()) == NEW_CACHE
    assert cache_kwarg(_Old()) == OLD_CACHE
    assert cache_kwarg(_Wrapper()) == _library_name()
    model, _ = tiny
    assert cache_kwarg(model.get_decoder()) == _library_name()


def test_output_cache_reads_the_output_field() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    marker = object()
    out = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), **{_library_name(): marker})
    assert output_cache(out) is marker

    @dataclass
    class OldOutput:
        last_hidden_state: Any = None
        past_key_values: Any = None

    assert output_cache(OldOutput(past_key_values=marker)) is marker


def test_sampling_and_prefix_scoring_raise_no_deprecation(tiny, strict: list[str]) -> None:
    from opcd.sampling.rollout import sample
    from opcd.teachers.scoring import PrefixStore, cached_response_hidden, uncached_response_hidden

    model, tok = tiny
    base = tok.encode("What is the capital of Italy? " * 4)
    prompts = [base, base + tok.encode(" Bonjour")]
    out = sample(
        model, tok, prompts, n=2, temperature=1.0, max_new_tokens=6, engine="loop", seeds=[3, 4]
    )
    assert all(len(r) > 0 for r in out.response_ids)
    responses = [r or [5] for r in out.response_ids[::2]]
    store = PrefixStore(block=8)
    got = cached_response_hidden(model, prompts, responses, 0, store=store, block=8, min_shared=4)
    want = uncached_response_hidden(model, prompts, responses, 0)
    assert store.misses > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    _no_deprecation(strict)


def test_student_setup_raises_only_silenced_library_warnings(tiny, strict: list[str]) -> None:
    from opcd.config import Config
    from opcd.training.trainer import setup_student

    quiet_library_warnings()  # what the command line does: peft's own deprecated reads
    model, _ = tiny
    cfg = Config()
    cfg.train.gradient_checkpointing = True
    cfg.lora.enabled = True
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    student = setup_student(cfg, model)
    out = student(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    out.logits.sum().backward()
    assert any(p.grad is not None for p in student.parameters() if p.requires_grad)
    _no_deprecation(strict)


def test_enable_activation_checkpointing(tiny, strict: list[str]) -> None:
    model, _ = tiny
    enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    _no_deprecation(strict)
