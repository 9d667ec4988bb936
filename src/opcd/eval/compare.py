"""``opcd compare``: one table of base / in-context / off-policy CD / OPCD (/ OVD / cross-size).

A spec (YAML file or dict) names the columns, the rows and the evaluation settings::

    tasks:                        # columns: every row is scored on each
      - {name: math, split: test, label: math (in-distribution)}
      - {name: gsm8k, split: test, label: GSM8K (OOD), task: {test_size: 200}}
    rows:
      - {label: base, model: qwen2.5-coder-0.5b-instruct}
      - {label: in-context, model: qwen2.5-coder-0.5b-instruct, with_context: true}
      - {label: off-policy CD, run: runs/math-offpolicy}   # model: the run's final/
      - {label: OPCD, run: runs/math-opcd}
      - {label: OPCD x3, runs: [runs/math-opcd-s0, runs/math-opcd-s1, runs/math-opcd-s2]}
      - {label: 0.5B + 1.5B experience, model: qwen2.5-coder-0.5b-instruct,
         with_context: true, context_file: runs/extract-1.5b/experience.txt}
    eval: {size: 100, max_new_tokens: 256, temperature: 1.0, seed: 1234, batch_size: 16}
    output: runs/compare
    reuse: [runs/compare-math]    # optional: take cells other tables already evaluated
    paired_with: base             # optional: every other row's difference to this row

A column may instead be an lm-evaluation-harness task (:mod:`opcd.eval.harness`; needs
``pip install "opcd[harness]"``)::

      - {harness: ifeval, metric: prompt_level_strict_acc, label: IFEval (OOD),
         include: tasks/lm_eval, limit: 100, chat_template: true, max_gen_toks: 1280}

``metric`` is one of the task's lm-eval metrics (a filtered one as ``exact_match,strict-match``);
``include`` (a folder or a list) holds task YAML files of your own; ``limit`` defaults to the
table's ``eval.size`` and the seed to its ``eval.seed``; ``num_fewshot``, ``max_gen_toks`` and
``batch_size`` (default 8) are lm-eval's. A row with ``with_context`` and its own ``context`` /
``context_file`` gets that text as lm-eval's system instruction; a row whose context would
come from a task's config has none for lm-eval and shows ``-`` there.

A column's ``task`` holds extra ``task.*`` keys (sizes, prompts, behaviour, context), and its
``eval`` overrides the table's ``eval`` settings for that column (a short verdict needs fewer
new tokens than a worked solution); a row's ``context`` / ``context_file`` replaces the task's
context when ``with_context``.

Every cell is :func:`opcd.eval.evaluate.evaluate` (mean ± standard error) and is cached in
``<output>/cache.json`` under a hash of (model weights, task settings, context, split,
with_context, eval settings): rerunning a comparison, or adding a row, only evaluates the
new cells. ``reuse`` names other comparisons' output folders whose cached cells count as
this table's (the key is the same computation, so a cell is only ever evaluated once).
Each evaluated cell's answers, with their scores, are in ``<output>/answers/<key>.jsonl``
(a first line naming the row and the column; the cache's ``answers`` field names the file).

A row with ``runs`` (or ``models``), a list with one trained model per training seed, is
evaluated seed by seed (rows ``<label> (seed k)``) and shown as well as one row whose cells
are the seeds' means: the mean score ± the standard error over seeds, and each item's mean
over the seeds (:func:`seed_mean`), so its paired difference is per item, then over seeds.

``paired_with`` names a row (the base model, usually); every other row then also gets, per
column, its *paired* difference to that row: the mean over the items both cells scored of
(row's score - that row's score), with the standard error of those differences and their
95% percentile bootstrap interval. Every cell
draws each item's answer from the same seed on the same prompt, so the per-item
differences remove the items' own difficulty from the error: a change too small to show
between two independent means shows here (see :func:`paired_difference`). Outputs: ``results.md`` and ``results.csv`` (the table), ``training.png`` (loss and
held-out score against step from each row's run folder ``metrics.jsonl``).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError
from opcd.runtime.jsonl import JsonlFile

EVAL_DEFAULTS: dict[str, Any] = {
    "size": 100, "max_new_tokens": 256, "temperature": 1.0, "seed": 1234, "batch_size": 16,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class Column:
    label: str
    name: str
    split: str
    task: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    """This column's overrides of the table's ``eval`` settings."""
    harness: dict[str, Any] | None = None
    """An lm-eval column: its metric, include folders, limit, ... (``name`` is the lm-eval
    task, ``split`` is ``"harness"``); None for opcd's own tasks."""

    def settings(self, table: dict[str, Any]) -> dict[str, Any]:
        """The evaluation settings of this column's cells."""
        return {**table, **self.eval}


