"""Checkpoints: the student's weights in HF format plus the trainer state, written atomically.

A checkpoint is a folder ``checkpoints/step-000010/`` holding ``model/`` (``save_pretrained``:
the full model, or only the PEFT adapter under LoRA), ``optimizer.pt`` (AdamW state,
tensors only, read back with ``weights_only=True``) and ``state.json`` (step, data
position, RNG states). It is written into a temporary folder and renamed into place, so
a checkpoint is either complete or absent. The newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.json"
_PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as JSON-serialisable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state((np_s[0], np.array(np_s[1], dtype=np.uint32), *np_s[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its folder."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{_PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if "rng" not in state:
        state = {**state, "rng": rng_state()}
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))


def load_weights(ckpt: Path, model: nn.Module, lora: bool) -> None:
    """Load the checkpoint's weights into ``model`` in place (safetensors only)."""
    from safetensors.torch import load_file

    folder = ckpt / "model"
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output heads are saved once; anything else missing is an error.
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
