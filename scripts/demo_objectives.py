"""Compare OPCD objectives on the demo task (French system prompt, Qwen2.5-Coder-0.5B, LoRA).

Trains with the given overrides on top of a small demo-like config and prints, every 4
steps, the training loss, the student's probability mass on the top-k slots, and the
French rate on 16 held-out prompts *without* the system prompt (16 new tokens each).

    python scripts/demo_objectives.py train.lr=4e-4 loss.union=true loss.objective=forward_kl
    python scripts/demo_objectives.py train.lr=4e-4 loss.union=true               # reverse KL
    python scripts/demo_objectives.py train.lr=1e-3 loss.union=true loss.renormalize=true

The figures recorded in README.md ("What the demo showed") came from these commands.
"""

from __future__ import annotations

import sys
import tempfile
import time

from opcd.config import config_from_dict
from opcd.evaluate import evaluate
from opcd.trainer import Trainer

BASE = {
    "model": "qwen2.5-coder-0.5b-instruct",
    "task": {"name": "french"},
    "rollout": {"max_new_tokens": 8, "batch_size": 8},
    "train": {"steps": 12, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3},
    "lora": {"enabled": True, "r": 16, "alpha": 32},
    "run": {"dir": tempfile.mkdtemp(prefix="opcd-objectives-"), "plot": False},
}


def main(overrides: list[str]) -> None:
    cfg = config_from_dict(BASE, overrides)
    tr = Trainer(cfg, progress=False)
    t0 = time.time()
    for s in range(cfg.train.steps):
        m = tr.train_step()
        if (s + 1) % 4 == 0:
            r = evaluate(tr.student, tr.tokenizer, tr.task, size=16, max_new_tokens=16,
                         temperature=1.0, seed=1)
            print(overrides, "step", s + 1, f"loss {m['loss']:.3f}",
                  f"smass {m['student_topk_mass']:.3f} french {r.score:.2f}",
                  f"{time.time() - t0:.0f}s", repr(r.records[0]["response"][:60]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