@dataclass
class Row:
    label: str
    model: str
    with_context: bool = False
    context: str | None = None
    context_file: str | None = None
    run: str | None = None
    group: str | None = None
    """For one training seed of a row given several (``runs:`` / ``models:``): that row's label."""
    seeds: int = 0
    """For a row given several seeds: how many (its cells are their means)."""


@dataclass
class Cell:
    score: float
    stderr: float
    n: int
    cached: bool = False
    details: dict[str, float] = field(default_factory=dict)
    """The task's extra figures (refusal rates, invalid moves, ...)."""
    items: dict[str, float] = field(default_factory=dict)
    """Each item's score by item id (for paired differences; empty in caches written
    before they were kept, which are then evaluated again when a pairing needs them)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """The scored answers (only for cells evaluated now; written to ``answers/``)."""


@dataclass(frozen=True)
class Paired:
    """A paired difference: mean, its standard error, a 95% bootstrap interval, n items."""

    mean: float
    stderr: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        star = " *" if not self.low <= 0.0 <= self.high else ""
        return (f"{self.mean:+.3f} ± {self.stderr:.3f} [{self.low:+.3f}, {self.high:+.3f}]{star} "
                f"(n={self.n})")


def bootstrap_ci(values: list[float], *, resamples: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the items with
    replacement, ``resamples`` times, from a fixed seed: the same values give the same
    interval)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(a: Cell, b: Cell) -> Paired | None:
    """``a``'s minus ``b``'s score over the items both scored: mean, standard error and 95%
    bootstrap interval of the per-item differences; None when they share fewer than two."""
    from opcd.eval.evaluate import mean_stderr

    common = sorted(set(a.items) & set(b.items))
    if len(common) < 2:
        return None
    diffs = [a.items[i] - b.items[i] for i in common]
    mean, se = mean_stderr(diffs)
    low, high = bootstrap_ci(diffs)
    return Paired(mean, se, low, high, len(common))


@dataclass
class CompareResult:
    """The table (``cells[row label][column label]``) and the files written."""

    rows: list[Row]
    columns: list[Column]
    cells: dict[str, dict[str, Cell]]
    markdown: Path
    csv: Path
    plot: Path | None
    evaluated: int
    """Cells evaluated now (the others came from the cache)."""
    paired_with: str | None = None
    """The row every other row's paired difference is taken to (None: no pairing)."""


# --------------------------------------------------------------------------- spec
def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] in (None, ""):
        raise ConfigError(f"compare spec: {where} needs {key!r}.")
    return d[key]


def _check_keys(d: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"compare spec: {where} must be a mapping, got {type(d).__name__}.")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"compare spec: {where} has unknown keys {unknown}; valid: {sorted(allowed)}.")
    return d


