"""``opcd demo``: the embedded default run, end to end, with a before/after report.

Distils the system prompt "Always answer in French, whatever the language of the
question" into the packaged Qwen2.5-Coder-0.5B-Instruct with OPCD (LoRA, frozen base as
teacher), then reports on held-out prompts *without* the system prompt the French rate
before and after training, next to the in-context rate (the ceiling). Writes a run
folder with the config, metrics JSONL, the final model, a PNG plot and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from opcd.config import load_config

DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


def _free_run_dir(base: str) -> str:
    """``runs/demo``, or ``runs/demo-2``, ... if it is taken: a demo never overwrites a run."""
    p = Path(base)
    if not p.exists() or not any(p.iterdir()):
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return f"{base}-{i}"


def demo(
    run_dir: str | None = None,
    steps: int | None = None,
    model: str | None = None,
    progress: bool = True,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``summary.json``); ``overrides``
    change the demo config (``key=value``, as for ``opcd train``)."""
    from opcd.models import pull
    from opcd.training.loop import train

    extra, overrides = overrides, [f"run.dir={_free_run_dir(run_dir or 'runs/demo')}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if model is not None:
        overrides.append(f"model={model}")
    cfg = load_config(DEMO_CONFIG, [*overrides, *(extra or [])])
    t0 = time.perf_counter()
    from opcd.models.registry import REGISTRY

    if cfg.model in REGISTRY:
        pull(cfg.model)
    t_pull = time.perf_counter() - t0
    seen: dict[int, Any] = {}
    result = train(cfg, progress=progress, on_eval=lambda step, res: seen.__setitem__(step, res))
    evals = [e for e in result.evals if not e["with_context"]]
    ctx = [e for e in result.evals if e["with_context"]]
    summary = {
        "model": cfg.model,
        "task": cfg.task.name,
        "steps": result.steps,
        "eval_prompts": evals[0]["n"] if evals else 0,
        "before": _figures(evals[0]) if evals else None,
        "after": _figures(evals[-1]) if evals else None,
        "in_context": _figures(ctx[0]) if ctx else None,
        "curve": [(e["step"], e["score"]) for e in evals],
        "examples": _examples(seen),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "seconds_pull": round(t_pull, 1),
        "run_dir": str(result.run_dir),
        "final_model": str(result.final_model),
        "plot": str(result.run_dir / "plot.png"),
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_summary(summary))
    return summary


def _figures(e: dict[str, Any]) -> dict[str, float | None]:
    return {"rate": e["score"], "stderr": e["stderr"], "quality": e.get("quality"),
            "quality_stderr": e.get("quality_stderr")}


def _examples(seen: dict[int, Any], k: int = 3) -> list[dict[str, str]]:
    """The first ``k`` held-out prompts with the answers before and after training."""
    if len(seen) < 2:
        return []
    first, last = seen[min(seen)], seen[max(seen)]
    after = {r["id"]: r["response"] for r in last.records}
    return [
        {"prompt": r["prompt"], "before": r["response"], "after": after.get(r["id"], "")}
        for r in first.records[:k]
    ]


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_summary(s: dict[str, Any]) -> str:
    def cell(x: dict[str, Any] | None) -> str:
        if not x:
            return "   n/a"
        rate = f"{x['rate'] * 100:5.1f}% ± {x['stderr'] * 100:4.1f}"
        if x.get("quality") is None:
            return rate
        return f"{rate}   quality {x['quality']:+.2f} ± {x['quality_stderr']:.2f}"

    lines = [
        "",
        f"OPCD demo: {s['task']} system prompt distilled into {s['model']} ({s['steps']} steps)",
        f"French rate on {s['eval_prompts']} held-out prompts (quality: the frozen base's mean "
        "log-probability per token of the answers, given the system prompt, relative to its "
        "entropy; 0 = as natural as its own answers, lower = less natural):",
        f"  without the system prompt, before training : {cell(s['before'])}",
        f"  without the system prompt, after OPCD      : {cell(s['after'])}",
        f"  with the system prompt (in-context ceiling): {cell(s['in_context'])}",
        f"run folder {s['run_dir']} (plot: {s['plot']}); {s['seconds_total']:.0f} s in all",
    ]
    for ex in s.get("examples", []):
        lines += [f"  Q: {_short(ex['prompt'])}", f"    before: {_short(ex['before'])}",
                  f"    after : {_short(ex['after'])}"]
    return "\n".join(lines)
