"""Packed fp32 weights for the token-by-token decode on CPUs (used by :func:`opcd.sampling.rollout.sample`).

A decode step multiplies a few rows (one per sequence) by every weight matrix of the model:
it is bound by how fast the weights are read, and torch's default fp32 product for such
shapes reads them well below the machine's memory bandwidth. Two kernels lay each matrix
out once for a fixed row count and then read it faster: oneDNN's prepacked linear
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``) and MKL's packed GEMM
(``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``). Which one wins, and by how
much, depends on the CPU (``benchmarks/micro.py decode``, Qwen2.5-0.5B, 8 rows, one 2-core
EPYC without AVX-512: a decode step 378 ms plain, 144 ms oneDNN, 323 ms MKL; an earlier one
with AVX-512: MKL read the weights at 18 GB/s against plain 11), so :func:`should_pack` asks :mod:`opcd.sampling.probe`, which times each once per
machine.

:func:`packed_linears` packs the weight of every fp32 ``nn.Linear`` on the CPU for a fixed
number of rows and routes products with at most that many rows through the packed copy
(padding fewer rows up to it, so a row's result never depends on how many other rows are
live); larger products (the prompt read) keep the plain weights. The packed copies cost one
extra copy of the linear weights while sampling and are freed on exit (handing the freed
pages back to the system with ``malloc_trim`` made the update slower on this VM, commit
6142e46; figures in ``benchmarks/results.md``). Packing costs a few decode steps with
oneDNN (Qwen2.5-0.5B: 0.6-1.7 s) and about a dozen with MKL, so :func:`should_pack` asks
for long enough generations (:data:`PACK_MIN_NEW_TOKENS`). Results equal the plain product
up to float rounding (a different summation order). :func:`opcd.eval.evaluate.evaluate` packs
once for all its batches (the weights do not change during an evaluation); a ``sample()``
call inside it finds the modules packed and packs nothing again.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opcd.sampling import probe

KERNELS = ("onednn", "mkl")
PACK_MIN_NEW_TOKENS = {"onednn": 16, "mkl": 128}
"""``auto`` packs only for generations of at least this many new tokens: oneDNN's packing of
Qwen2.5-0.5B (0.6-1.7 s) is paid back after 3-7 decode steps of 8 rows (``micro.py decode``);
MKL's gains less per step, so it needs longer generations."""
MIN_SPEEDUP = 1.1
"""``auto`` packs only where the probe's packed product is at least this much faster."""


def packing_available() -> bool:
    """Whether this torch build has a packed fp32 kernel (oneDNN or MKL)."""
    return bool(available_kernels())


def available_kernels() -> list[str]:
    """The packed fp32 kernels this torch build has."""
    return ([k for k, ok in (("onednn", probe.onednn_available()), ("mkl", probe.mkl_available()))
             if ok])


def packed_decode_setting() -> str:
    """``$OPCD_PACKED_DECODE``: ``auto`` (default: the probe decides), ``1`` (the fastest
    packed kernel for any length), ``onednn`` or ``mkl`` (that kernel), or ``0`` (never)."""
    raw = os.environ.get("OPCD_PACKED_DECODE", "auto")
    value = raw.strip().lower()
    if value in ("0", "false", "off", "no"):
        return "0"
    if value in ("1", "true", "on", "yes"):
        return "1"
    if value in KERNELS:
        return value
    if value not in ("", "auto"):
        warnings.warn(f"OPCD_PACKED_DECODE={raw!r} is not auto, 1, 0, onednn or mkl; using auto. "
                      "Set it to 0 (plain fp32 decode), 1 (pack for any length), onednn or mkl "
                      "(that kernel) or auto (measured on this machine).", stacklevel=2)
    return "auto"


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    # subclasses with their own forward (quantised or adapter layers) are left alone
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and isinstance(w, Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.dim() == 2)


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return next(m.in_features for m in model.modules() if _packable(m))


def fastest_kernel(model: nn.Module, rows: int) -> tuple[str | None, float]:
    """The fastest packed kernel for ``model``'s products of ``rows`` rows on this machine
    (:func:`opcd.sampling.probe.product_seconds`) and its speed-up over the plain product (None, 1.0
    where the build has none)."""
    figures = probe.product_seconds(_hidden_size(model), rows)
    timed = [(figures[f"float32/{k}"], k) for k in available_kernels() if f"float32/{k}" in figures]
    if not timed:
        return None, 1.0
    seconds, kernel = min(timed)
    return kernel, figures["float32"] / seconds


