"""The table of docs/objectives.md from runs/objectives/*.json (see run.py and grid.sh).

    python scripts/objectives/table.py [--answers CELL STEP]
    python scripts/objectives/table.py --defaults     # the min-* cells of defaults.sh

One row per cell: the behaviour rate and the quality figure at every evaluation, the largest
entropy and smallest top-k mass over the steps, and the steps at which the collapse guard
with today's default bounds alarms on the recorded figures; then per objective the mean over
its seeds. ``--answers`` prints one cell's answers at one evaluation. ``--defaults``: the
cells of ``defaults.sh`` (issue 18's targets with a minimal config) against the targets.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from opcd.training.guard import CollapseGuard, GuardConfig

OUT = Path("runs/objectives")


def _cells(minimal: bool = False) -> list[dict]:
    """The recorded cells: the demo-config grid's, or (``minimal``) defaults.sh's."""
    cells = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    return [c for c in cells if isinstance(c, dict) and "evals" in c  # (not lift-*.json)
            and bool(c.get("minimal")) == minimal]


def defaults_table() -> None:
    """Issue 18's targets per behaviour: the held-out rate without the prompt >= 80% of the
    in-context rate, the quality figure at least the base model's within 2 standard errors
    (of the difference: sqrt(se_student^2 + se_base^2)), the guard silent."""
    print("| cell (behaviour) | in context | base (step 0) | " + "evaluations: step: rate / quality ± se"
          + " | first step meeting both targets | guard |")
    print("|---|---|---|---|---|---|")
    for c in _cells(minimal=True):
        ctx, evals = c["in_context"], c["evals"]
        base = evals[0]
        met = []
        parts = []
        for e in evals[1:]:
            rate_ok = e["score"] >= 0.8 * ctx["score"]
            se = (e["quality_stderr"] ** 2 + base["quality_stderr"] ** 2) ** 0.5
            quality_ok = e["quality"] >= base["quality"] - 2 * se
            if rate_ok and quality_ok:
                met.append(e["step"])
            parts.append(f"{e['step']}: {e['score'] * 100:.0f}% / {e['quality']:+.2f} ± "
                         f"{e['quality_stderr']:.2f}{'' if quality_ok else ' (q)'}"
                         f"{'' if rate_ok else ' (r)'}")
        behaviour = next((o.split("=", 1)[1] for o in c["overrides"] if o.startswith("task.behaviour=")), "?")
        alarms = ",".join(str(s) for s in _replayed_alarms(c)) or "-"
        fired = "fired" if c["guard"] else "silent"
        print(f"| {c['name']} ({behaviour}) | {ctx['score'] * 100:.0f}% / {ctx['quality']:+.2f} | "
              f"{base['score'] * 100:.0f}% / {base['quality']:+.2f} ± {base['quality_stderr']:.2f} | "
              f"{'; '.join(parts)} | {met[0] if met else 'none'} | {fired} (replayed: {alarms}) |")
    print("\n(r): rate below 80% of the in-context rate; (q): quality more than 2 standard "
          "errors below the base's.")


def _replayed_alarms(cell: dict) -> list[int]:
    """Steps at which the collapse guard, with today's default bounds, would alarm on the
    cell's recorded figures (cells run before a bound changed were watched with the old one)."""
    guard = CollapseGuard(GuardConfig(action="warn"), [])
    evals = {e["step"]: e for e in cell["evals"]}
    alarms = []
    if 0 in evals and guard.after_eval(0, evals[0]["quality"]):
        alarms.append(0)
    last = max(evals)
    for m in cell["steps"]:
        if guard.after_step(m):
            alarms.append(m["step"])
        e = evals.get(m["step"])
        if e is not None and guard.after_eval(m["step"], e["quality"], final=m["step"] == last):
            alarms.append(m["step"])
    return alarms


def _fmt(e: dict) -> str:
    q = "n/a" if e["quality"] is None else f"{e['quality']:+.2f}"
    return f"{e['score'] * 100:.0f}% / {q}"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--defaults"]:
        defaults_table()
        return
    cells = _cells()
    if argv[:1] == ["--answers"]:
        cell = next(c for c in [*cells, *_cells(minimal=True)] if c["name"] == argv[1])
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
        alarms = ",".join(str(s) for s in _replayed_alarms(c)) or "-"
        print(f"| {c['name']} | " + " | ".join(_fmt(by[s]) if s in by else "" for s in steps)
              + f" | {max(hs):.2f} | {min(ms):.3f} | {alarms} | {c['seconds']:.0f} |")
    ctx = next((c["in_context"] for c in cells if c.get("in_context")), None)
    if ctx:
        print(f"\nIn context (the ceiling): {ctx['score'] * 100:.0f}% ± {ctx['stderr'] * 100:.0f}, "
              f"quality {ctx['quality']:+.2f} ± {ctx['quality_stderr']:.2f}")
    groups: dict[str, list[dict]] = {}
    for c in cells:
        if not c["name"].startswith("suite-"):
            groups.setdefault(c["name"].rsplit("-s", 1)[0], []).append(c)
    print("\n| objective | seeds | rate at step 4 | final rate (step 8) | final quality | "
          "runs the guard flagged |")
    print("|---|---|---|---|---|---|")
    for name, cs in groups.items():
        at4 = [e for c in cs for e in c["evals"] if e["step"] == 4]
        last = [c["evals"][-1] for c in cs]
        qs = [e["quality"] for e in last if e["quality"] is not None]
        flagged = sum(bool(_replayed_alarms(c)) for c in cs)
        print(f"| {name} | {len(cs)} | {_mean_sd([e['score'] for e in at4])} | "
              f"{_mean_sd([e['score'] for e in last])} | "
              f"{f'{statistics.mean(qs):+.2f}' if qs else 'n/a'} | {flagged} of {len(cs)} |")


def _mean_sd(rates: list[float]) -> str:
    """Mean over seeds in percent, ± the standard deviation between seeds."""
    if not rates:
        return "n/a"
    sd = f" ± {statistics.stdev(rates) * 100:.0f}" if len(rates) > 1 else ""
    return f"{statistics.mean(rates) * 100:.0f}%{sd}"

if __name__ == "__main__":
    main(sys.argv[1:])