def parse_spec(spec: dict[str, Any]) -> tuple[list[Column], list[Row], dict[str, Any], Path]:
    """Validate a spec: (columns, rows, eval settings, output folder)."""
    spec = _check_keys(spec, {"tasks", "rows", "eval", "output", "reuse", "paired_with"}, "the spec")
    reuse = spec.get("reuse") or []
    if not isinstance(reuse, list) or not all(isinstance(x, str) for x in reuse):
        raise ConfigError("compare spec: 'reuse' must be a list of output folders of other comparisons.")
    columns: list[Column] = []
    for i, c in enumerate(_need(spec, "tasks", "the spec")):
        if isinstance(c, str):
            c = {"name": c}
        if isinstance(c, dict) and "harness" in c:
            columns.append(_harness_column(c, i))
            continue
        c = _check_keys(c, {"name", "split", "label", "task", "eval"}, f"tasks[{i}]")
        name = str(_need(c, "name", f"tasks[{i}]"))
        split = str(c.get("split", "eval"))
        extra = _check_keys(c.get("task") or {}, {f.name for f in dataclasses.fields(_task_config())},
                            f"tasks[{i}].task")
        col_eval = _check_keys(c.get("eval") or {}, set(EVAL_DEFAULTS), f"tasks[{i}].eval")
        columns.append(Column(str(c.get("label") or f"{name}/{split}"), name, split, dict(extra),
                              dict(col_eval)))
    rows: list[Row] = []
    for i, r in enumerate(_need(spec, "rows", "the spec")):
        r = _check_keys(r, {"label", "model", "with_context", "context", "context_file", "run",
                            "runs", "models"}, f"rows[{i}]")
        many = r.get("runs") or r.get("models")
        if many is not None:
            rows.extend(_seed_rows(r, i))
            continue
        run = r.get("run")
        model = r.get("model") or (str(Path(run) / "final") if run else None)
        if not model:
            raise ConfigError(f"compare spec: rows[{i}] needs 'model' or 'run'.")
        if run and not r.get("model") and not Path(model).is_dir():
            raise ConfigError(
                f"compare spec: rows[{i}]: run folder {run!r} has no final/ model (an unfinished "
                "run? finish it with `opcd train CONFIG --resume`), or give the row a 'model'."
            )
        if r.get("context") is not None and r.get("context_file") is not None:
            raise ConfigError(f"compare spec: rows[{i}] sets both 'context' and 'context_file'.")
        label = str(r.get("label") or (Path(run).name if run else model))
        rows.append(Row(label, str(model), bool(r.get("with_context", False)), r.get("context"),
                        r.get("context_file"), str(run) if run else None))
    for what, labels in (("row", [r.label for r in rows]), ("task", [c.label for c in columns])):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"compare spec: {what} labels must be unique; repeated: {dup}.")
    paired = spec.get("paired_with")
    if paired is not None and paired not in [r.label for r in rows]:
        raise ConfigError(f"compare spec: paired_with {paired!r} is not a row label; the rows are "
                          f"{[r.label for r in rows]}.")
    ev = _check_keys(spec.get("eval") or {}, set(EVAL_DEFAULTS), "eval")
    settings = {**EVAL_DEFAULTS, **ev}
    return columns, rows, settings, Path(spec.get("output") or "runs/compare")


HARNESS_KEYS = {"harness", "label", "metric", "include", "limit", "num_fewshot", "max_gen_toks",
                "chat_template", "batch_size"}


def _harness_column(c: dict[str, Any], i: int) -> Column:
    """A ``{harness: TASK, metric: M, ...}`` column (see the module docstring)."""
    c = _check_keys(c, HARNESS_KEYS, f"tasks[{i}]")
    task = str(_need(c, "harness", f"tasks[{i}]"))
    metric = str(_need(c, "metric", f"tasks[{i}] (an lm-eval column: which of its metrics)"))
    include = c.get("include") or []
    include = [include] if isinstance(include, str) else include
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise ConfigError(f"compare spec: tasks[{i}].include must be a folder or a list of folders.")
    for key, low in (("limit", 1), ("num_fewshot", 0), ("max_gen_toks", 1), ("batch_size", 1)):
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"compare spec: tasks[{i}].{key} must be an integer >= {low}, got {v!r}.")
    settings = {"metric": metric, "include": list(include), "limit": c.get("limit"),
                "num_fewshot": c.get("num_fewshot"), "max_gen_toks": c.get("max_gen_toks"),
                "chat_template": bool(c.get("chat_template", False)),
                "batch_size": int(c.get("batch_size") or 8)}
    return Column(str(c.get("label") or f"{task} ({metric})"), task, "harness", harness=settings)


