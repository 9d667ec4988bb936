"""Python entry points behind the CLI commands that are not the training loop itself."""

from __future__ import annotations

from pathlib import Path

from opcd.config import config_from_dict, read_yaml
from opcd.eval.evaluate import EvalResult, evaluate, teacher_judge


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
    judge: str | None = None,
) -> EvalResult:
    """Load ``model`` and score it on ``task``'s ``split`` (``opcd eval``).

    ``records_path``: a JSONL file the records are appended to batch by batch; running the
    same evaluation again skips the items already there (``opcd eval --output-jsonl``).
    ``judge``: a model (e.g. the base a run started from, same tokenizer) that rates the
    answers' quality given the context (:func:`opcd.eval.evaluate.teacher_judge`).
    """
    from opcd.models import check_tokenizers_compatible, load_model
    from opcd.tasks import build_task
    from opcd.teachers.teacher import Teacher

    data = read_yaml(config) if config else {}
    data.setdefault("task", {})
    data["task"]["name"] = task
    cfg = config_from_dict(data, overrides)
    task_obj = build_task(cfg.task)
    task_obj.examples(split)  # checks the split name before the model is loaded
    m, tok = load_model(model)
    rate = None
    if judge is not None:
        j_model, j_tok = load_model(judge)
        check_tokenizers_compatible(tok, j_tok, model, judge)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rate = teacher_judge(Teacher("model", m, j_model), int(pad), next(m.parameters()).device)
    return evaluate(
        m, tok, task_obj, split=split, with_context=with_context, size=size,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        batch_size=cfg.rollout.batch_size, records_path=records_path,
        records_meta={"model": str(model)} if records_path is not None else None, judge=rate,
    )
