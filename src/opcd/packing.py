"""Packed fp32 weights for the token-by-token decode on CPUs (used by :func:`opcd.rollout.sample`).

A decode step multiplies a few rows (one per sequence) by every weight matrix of the
model: it is bound by how fast the weights are read, not by arithmetic. torch's default
fp32 product for such shapes reads the weights at about 40% of this machine's memory
bandwidth (Qwen2.5-0.5B's matrices, 8 rows, 2 threads: 10.9 GB/s against 28.1 GB/s for a
plain sum); MKL's packed GEMM (``cblas_sgemm_pack``, reached through
``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``) lays each matrix out for
its kernel once and then reads it at 18.3 GB/s (``benchmarks/micro.py decode``).

:func:`packed_linears` packs the weight of every fp32 ``nn.Linear`` on the CPU for a fixed
number of rows and routes products with at most that many rows through the packed copy
(padding fewer rows up to it, so a row's result never depends on how many other rows are
live); larger products (the prompt read) keep the plain weights. The packed copies cost one
extra copy of the linear weights while sampling and are freed on exit. The freed pages stay
with the process and the update's activations reuse them: a full fine-tuning step's peak is
unchanged (Qwen2.5-0.5B: 17.70 against 17.67 GiB); a LoRA step's peak over two steps grew
from 11.27 to 11.49 GiB. (Handing the pages back with glibc's ``malloc_trim``, commit
6142e46, made it worse: the update faulted them in again, 5-10 s slower per step on this VM,
and the LoRA peak rose to 11.79 GiB; figures in ``benchmarks/results.md``.) Packing takes
about as long as a dozen decode steps, so :func:`should_pack` asks for long enough
generations.
Results equal the plain product up to float rounding (a different summation order).
:func:`opcd.evaluate.evaluate` packs once for all its batches (the weights do not change
during an evaluation); a ``sample()`` call inside it finds the modules packed and packs
nothing again (entering :func:`packed_linears` on packed modules is a no-op).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACK_MIN_NEW_TOKENS = 128
"""``auto`` packs only for generations of at least this many new tokens (pack cost: about a
dozen decode steps; each packed step saves about a third)."""


def packing_available() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM."""
    return (torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
            and hasattr(torch.ops.mkl, "_mkl_linear"))


def packed_decode_setting() -> str:
    """``$OPCD_PACKED_DECODE``: ``auto`` (default), ``1`` (always where possible) or ``0``."""
    raw = os.environ.get("OPCD_PACKED_DECODE", "auto")
    value = raw.strip().lower()
    if value in ("0", "false", "off", "no"):
        return "0"
    if value in ("1", "true", "on", "yes"):
        return "1"
    if value not in ("", "auto"):
        warnings.warn(f"OPCD_PACKED_DECODE={raw!r} is not auto, 1 or 0; using auto. Set it to "
                      "0 (plain fp32 decode), 1 (pack for any length) or auto.", stacklevel=2)
    return "auto"


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    # subclasses with their own forward (quantised or adapter layers) are left alone
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and isinstance(w, Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.dim() == 2)


def should_pack(model: nn.Module, max_new_tokens: int) -> bool:
    """Whether :func:`opcd.rollout.sample` packs ``model``'s weights for this generation."""
    setting = packed_decode_setting()
    if setting == "0":
        return False
    why = ("this torch build has no MKL packed GEMM" if not packing_available() else
           None if any(_packable(m) for m in model.modules()) else
           "the model has no float32 linear layers on the CPU")
    if why is not None:
        if setting == "1":  # asked for explicitly: say why it does not happen
            warnings.warn(f"OPCD_PACKED_DECODE=1, but {why}: decoding with the plain weights.",
                          stacklevel=2)
        return False
    return setting == "1" or max_new_tokens >= PACK_MIN_NEW_TOKENS


def _packed_forward(weight: Tensor, bias: Tensor | None, packed: Tensor, rows: int):
    def forward(x: Tensor) -> Tensor:
        n = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if n > rows or n == 0 or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        flat = x.reshape(n, x.shape[-1])
        if n < rows:
            flat = torch.cat([flat, flat.new_zeros(rows - n, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), packed, weight, bias, rows)
        return out[:n].reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Within the block, products of at most ``rows`` rows use MKL-packed weights.

    Yields the number of modules packed (0 where this build has no packed GEMM). Inference
    only: the packed path has no gradient, so use it under ``torch.no_grad()``. Each module's
    ``forward`` is restored on exit, even on an error.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    patched: list[nn.Module] = []
    try:
        if packing_available():
            for module in model.modules():
                if _packable(module) and "forward" not in module.__dict__:
                    _install(module, rows)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # drops the closure and with it the packed copy


def _install(module: nn.Module, rows: int) -> None:
    weight = module.weight.detach()
    bias = module.bias.detach() if isinstance(module.bias, Tensor) else None
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    module.forward = _packed_forward(weight, bias, packed, rows)