def _seed_rows(r: dict[str, Any], i: int) -> list[Row]:
    """A row given one model per training seed (``runs: [...]`` or ``models: [...]``): a row
    per seed, labelled ``<label> (seed k)``, then the row itself, whose cells are their means."""
    key = "runs" if r.get("runs") else "models"
    many = r[key]
    if (not isinstance(many, list) or len(many) < 1 or not all(isinstance(x, str) for x in many)
            or ("runs" in r and "models" in r) or r.get("run") or r.get("model")):
        raise ConfigError(f"compare spec: rows[{i}]: give one of model, run, runs (a list of run "
                          "folders, one per training seed) or models (a list).")
    label = r.get("label")
    if not label:
        raise ConfigError(f"compare spec: rows[{i}] with {key} needs a label.")
    out = []
    for k, ref in enumerate(many):
        one = {x: v for x, v in r.items() if x not in ("runs", "models")}
        one["label"] = f"{label} (seed {k})"
        one["run" if key == "runs" else "model"] = ref
        row = parse_spec({"tasks": ["french"], "rows": [one]})[1][0]
        out.append(dataclasses.replace(row, group=str(label)))
    first = out[0]
    return [*out, Row(str(label), f"{len(many)} seeds", first.with_context, first.context,
                      first.context_file, None, seeds=len(many))]


def seed_mean(cells: list[Cell]) -> Cell:
    """The cell of a row given several training seeds: the mean of their scores, ± the
    standard error over seeds (one seed: its own), and each item's mean score over the seeds
    that all scored it (for paired differences: per item, then over seeds)."""
    from opcd.eval.evaluate import mean_stderr

    mean, se = mean_stderr([c.score for c in cells])
    if len(cells) == 1:
        se = cells[0].stderr
    common = set.intersection(*(set(c.items) for c in cells)) if cells else set()
    items = {i: sum(c.items[i] for c in cells) / len(cells) for i in sorted(common)}
    return Cell(mean, se, min(c.n for c in cells), cached=all(c.cached for c in cells), items=items)


def _task_config() -> Any:
    from opcd.config import TaskConfig

    return TaskConfig


