"""Data-parallel runs: the processes started by ``accelerate launch`` (or ``torchrun``).

opcd grows no distributed system of its own. accelerate's :class:`~accelerate.PartialState`
reads the launcher's environment, opens the process group (gloo on CPUs, NCCL on GPUs)
and picks each process's device; this module wraps the few collective operations the
trainer needs, and is a no-op in a single process.

How a step is split (see :class:`opcd.training.trainer.Trainer`): every process draws the same
global batch of prompts (same seeded data order), keeps its shard (positions
``rank::world``), samples and scores those rows, and normalises its loss by the *global*
token count (all-reduced first). Summing the processes' gradients
(:meth:`Dist.sum_gradients`) then gives exactly the gradient of the one-process step over
the whole batch, so every process takes the same clipped AdamW step and the weights stay
identical without being broadcast. Rollouts are seeded per row
(:func:`opcd.sampling.rollout.sample`), which makes the samples, and hence the run, independent of
the number of processes: a run resumes from its checkpoint on any process count.

Only the main process writes the run folder (metrics, checkpoints, the final model); the
others read the checkpoints on resume, so several machines need a shared run folder.
An FSDP launch configuration shards the student over the processes instead of copying it
(:mod:`opcd.runtime.sharding`); DeepSpeed configurations are refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as torch_dist

from opcd.errors import ConfigError
from opcd.runtime.sharding import FsdpSettings, fsdp_settings_from_env

_BUCKET_NUMEL = 32 * 1024 * 1024  # gradients summed per collective call (128 MB in fp32)


def launched() -> bool:
    """True when a launcher (accelerate, torchrun, mpirun) started several processes."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(key, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


class Dist:
    """This process's place in the run: ``rank`` of ``world``, its ``device``, collectives."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 fsdp: FsdpSettings | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.fsdp = fsdp if world > 1 else None
        """How the student is sharded (an FSDP launch), or None: a whole copy per process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Dist:
        """One process (nothing launched), else the launcher's process group via accelerate."""
        if not launched():
            return cls()
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise ConfigError(
                "This run was launched with DeepSpeed, which opcd does not support yet. Launch "
                "with an FSDP config to shard the student (configs/accelerate/fsdp_gpu.yaml), or "
                "a data-parallel one (configs/accelerate/ddp_gpu.yaml or ddp_cpu.yaml), or torchrun."
            )
        fsdp = fsdp_settings_from_env()
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                f"accelerate distributed type {state.distributed_type} is not supported; use an "
                "FSDP or data-parallel (multi-GPU / multi-CPU) configuration."
            )
        return cls(state.process_index, state.num_processes, state.device, fsdp)

    # ---------------------------------------------------------------- collectives
    def sum_floats(self, values: Iterable[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        vals = list(values)
        if not self.enabled:
            return vals
        t = torch.tensor(vals, dtype=torch.float64, device=self._comm_device())
        torch_dist.all_reduce(t)
        return t.tolist()

    def global_figures(self, ratios: Mapping[str, tuple[float, float]],
                       counts: Mapping[str, int] | None = None) -> dict[str, float | int | None]:
        """A step's figures over every process's rows, in one all-reduce: each of ``ratios``
        is (numerator, denominator), both summed before the division (None where the sum of
        denominators is 0: no process had a value); ``counts`` are summed."""
        counts = counts or {}
        total = self.sum_floats([*(x for pair in ratios.values() for x in pair), *counts.values()])
        out: dict[str, float | int | None] = {
            key: total[2 * i] / total[2 * i + 1] if total[2 * i + 1] else None
            for i, key in enumerate(ratios)}
        out.update({key: int(round(v)) for key, v in zip(counts, total[2 * len(ratios):], strict=True)})
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return bool(self.sum_floats([1.0 if flag else 0.0])[0] > 0)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over processes."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return int(t.item())

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its sum over processes (missing ones count as zeros).

        Sharded (FSDP) gradients arrive already reduced, as the mean over processes: they are
        multiplied by the process count.
        """
        if not self.enabled:
            return
        from torch.distributed.tensor import DTensor

        params = list(params)
        sharded = [p for p in params if isinstance(p, DTensor)]
        for p in sharded:
            if p.grad is not None:
                p.grad.mul_(self.world)
        params = [p for p in params if not isinstance(p, DTensor)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= _BUCKET_NUMEL:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def _comm_device(self) -> torch.device:
        backend = torch_dist.get_backend()
        return self.device if "nccl" in str(backend) else torch.device("cpu")

    def shard(self, n: int) -> list[int]:
        """The positions ``rank::world`` of ``n`` items: this process's share."""
        return list(range(self.rank, n, self.world))