def should_pack(model: nn.Module, max_new_tokens: int, rows: int = 8) -> str | None:
    """The packed kernel :func:`opcd.sampling.rollout.sample` decodes ``model`` with, or None (plain)."""
    setting = packed_decode_setting()
    if setting == "0":
        return None
    why = ("this torch build has no packed fp32 kernel" if not packing_available() else
           None if any(_packable(m) for m in model.modules()) else
           "the model has no float32 linear layers on the CPU")
    if why is None and setting in KERNELS and setting not in available_kernels():
        why = f"this torch build has no {setting} kernel"
    if why is not None:
        if setting != "auto":  # asked for explicitly: say why it does not happen
            warnings.warn(f"OPCD_PACKED_DECODE={setting}, but {why}: decoding with the plain "
                          "weights.", stacklevel=2)
        return None
    if setting in KERNELS:
        return setting
    kernel, speedup = fastest_kernel(model, max(1, rows))
    if kernel is None:
        return None
    if setting == "1":
        return kernel
    if speedup < MIN_SPEEDUP or max_new_tokens < PACK_MIN_NEW_TOKENS[kernel]:
        return None
    return kernel


def _padded_product(x: Tensor, rows: int, product) -> Tensor:
    """``product`` (of exactly ``rows`` rows) applied to ``x``'s rows, padded up to ``rows``."""
    n = x.numel() // x.shape[-1]
    flat = x.reshape(n, x.shape[-1])
    if n < rows:
        flat = torch.cat([flat, flat.new_zeros(rows - n, flat.shape[1])])
    out = product(flat.contiguous())
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


def _fits(x: Tensor, rows: int) -> bool:
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < n <= rows and x.dtype == torch.float32


def _packed_forward(kernel: str, weight: Tensor, bias: Tensor | None, packed: Tensor, rows: int):
    def forward(x: Tensor) -> Tensor:
        if not _fits(x, rows):
            return F.linear(x, weight, bias)
        return _padded_product(
            x, rows, lambda flat: probe.packed_product(kernel, flat, packed, weight, bias, rows))

    return forward


def _plain_lora(module: nn.Module) -> str | None:
    """The one active adapter of a peft LoRA linear layer that a merged packed copy can
    replace (plain LoRA on a packable fp32 ``nn.Linear``, no DoRA or other variant, no bias on
    the adapter, not merged into the base), else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None
    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return None
    active = list(module.active_adapters)
    if len(active) != 1 or getattr(module, "fan_in_fan_out", False):
        return None
    name = active[0]
    if (name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or not _packable(module.base_layer)):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if not (_packable(a) and _packable(b) and a.bias is None and b.bias is None):
        return None
    return name


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int, kernel: str | None = None) -> Iterator[int]:
    """Within the block, products of at most ``rows`` rows use packed weights (``kernel``:
    ``onednn``, ``mkl``, or None for the fastest on this machine).

    A peft LoRA layer is packed as one matrix, its base weight plus ``scaling * B @ A``: one
    product per layer instead of three (Qwen2.5-0.5B, r=16 on every linear
    layer, 8 rows, ``benchmarks/micro.py decode``: 329 ms per step with the adapter's own
    products, 191 ms merged). The
    layer falls back to its own forward whenever its adapter is switched off, merged or
    changed inside the block (the frozen teacher scoring with the adapter off).

    Yields the number of modules packed (0 where this build has no packed kernel). Inference
    only: the packed path has no gradient, so use it under ``torch.no_grad()``. Each module's
    ``forward`` is restored on exit, even on an error.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown packed kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    patched: list[nn.Module] = []
    try:
        loras = {m: name for m in model.modules()
                 if "forward" not in m.__dict__ and (name := _plain_lora(m)) is not None}
        inside = {id(part) for m in loras for part in m.modules() if part is not m}
        plain = [m for m in model.modules()
                 if _packable(m) and "forward" not in m.__dict__ and id(m) not in inside]
        if (loras or plain) and packing_available():
            kernel = kernel or fastest_kernel(model, rows)[0]
            if kernel in available_kernels():
                for module, name in loras.items():
                    _install_lora(module, name, rows, kernel)
                    patched.append(module)
                for module in plain:
                    _install(module, rows, kernel)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # drops the closure and with it the packed copy


def _install(module: nn.Module, rows: int, kernel: str) -> None:
    weight = module.weight.detach()
    bias = module.bias.detach() if isinstance(module.bias, Tensor) else None
    packed = probe.reorder(kernel, weight, rows)
    module.forward = _packed_forward(kernel, weight, bias, packed, rows)


def _install_lora(module: nn.Module, name: str, rows: int, kernel: str) -> None:
    base = module.base_layer
    a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
    merged = torch.addmm(base.weight.detach(), b, a, alpha=float(module.scaling[name]))
    bias = base.bias.detach() if isinstance(base.bias, Tensor) else None
    packed = probe.reorder(kernel, merged, rows)
    plain = merged if kernel == "mkl" else None  # MKL's product reads the plain matrix too
    del merged
    own_forward = type(module).forward.__get__(module)

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if (args or kwargs or not _fits(x, rows) or module.disable_adapters or module.merged
                or list(module.active_adapters) != [name]):
            return own_forward(x, *args, **kwargs)
        return _padded_product(
            x, rows, lambda flat: probe.packed_product(kernel, flat, packed, plain, bias, rows))

    module.forward = forward
