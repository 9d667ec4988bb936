"""Checkpoints: the student's weights in HF format plus the trainer state, complete or absent.

A checkpoint is a folder ``checkpoints/step-000010/`` holding ``model/`` (``save_pretrained``:
the full model, or only the PEFT adapter under LoRA), ``optimizer.pt`` (AdamW state,
tensors only, read back with ``weights_only=True``), ``state.json`` (step, data position,
RNG states, skip counter) and ``manifest.json`` (the size and sha256 of every other file).

Guarantees (see docs/reliability.md):

- complete or absent: a checkpoint is written into ``.tmp-step-N-<pid>/``; every file and
  folder in it is fsynced, it is renamed to ``step-N`` and the parent folder is fsynced.
  A failed write (disk full, unwritable folder) deletes the temporary folder and raises
  :class:`~opcd.errors.RunFolderError` naming the folder and the OS error; the previous
  checkpoints are never touched before the new one is in place.
- verifiable: :func:`verify_checkpoint` re-hashes every file against the manifest;
  :func:`latest_intact` walks from the newest checkpoint back to the first intact one,
  warning (:class:`CheckpointWarning`) about each damaged one and moving it aside.
- the newest ``keep_last`` are kept; older ones are renamed aside (one atomic step) before
  they are deleted, so a crash while pruning never leaves a half-deleted ``step-N``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from opcd.errors import CheckpointError, RunFolderError

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "optimizer.pt"
DAMAGED_PREFIX = "damaged-"
_PREFIX = "step-"
_NAME = re.compile(r"step-([0-9]+)")
_TMP = ".tmp-"
_TRASH = ".trash-"
# What a failed write raises: the OS error, or safetensors' wrapper around it.
_WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged and skipped in favour of an older one."""


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as JSON-serialisable values."""
    np_state = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
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


# --------------------------------------------------------------------------- durable writes
def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every folder (so the entries are durable too)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(Path(root))


def os_error_text(e: BaseException) -> str:
    """``No space left on device [ENOSPC]``: the OS message and the errno name."""
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno or 0, "")
        return f"{e.strerror or e}" + (f" [{name}]" if name else "")
    return str(e)


def write_error(what: str, folder: Path, e: BaseException) -> RunFolderError:
    """A :class:`RunFolderError` for a failed write: the folder, the OS error and the fix."""
    detail = os_error_text(e)
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "StorageFull" in detail
    hint = (
        "The disk is full: free some space (or point run.dir at another disk)"
        if full else "Make the folder writable (or choose another run.dir)"
    )
    return RunFolderError(
        f"Could not write {what} in {str(folder)!r}: {detail}. {hint}, then continue with "
        "--resume. Nothing partial was left behind: the previous checkpoint is intact."
    )


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (temporary file, fsync, rename, fsync folder)."""
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_dir_atomically(final: Path, write: Callable[[Path], None], what: str) -> Path:
    """Build folder ``final`` by ``write(tmp)`` in a temporary sibling, then rename it in place.

    Either ``final`` is complete afterwards or it is as it was before (an older ``final``
    is only moved aside once the new one is fully written and synced). Failed writes raise
    :class:`RunFolderError` and leave no temporary folder behind.
    """
    parent = final.parent
    tmp = parent / f"{_TMP}{final.name}-{os.getpid()}"
    trash = parent / f"{_TRASH}{final.name}-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in (tmp, trash):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            os.replace(final, trash)  # a non-empty folder cannot be replaced in one rename
        try:
            os.replace(tmp, final)
        except BaseException:
            if trash.exists() and not final.exists():
                os.replace(trash, final)
            raise
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _WRITE_ERRORS):
            raise write_error(what, parent, e) from e
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- manifest
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, Any]:
    """Record the size and sha256 of every file under ``folder`` in ``manifest.json``."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST_FILE:
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": 1, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name carries, or None for anything else."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file of ``ckpt`` against its manifest and return its state.

    Raises :class:`CheckpointError` saying what is wrong (missing manifest, missing or
    truncated file, sha256 mismatch, unreadable state).
    """
    try:
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no readable manifest ({e})") from None
    needed = {STATE_FILE, OPTIMIZER_FILE}
    if not needed <= set(files) or not any(f.startswith("model/") for f in files):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: its manifest lacks "
                              f"{sorted(needed - set(files)) or ['model/']}")
    for rel, meta in sorted(files.items()):
        p = ckpt / rel
        try:
            size = p.stat().st_size
        except OSError:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: file {rel} is missing") from None
        if not isinstance(meta, dict) or size != meta.get("size"):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: file {rel} is truncated or changed "
                f"({size} bytes, the manifest says {meta.get('size') if isinstance(meta, dict) else '?'})"
            )
        try:
            digest = sha256_file(p)
        except OSError as e:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: file {rel} is unreadable ({e.strerror})") from None
        if digest != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: file {rel} does not match its sha256")
    state = read_state(ckpt)
    if state.get("step") != checkpoint_step(ckpt):
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} holds step {state.get('step')!r}, not the step in its name"
        )
    return state


