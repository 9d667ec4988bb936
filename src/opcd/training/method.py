"""A training method as three parts that the one training step composes.

Where it sits: :meth:`opcd.training.trainer.Trainer.train_step` runs the same step for every method
built from parts::

    rows = method.sampler.sample(idx)          # who writes the responses, without the context
    targets = method.scorer.score(rows)        # what the student is pulled towards
    for each micro-batch:                      # the student reads its rows without the context
        loss, figures = method.objective.loss(rows, targets, sl, totals, weight)
        loss.backward()
    one optimiser step                         # Trainer.optimizer_step, shared

- OPCD (:mod:`opcd.methods.onpolicy`): the student's own rollout; the teacher reading the context,
  the prompt and the student's tokens (local model or server); ``loss.objective`` over
  top-k slots plus the rest bucket.
- Off-policy CD (:mod:`opcd.methods.offpolicy`): the teacher's own responses, generated once and
  stored; their stored top-k log-probs; ``offpolicy.loss`` (forward KL or SFT).
- OVD (:mod:`opcd.methods.ovd_method`): OPCD's sampler; the verbal teacher's 0-9 verdicts (poor
  responses replaced by teacher text) as group-normalised advantages; a clipped policy
  gradient.

Which settings each method supports is :data:`opcd.config.METHODS`. The parts read the run's
shared state (student, teacher, config, step) through :class:`Host`, which the trainer is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from opcd.config import Config
from opcd.runtime.distributed import Dist
from opcd.sampling.multiturn import EpisodeRollout
from opcd.sampling.rollout import Rollout
from opcd.tasks import Task
from opcd.tasks.base import Example
from opcd.tasks.chat import PromptPair


@dataclass
class Rows:
    """A step's rows: the prompt pairs (without / with the context), the responses (one row
    per response; ``roll.prompt_index`` maps a row to its pair), and the sampler's own
    figures for the step record (a game's episodes; the off-policy store's new / reused)."""

    pairs: list[PromptPair]
    roll: Rollout
    figures: dict[str, float] = field(default_factory=dict)
    stored: list[dict[str, Any]] | None = None
    """The stored records the rows were read from, one per row (off-policy CD: the teacher's
    responses with their top-k)."""
    played: EpisodeRollout | None = None
    """Games: the episodes the rows are the moves of."""
    problems: list[Example] = field(default_factory=list)
    """Games: the problem of each group of ``rollout.n`` episodes, in order."""

    @property
    def responses(self) -> list[list[int]]:
        return self.roll.response_ids


@dataclass
class Targets:
    """The scorer's reading of a step's rows: per row a sparse top-k reading (a server
    teacher's scores, stored teacher log-probs), or the local teacher's response hidden
    states, or neither (the objective then runs the teacher per micro-batch), or per row an
    advantage (OVD); ``seconds`` counts the time spent in the teacher, ``figures`` go to the
    step record."""

    sparse: list[Any] | None = None
    hidden: list[torch.Tensor] | None = None
    advantages: torch.Tensor | None = None
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


Totals = list[float]
"""The whole (global) batch's response tokens, non-empty responses, rows and truncated rows:
what the loss is normalised by, summed over processes."""


class Host(Protocol):
    """What the parts read of the run: the trainer's shared state."""

    cfg: Config
    dist: Dist
    student: nn.Module
    teacher: Any
    tokenizer: Any
    task: Task
    train_examples: list[Example]
    device: torch.device
    pad_id: int
    step: int
    backend: Any
    """The student's sampler (:mod:`opcd.sampling.rollout_backends`)."""
    max_prompt_tokens: int

    def prompt_pairs(self, idx: list[int], positions: list[int] | None = None) -> list[PromptPair]: ...

    def say(self, msg: str) -> None: ...


class Sampler(Protocol):
    """Writes the step's responses for the training examples ``idx`` (this process's share)."""

    def sample(self, idx: list[int]) -> Rows: ...


class Scorer(Protocol):
    """Attaches to every row what the student is trained towards."""

    def score(self, rows: Rows) -> Targets: ...


class Objective(Protocol):
    """The loss of one micro-batch of rows (the slice ``sl``), normalised over the global
    batch (``totals``) and times ``weight``, with its per-token figures: each is summed over
    the batch and reported per token under its name in ``figures``."""

    figures: tuple[str, ...]

    def loss(self, rows: Rows, targets: Targets, sl: slice, totals: Totals, weight: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Method:
    """A method's three parts, how its step record is shown, and the run-folder state its
    parts keep (``open(run_dir)``, before the first step or a restore; e.g. the off-policy
    teacher responses)."""

    sampler: Sampler
    scorer: Scorer
    objective: Objective
    format_step: Callable[[dict[str, Any]], str]
    postfix: Callable[[dict[str, Any]], dict[str, str]]
    open: Callable[[Path], None] | None = None
