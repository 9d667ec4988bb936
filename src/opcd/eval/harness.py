"""Standard benchmarks through lm-evaluation-harness (``opcd eval MODEL_OR_RUN --harness``).

Where it sits: after training. ``opcd train`` writes a run folder whose ``final/`` model is a
plain Hugging Face folder; this module hands that folder (or any model reference opcd
resolves: a packaged name, a model folder, a .gguf file) to lm-eval's Python API
(``lm_eval.simple_evaluate`` with its ``hf`` model) and returns each task's metrics with
their standard errors. It is the out-of-distribution check of the paper (IFEval through
lm-eval) next to opcd's own task scores (:mod:`opcd.eval.evaluate`), and the ``harness`` columns
of ``opcd compare`` (:mod:`opcd.eval.compare`) call it too.

lm-eval is an optional extra (``pip install "opcd[harness]"``, pinned to the version this
was tested with); without it :func:`evaluate_harness` raises :class:`ConfigError` saying so.

Tasks are lm-eval task names (or paths to task YAML files) found in lm-eval's own task
folder, in this package's ``harness_tasks/`` (``opcd_tiny_qa``: six one-word questions
read from a local JSONL file, for tests and the README) and in any ``include`` folders of
your own. Nothing here downloads anything, but lm-eval's built-in tasks read their data
sets from the Hugging Face hub (or its local cache): offline, point a task file of your own
at a local copy (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError

LM_EVAL_VERSION = "0.4.13"
"""The lm-eval release the ``harness`` extra pins (and the tests ran with)."""
PACKAGED_TASKS = Path(__file__).resolve().parent / "harness_tasks"
"""Folder of the task files opcd ships (always on lm-eval's include path)."""
INSTALL_HINT = f'pip install "opcd[harness]"  (lm-eval=={LM_EVAL_VERSION})'


@dataclass
class HarnessResult:
    """What one lm-eval run gave: ``metrics[task][name]`` and ``metrics[task][name_stderr]``
    (None where lm-eval computed no standard error), the items scored per task, each item's
    value of each metric (``items[task][name][doc_id]``, for paired differences) and the
    settings it ran with."""

    model: str
    """The reference as given (a run folder, a name, a path)."""
    location: str
    """The folder lm-eval loaded (a run folder's ``final/``, a packaged model's cache)."""
    metrics: dict[str, dict[str, float | None]]
    n: dict[str, int] = field(default_factory=dict)
    items: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    lm_eval_version: str = ""
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """lm-eval's record of every item per task: the document, the prompt, the response(s)
    and each metric's value (``--output`` writes them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The metrics as a Markdown table: task, metric, value, stderr, n."""
        lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
        for task, values in self.metrics.items():
            for name, value in values.items():
                if name.endswith("_stderr"):
                    continue
                se = values.get(f"{name}_stderr")
                lines.append(f"| {task} | {name} | {_fmt(value)} | {_fmt(se)} | "
                             f"{self.n.get(task, '-')} |")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def import_lm_eval() -> Any:
    """The ``lm_eval`` module, or :class:`ConfigError` with the install command."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (the part used besides the API)
    except ImportError as e:
        raise ConfigError(
            f"Evaluating with lm-evaluation-harness needs the optional extra: {INSTALL_HINT}. "
            f"(Importing lm_eval failed: {e}.)"
        ) from e
    return lm_eval


def resolve_model_location(ref: str) -> str:
    """Where lm-eval should load ``ref`` from: a run folder's ``final/`` model; a packaged
    model's prepared folder (pulled first if needed); a model folder; a .gguf file's
    converted folder; a hub id as it is (opcd's own resolvers, as ``opcd chat``)."""
    from opcd.models import resolve_model_ref
    from opcd.tools.interactive import resolve_target

    return resolve_model_ref(resolve_target(ref).model).location


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blank names dropped)."""
    parts = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for p in parts for n in p.split(",") if n.strip()]
    if not names:
        raise ConfigError("No lm-eval task given: pass one or more names, e.g. --harness ifeval.")
    return names


def include_paths(include: str | Path | Sequence[str | Path] | None) -> list[str]:
    """opcd's packaged task folder, then each folder of ``include`` (which must exist)."""
    extra = [] if include is None else [include] if isinstance(include, (str, Path)) else list(include)
    out = [str(PACKAGED_TASKS)]
    for p in extra:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise ConfigError(f"The lm-eval task folder {str(p)!r} does not exist (--harness-include "
                              "takes a folder of task YAML files).")
        out.append(str(path.resolve()))
    return out


def _check_task_names(manager: Any, names: list[str], include: list[str]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name in known or Path(name).is_file() or manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"lm-eval has no task {name!r} in its own tasks or in {', '.join(include)}.{hint} "
            "Pass a task name, a task YAML file, or a folder of task files with "
            "--harness-include DIR."
        )


def _split_key(key: str) -> tuple[str, str] | None:
    """lm-eval's ``"metric,filter"`` result key -> (metric, filter); None for other keys."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    return metric, filt


def _metric_name(metric: str, filt: str) -> str:
    """``exact_match`` for the unfiltered ``exact_match,none``; ``exact_match,strict-match``
    (lm-eval's own spelling) for a filtered one."""
    return metric if filt == "none" else f"{metric},{filt}"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None  # lm-eval writes "N/A" where it has no standard error
    return float(v)


def parse_results(raw: dict[str, Any]) -> tuple[dict[str, dict[str, float | None]],
                                                dict[str, int], dict[str, dict[str, dict[str, float]]]]:
    """(metrics, n, items) of ``lm_eval.simple_evaluate``'s result (see :class:`HarnessResult`)."""
    metrics: dict[str, dict[str, float | None]] = {}
    for task, values in (raw.get("results") or {}).items():
        out: dict[str, float | None] = {}
        for key, value in values.items():
            parts = _split_key(key)
            if parts is None:
                continue
            metric, filt = parts
            if metric.endswith("_stderr"):
                out[f"{_metric_name(metric[: -len('_stderr')], filt)}_stderr"] = _number(value)
            else:
                out[_metric_name(metric, filt)] = _number(value)
        for name in [k for k in out if not k.endswith("_stderr")]:
            out.setdefault(f"{name}_stderr", None)
        metrics[str(task)] = out
    n = {str(t): int(v.get("effective", v.get("original", 0)))
         for t, v in (raw.get("n-samples") or {}).items() if isinstance(v, dict)}
    items: dict[str, dict[str, dict[str, float]]] = {}
    for task, samples in (raw.get("samples") or {}).items():
        per: dict[str, dict[str, float]] = {}
        for s in samples:
            filt = str(s.get("filter", "none"))
            for metric in s.get("metrics") or []:
                value = _number(s.get(metric))
                if value is not None:
                    per.setdefault(_metric_name(metric, filt), {})[str(s.get("doc_id"))] = value
        items[str(task)] = per
    return metrics, n, items


def evaluate_harness(
    model: str,
    tasks: str | Sequence[str],
    *,
    include: str | Path | Sequence[str | Path] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    max_gen_toks: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> HarnessResult:
    """Run lm-eval on ``model`` (a run folder means its ``final/``; see
    :func:`resolve_model_location`) for ``tasks`` and return their metrics.

    ``include``: folders of task YAML files besides lm-eval's own and opcd's packaged ones.
    ``limit``: score only the first N items of each task. ``num_fewshot``: lm-eval's
    few-shot count (default: each task's own). ``seed``: every seed lm-eval takes (Python,
    numpy, torch, few-shot sampling). ``max_gen_toks``: caps the generated tokens of
    generate_until tasks (default: each task's own). ``apply_chat_template``: format the
    prompts with the model's chat template (instruct models); ``system_instruction``: a
    system prompt (in the chat template's system turn with ``apply_chat_template``, else
    put before the prompt). ``device`` / ``dtype``: default CUDA and bfloat16 if available,
    else CPU and float32 (as :func:`opcd.models.load_model`).
    """
    lm_eval = import_lm_eval()
    import torch
    from lm_eval.tasks import TaskManager

    from opcd.models import default_device, default_dtype

    names = split_tasks(tasks)
    paths = include_paths(include)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of items, got {limit}.")
    manager = TaskManager(include_path=paths)
    _check_task_names(manager, names, paths)  # before a packaged model is pulled
    location = resolve_model_location(model)
    target = torch.device(device) if device is not None else default_device()
    device = str(target)
    dtype = dtype or str(default_dtype(target)).removeprefix("torch.")
    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": location, "dtype": dtype},
        tasks=names,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks is not None else None,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
    )
    if raw is None:  # only on the non-zero ranks of a multi-process launch
        raise ConfigError("lm-eval returned no results (a process other than rank 0?).")
    metrics, n, items = parse_results(raw)
    settings: dict[str, Any] = {
        "tasks": names, "include": paths[1:], "limit": limit, "num_fewshot": num_fewshot,
        "seed": seed, "max_gen_toks": max_gen_toks, "batch_size": batch_size,
        "apply_chat_template": apply_chat_template, "system_instruction": system_instruction,
        "device": device, "dtype": dtype,
    }
    return HarnessResult(str(model), location, metrics, n, items, settings,
                         str(getattr(lm_eval, "__version__", "")), dict(raw.get("samples") or {}))


def run_harness(model: str, tasks: str | Sequence[str], **kwargs: Any) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: value, metric_stderr: stderr}}`` of :func:`evaluate_harness` (same
    arguments)."""
    return evaluate_harness(model, tasks, **kwargs).metrics
