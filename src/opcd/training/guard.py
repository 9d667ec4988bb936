"""The collapse guard: notice a student that is breaking, stop, and keep the last good state.

A falling loss is not evidence of learning: a divergence can be lowered by wrecking the
model (the student's mass leaking out of the top-k slots, its answers turning to garbage).
The training loop (:func:`opcd.training.loop.train`) hands this guard every step's figures and
every evaluation's, and the guard compares them with their values at the start:

- the student's entropy at its own sampled positions (``guard.max_entropy_rise`` nats above
  the first step's), and its top-k mass (below ``guard.min_topk_mass_ratio`` of the first
  step's): a per-step bound must be crossed ``guard.patience`` steps in a row;
- the evaluation's quality figure (how natural the frozen base model, given the context,
  finds the answers, in nats per token, see :mod:`opcd.eval.evaluate`): more than
  ``guard.max_quality_drop`` nats per token below the start's.

Past a bound it raises an :class:`Alarm` naming the figures. The loop then warns
(``guard.action: warn``) or, by default, stops, puts back the last state that passed every
check, and saves that as the run's final model. The last good state is a copy of the
trainable weights: after every passing step when they are small (LoRA adapters), else after
every passing evaluation (full fine-tuning: one copy of the model, refreshed at the
``eval.every`` cadence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opcd.config import GuardConfig

__all__ = ["Alarm", "CollapseGuard"]

PER_STEP_SNAPSHOT_BYTES = 256 * 2**20
"""Trainable weights up to this size are copied after every passing step; larger ones only
after passing evaluations."""


@dataclass
class Alarm:
    """A bound crossed at ``step``: what, with the numbers."""

    step: int
    reasons: list[str]

    def text(self) -> str:
        return "; ".join(self.reasons)


class CollapseGuard:
    """Watches one run's figures against their start values and keeps the last good state."""

    def __init__(self, cfg: GuardConfig, params: list[nn.Parameter],
                 history: list[dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.params = params
        size = sum(p.numel() * p.element_size() for p in params)
        self.per_step = size <= PER_STEP_SNAPSHOT_BYTES
        self.start_entropy: float | None = None
        self.start_mass: float | None = None
        self.start_quality: float | None = None
        self.streak = 0
        self.good: tuple[int, list[torch.Tensor]] | None = None
        self._pending: tuple[int, list[torch.Tensor]] | None = None
        for rec in history or []:  # a resumed run: the start values of its first records
            if rec.get("type") == "train" and "student_entropy" in rec and self.start_entropy is None:
                self._set_start(rec)
            if (rec.get("type") == "eval" and rec.get("step") == 0 and not rec.get("with_context")
                    and rec.get("quality") is not None):
                self.start_quality = float(rec["quality"])

    @property
    def enabled(self) -> bool:
        return self.cfg.action != "off"

    def _set_start(self, m: dict[str, Any]) -> None:
        self.start_entropy = float(m["student_entropy"])
        self.start_mass = float(m["student_topk_mass"])

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def mark_good(self, step: int) -> None:
        """The current weights (after ``step`` updates) are known good: the run's start, or a
        resumed checkpoint."""
        if self.enabled:
            self.good = (step, self._copy())
            self._pending = None

    def after_step(self, m: dict[str, Any]) -> Alarm | None:
        """Check a finished step's figures (they measure the weights before its update)."""
        if not self.enabled or m.get("skipped") or "student_entropy" not in m:
            return None  # (OVD's steps carry no per-token figures: its evaluations are checked)
        if self.start_entropy is None:
            self._set_start(m)
        assert self.start_entropy is not None and self.start_mass is not None
        reasons = []
        h, mass = float(m["student_entropy"]), float(m["student_topk_mass"])
        if h > self.start_entropy + self.cfg.max_entropy_rise:
            reasons.append(f"the student's entropy rose from {self.start_entropy:.2f} to {h:.2f} "
                           f"nats (bound: +{self.cfg.max_entropy_rise:g}, guard.max_entropy_rise)")
        if mass < self.cfg.min_topk_mass_ratio * self.start_mass:
            reasons.append(f"its top-k mass fell from {self.start_mass:.3f} to {mass:.3f} (bound: "
                           f"{self.cfg.min_topk_mass_ratio:g}x, guard.min_topk_mass_ratio)")
        step = int(m["step"])
        if reasons:
            self.streak += 1
            if self.per_step:
                self._pending = None  # the weights this step measured are suspect
            if self.streak >= self.cfg.patience:
                return Alarm(step, reasons + [f"{self.streak} steps in a row"])
            return None
        self.streak = 0
        if self.per_step:
            # The figures measured the weights after step - 1 updates: those are good now.
            if self._pending is not None and self._pending[0] == step - 1:
                self.good = self._pending
            self._pending = (step, self._copy())
        return None

    def after_eval(self, step: int, quality: float | None, final: bool = False) -> Alarm | None:
        """Check an evaluation (without the context) of the weights after ``step`` updates;
        ``final``: the run's last one, held to ``guard.max_final_quality_drop``."""
        if not self.enabled or quality is None:
            return None
        if self.start_quality is None:
            self.start_quality = quality
        drop, key = ((self.cfg.max_final_quality_drop, "guard.max_final_quality_drop") if final
                     else (self.cfg.max_quality_drop, "guard.max_quality_drop"))
        if quality < self.start_quality - drop:
            return Alarm(step, [
                f"the answers' quality (how natural the base model finds them given the context) "
                f"fell from {self.start_quality:.2f} to {quality:.2f} (bound: -{drop:g}, {key}"
                f"{', for the final model' if final else ''})"])
        if self.streak == 0 and step > 0:
            if not self.per_step:
                self.good = (step, self._copy())
            elif self._pending is not None and self._pending[0] == step:
                self.good = self._pending
                self._pending = None
        return None

    @torch.no_grad()
    def restore(self) -> int:
        """Put the last good weights back; the number of updates they hold."""
        if self.good is None:
            raise RuntimeError("the collapse guard holds no good state (guard.action is off)")
        step, saved = self.good
        for p, v in zip(self.params, saved, strict=True):
            p.copy_(v)
        return step
