"""The in-context lift of the behaviour suite's system prompts on a model: the behaviour
rate on the held-out prompts with the system prompt minus without (what distillation can
put into the weights), each with its standard error.

    python scripts/objectives/lift.py [--model NAME] [--size 24] [ENTRY ...]

Writes runs/objectives/lift-MODEL.json and prints a markdown table (all entries by default).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from opcd.config import TaskConfig
from opcd.eval.evaluate import evaluate
from opcd.models import load_model
from opcd.tasks import build_task
from opcd.tasks.behaviours import load_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("entries", nargs="*")
    args = ap.parse_args()
    names = args.entries or list(load_suite())
    model, tok = load_model(args.model)
    rows = []
    print("| entry | behaviour | without | with | lift |\n|---|---|---|---|---|")
    for name in names:
        task = build_task(TaskConfig(name="suite", behaviour=name))
        kw = dict(size=args.size, max_new_tokens=args.max_new_tokens, batch_size=args.size)
        base = evaluate(model, tok, task, with_context=False, **kw)
        ctx = evaluate(model, tok, task, with_context=True, **kw)
        lift, se = ctx.score - base.score, math.hypot(ctx.stderr, base.stderr)
        rows.append({"entry": name, "behaviour": task.behaviour, "without": base.score,
                     "without_se": base.stderr, "with": ctx.score, "with_se": ctx.stderr,
                     "lift": lift, "lift_se": se})
        print(f"| {name} | `{task.behaviour}` | {base.score:.2f} ± {base.stderr:.2f} | "
              f"{ctx.score:.2f} ± {ctx.stderr:.2f} | {lift:+.2f} ± {se:.2f} |", flush=True)
    out = Path("runs/objectives") / f"lift-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
