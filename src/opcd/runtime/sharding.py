"""FSDP: the student's weights, gradients and AdamW moments sharded over the processes.

Launched with an FSDP configuration (``accelerate launch --use_fsdp``, or an accelerate
config file with ``distributed_type: FSDP``), opcd shards the *student* with PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer is one unit and the
root (embeddings, final norm, output head) another. Each process then holds 1/N of the
student's weights, gradients and optimiser state. The teacher (a ``frozen`` copy, taken
before the student is sharded, or a separate ``model``) has its decoder layers sharded the
same way (:func:`shard_frozen_layers`). Gathered whole only for a while:

- the student's weights *while sampling* (rollouts and evaluation): :func:`gathered`
  all-gathers them once and keeps them whole until sampling ends, so a process decodes
  alone, with no collective per token, and processes may finish at different times;
- the teacher's layers while it scores a step's rows (the same way; its embeddings and
  output head are never sharded, since the loss reads the head during the update).

The update runs every micro-batch's forward and backward through FSDP (all-gather a layer,
use it, free it; gradients reduce-scattered). FSDP averages gradients over processes and
opcd's loss is already normalised by the global batch's token count, so
:meth:`opcd.runtime.distributed.Dist.sum_gradients` scales the sharded gradients by N: the step
equals the one-process step. Every process must run the same number of micro-batches:
the trainer pads the shorter processes with zero-weight repeats.

Checkpoints hold the *full* state (gathered here, written by the main process) in the same
layout as an unsharded run, so a run resumes on any process count, sharded or not. Under
LoRA the whole PEFT model is sharded, a checkpoint holds the adapter as usual, and the
final merged model is folded from the gathered state (:func:`merged_lora_state`).

Which accelerate FSDP settings are read: ``FSDP_RESHARD_AFTER_FORWARD`` (``true`` /
``FULL_SHARD``: free each layer's gathered weights after its forward; ``false`` /
``SHARD_GRAD_OP`` / ``NO_RESHARD``: keep them until the backward) and
``FSDP_ACTIVATION_CHECKPOINTING`` (turns on ``train.gradient_checkpointing``).
``FSDP_OFFLOAD_PARAMS=true`` is refused. The rest (wrap policy, state-dict type,
prefetching, FSDP version) is decided by opcd as described above.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opcd.errors import ConfigError


@dataclass(frozen=True)
class FsdpSettings:
    """How the student is sharded (read from the launcher's environment)."""

    reshard_after_forward: bool = True
    activation_checkpointing: bool = False


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def fsdp_settings_from_env() -> FsdpSettings | None:
    """The FSDP settings accelerate's launcher exported, or None without FSDP."""
    if _flag("ACCELERATE_USE_FSDP", "false") != "true":
        return None
    if _flag("FSDP_OFFLOAD_PARAMS", "false") == "true":
        raise ConfigError(
            "This run was launched with FSDP parameter offloading (fsdp_offload_params: true), "
            "which opcd does not support yet. Set fsdp_offload_params: false in the accelerate "
            "config (or drop --fsdp_offload_params)."
        )
    reshard = _flag("FSDP_RESHARD_AFTER_FORWARD", "true")
    known = {"true": True, "full_shard": True, "false": False, "shard_grad_op": False,
             "no_reshard": False}
    if reshard not in known:
        raise ConfigError(
            f"FSDP_RESHARD_AFTER_FORWARD={reshard!r} is not understood; use true or false "
            "(FULL_SHARD / SHARD_GRAD_OP also work)."
        )
    return FsdpSettings(
        reshard_after_forward=known[reshard],
        activation_checkpointing=_flag("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true",
    )


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _layer_classes(model: nn.Module) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"{type(model).__name__} does not name its decoder layer class (_no_split_modules), "
            "so opcd cannot shard it with FSDP. Launch with a data-parallel configuration "
            "(configs/accelerate/ddp_gpu.yaml) instead."
        )
    return names


def shard_model(model: nn.Module, world: int, device: torch.device, settings: FsdpSettings) -> nn.Module:
    """Shard ``model`` in place over the ``world`` processes: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"none of {type(model).__name__}'s modules is a {sorted(names)}: opcd cannot find the "
            "decoder layers to shard. Launch with a data-parallel configuration instead."
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
        layer._opcd_reshard = settings.reshard_after_forward
    # The root stays gathered from its forward to its backward: the loss reads the output
    # head's weight between the two (see opcd.teachers.scoring.response_hidden).
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model._opcd_reshard = False
    # FSDP settles which unit is the root at the first forward, which must be the whole
    # model's: sampling calls the decoder directly. One token through the model does it.
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False,
              logits_to_keep=1)
    for m in _fsdp_modules(model):  # every unit back to its shard (the optimiser takes these)
        m.reshard()
    from torch.distributed.tensor import DTensor

    whole = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if whole:
        raise RuntimeError(f"opcd: FSDP left parameters unsharded: {whole[:3]}")
    return model


def shard_frozen_layers(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """Shard the decoder layers of a frozen model (the teacher) over the ``world`` processes.

    Only the layers: the root's embeddings and output head stay whole, since the loss reads
    the head between forwards. The model is only run inside :func:`gathered` (whole, no
    backward), so each process holds 1/N of the layers' weights outside teacher scoring.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = _layer_classes(model)
    for layer in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        layer._opcd_reshard = False
        layer.reshard()
    return model


def has_shards(model: nn.Module | None) -> bool:
    """True when some of ``model``'s modules are sharded (a student or a teacher)."""
    return model is not None and bool(_fsdp_modules(model))


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep every weight of a sharded ``model`` whole (gathered once) inside the block.

    For sampling: the process then runs forwards on its own, with no collective, as many as
    it needs. Every process must enter and leave the block together (two collectives).
    A no-op for a model that is not sharded.
    """
    mods = _fsdp_modules(model)
    if not mods:
        yield
        return
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(bool(getattr(m, "_opcd_reshard", True)), recurse=False)


# --------------------------------------------------------------------------- full state


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the main process (CPU tensors), empty elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable parameters (a LoRA run's adapters) on the main process (CPU),
    empty elsewhere. Collective: every process gathers them in the same order."""
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            if dist.get_rank() == 0:
                out[name] = whole.cpu()
    return out


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's whole state on the main process, in ``optimizer.state_dict()``'s layout
    (parameters numbered in order, as an unsharded run saves it); empty elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not sd:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    state = {index[name]: value for name, value in sd["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a whole (unsharded) state dict into the sharded ``model`` (every process);
    the missing and unexpected keys."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    keys = set_model_state_dict(model, state, options=_options(strict=False))
    return list(keys.missing_keys), list(keys.unexpected_keys)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              sd: dict[str, Any]) -> None:
    """Load an ``optimizer.state_dict()``-layout state into the sharded optimiser."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _trainable_names(model)
    state = {names[int(i)]: value for i, value in sd["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=_options())


def save_pretrained_full(model: nn.Module, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """``save_pretrained`` of a sharded model from its gathered ``state``, under the model's own
    class name (FSDP wraps the class, and transformers records the class name in config.json)."""
    # A tied output head is one parameter under two names: saved once, as transformers does.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k in names}
    fsdp_cls = type(model)
    plain = next(c for c in fsdp_cls.__mro__[1:] if issubclass(c, nn.Module)
                 and not c.__name__.startswith("FSDP"))
    model.__class__ = plain
    try:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)  # type: ignore[operator]
    finally:
        model.__class__ = fsdp_cls


# --------------------------------------------------------------------------- LoRA under FSDP


def merged_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights with the LoRA adapters folded in, from the gathered ``state``
    of a sharded PEFT ``model`` (its own parameter names).

    PEFT's ``merge_and_unload`` works on the modules' weights, which are shards here; this is
    its computation for opcd's plain LoRA layers on the whole tensors: ``W + (B @ A) * scale``
    for each adapted linear layer (an adapter's ``scaling``, the layers' ``fan_in_fan_out``
    false, as PEFT sets it for ``nn.Linear``). Names are the base model's, tied copies once.
    """
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    adapted: dict[str, torch.Tensor] = {}
    for name, module in model.get_base_model().named_modules():  # type: ignore[operator]
        lora_a = getattr(module, "lora_A", None)
        if not lora_a or not hasattr(module, "base_layer"):
            continue
        if getattr(module, "fan_in_fan_out", False):
            raise ConfigError(f"LoRA layer {name} has fan_in_fan_out=True, which opcd cannot "
                              "merge from sharded weights; launch the run data parallel.")
        delta = None
        for adapter in module.active_adapters:
            if adapter not in lora_a:
                continue
            a = state[f"{prefix}{name}.lora_A.{adapter}.weight"]
            b = state[f"{prefix}{name}.lora_B.{adapter}.weight"]
            d = (b.double() @ a.double()) * module.scaling[adapter]
            delta = d if delta is None else delta + d
        if delta is not None:
            adapted[f"{name}.weight"] = delta
    keep = {n.removeprefix(prefix).replace(".base_layer.", ".") for n, _ in model.named_parameters()}
    keep |= {n.removeprefix(prefix).replace(".base_layer.", ".") for n, _ in model.named_buffers()}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        clean = key.removeprefix(prefix).replace(".base_layer.", ".")
        if clean not in keep:
            continue  # a tied head's second name
        out[clean] = (value.double() + adapted[clean]).to(value.dtype) if clean in adapted else value
    return out


def adapter_keys_to_model_keys(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """A saved adapter's keys (``...lora_A.weight``) as the PEFT model names its parameters
    (``...lora_A.<adapter>.weight``), for :func:`load_full_model_state`."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            head, leaf = key.rsplit(".", 1)
            key = f"{head}.{adapter}.{leaf}"
        out[key] = value
    return out