def spec_from_runs(
    runs: list[str],
    tasks: list[str] | None = None,
    *,
    split: str = "eval",
    base: str | None = None,
    output: str | None = None,
    eval_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec of ``opcd compare --runs A B ... [--task T ...]``: the base model without and
    with the context, then each run's final model; columns: the first run's task (its
    ``task`` section) and any ``tasks`` named."""
    from opcd.config import load_config

    if not runs:
        raise ConfigError("opcd compare --runs needs at least one run folder.")
    cfgs = []
    for r in runs:
        path = Path(r) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"{r!r} is not an opcd run folder (no config.yaml).")
        cfgs.append(load_config(path))
    first = cfgs[0]
    own = {k: v for k, v in dataclasses.asdict(first.task).items()
           if k != "name" and v != getattr(_task_config()(), k)}
    cols: list[dict[str, Any]] = [{"name": first.task.name, "split": split, "task": own}]
    for t in tasks or []:
        if t != first.task.name:
            cols.append({"name": t, "split": split})
    model = base or first.model
    rows: list[dict[str, Any]] = [{"label": "base", "model": model},
                                  {"label": "in-context", "model": model, "with_context": True}]
    for r, c in zip(runs, cfgs, strict=True):
        rows.append({"label": f"{c.method} ({Path(r).name})", "run": r})
    return {"tasks": cols, "rows": rows, "eval": eval_settings or {},
            "output": output or "runs/compare"}


# --------------------------------------------------------------------------- cache
EVAL_SAMPLING = "per-item-v2"
"""Part of every cell's key: how evaluation samples and scores (per-item seeds; games
played as whole episodes). Changing it invalidates cached cells computed another way."""

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(model: str, memo: dict[str, Any] | None = None) -> str:
    """What identifies a model's weights: a hash of its weight files (a local folder or
    file; memoised by path, size and mtime), else its registry name or hub id."""
    p = Path(model)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    elif p.is_file():
        files = [p]
    else:
        return f"name:{model}"
    if not files:
        raise ConfigError(f"{model!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}).")
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = memo.get(key) if memo is not None else None
        if digest is None:
            digest = _sha256_file(f)
            if memo is not None:
                memo[key] = digest
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{digest}\n".encode())
    return "sha256:" + h.hexdigest()


class _Cache:
    def __init__(self, path: Path) -> None:
        self.path = path
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError, UnicodeDecodeError):
                data = {}  # a damaged cache is only a slower rerun
        self.cells: dict[str, Any] = data.get("cells", {}) if isinstance(data, dict) else {}
        self.hashes: dict[str, Any] = data.get("hashes", {}) if isinstance(data, dict) else {}

    def save(self) -> None:
        from opcd.runtime import checkpoint as ckpt

        ckpt.atomic_write_text(self.path, json.dumps({"cells": self.cells, "hashes": self.hashes},
                                                     indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- the table
_TRAINING_ONLY = frozenset({"other_system_prompt_share", "other_system_prompt_rows", "other_system_prompts",
                            "other_system_prompt_mode"})
"""Task settings that shape training rows only: not part of a cell's identity (an evaluation
does not read them, and the cache keys of tables made before they existed stay valid)."""


def _cell_task(col: Column, row: Row, batch_size: int) -> tuple[Any, dict[str, Any]]:
    """The task config of a cell (validated) and the part of it that identifies the cell."""
    from opcd.config import config_from_dict
    from opcd.tasks.base import read_context_file

    task = {**col.task, "name": col.name}
    context = None
    if row.with_context and (row.context is not None or row.context_file is not None):
        context = row.context if row.context is not None else read_context_file(str(row.context_file))
        task.pop("context_file", None)
        task["context"] = context
    cfg = config_from_dict({"task": task, "rollout": {"batch_size": batch_size}})
    ident = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k not in _TRAINING_ONLY}
    if ident.get("context_file"):  # identify a context file by its content, not its path
        ident["context"] = read_context_file(ident.pop("context_file"))
    return cfg.task, ident


def _default_evaluator(model: Any, tok: Any, task: Any, row: Row, col: Column,
                       settings: dict[str, Any]) -> Cell:
    from opcd.eval.evaluate import evaluate

    res = evaluate(model, tok, task, split=col.split, with_context=row.with_context,
                   size=settings["size"], max_new_tokens=settings["max_new_tokens"],
                   temperature=settings["temperature"], seed=settings["seed"],
                   batch_size=settings["batch_size"])
    return Cell(res.score, res.stderr, res.n, details=dict(res.details),
                items={str(r["id"]): float(r["score"]) for r in res.records},
                records=res.records)


def _row_context(row: Row) -> str | None:
    """The context a row gives itself (``context`` / ``context_file``) when ``with_context``."""
    from opcd.tasks.base import read_context_file

    if not row.with_context:
        return None
    if row.context is not None:
        return row.context
    return read_context_file(str(row.context_file)) if row.context_file is not None else None


def _folder_digest(folder: str) -> str:
    """sha256 of a task folder's files (names and contents): a changed task file is a new cell."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"compare spec: the lm-eval task folder {folder!r} does not exist.")
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(f"{f.relative_to(root)}:{_sha256_file(f)}\n".encode())
    return h.hexdigest()


def _harness_limit(col: Column, settings: dict[str, Any]) -> int | None:
    assert col.harness is not None
    limit = col.harness["limit"]
    return limit if limit is not None else settings.get("size")


def _harness_key(col: Column, row: Row, weights: str, settings: dict[str, Any]) -> str:
    """The cache key of an lm-eval cell: weights, task, its task files, settings, context."""
    from opcd.eval.harness import LM_EVAL_VERSION, PACKAGED_TASKS

    assert col.harness is not None
    h = {**col.harness, "include": [_folder_digest(x) for x in col.harness["include"]],
         "packaged": _folder_digest(str(PACKAGED_TASKS)), "limit": _harness_limit(col, settings),
         "seed": settings["seed"], "context": _row_context(row)}
    return hashlib.sha256(json.dumps({
        "weights": weights, "harness": col.name, "settings": h, "lm_eval": LM_EVAL_VERSION,
    }, sort_keys=True).encode()).hexdigest()


