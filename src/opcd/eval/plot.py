"""PNG plot of a run: training loss and the behaviour score (without context) over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(history: list[dict[str, Any]], path: Path, title: str = "OPCD run") -> Path:
    """Draw loss (left) and eval score with its standard error (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval" and not r.get("with_context")]
    ctx = [r for r in history if r.get("type") == "eval" and r.get("with_context")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], marker="o", ms=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (reverse KL, top-k)")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    if evals:
        xs = [r["step"] for r in evals]
        ys = [r["score"] for r in evals]
        es = [r.get("stderr", 0.0) or 0.0 for r in evals]
        ax2.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label="without context")
    for r in ctx:
        ax2.axhline(r["score"], color="gray", ls="--", label="with context (ceiling)")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("step")
    ax2.set_ylabel("behaviour rate")
    ax2.set_title("held-out behaviour")
    ax2.grid(alpha=0.3)
    if evals or ctx:
        ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
