"""Measured facts about this machine that decide how the decode runs.

A decode step multiplies a few rows (one per sequence) by every weight matrix of the model,
and which way of doing that product is fastest differs between the CPUs this tool meets:
on one 2-core AMD EPYC without AVX-512 (``benchmarks/micro.py decode``, Qwen2.5-0.5B, 8
rows) a decode step took 378 ms with torch's plain fp32 product, 323 ms with MKL's packed
GEMM, 144 ms with oneDNN's prepacked weights and 522 ms from a bf16 copy (no bf16 units);
on another one with AVX-512 BF16, bf16 was twice as fast as fp32. So nothing is assumed: :func:`product_seconds`
times one decode-shaped product ``[rows, hidden] @ [4 hidden, hidden]^T`` in each way this
torch build offers, once per machine, and keeps the figures in
``<cache root>/probe.json`` (keyed by the CPU's model name and flags, the torch version, the
thread count and the shape). :mod:`opcd.sampling.packing` picks the fp32 kernel from them and
:func:`opcd.sampling.rollout_backends.choose_rollout_dtype` the sampling copy's dtype.

Ways (keys of the returned dict): ``float32`` (``F.linear``), ``float32/onednn`` and
``float32/mkl`` (prepacked weights), ``bfloat16``, ``bfloat16/onednn`` and ``float16``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

PROBE_FILE = "probe.json"
PROBE_VERSION = 2
"""Part of the key: a probe that times other ways measures again instead of reading old figures."""
_REPEATS = 5


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (``torch.ops.mkldnn``)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._linear_pointwise is not None
                and torch.ops.mkldnn._reorder_linear_weight is not None)
    except (AttributeError, RuntimeError):
        return False


def mkl_available() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM (``cblas_sgemm_pack``)."""
    try:
        return (torch.backends.mkl.is_available()
                and torch.ops.mkl._mkl_reorder_linear_weight is not None
                and torch.ops.mkl._mkl_linear is not None)
    except (AttributeError, RuntimeError):
        return False


def reorder(kernel: str, weight: Tensor, rows: int) -> Tensor:
    """``weight`` laid out for ``kernel`` (``onednn`` or ``mkl``) and products of ``rows`` rows."""
    if kernel == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    if kernel == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    raise ValueError(f"unknown packed kernel {kernel!r}: onednn or mkl")


def packed_product(kernel: str, x: Tensor, packed: Tensor, weight: Tensor | None,
                   bias: Tensor | None, rows: int) -> Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` of ``rows`` rows, through ``packed``
    (``weight``, the plain matrix, is read by the MKL kernel only)."""
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _best_seconds(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(_REPEATS + 1):  # the first call warms up
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(hidden: int, rows: int) -> dict[str, float]:
    """Seconds of one ``[rows, hidden] @ [4 hidden, hidden]^T`` product in each available way
    (best of a few; about 0.1 s in all for a 1k hidden size)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w = torch.randn(4 * hidden, hidden, generator=g)
    out: dict[str, float] = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            name = str(dtype).removeprefix("torch.")
            xd, wd = x.to(dtype), w.to(dtype)
            out[name] = _best_seconds(lambda xd=xd, wd=wd: F.linear(xd, wd))
            kernels = (["onednn"] if onednn_available() and dtype != torch.float16 else []) + (
                ["mkl"] if dtype == torch.float32 and mkl_available() else [])
            for kernel in kernels:
                try:
                    packed = reorder(kernel, wd, rows)
                    out[f"{name}/{kernel}"] = _best_seconds(
                        lambda k=kernel, xd=xd, p=packed, wd=wd: packed_product(k, xd, p, wd, None, rows))
                except RuntimeError:  # this build or CPU has no such kernel for the dtype
                    continue
    return out


def machine_key() -> str:
    """What the figures depend on: the CPU (model name and flags), torch, the thread count."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{cpu}|flags:{digest}|torch:{torch.__version__}|threads:{torch.get_num_threads()}"


def _probe_path() -> Path:
    from opcd.models.pull import cache_root

    return cache_root() / PROBE_FILE


_MEMO: dict[str, dict[str, float]] = {}


def product_seconds(hidden: int, rows: int) -> dict[str, float]:
    """:func:`measure`'s figures for this machine and shape, measured once and then read back
    (from memory in this process, from ``probe.json`` across processes)."""
    key = f"{machine_key()}|v{PROBE_VERSION}|hidden:{hidden}|rows:{rows}"
    if key in _MEMO:
        return _MEMO[key]
    path = _probe_path()
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    figures = stored.get(key)
    if not isinstance(figures, dict) or not all(isinstance(v, float) for v in figures.values()):
        figures = measure(hidden, rows)
        stored[key] = figures
        try:  # written whole, then renamed: a reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: measure again next time
    _MEMO[key] = figures
    return figures


def describe(figures: dict[str, float], hidden: int, rows: int) -> str:
    """One line with the probe's figures, for logs."""
    parts = ", ".join(f"{way} {s * 1e3:.2f} ms" for way, s in sorted(figures.items(), key=lambda kv: kv[1]))
    return f"decode-shaped product [{rows}x{hidden}] @ [{4 * hidden}x{hidden}]^T on this CPU: {parts}"