def _harness_evaluator(row: Row, col: Column, settings: dict[str, Any]) -> Cell:
    """An lm-eval cell: the column's metric of ``row``'s model (:mod:`opcd.eval.harness`)."""
    from opcd.eval.harness import evaluate_harness

    h = col.harness
    assert h is not None
    res = evaluate_harness(
        row.model, [col.name], include=h["include"] or None, limit=_harness_limit(col, settings),
        num_fewshot=h["num_fewshot"], seed=settings["seed"], max_gen_toks=h["max_gen_toks"],
        batch_size=h["batch_size"], apply_chat_template=h["chat_template"],
        system_instruction=_row_context(row),
    )
    values = res.metrics.get(col.name, {})
    metric = h["metric"]
    if values.get(metric) is None:
        known = sorted(k for k in values if not k.endswith("_stderr"))
        raise ConfigError(f"compare spec: lm-eval's {col.name!r} gave no metric {metric!r}; it "
                          f"gave {known}. Set the column's metric to one of them.")
    se = values.get(f"{metric}_stderr")
    base, _, filt = metric.partition(",")
    records = [json.loads(json.dumps(
        {"id": str(x.get("doc_id")), "score": x.get(base), "target": x.get("target"),
         "response": x.get("filtered_resps")}, default=str))
        for x in res.samples.get(col.name, []) if x.get("filter", "none") == (filt or "none")]
    items = res.items.get(col.name, {}).get(metric, {})
    return Cell(float(values[metric] or 0.0), float("nan") if se is None else float(se),
                res.n.get(col.name, len(items)), items=dict(items), records=records)


def compare(
    spec: str | Path | dict[str, Any],
    *,
    output: str | Path | None = None,
    progress: bool = True,
) -> CompareResult:
    """Evaluate every row on every column (cached) and write the table and plots
    (``opcd compare SPEC.yaml``)."""
    from opcd.config import read_yaml
    from opcd.runtime import checkpoint as ckpt
    from opcd.tasks import build_task

    data = read_yaml(spec) if isinstance(spec, (str, Path)) else spec
    columns, rows, settings, out = parse_spec(data)
    paired = data.get("paired_with")
    if output is not None:
        out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out / "cache.json")

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    # other tables' cells: only those this table uses are copied into its own cache
    borrowed: dict[str, Any] = {}
    for other in data.get("reuse") or []:
        path = Path(other) / "cache.json"
        if not path.is_file():
            say(f"reuse: {other!r} has no cache.json yet; its cells will be evaluated here.")
            continue
        theirs = _Cache(path)
        borrowed = {**theirs.cells, **borrowed}
        cache.hashes = {**theirs.hashes, **cache.hashes}  # a memo of weight-file digests

    # plan: every cell's key, so that only missing cells load their model
    plan: dict[str, list[tuple[Column, Any, str]]] = {}
    shared: list[tuple[str, str, tuple[str, str]]] = []
    cells: dict[str, dict[str, Cell]] = {r.label: {} for r in rows}
    wid_of: dict[str, str] = {}
    for row in rows:
        if row.seeds:
            continue  # its cells are its seeds' means, filled in below
        if row.model not in wid_of:
            wid_of[row.model] = weights_id(row.model, cache.hashes)
        for col in columns:
            col_settings = col.settings(settings)
            if col.harness is not None:
                if row.with_context and _row_context(row) is None:
                    continue  # no context of its own to give lm-eval: the cell shows '-'
                task_cfg, key = None, _harness_key(col, row, wid_of[row.model], col_settings)
            else:
                task_cfg, ident = _cell_task(col, row, col_settings["batch_size"])
                key = hashlib.sha256(json.dumps({
                    "weights": wid_of[row.model], "task": ident, "split": col.split,
                    "with_context": row.with_context, "eval": col_settings,
                    "sampling": EVAL_SAMPLING,
                }, sort_keys=True).encode()).hexdigest()
            hit = cache.cells.get(key)
            if hit is None and key in borrowed:
                hit = cache.cells[key] = borrowed[key]
            if paired and not (hit or {}).get("items"):
                hit = None  # a pairing needs each item's score: older cells are redone
            if isinstance(hit, dict) and {"score", "stderr", "n"} <= set(hit):
                cells[row.label][col.label] = Cell(
                    float(hit["score"]), float(hit["stderr"]), int(hit["n"]), cached=True,
                    details={k: float(v) for k, v in (hit.get("details") or {}).items()},
                    items={str(k): float(v) for k, v in (hit.get("items") or {}).items()})
            else:
                plan.setdefault(row.label, []).append((col, task_cfg, key))
    # a cell two rows share (the same weights, task and settings) is evaluated once
    first_of: dict[str, tuple[str, str]] = {}
    for label in list(plan):
        keep = []
        for col, task_cfg, key in plan[label]:
            if key in first_of:
                shared.append((label, col.label, first_of[key]))
            else:
                first_of[key] = (label, col.label)
                keep.append((col, task_cfg, key))
        plan[label] = keep
    evaluated = 0
    tasks: dict[str, Any] = {}
    for row in rows:
        todo = plan.get(row.label)
        if not todo:
            continue
        model = tok = None
        if any(col.harness is None for col, _, _ in todo):  # lm-eval loads its own copy
            from opcd.models import load_model

            say(f"loading {row.model} for row {row.label!r} ...")
            model, tok = load_model(row.model)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        for col, task_cfg, key in todo:
            if col.harness is not None:
                say(f"lm-eval {col.name} on {row.model} for row {row.label!r} ...")
                cell = _harness_evaluator(row, col, col.settings(settings))
            else:
                tkey = json.dumps(dataclasses.asdict(task_cfg), sort_keys=True)
                if tkey not in tasks:
                    tasks[tkey] = build_task(task_cfg)
                cell = _default_evaluator(model, tok, tasks[tkey], row, col,
                                          col.settings(settings))
            cells[row.label][col.label] = cell
            (out / "answers").mkdir(exist_ok=True)
            JsonlFile(out / "answers" / f"{key[:16]}.jsonl").rewrite(
                [{"row": row.label, "task": col.label, "model": row.model}, *cell.records])
            cache.cells[key] = {"score": cell.score, "stderr": cell.stderr, "n": cell.n,
                                "details": cell.details, "items": cell.items,
                                "row": row.label, "model": row.model,
                                "task": col.label, "answers": f"answers/{key[:16]}.jsonl"}
            cache.save()  # every finished cell survives an interruption
            evaluated += 1
            say(f"{row.label} / {col.label}: {cell.score:.3f} ± {cell.stderr:.3f} (n={cell.n})")
        del model, tok
        gc.collect()
    cache.save()
    for label, col_label, (src_row, src_col) in shared:
        cells[label][col_label] = dataclasses.replace(cells[src_row][src_col], cached=True)
    for row in rows:
        if row.seeds:
            members = [r for r in rows if r.group == row.label]
            for col in columns:
                found = [cells[m.label][col.label] for m in members if col.label in cells[m.label]]
                if len(found) == len(members):
                    cells[row.label][col.label] = seed_mean(found)
    md_path, csv_path = out / "results.md", out / "results.csv"
    ckpt.atomic_write_text(md_path, format_markdown(rows, columns, cells, settings, paired))
    ckpt.atomic_write_text(csv_path, format_csv(rows, columns, cells))
    plot = plot_runs(rows, out / "training.png")
    return CompareResult(rows, columns, cells, md_path, csv_path, plot, evaluated, paired)


