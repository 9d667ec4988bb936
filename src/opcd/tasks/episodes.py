"""Multi-turn episodes: the interface between text environments and a training loop.

An :class:`Episode` is one play-through of a text environment. It knows nothing about
models: it shows an observation, takes the model's reply as raw text, parses an action
out of it, applies it and answers with a :class:`StepResult`
``(observation, done, success, invalid)``. A reply it cannot parse is an *invalid move*:
counted, logged, answered with an observation that says so, and it uses up a move (so an
episode always ends within its move limit); it never raises.

The conversation a model sees is a list of ``(role, content)`` turns: the task's first
user turn (rules and the initial observation), then alternating ``assistant`` replies and
``user`` observations. :func:`conversation_messages` turns it into chat messages, with
the context (for the teacher) in the system message or folded into the first user turn.

A loop plays episodes with :func:`play_episodes`, given a *policy*: a function from a
batch of message lists to a batch of reply texts (for example, the student sampling
without the context). For OPCD on games the loop records each assistant turn with the
messages it was generated from; the teacher scores the same reply tokens given
``conversation_messages(turns, context=...)`` up to that turn.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

_log = logging.getLogger("opcd.episodes")

Turn = tuple[str, str]
"""``(role, content)`` with role ``user`` or ``assistant``."""

BatchPolicy = Callable[[list[list[dict[str, str]]]], list[str]]
"""Given a batch of chat message lists, return one reply text per list."""


class StepResult(NamedTuple):
    """What one move did: the new observation text, and whether the episode is over."""

    observation: str
    done: bool
    success: bool
    invalid: bool


class Episode(ABC):
    """One play-through of a text environment, driven by raw reply texts."""

    max_moves: int = 5

    def __init__(self) -> None:
        self.moves = 0
        """Moves used so far (invalid replies included)."""
        self.invalid_moves = 0
        self.done = False
        self.success = False
        self.actions: list[str | None] = []
        """The parsed action of each move (None: the reply could not be read)."""

    # -- what a concrete environment provides

    @abstractmethod
    def parse_action(self, text: str) -> str | None:
        """The action in ``text``, or None if there is no readable one."""

    @abstractmethod
    def _apply(self, action: str) -> tuple[str, bool, bool]:
        """Apply a valid action: ``(what happened, episode over, success)``."""

    @abstractmethod
    def render(self) -> str:
        """The current state as text (for example a grid)."""

    @abstractmethod
    def instructions(self) -> str:
        """The rules and the reply format, shown once at the start."""

    # -- shared behaviour

    def observation_text(self) -> str:
        """The current observation: the rendered state and the moves left."""
        return f"{self.render()}\n{self._status_line()}"

    def first_prompt(self) -> str:
        """The first user turn: rules, then the initial observation."""
        return f"{self.instructions()}\n\nCurrent state:\n{self.observation_text()}"

    def _status_line(self) -> str:
        if self.done:
            return "The game is over: you won." if self.success else "The game is over: you lost."
        left = self.max_moves - self.moves
        return f"Moves left: {left}. Your next action?"

    def step(self, action_text: str) -> StepResult:
        """Play the reply ``action_text``; raises RuntimeError if the episode is already over."""
        if self.done:
            raise RuntimeError("This episode is over; start a new one.")
        self.moves += 1
        action = self.parse_action(action_text)
        self.actions.append(action)
        if action is None:
            self.invalid_moves += 1
            _log.info(
                "invalid move %d (unreadable action) in reply %r", self.moves, action_text[-120:]
            )
            what, over, success = (
                "That reply had no valid action, so you did not move. Reply with exactly one "
                "of [up], [down], [left], [right].",
                False,
                False,
            )
        else:
            what, over, success = self._apply(action)
        if over:
            self.done, self.success = True, success
        elif self.moves >= self.max_moves:
            self.done = True
            what += " You have used all your moves."
        observation = f"Move {self.moves}/{self.max_moves}: {what}\n{self.observation_text()}"
        return StepResult(observation, self.done, self.success, action is None)


@dataclass
class EpisodeResult:
    """A finished episode: the conversation and the outcome."""

    example_id: str
    turns: list[Turn]
    success: bool
    moves: int
    invalid_moves: int
    actions: list[str | None] = field(default_factory=list)


def conversation_messages(
    turns: Sequence[Turn],
    *,
    context: str | None = None,
    placement: str = "system",
    user_template: str = "{context}\n\n{prompt}",
) -> list[dict[str, str]]:
    """Chat messages for ``turns``; ``context`` (if any) goes in a system message or,
    with ``placement="user"``, into the first user turn through ``user_template``."""
    messages = [{"role": role, "content": content} for role, content in turns]
    if messages and messages[0]["role"] != "user":
        raise ValueError("a conversation starts with a user turn")
    for a, b in zip(messages, messages[1:], strict=False):
        if a["role"] == b["role"]:
            raise ValueError("user and assistant turns must alternate")
    if not context:
        return messages
    if placement == "system":
        return [{"role": "system", "content": context}, *messages]
    if messages:
        from opcd.tasks.chat import fill_template  # lazily: opcd.tasks.chat imports this package

        first = fill_template(user_template, context, messages[0]["content"])
        messages[0] = {"role": "user", "content": first}
    return messages


def play_episodes(
    episodes: Sequence[Episode],
    example_ids: Sequence[str],
    policy: BatchPolicy,
    *,
    context: str | None = None,
    placement: str = "system",
    user_template: str = "{context}\n\n{prompt}",
) -> list[EpisodeResult]:
    """Play ``episodes`` in lockstep: each round, one batched ``policy`` call for every
    episode still running. ``context`` is shown to the policy (in-context runs)."""
    turns: list[list[Turn]] = [[("user", ep.first_prompt())] for ep in episodes]
    while True:
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        if not live:
            break
        batch = [
            conversation_messages(
                turns[i], context=context, placement=placement, user_template=user_template
            )
            for i in live
        ]
        replies = policy(batch)
        if len(replies) != len(live):
            raise ValueError(f"the policy returned {len(replies)} replies for {len(live)} prompts")
        for i, reply in zip(live, replies, strict=True):
            result = episodes[i].step(reply)
            turns[i].append(("assistant", reply))
            turns[i].append(("user", result.observation))
    return [
        EpisodeResult(eid, t, ep.success, ep.moves, ep.invalid_moves, list(ep.actions))
        for eid, t, ep in zip(example_ids, turns, episodes, strict=True)
    ]


def episode_summary(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """Success rate, mean moves, invalid moves in all and per episode."""
    n = len(results)
    if not n:
        return {"success_rate": 0.0, "n": 0.0, "mean_moves": 0.0, "invalid_moves": 0.0}
    invalid = sum(r.invalid_moves for r in results)
    return {
        "success_rate": sum(r.success for r in results) / n,
        "n": float(n),
        "mean_moves": sum(r.moves for r in results) / n,
        "invalid_moves": float(invalid),
        "invalid_moves_per_episode": invalid / n,
    }
