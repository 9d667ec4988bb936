"""System-prompt distillation: a system prompt, user prompts, and a behaviour scorer.

The teacher sees the system prompt in the system message; the student sees the same
conversation without it. The prompts come from a JSONL file (one object per line with a
``prompt`` field, optional ``id`` and ``context``), split into train / eval by seed. The
behaviour scorer is named by a spec (``language:fr`` scores 1 when the response is in
French) or a list of specs that must all hold; the specs are those of
:mod:`opcd.tasks.behaviours`, whose suite of realistic system prompts the ``suite`` task
draws from.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError, DataError
from opcd.tasks.base import Example, Placement, Task
from opcd.tasks.behaviours import BehaviourRules, build_rules, describe_rules

DATA_DIR = Path(__file__).parent / "data"

FRENCH_SYSTEM_PROMPT = (
    "Always answer in French, whatever the language of the question. "
    "Toujours répondre en français."
)


def _is_text(value: str) -> bool:
    """Encodable as UTF-8 (JSON escapes can smuggle in lone surrogates, which are not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl_objects(
    path: str | Path,
    *,
    setting: str = "task.prompts",
    shape: str = '{"prompt": "..."}',
    fields: str = 'a "prompt" field',
) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their line numbers (blank lines skipped).

    The shared first pass of the JSONL loaders: the file must exist and be UTF-8 (a leading
    byte-order mark is allowed), and every non-blank line one JSON object; anything else is
    a :class:`DataError` naming the file and line. ``setting`` (the config key that points
    at the file), ``shape`` (one line's form) and ``fields`` (the fields a line needs) only
    word the messages. The rows' fields are left to the caller to check.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"Dataset {str(p)!r} does not exist. Point {setting} at a JSONL file with one "
            f"{shape} object per line."
        )
    if not p.is_file():
        raise DataError(f"Dataset {str(p)!r} is not a file. Point {setting} at a JSONL file.")
    try:
        # utf-8-sig: a leading byte-order mark (written by some editors) is not an error.
        with p.open(encoding="utf-8-sig", errors="strict", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"Dataset {str(p)!r} is not UTF-8 text (bad byte at offset {e.start})."
        ) from None
    except OSError as e:
        raise DataError(f"Dataset {str(p)!r} cannot be read: {e.strerror or e}.") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"Dataset {str(p)!r} line {lineno} is not valid JSON ({e.msg}). "
                "Each line must be one JSON object."
            ) from None
        except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
            raise DataError(
                f"Dataset {str(p)!r} line {lineno} cannot be read as JSON "
                f"({type(e).__name__}). Each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"Dataset {str(p)!r} line {lineno} is a {type(row).__name__}, not a JSON object "
                f"with {fields}."
            )
        rows.append((lineno, row))
    return rows


def load_prompts(path: str | Path) -> list[Example]:
    """Read a JSONL prompt file; errors name the file and line and say how to fix them.

    The file is untrusted input: every row is checked (a JSON object, a non-empty string
    ``prompt``, an optional string ``context`` and string or integer ``id``, valid Unicode)
    and every problem is a :class:`DataError`. The text is kept as data, never interpreted.
    """
    p = Path(path)
    examples: list[Example] = []
    seen: set[str] = set()
    for lineno, row in read_jsonl_objects(p):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            fields = ", ".join(sorted(repr(k)[:40] for k in row)[:12]) or "none"
            raise DataError(
                f"Dataset {str(p)!r} line {lineno} has no non-empty string field \"prompt\" "
                f"(fields present: {fields}). Add it or remove the line."
            )
        ctx = row.get("context")
        if ctx is not None and (not isinstance(ctx, str) or not ctx.strip()):
            raise DataError(
                f"Dataset {str(p)!r} line {lineno}: field \"context\" must be a non-empty string "
                "or absent (absent: the task's context is used)."
            )
        raw_id = row.get("id", f"line-{lineno}")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise DataError(
                f"Dataset {str(p)!r} line {lineno}: field \"id\" must be a non-empty string or "
                "an integer (or absent: the line number is used)."
            )
        for name, value in (("prompt", prompt), ("context", ctx), ("id", raw_id)):
            if isinstance(value, str) and not _is_text(value):
                raise DataError(
                    f"Dataset {str(p)!r} line {lineno}: field \"{name}\" is not valid Unicode "
                    "text (it holds a lone surrogate escape such as \\ud800)."
                )
        ex_id = str(raw_id)
        if ex_id in seen:
            raise DataError(f"Dataset {str(p)!r} line {lineno}: id {ex_id[:80]!r} appears twice.")
        seen.add(ex_id)
        examples.append(Example(id=ex_id, prompt=prompt, context=ctx))
    if not examples:
        raise DataError(
            f"Dataset {str(p)!r} is empty. Add at least two prompts (one per line) so that "
            "some can be held out for evaluation."
        )
    return examples


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> dict[str, list[Example]]:
    """Shuffle by ``seed`` and hold out ``eval_fraction`` (at least one example each side)."""
    if len(examples) < 2:
        raise DataError(
            f"The dataset has {len(examples)} prompt; at least 2 are needed (train and eval)."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    return {
        "eval": [examples[i] for i in order[:n_eval]],
        "train": [examples[i] for i in order[n_eval:]],
    }


def behaviour_scorer(spec: str | Sequence[str]) -> BehaviourRules:
    """The response scorer ``task.behaviour`` names: a spec such as ``language:fr``, or a list
    of specs (1 when all hold). ConfigError on an unknown name or a bad argument, listing the
    valid forms (see :mod:`opcd.tasks.behaviours`)."""
    return build_rules(spec)


class SystemPromptTask(Task):
    """Distil a system prompt; score the behaviour it causes."""

    def __init__(
        self,
        name: str,
        system_prompt: str,
        examples: list[Example],
        behaviour: str | Sequence[str],
        *,
        eval_fraction: float = 0.25,
        seed: int = 0,
        placement: Placement = "system",
        user_template: str = "{context}\n\n{prompt}",
        label: str | None = None,
    ) -> None:
        if not system_prompt or not system_prompt.strip():
            raise ConfigError("The task's context (system prompt) is empty; set task.context.")
        self.name = name
        self.system_prompt = system_prompt
        self.placement = placement
        self.user_template = user_template
        self.behaviour = behaviour
        self.label = label
        self._rules = behaviour_scorer(behaviour)
        self._splits = split_examples(examples, eval_fraction, seed)

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        return self._splits[split]

    def context(self, example: Example) -> str | None:
        return example.context if example.context is not None else self.system_prompt

    def score(self, example: Example, response: str) -> float:
        return self._rules(response)

    def score_details(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
        """``score`` and ``n``; with several rules also each rule's rate (keyed by its spec)
        and ``all_rules``, the share meeting them all (which is the score)."""
        if len(self._rules.specs) == 1:
            return super().score_details(examples, responses)
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        rates = self._rules.rates(responses)
        return {"score": rates["all_rules"], "n": float(len(responses)), **rates}

    def describe(self) -> str:
        name = f"{self.name}/{self.label}" if self.label else self.name
        return f"{name} (behaviour {describe_rules(self.behaviour)})"