# --------------------------------------------------------------------------- save / list
def clean_stale(folder: Path) -> None:
    """Remove the temporary and half-pruned entries that a killed process left in ``folder``."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith((_TMP, _TRASH)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (each moved aside first)."""
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        trash = old.with_name(f"{_TRASH}{old.name}-{os.getpid()}")
        try:
            os.replace(old, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(ckpt_root)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    *,
    write_model: Callable[[Path], None] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, with its manifest, and prune old ones.

    ``write_model`` (a folder -> None) replaces ``model.save_pretrained`` and
    ``optimizer_state`` replaces ``optimizer.state_dict()``: a sharded run passes its
    gathered state (see :mod:`opcd.runtime.sharding`).
    """
    full_state = {**state, "step": step}
    if "rng" not in full_state:
        full_state["rng"] = rng_state()

    def write(tmp: Path) -> None:
        if write_model is not None:
            write_model(tmp / "model")
        else:
            model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        opt_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save(opt_state, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(full_state), encoding="utf-8")
        write_manifest(tmp)  # last: lists every file above

    try:
        clean_stale(ckpt_root)
    except OSError as e:
        raise write_error(f"checkpoint step {step}", ckpt_root, e) from e
    final = write_dir_atomically(ckpt_root / checkpoint_name(step), write, f"checkpoint step {step}")
    prune(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders (``step-N`` with a manifest), oldest first. Not yet verified."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p for p in ckpt_root.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / MANIFEST_FILE).is_file()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def _set_aside(ckpt: Path) -> Path | None:
    """Rename a damaged checkpoint to ``damaged-step-N`` so that it is never used again."""
    target = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}.{n}")
    try:
        os.replace(ckpt, target)
    except OSError:
        return None
    return target


def latest_intact(ckpt_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, and its state; None when there is none at all.

    Each damaged checkpoint met on the way is reported with a :class:`CheckpointWarning`
    and renamed ``damaged-step-N``. When checkpoints exist but none is intact, raises
    :class:`CheckpointError`.
    """
    found = list_checkpoints(ckpt_root)
    damaged: list[str] = []
    for ck in reversed(found):
        try:
            return ck, verify_checkpoint(ck)
        except CheckpointError as e:
            moved = _set_aside(ck)
            where = f"; moved to {moved.name}" if moved else ""
            warnings.warn(
                f"{e}{where}. Falling back to the previous checkpoint.", CheckpointWarning,
                stacklevel=2,
            )
            damaged.append(ck.name)
    if damaged:
        raise CheckpointError(
            f"Every checkpoint in {str(ckpt_root)!r} is damaged ({', '.join(damaged)}): nothing "
            "intact to resume from. Start the run again with --overwrite."
        )
    return None


# --------------------------------------------------------------------------- load
def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {STATE_FILE} is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {STATE_FILE} is not a JSON object")
    return state


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer,
                   load_state: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Restore the optimizer's state; its implementation (fused or not) stays the current one.

    ``load_state_dict`` would also take the saved run's ``fused``/``foreach`` switches: a
    checkpoint written with another ``perf.fused_optimizer`` (or on a device without a fused
    kernel) resumes with this run's choice, the step counters moved where it needs them.
    ``load_state`` replaces ``optimizer.load_state_dict`` (a sharded run's loader).
    """
    kinds = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    try:
        sd = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        (load_state or optimizer.load_state_dict)(sd)
    except (OSError, RuntimeError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: the optimizer state cannot be restored ({e})"
        ) from None
    for group, (fused, foreach) in zip(optimizer.param_groups, kinds, strict=True):
        group["fused"], group["foreach"] = fused, foreach
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):  # fused/capturable: on the parameter's device
                on_device = fused or group.get("capturable")
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)


def load_weights(ckpt: Path, model: nn.Module, lora: bool,
                 load_state: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Load the checkpoint's weights into ``model`` in place (safetensors only).

    ``load_state`` (a state dict -> its missing and unexpected keys) replaces
    ``model.load_state_dict(state, strict=False)`` (and, with ``lora``, PEFT's loader, given
    the adapter's weights): a sharded run's loader.
    """
    from safetensors.torch import load_file

    folder = ckpt / "model"
    try:
        if lora:
            adapter = load_file(str(folder / "adapter_model.safetensors"))
            if load_state is not None:  # sharded: the adapter's keys, as the model names them
                _, unexpected = load_state(adapter)
                if unexpected:
                    raise CheckpointError(f"checkpoint {str(ckpt)!r}: adapter weights the model "
                                          f"does not have: {sorted(unexpected)[:5]}")
                return
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, adapter)
            return
        state: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        if load_state is None:
            missing, unexpected = model.load_state_dict(state, strict=False)
        else:
            missing, unexpected = load_state(state)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: the weights cannot be loaded ({e})") from None
    # Tied output heads are saved once; anything else missing is an error.
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not match the model: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
