"""The teacher: scores the student's exact response tokens with the context in its prompt.

Modes (``teacher.mode``, resolved by :class:`TeacherWeights`, which the verbal teacher of
:mod:`opcd.teachers.verbal` shares):
- ``frozen`` (default): the student's initial weights, frozen. Under LoRA this is the
  student itself with the adapter switched off (no second copy of the weights);
  otherwise a frozen copy made before training.
- ``model``: a separate frozen model (e.g. a larger one, cross-size) that must share the
  student's tokenizer.
- ``live``: the current student weights, under no_grad.

:meth:`Teacher.response_logits` returns ``[B, R, V]`` logits aligned position by position
with the student's (see :mod:`opcd.teachers.scoring`).

:meth:`Teacher.response_hidden` returns, per row, only the final hidden states
``[len(response), H]`` (the loss projects them to logits chunk by chunk, see
:func:`opcd.objectives.losses.chunked_distill_loss`) and runs each shared context prefix once: the
teacher's prompts are grouped by their common token prefix, whose keys/values are kept in
a :class:`~opcd.teachers.scoring.PrefixStore`. The store is tied to the teacher's weights: it lasts
the whole run for a ``frozen`` or ``model`` teacher (under LoRA: the base weights, which
never change), and is emptied whenever the weights change, i.e. once per step for a
``live`` teacher (detected from the parameters' version counters, so it cannot go stale).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from opcd.teachers.scoring import (
    PackedBatch,
    PrefixStore,
    cached_response_hidden,
    linear_head,
    response_logits,
    uncached_response_hidden,
)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TeacherWeights:
    """The weights a ``teacher.mode`` reads, for every kind of teacher (the log-prob
    :class:`Teacher` here, the verbal teacher of :mod:`opcd.teachers.verbal`).

    ``model``: ``other`` frozen; ``frozen``: under LoRA the student with its adapter off (no
    second copy), else a frozen deep copy of the student made now; ``live``: the student.
    """

    def __init__(self, mode: str, student: nn.Module, other: nn.Module | None = None) -> None:
        self.mode = mode
        self.student = student
        self.adapter_off = False
        self.gathered = False
        """Inside :meth:`whole` with sharded weights (gathered whole)."""
        self.model: nn.Module | None = None
        """The teacher's own weights (a frozen copy or another model); None: the student's."""
        if mode == "model":
            if other is None:
                raise ValueError("teacher mode 'model' needs a teacher model")
            self.model = _freeze(other)
        elif mode == "frozen":
            if hasattr(student, "disable_adapter") and hasattr(student, "peft_config"):
                self.adapter_off = True
            else:
                self.model = _freeze(copy.deepcopy(student))
        elif mode != "live":
            raise ValueError(f"unknown teacher mode {mode!r}; use frozen, model or live")

    @contextlib.contextmanager
    def scorer(self) -> Iterator[nn.Module]:
        """The module to score with: the teacher's own model when it has one, else the
        student in eval mode (with its LoRA adapter off for ``frozen``: the base weights)."""
        if self.model is not None:
            yield self.model
            return
        was_training = self.student.training
        self.student.eval()
        try:
            if self.adapter_off:
                with self.student.disable_adapter():  # type: ignore[operator]
                    yield self.student
            else:
                yield self.student
        finally:
            self.student.train(was_training)

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        """The weights whole for a forward: a no-op unless they are sharded (FSDP: the frozen
        copy's or other model's layers, or a live teacher's student), where every process
        must enter. Re-entrant: inside an outer block (e.g. sampling with the teacher, then
        scoring what it sampled) the weights stay gathered and nothing is collective."""
        from opcd.runtime.sharding import gathered as gather_whole
        from opcd.runtime.sharding import has_shards

        module = self.model if self.model is not None else self.student
        if self.gathered or not has_shards(module):
            yield
            return
        self.gathered = True
        try:
            with gather_whole(module):
                yield
        finally:
            self.gathered = False


class Teacher:
    """Context-conditioned scorer for the student's responses."""

    def __init__(self, mode: str, student: nn.Module, model: nn.Module | None = None) -> None:
        self.mode = mode
        self.weights = TeacherWeights(mode, student, model)
        self.store: PrefixStore | None = None

    @torch.no_grad()
    def response_logits(self, batch: PackedBatch) -> Tensor:
        with self.weights.whole(), self.weights.scorer() as model:
            return response_logits(model, batch)

    def _fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever a weight the teacher reads is modified or replaced.

        Read outside :meth:`TeacherWeights.whole`: a sharded weight counts by its shard (its storage, and
        the version of the sharded parameter, which the optimiser's in-place update bumps);
        gathered copies are new tensors at every gather.
        """
        from torch.distributed.tensor import DTensor

        w = self.weights
        model = w.model if w.model is not None else w.student
        return tuple(
            ((p.to_local() if isinstance(p, DTensor) else p).data_ptr(), p._version)
            for name, p in model.named_parameters()
            if not (w.adapter_off and "lora_" in name)
        )

    @torch.no_grad()
    def response_hidden(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        pad_id: int,
        *,
        prefix_cache: bool = True,
        batch_size: int = 8,
        block: int = 64,
        cache_tokens: int = 16384,
        min_shared: int = 16,
    ) -> list[Tensor]:
        """Per row, the teacher's final hidden states predicting its response tokens.

        ``prompts`` are the teacher prompts (context included). With ``prefix_cache`` each
        group of rows sharing a prompt prefix runs it once, and block-aligned prefixes are
        kept across calls while the weights stay the same; without, every row runs in full.
        """
        store = self.prefix_store(block, cache_tokens) if prefix_cache else None
        with self.weights.whole(), self.weights.scorer() as model:
            if store is None:
                return uncached_response_hidden(model, prompts, responses, pad_id, batch_size=batch_size)
            return cached_response_hidden(
                model, prompts, responses, pad_id, store=store, batch_size=batch_size,
                block=block, min_shared=min_shared,
            )

    def prefix_store(self, block: int = 64, cache_tokens: int = 16384) -> PrefixStore:
        """The store of the teacher's prefix keys/values, emptied if its weights changed since
        it was filled (read it inside :meth:`TeacherWeights.scorer`, e.g. to sample with the
        context: :func:`opcd.sampling.rollout.sample`'s ``prefix_store``). Inside
        :meth:`TeacherWeights.whole` the weights cannot change and are not checked: call this
        once before entering it."""
        if self.store is None or self.store.block != block or self.store.max_tokens != cache_tokens:
            self.store = PrefixStore(block=block, max_tokens=cache_tokens)
        if not self.weights.gathered:  # gathered copies are new tensors: check before gathering
            self.store.check(self._fingerprint())
        return self.store

    def head(self) -> tuple[Tensor | Callable[[Tensor], Tensor], Tensor | None]:
        """The teacher's output head: ``(weight, bias)``, or ``(callable, None)`` when the head
        is not a plain linear layer (e.g. LoRA on the head of a live teacher)."""
        with self.weights.scorer() as model:
            module = model.get_output_embeddings()
            if module is None:
                raise TypeError(f"{type(model).__name__} has no output head")
            if self.weights.adapter_off and hasattr(module, "base_layer"):
                module = module.base_layer  # adapter off: the base head alone
            plain = linear_head(module)
        if plain is not None:
            return plain[0].detach(), None if plain[1] is None else plain[1].detach()
        return self.logits_from_hidden, None

    @torch.no_grad()
    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """The teacher's logits (fp32) from hidden states of :meth:`response_hidden`."""
        with self.weights.whole(), self.weights.scorer() as model:
            return model.get_output_embeddings()(hidden).float()

    @property
    def separate_model(self) -> nn.Module | None:
        """The teacher's own weights when it has them (frozen copy or other model)."""
        return self.weights.model
