"""The task interface: where prompts x, contexts c and scores come from.

A task provides examples (a user prompt, optionally a per-example context), the context
the teacher sees and where it goes (the system message, or the user turn through a
template), and a scorer for a response. Training reads the ``train`` split; evaluation
reads ``eval`` (held out by seed). Every task family (system prompts, math, games, ...)
implements :class:`Task`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

Placement = Literal["system", "user"]
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Example:
    """One prompt x, with an optional per-example context c."""

    id: str
    prompt: str
    context: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A source of prompts, the context to distil, and a behaviour scorer."""

    name: str = "task"
    placement: Placement = "system"
    user_template: str = "{context}\n\n{prompt}"

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