def _context_note(row: Row) -> str:
    if not row.with_context:
        return "no"
    if row.context_file:
        return f"yes ({Path(row.context_file).name})"
    return "yes (given)" if row.context is not None else "yes"


def format_markdown(rows: list[Row], columns: list[Column], cells: dict[str, dict[str, Cell]],
                    settings: dict[str, Any], paired_with: str | None = None) -> str:
    """The table in Markdown: one row per model, one column per task/split, mean ± s.e.;
    with ``paired_with``, a second table of each row's paired difference to that row."""
    head = ["row", "model", "context", *[c.label for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = []
        for c in columns:
            cell = cells[r.label].get(c.label)
            vals.append(f"{cell.score:.3f} ± {cell.stderr:.3f}" if cell else "-")
        model = r.run or r.model
        lines.append("| " + " | ".join([r.label, f"`{model}`", _context_note(r), *vals]) + " |")
    where = ", ".join(f"{c.label} = lm-eval {c.name} ({c.harness['metric']})" if c.harness
                      else f"{c.label} = {c.name}/{c.split}" for c in columns)
    lines += ["", _settings_note(columns, settings, where)]
    if paired_with is not None:
        lines += ["", f"Paired difference to {paired_with!r} (mean over the items both scored of "
                  "the row's score minus its score, ± the standard error of the differences, "
                  "[95% percentile bootstrap interval, 10,000 resamples of the items]; * where "
                  "the interval excludes 0):", "",
                  "| row | " + " | ".join(c.label for c in columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]
        for r in rows:
            if r.label == paired_with:
                continue
            vals = []
            for c in columns:
                a, b = cells[r.label].get(c.label), cells[paired_with].get(c.label)
                d = paired_difference(a, b) if a and b else None
                vals.append("-" if d is None else d.text())
            lines.append("| " + " | ".join([r.label, *vals]) + " |")
    for c in columns:  # the tasks' own figures, one table per column that has any
        keys = sorted({k for r in rows for k in (cells[r.label].get(c.label) or Cell(0, 0, 0)).details})
        if not keys:
            continue
        lines += ["", f"{c.label}, details:", "", "| row | " + " | ".join(keys) + " |",
                  "|" + "---|" * (len(keys) + 1)]
        for r in rows:
            cell = cells[r.label].get(c.label)
            vals = [_fmt(cell.details.get(k)) if cell else "-" for k in keys]
            lines.append("| " + " | ".join([r.label, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _settings_note(columns: list[Column], settings: dict[str, Any], where: str) -> str:
    """The sentence under the table: the settings every column shares, then per column the
    ones that differ (a column's own ``eval``)."""
    per_col = [c.settings(settings) for c in columns] or [settings]
    shown = ("size", "temperature", "max_new_tokens", "seed")
    same = {k: per_col[0].get(k) for k in shown if all(cs.get(k) == per_col[0].get(k) for cs in per_col)}
    n = f"n = {same['size']} examples" if "size" in same else "n examples (per column, below)"
    parts = [f"{k} {same[k]}" for k in ("temperature", "max_new_tokens", "seed") if k in same]
    note = f"Mean ± standard error over {n} per cell (at most); {where}"
    note += f"; sampling {', '.join(parts)}." if parts else "."
    differ = [k for k in shown if k not in same]
    if differ:
        note += "\nColumn settings: " + "; ".join(
            f"{c.label}: " + ", ".join(f"{k} {cs[k]}" for k in differ)
            for c, cs in zip(columns, per_col, strict=True)) + "."
    return note


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if float(v).is_integer() else f"{v:.3f}"


def format_csv(rows: list[Row], columns: list[Column], cells: dict[str, dict[str, Cell]]) -> str:
    """The table as CSV: label, model, run, with_context, then mean, stderr and n per column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["label", "model", "run", "with_context"]
    extra = {c.label: sorted({k for r in rows for k in
                              (cells[r.label].get(c.label) or Cell(0, 0, 0)).details})
             for c in columns}
    for c in columns:
        head += [f"{c.label} mean", f"{c.label} stderr", f"{c.label} n",
                 *(f"{c.label} {k}" for k in extra[c.label])]
    w.writerow(head)
    for r in rows:
        vals: list[Any] = [r.label, r.model, r.run or "", r.with_context]
        for c in columns:
            cell = cells[r.label].get(c.label)
            vals += [cell.score, cell.stderr, cell.n] if cell else ["", "", ""]
            vals += [cell.details.get(k, "") if cell else "" for k in extra[c.label]]
        w.writerow(vals)
    return buf.getvalue()


def _read_metrics(run: str) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def plot_runs(rows: list[Row], path: Path) -> Path | None:
    """Loss (left) and held-out score without context (right) against step, one line per
    row with a run folder; None (no file) when no row has a metrics.jsonl."""
    series = [(r.label, _read_metrics(r.run)) for r in rows if r.run]
    series = [(label, recs) for label, recs in series if recs]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, recs in series:
        train = [r for r in recs if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
        evals = [r for r in recs if r.get("type") == "eval" and not r.get("with_context")]
        if train:
            ax1.plot([r["step"] for r in train], [r["loss"] for r in train], marker="o", ms=2, label=label)
        if evals:
            ax2.errorbar([r["step"] for r in evals], [r["score"] for r in evals],
                         yerr=[r.get("stderr") or 0.0 for r in evals], marker="o", ms=3, capsize=3,
                         label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (each method's own)")
    ax1.set_title("loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("score without context")
    ax2.set_title("held-out metric")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
