"""Tasks: prompts, contexts and scorers. ``build_task(cfg.task)`` makes one from a config.

Built-in tasks:
- ``french``: distil "Always answer in French" (the demo); 320 everyday English prompts,
  scored by language identification.
- ``system_prompt``: your own system prompt (``task.context``), prompts
  (``task.prompts``, JSONL) and scorer (``task.behaviour``: a spec of
  :mod:`opcd.tasks.behaviours` such as ``max_words:50``, or a list of specs that must all
  hold).
- ``suite``: one entry of the built-in behaviour suite, named by ``task.behaviour``
  (``lowercase_replies``, ``json_api``, ...): its system prompt, the ``french`` task's
  everyday prompts, scored by its spec (see :mod:`opcd.tasks.behaviours`).
- ``math``: reasoning-gym problems (``task.families``), answers in ``\\boxed{}``; test =
  held-out generator seeds. ``gsm8k``: the same train / eval, the GSM8K test set as test.
- ``frozenlake``, ``sokoban``: multi-turn text games (see :mod:`opcd.tasks.games`).
- ``safety``: judge requests harmful or not (AdvBench, HarmBench vs. benign requests).
- ``knowledge``: a fictional organisation's handbook as the context, questions with short
  exact answers; train and held-out questions (phrased differently) from the questions
  file (see :mod:`opcd.tasks.knowledge`).

The generated tasks have splits ``train``, ``eval`` and ``test`` sized by
``task.train_size`` / ``eval_size`` / ``test_size``; see docs/tasks.md.
"""

from __future__ import annotations

import dataclasses
import difflib

from opcd.config import TaskConfig
from opcd.errors import ConfigError
from opcd.tasks.base import SPLITS, Example, Task
from opcd.tasks.behaviours import suite_entry
from opcd.tasks.system_prompt import DATA_DIR, FRENCH_SYSTEM_PROMPT, SystemPromptTask, load_prompts

TASKS = ("french", "system_prompt", "suite", "math", "gsm8k", "frozenlake", "sokoban", "safety",
         "knowledge")

_DEFAULT_TEMPLATE = next(
    f.default for f in dataclasses.fields(TaskConfig) if f.name == "user_template"
)
_DEFAULT_EVAL_FRACTION = next(
    f.default for f in dataclasses.fields(TaskConfig) if f.name == "eval_fraction"
)


def _split_sizes(cfg: TaskConfig) -> dict[str, int]:
    """The ``task.<split>_size`` values that are set, checked positive."""
    sizes = {}
    for split in SPLITS:
        n = getattr(cfg, f"{split}_size")
        if n is not None:
            if n < 1:
                raise ConfigError(f"Config value task.{split}_size={n} must be at least 1.")
            sizes[split] = n
    return sizes


def _check_unused(cfg: TaskConfig, *, families: bool = False) -> None:
    """Refuse keys the built-in generated tasks do not read (rather than ignore them)."""
    unused = [k for k in ("prompts", "behaviour") if getattr(cfg, k)]
    if cfg.families is not None and not families:
        unused.append("families")
    if unused:
        raise ConfigError(
            f"task.name={cfg.name} does not use "
            + ", ".join(f"task.{k}" for k in unused)
            + "; remove it (task.families is for math and gsm8k; task.prompts and "
            "task.behaviour are for system_prompt, french and suite)."
        )


def _template(cfg: TaskConfig) -> str | None:
    """The user template the config sets, or None to keep the task's own."""
    return None if cfg.user_template == _DEFAULT_TEMPLATE else cfg.user_template


def build_task(cfg: TaskConfig) -> Task:
    """Make the task a config names, with its overrides applied."""
    if cfg.name == "knowledge":
        return _knowledge(cfg)
    if cfg.context_file is not None:
        from opcd.tasks.base import read_context_file

        if cfg.context is not None:
            raise ConfigError("Set task.context or task.context_file, not both.")
        cfg = dataclasses.replace(cfg, context=read_context_file(cfg.context_file), context_file=None)
    if cfg.name in ("french", "system_prompt", "suite"):
        extra = [k for k in ("families", "train_size", "eval_size", "test_size")
                 if getattr(cfg, k) is not None]
        if extra:
            raise ConfigError(
                f"task.name={cfg.name} does not use " + ", ".join(f"task.{k}" for k in extra)
                + "; it splits task.prompts by task.eval_fraction into train and eval."
            )
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
    if cfg.name == "suite":
        entry = suite_entry(cfg.behaviour)
        return SystemPromptTask(
            "suite",
            cfg.context or entry.system_prompt,
            load_prompts(cfg.prompts or DATA_DIR / "general_questions.jsonl"),
            entry.behaviour,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
            placement=cfg.placement or "system",
            user_template=cfg.user_template,
            label=entry.name,
        )
    if cfg.name in ("math", "gsm8k"):
        from opcd.tasks.math_problems import DEFAULT_FAMILIES, MathTask

        _check_unused(cfg, families=True)
        return MathTask(
            cfg.name,
            families=cfg.families if cfg.families is not None else DEFAULT_FAMILIES,
            sizes=_split_sizes(cfg),
            seed=cfg.seed,
            test_set="gsm8k" if cfg.name == "gsm8k" else "heldout",
            context=cfg.context,
            placement=cfg.placement or "user",
            user_template=_template(cfg),
        )
    if cfg.name in ("frozenlake", "sokoban"):
        from opcd.tasks.games import GameTask

        _check_unused(cfg)
        return GameTask(
            cfg.name,
            sizes=_split_sizes(cfg),
            seed=cfg.seed,
            context=cfg.context,
            placement=cfg.placement or "user",
            user_template=_template(cfg),
        )
    if cfg.name == "safety":
        from opcd.tasks.safety import SafetyTask

        _check_unused(cfg)
        return SafetyTask(
            "safety",
            sizes=dict(_split_sizes(cfg)),
            seed=cfg.seed,
            context=cfg.context,
            placement=cfg.placement or "system",
            user_template=cfg.user_template,
        )
    close = difflib.get_close_matches(cfg.name, TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"Unknown task {cfg.name!r}.{hint} Available tasks: {', '.join(TASKS)}.")


def _knowledge(cfg: TaskConfig) -> Task:
    """``task.name: knowledge``; its handbook file is read whole (blank lines kept), so it
    does not go through the line-based ``task.context_file`` reading of the other tasks."""
    from opcd.tasks.knowledge import build_knowledge_task

    unused = [f"task.{k}" for k in ("behaviour", "families", "train_size", "eval_size", "test_size")
              if getattr(cfg, k) is not None]
    if cfg.eval_fraction != _DEFAULT_EVAL_FRACTION:
        unused.append("task.eval_fraction")
    if unused:
        raise ConfigError(
            "task.name=knowledge does not use " + ", ".join(unused) + "; remove it. Its "
            "splits come from the questions file's \"split\" field (train / eval), because "
            "a held-out question must be phrased differently from the training ones, and it "
            "scores exact answers (no task.behaviour)."
        )
    return build_knowledge_task(
        context=cfg.context, context_file=cfg.context_file, prompts=cfg.prompts,
        placement=cfg.placement, user_template=cfg.user_template,
    )


__all__ = ["TASKS", "Example", "Task", "build_task"]
