"""The table of docs/objectives.md from runs/objectives/*.json (see run.py and grid.sh).

    python scripts/objectives/table.py [--answers CELL STEP]

One row per cell: the behaviour rate and the quality figure at every evaluation, the largest
entropy and smallest top-k mass over the steps, and the guard's alarms; then per objective
the mean over its seeds. ``--answers`` prints one cell's answers at one evaluation.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

OUT = Path("runs/objectives")


def _cells() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]


def _fmt(e: dict) -> str:
    q = "n/a" if e["quality"] is None else f"{e['quality']:+.2f}"
    return f"{e['score'] * 100:.0f}% / {q}"


def main(argv: list[str]) -> None:
    cells = _cells()
    if argv[:1] == ["--answers"]:
        cell = next(c for c in cells if c["name"] == argv[1])
        ev = next(e for e in cell["evals"] if e["step"] == int(argv[2]))
        for a in ev["answers"]:
            print("-", " ".join(a.split())[:300])
        return
    steps = sorted({e["step"] for c in cells for e in c["evals"]})
    print("| cell | " + " | ".join(f"step {s}" for s in steps)
          + " | max H | min top-k mass | guard alarms | s |")
    print("|---" * (len(steps) + 5) + "|")
    for c in cells:
        by = {e["step"]: e for e in c["evals"]}
        hs = [s["student_entropy"] for s in c["steps"]]
        ms = [s["student_topk_mass"] for s in c["steps"]]
        alarms = ",".join(str(g["step"]) for g in c["guard"]) or "-"
        print(f"| {c['name']} | " + " | ".join(_fmt(by[s]) if s in by else "" for s in steps)
              + f" | {max(hs):.2f} | {min(ms):.3f} | {alarms} | {c['seconds']:.0f} |")
    ctx = next((c["in_context"] for c in cells if c.get("in_context")), None)
    if ctx:
        print(f"\nIn context (the ceiling): {ctx['score'] * 100:.0f}% ± {ctx['stderr'] * 100:.0f}, "
              f"quality {ctx['quality']:+.2f} ± {ctx['quality_stderr']:.2f}")
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c["name"].rsplit("-s", 1)[0], []).append(c)
    print("\n| objective | seeds | final rate | final quality |")
    print("|---|---|---|---|")
    for name, cs in groups.items():
        last = [c["evals"][-1] for c in cs]
        rate = statistics.mean(e["score"] for e in last)
        qs = [e["quality"] for e in last if e["quality"] is not None]
        sd = f" ± {statistics.stdev(e['score'] for e in last) * 100:.0f}" if len(last) > 1 else ""
        print(f"| {name} | {len(cs)} | {rate * 100:.0f}%{sd} | "
              f"{statistics.mean(qs):+.2f} |" if qs else "| n/a |")


if __name__ == "__main__":
    main(sys.argv[1:])
