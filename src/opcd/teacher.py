"""The teacher: scores the student's exact response tokens with the context in its prompt.

Modes (``teacher.mode``):
- ``frozen`` (default): the student's initial weights, frozen. Under LoRA this is the
  student itself with the adapter switched off (no second copy of the weights);
  otherwise a frozen copy made before training.
- ``model``: a separate frozen model (e.g. a larger one, cross-size) that must share the
  student's tokenizer.
- ``live``: the current student weights, under no_grad.

:meth:`Teacher.response_logits` returns ``[B, R, V]`` logits aligned position by position
with the student's (see :mod:`opcd.scoring`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from opcd.scoring import PackedBatch, response_logits


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Teacher:
    """Context-conditioned scorer for the student's responses."""

    def __init__(self, mode: str, student: nn.Module, model: nn.Module | None = None) -> None:
        self.mode = mode
        self._student = student
        self._uses_adapter_off = False
        if mode == "model":
            if model is None:
                raise ValueError("teacher mode 'model' needs a teacher model")
            self._model: nn.Module | None = _freeze(model)
        elif mode == "frozen":
            if hasattr(student, "disable_adapter") and hasattr(student, "peft_config"):
                self._model = None
                self._uses_adapter_off = True
            else:
                self._model = _freeze(copy.deepcopy(student))
        elif mode == "live":
            self._model = None
        else:
            raise ValueError(f"unknown teacher mode {mode!r}; use frozen, model or live")

    @contextlib.contextmanager
    def _scorer(self) -> Iterator[nn.Module]:
        if self._model is not None:
            yield self._model
            return
        was_training = self._student.training
        self._student.eval()
        try:
            if self._uses_adapter_off:
                with self._student.disable_adapter():  # type: ignore[operator]
                    yield self._student
            else:
                yield self._student
        finally:
            self._student.train(was_training)

    @torch.no_grad()
    def response_logits(self, batch: PackedBatch) -> Tensor:
        with self._scorer() as model:
            return response_logits(model, batch)

    @property
    def separate_model(self) -> nn.Module | None:
        """The teacher's own weights when it has them (frozen copy or other model)."""
        return self._model
