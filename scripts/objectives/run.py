"""One cell of the objective comparison (docs/objectives.md): a system-prompt distillation
with the given config overrides, every evaluation's answers kept.

    python scripts/objectives/run.py NAME [key=value ...]
    python scripts/objectives/run.py --minimal NAME task.behaviour=... [key=value ...]
    python scripts/objectives/run.py --minimal --keep-final NAME ...   # final/ kept (for compare)

Writes runs/objectives/NAME/ (the run folder) and runs/objectives/NAME.json: every
evaluation's behaviour rate, quality figure and answers, the per-step figures, and whether
the collapse guard fired. A finished cell is skipped when run again (delete its JSON to
redo it). Base config: the demo's (src/opcd/configs/demo.yaml) with guard.action=warn, so
that a breaking run is seen to its end. ``--minimal``: instead, the issue's "config holding
only model, context, prompts and behaviour" (the packaged model, ``task.name: suite``, every
other setting opcd's default), guard as by default. The run folder's weights are deleted
once the JSON is written (a cell is ~2.5 GB of weights; its metrics.jsonl is kept), unless
``--keep-final``: then ``final/`` (the model an out-of-distribution comparison evaluates) and
the last checkpoint (to continue the run) stay.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from opcd.config import config_from_dict, load_config
from opcd.tools.demo import DEMO_CONFIG
from opcd.training.loop import train

OUT = Path("runs/objectives")


MINIMAL = {"model": "qwen2.5-coder-0.5b-instruct", "task": {"name": "suite"}}


def main(name: str, overrides: list[str], minimal: bool = False, keep_final: bool = False) -> None:
    out = OUT / f"{name}.json"
    if out.is_file():
        print(f"{out} exists: skipped")
        return
    if minimal:
        cfg = config_from_dict(MINIMAL, [f"run.dir={OUT / name}", *overrides])
    else:
        cfg = load_config(DEMO_CONFIG, ["guard.action=warn", f"run.dir={OUT / name}", *overrides])
    evals: list[dict] = []

    def keep(step: int, res) -> None:  # noqa: ANN001 - an EvalResult
        evals.append({"step": step, "score": res.score, "stderr": res.stderr,
                      "quality": res.quality, "quality_stderr": res.quality_stderr,
                      "details": res.details, "answers": [r["response"] for r in res.records]})

    t0 = time.perf_counter()
    res = train(cfg, overwrite=True, progress=False, on_eval=keep)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    ctx = [r for r in recs if r["type"] == "eval" and r["with_context"]]
    out.write_text(json.dumps({
        "name": name, "overrides": overrides, "minimal": minimal, "seconds": round(time.perf_counter() - t0, 1),
        "in_context": ctx[0] if ctx else None, "evals": evals,
        "steps": [{k: r[k] for k in ("step", "loss", "reverse_kl", "student_entropy",
                                     "student_topk_mass", "time_step")}
                  for r in recs if r["type"] == "train"],
        "guard": [r for r in recs if r["type"] == "guard"],
    }, indent=1, ensure_ascii=False))
    for heavy in () if keep_final else ("final", "checkpoints"):  # the weights: kept only while the cell runs
        shutil.rmtree(res.run_dir / heavy, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    flags = {"--minimal", "--keep-final"}
    args = [a for a in sys.argv[1:] if a not in flags]
    main(args[0], args[1:], minimal="--minimal" in sys.argv, keep_final="--keep-final" in sys.argv)
