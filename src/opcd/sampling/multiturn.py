"""On-policy rollouts over multi-turn episodes (text games), for OPCD training.

The student plays each episode to its end without the context: at every move it samples
one reply from the conversation so far, the environment answers with an observation
(:mod:`opcd.tasks.episodes`), and the next move is sampled from the longer conversation.
Every model-generated turn becomes one training row:

- student prompt: the conversation up to that turn, without the context;
- teacher prompt: the same conversation with the context (experience) placed as the task
  says;
- response: the exact tokens the student sampled for that turn (up to its EOS).

Environment text is only ever in prompts, so it is never in the loss; earlier replies are
in the prompt of later turns, as in the episode. For a causal model this gives the same
per-token loss as one packed episode with the environment tokens masked, and it reuses the
single-turn machinery unchanged (teacher prefix reuse, chunked loss, normalisation over
the batch's trained tokens). Each reply is seeded from (run seed, step, position in the
global batch, sample, move), so episodes do not depend on the batch layout or the number
of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase

from opcd.errors import DataError
from opcd.sampling import rollout
from opcd.sampling.rollout_backends import HFBackend, RolloutBackend
from opcd.tasks.base import Example, Task, derive_seed
from opcd.tasks.chat import PromptPair, encode_chat
from opcd.tasks.episodes import Episode, EpisodeResult, Turn


class EpisodeTask(Protocol):
    """What a task offers for multi-turn play (:class:`opcd.tasks.games.GameTask`)."""

    def new_episode(self, example: Example) -> Episode: ...

    def messages(
        self, example: Example, turns: Sequence[Turn], *, with_context: bool
    ) -> list[dict[str, str]]: ...


def is_multiturn(task: Task) -> bool:
    """True for tasks played as episodes (games)."""
    return bool(getattr(task, "multi_turn", False)) and callable(getattr(task, "new_episode", None))


@dataclass
class EpisodeRollout:
    """The training rows of a batch of played episodes."""

    pairs: list[PromptPair]
    """One per trained turn."""
    rollout: rollout.Rollout
    """``prompt_index[i] == i``: row ``i`` answers ``pairs[i]``."""
    episodes: list[EpisodeResult]
    turn_of: list[tuple[int, int]]
    """(episode, move) of each row."""

    def summary(self) -> dict[str, float]:
        n = max(len(self.episodes), 1)
        return {
            "episode_success": sum(e.success for e in self.episodes) / n,
            "episode_moves": sum(e.moves for e in self.episodes) / n,
            "invalid_moves": float(sum(e.invalid_moves for e in self.episodes)),
        }


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], limit: int,
         truncate: bool, where: str) -> list[int]:
    ids = encode_chat(tokenizer, messages)
    if len(ids) > limit:
        if not truncate:
            raise DataError(
                f"{where}: the conversation is {len(ids)} tokens, over "
                f"rollout.max_prompt_tokens={limit}. Raise the limit, lower "
                "rollout.max_new_tokens (shorter replies), or set rollout.truncate_prompts=true."
            )
        ids = ids[len(ids) - limit :]
    return ids


def play_for_training(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    positions: Sequence[int],
    *,
    seed: int,
    step: int,
    n: int = 1,
    **kw: Any,
) -> EpisodeRollout:
    """Play ``n`` episodes per example with the student (no context), in lockstep.

    ``positions``: each example's place in the step's global batch (for the seeds); ``kw``:
    sampling settings of :func:`play`.
    """
    plays = [(ex, derive_seed("episode", seed, step, pos, j))
             for ex, pos in zip(examples, positions, strict=True) for j in range(n)]
    return play(model, tokenizer, task, [ex for ex, _ in plays], [s for _, s in plays], **kw)


def play(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    seeds: Sequence[int],
    *,
    with_context: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_tokens: int = 4096,
    truncate: bool = False,
    backend: RolloutBackend | None = None,
) -> EpisodeRollout:
    """Play one episode per example with ``model`` sampling its replies, in lockstep.

    ``seeds``: one per episode (move ``m`` samples with a seed derived from it and ``m``).
    ``with_context``: the model sees the context (the in-context reference); the rows'
    teacher prompts always have it. ``backend``: who samples (default: :func:`opcd.sampling.rollout.sample`
    on ``model`` with ``batch_size``; the trainer passes its ``rollout.backend``).
    """
    sampler = backend or HFBackend(model, tokenizer, batch_size=batch_size)
    game: Any = task
    episodes = [game.new_episode(ex) for ex in examples]
    turns: list[list[Turn]] = [[("user", ep.first_prompt())] for ep in episodes]
    pairs: list[PromptPair] = []
    out = rollout.Rollout([], [], [], [])
    turn_of: list[tuple[int, int]] = []
    move = 0
    while True:
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        if not live:
            break
        s_prompts = []
        for i in live:
            where = f"Example {examples[i].id!r}, move {move + 1}"
            s_prompts.append(_ids(tokenizer, game.messages(examples[i], turns[i], with_context=with_context),
                                  max_prompt_tokens, truncate, where))
        roll = sampler.sample(
            s_prompts, n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            seeds=[derive_seed("move", seeds[i], move) for i in live],
        )
        for k, i in enumerate(live):
            ex = examples[i]
            t_ids = s_prompts[k] if with_context else _ids(
                tokenizer, game.messages(ex, turns[i], with_context=True), max_prompt_tokens,
                truncate, f"Example {ex.id!r}, move {move + 1} (teacher)")
            pairs.append(PromptPair(ex, s_prompts[k], t_ids))
            out.prompt_index.append(len(out.response_ids))
            out.response_ids.append(roll.response_ids[k])
            out.texts.append(roll.texts[k])
            out.truncated.append(roll.truncated[k])
            turn_of.append((i, move))
            result = episodes[i].step(roll.texts[k])
            turns[i].append(("assistant", roll.texts[k]))
            turns[i].append(("user", result.observation))
        move += 1
    results = [
        EpisodeResult(ex.id, t, ep.success, ep.moves, ep.invalid_moves, list(ep.actions))
        for ex, t, ep in zip(examples, turns, episodes, strict=True)
    ]
    return EpisodeRollout(pairs, out, results, turn_of)
