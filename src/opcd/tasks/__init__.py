"""Tasks: prompts, contexts and scorers. ``build_task(cfg.task)`` makes one from a config.

Built-in tasks:
- ``french``: distil "Always answer in French" (the demo); 320 everyday English prompts,
  scored by language identification.
- ``system_prompt``: your own system prompt (``task.context``), prompts
  (``task.prompts``, JSONL) and scorer (``task.behaviour``).
"""

from __future__ import annotations

import difflib

from opcd.config import TaskConfig
from opcd.errors import ConfigError
from opcd.tasks.base import Example, Task
from opcd.tasks.system_prompt import DATA_DIR, FRENCH_SYSTEM_PROMPT, SystemPromptTask, load_prompts

TASKS = ("french", "system_prompt")


def build_task(cfg: TaskConfig) -> Task:
    """Make the task a config names, with its overrides applied."""
    if cfg.name == "french":
        return SystemPromptTask(
            "french",
            cfg.context or FRENCH_SYSTEM_PROMPT,
            load_prompts(cfg.prompts or DATA_DIR / "general_questions.jsonl"),
            cfg.behaviour or "language:fr",
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
            placement=cfg.placement or "system",
            user_template=cfg.user_template,
        )
    if cfg.name == "system_prompt":
        missing = [k for k in ("context", "prompts", "behaviour") if not getattr(cfg, k)]
        if missing:
            raise ConfigError(
                "task.name=system_prompt needs " + ", ".join(f"task.{k}" for k in missing)
                + " (the system prompt, a JSONL file of prompts, and a scorer such as language:fr)."
            )
        assert cfg.context and cfg.prompts and cfg.behaviour
        return SystemPromptTask(
            "system_prompt",
            cfg.context,
            load_prompts(cfg.prompts),
            cfg.behaviour,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
            placement=cfg.placement or "system",
            user_template=cfg.user_template,
        )
    close = difflib.get_close_matches(cfg.name, TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"Unknown task {cfg.name!r}.{hint} Available tasks: {', '.join(TASKS)}.")


__all__ = ["TASKS", "Example", "Task", "build_task"]
