"""Python entry points behind the CLI commands that are not the training loop itself."""

from __future__ import annotations

from pathlib import Path

from opcd.config import config_from_dict, read_yaml
from opcd.evaluate import EvalResult, evaluate


def evaluate_model(
    model: str,
    task: str,
    *,
    split: str = "eval",
    with_context: bool = False,
    size: int | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 1234,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    records_path: str | Path | None = None,
) -> EvalResult:
    """Load ``model`` and score it on ``task``'s ``split`` (``opcd eval``).

    ``records_path``: a JSONL file the records are appended to batch by batch; running the
    same evaluation again skips the items already there (``opcd eval --output-jsonl``).
    """
    from opcd.models import load_model
    from opcd.tasks import build_task

    data = read_yaml(config) if config else {}
    data.setdefault("task", {})
    data["task"]["name"] = task
    cfg = config_from_dict(data, overrides)
    task_obj = build_task(cfg.task)
    task_obj.examples(split)  # checks the split name before the model is loaded
    m, tok = load_model(model)
    return evaluate(
        m, tok, task_obj, split=split, with_context=with_context, size=size,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        batch_size=cfg.rollout.batch_size, records_path=records_path,
        records_meta={"model": str(model)} if records_path is not None else None,
    )
