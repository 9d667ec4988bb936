"""Other system prompts on training rows: the context's behaviour under a user's own system prompt.

A student trained only on conversations without a system message (the chat template's
default) learns the context's behaviour for that case alone. Under a deployment's own
system prompt S it may then drop S's instructions, or apply the behaviour twice when the
context is given as well (docs/objectives.md measures both on the behaviour suite). With
``task.other_system_prompt_share`` > 0, that share of OPCD's training rows gets a system
message S drawn from a pool: the student sees S, the teacher the context followed by S in
one system message (:func:`opcd.tasks.chat.insert_context`), so the student learns the context's
behaviour *together with* whatever else a system prompt asks (``task.other_system_prompt_mode:
compose``); or the teacher sees S alone (``replace``), so the context becomes the model's
default system prompt, which a user's own replaces, as it would in context. With
``task.other_system_prompt_rows`` = N, such rows come on top of the batch instead: the
step's first N prompts again, each with an S, so the behaviour keeps all of the batch's
rows. Evaluation is unchanged.

The built-in pool (``data/other_system_prompts.txt``) holds 30 role, domain and tone prompts
and 30 prompts with format, length and language rules of the kinds real system prompts ask
for (numbered lists, headings, YAML, XML, a fixed opening or sign-off, sentence counts,
Italian, ...), none of them one of the behaviour suite's own prompts. With the role prompts
alone, ``replace`` students learnt "a system prompt present -> plain prose" and followed
the suite's bullet-point and JSON prompts less; with the rules added they follow them as
the base does (docs/objectives.md, "replace with a pool that has rules").
Where it sits: the trainer's prompt building (:meth:`opcd.training.trainer.Trainer.prompt_pairs`).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Literal

from opcd.errors import DataError
from opcd.tasks.base import Example, derive_seed

BUILTIN_POOL = Path(__file__).parent / "data" / "other_system_prompts.txt"
def load_pool(path: str | Path | None = None) -> list[str]:
    """The non-blank lines of ``path`` (None: the built-in pool), one system prompt each."""
    p = Path(path) if path is not None else BUILTIN_POOL
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"task.other_system_prompts={str(p)!r} does not exist. Point it at a text file with "
            "one system prompt per line, or remove it to use the built-in pool."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"task.other_system_prompts={str(p)!r} cannot be read as UTF-8 text: {e}.") from None
    pool = [line.strip() for line in lines if line.strip()]
    if not pool:
        raise DataError(
            f"task.other_system_prompts={str(p)!r} has no system prompts. Write one per line."
        )
    return pool


@dataclasses.dataclass(frozen=True)
class OtherSystemPrompts:
    """Gives ``share`` of the training rows a system message from ``pool``.

    ``mode`` says what the teacher sees on those rows: ``compose``, the context in front of
    the row's system message (the behaviour holds under any system prompt); ``replace``,
    the row's system message alone (the context acts as the model's default system prompt,
    which a user's own system prompt replaces, as it would in context).
    """

    pool: tuple[str, ...]
    share: float
    seed: int
    mode: Literal["compose", "replace"] = "replace"
    batch_size: int | None = None
    """The batch's rows (``train.batch_size``): rows at this position or later are the extra
    rows of ``task.other_system_prompt_rows`` and always get a system message (None: none)."""

    def apply(self, example: Example, step: int, position: int) -> tuple[Example, bool]:
        """``example``, with a system message from the pool on ``share`` of the draws, and
        whether the teacher sees the context on this row.

        The draw depends on (seed, step, position) only, so a resumed run draws the same
        rows. An example that has a system message of its own keeps it.
        """
        extra = self.batch_size is not None and position >= self.batch_size
        if example.system is not None or (self.share <= 0 and not extra):
            return example, True
        rng = random.Random(derive_seed("other-system-prompt", self.seed, step, position))
        if rng.random() >= self.share and not extra:
            return example, True
        return dataclasses.replace(example, system=rng.choice(self.pool)), self.mode == "compose"
