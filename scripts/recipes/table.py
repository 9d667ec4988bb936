"""Print the table of docs/results/recipes.md from what scripts/recipes/time.sh kept.

For each recipe timed (docs/results/recipes/NAME.time): the wall time and peak RSS of its
header's command, and from NAME.metrics.jsonl the run's evaluations: in context (step 0),
without it before training (step 0) and at the last step, each with its standard error and
the quality figure (the frozen base with the context reading each answer: per token, its
log-prob minus its expected log-prob, in nats; about 0 for answers it would write itself,
far below for garbage; see opcd.eval.evaluate.teacher_judge), plus the rates of each rule
of a multi-rule behaviour and any collapse-guard alarm.

    python scripts/recipes/table.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DIR = Path(__file__).resolve().parents[2] / "docs" / "results" / "recipes"
STANDARD = {"type", "step", "score", "stderr", "n", "with_context", "quality", "quality_stderr"}


def _eval(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    out = f"{rec['score']:.3f} ± {rec['stderr']:.3f}"
    if rec.get("quality") is not None:
        out += f", quality {rec['quality']:+.2f} ± {rec['quality_stderr']:.2f}"
    return out


def _extra(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return ""
    parts = [f"{k} {v:.2f}" for k, v in rec.items() if k not in STANDARD and isinstance(v, float)]
    return "; ".join(parts)


def row(name: str) -> str:
    time_line = (DIR / f"{name}.time").read_text().strip()
    m = re.search(r"peak RSS (\d+) KiB.*?([\d.]+) s$", time_line)
    if not m:
        raise SystemExit(f"{name}.time: no 'peak RSS ... s' line (the run failed?): {time_line!r}")
    rss_gib, wall = int(m.group(1)) / 2**20, float(m.group(2))
    failed = re.match(r"exit ([1-9]\d*)", time_line)
    if failed:
        return (f"| `{name}.yaml` | failed (exit {failed.group(1)}) after {int(wall) // 60} min "
                f"{int(wall) % 60:02d} s | {rss_gib:.1f} GiB | | | | | |")
    recs = [json.loads(line) for line in (DIR / f"{name}.metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["type"] == "eval"]
    ctx = next((r for r in evals if r["with_context"]), None)
    plain = [r for r in evals if not r["with_context"]]
    base, last = (plain[0], plain[-1]) if plain else (None, None)
    steps = max((r["step"] for r in recs if r["type"] == "train"), default=0)
    guard = [r for r in recs if r["type"] == "guard"]
    alarm = "; ".join(f"step {g['step']}: {g['reasons']}" for g in guard) or "silent"
    rules = _extra(last)
    return (f"| `{name}.yaml` | {int(wall) // 60} min {int(wall) % 60:02d} s | {rss_gib:.1f} GiB | {steps} "
            f"| {_eval(ctx)} | {_eval(base)} | {_eval(last)}{' (' + rules + ')' if rules else ''} | {alarm} |")


def main() -> None:
    names = sorted(p.stem for p in DIR.glob("*.time"))
    print("| recipe | wall time | peak RSS | steps | in context | without, before | without, after | guard |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(name))


if __name__ == "__main__":
    main()
