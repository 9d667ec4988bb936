"""The task interface: where prompts x, contexts c and scores come from.

A task provides examples (a user prompt, optionally a per-example context), the context
the teacher sees and where it goes (the system message, or the user turn through a
template), and a scorer for a response. Training reads the ``train`` split; evaluation
reads ``eval`` (validation, held out by seed); tasks with a final held-out set also have
``test``. A task names its splits in ``splits``; asking for one it lacks is a ConfigError
that lists them. Every task family (system prompts, math, games, ...) implements
:class:`Task`. Multi-turn tasks (text games) add an episode interface, see
:mod:`opcd.tasks.episodes`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opcd.errors import ConfigError, DataError

Placement = Literal["system", "user"]
SPLITS = ("train", "eval", "test")
"""Every split name a task may have; each task lists its own in :attr:`Task.splits`."""


def derive_seed(*parts: object) -> int:
    """A 32-bit seed from ``parts`` (stable across processes, unlike ``hash``)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


@dataclass(frozen=True)
class Example:
    """One prompt x, with an optional per-example context c and system message."""

    id: str
    prompt: str
    context: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    """The conversation's own system message, which student and teacher both see (the
    teacher's with the context in front, see :func:`opcd.tasks.chat.insert_context`); None: the
    chat template's default."""


class Task(ABC):
    """A source of prompts, the context to distil, and a behaviour scorer."""

    name: str = "task"
    placement: Placement = "system"
    user_template: str = "{context}\n\n{prompt}"
    splits: tuple[str, ...] = ("train", "eval")
    """The splits this task has (a subset of :data:`SPLITS`)."""
    multi_turn: bool = False
    """True for tasks played as episodes (see :mod:`opcd.tasks.episodes`)."""

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """The examples of ``split`` (``train`` or ``eval``), in a fixed order."""

    @abstractmethod
    def context(self, example: Example) -> str | None:
        """The context the teacher sees for ``example`` (None: no context)."""

    @abstractmethod
    def score(self, example: Example, response: str) -> float:
        """How well ``response`` shows the wanted behaviour, in [0, 1]."""

    def describe(self) -> str:
        return self.name

    def check_split(self, split: str) -> None:
        """Raise a ConfigError listing this task's splits if it has no ``split``."""
        if split not in self.splits:
            raise ConfigError(
                f"Unknown split {split!r} for task {self.name!r}: its splits are "
                f"{', '.join(self.splits)}."
            )

    def score_details(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
        """Aggregate scores of ``responses`` (one per example): at least ``score`` and ``n``.

        Tasks add their own figures (parse failures, per-class rates, ...).
        """
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        scores = [float(self.score(ex, r)) for ex, r in zip(examples, responses, strict=True)]
        return {"score": sum(scores) / len(scores) if scores else 0.0, "n": float(len(scores))}


def read_context_file(path: str | Path, what: str = "task.context_file") -> str:
    """The context held in a file: its non-blank lines (stripped of trailing spaces), joined.

    A missing, unreadable or empty file is a :class:`DataError` (an empty context would
    silently make the teacher the student); ``what`` names the setting in its message.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {str(p)!r} does not exist. Check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {str(p)!r} cannot be read as UTF-8 text ({e}).") from None
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(
            f"{what} {str(p)!r} holds no context (no non-blank line). An experience "
            "file has one item per line; run `opcd extract` to make one, or give another file."
        )
    return "\n".join(lines)
