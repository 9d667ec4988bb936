"""Rollout backends: who samples the student's responses (``rollout.backend``).

Every trainer samples through one interface, :class:`RolloutBackend`:
``sample(prompts, n=, temperature=, top_p=, max_new_tokens=, seeds=)`` returns a
:class:`opcd.sampling.rollout.Rollout` (``n`` responses per prompt, prompt-major, each response cut
after its first end-of-sequence token, which is kept), and ``sync_weights(model)`` is called
after every optimiser step (and after a checkpoint is restored) so the sampler follows the
weights being trained.

- :class:`HFBackend` (``rollout.backend: hf``, the default; CPU and GPU): opcd's own
  key/value-cache loop or HF ``generate`` (:func:`opcd.sampling.rollout.sample`), on the training
  model itself, so ``sync_weights`` has nothing to do. Its samples are exactly those of
  :func:`opcd.sampling.rollout.sample`.
- :class:`VllmBackend` (``rollout.backend: vllm``; optional, CUDA only, ``method: opcd`` on
  one process): a vLLM engine colocated on the training GPU. ``vllm`` is imported only when
  this backend is built; selecting it on a machine without ``vllm`` or without CUDA raises
  :class:`~opcd.errors.ConfigError` naming the fix.

**The vLLM backend has not been run on a GPU yet**: it was written on a machine without a
GPU or vLLM, against the API of vLLM 0.10 / 0.11 (V1 engine: ``LLM.generate`` with
``{"prompt_token_ids": ...}`` prompts and one ``SamplingParams`` per request,
``LLM.apply_model``, ``LLM.reset_prefix_cache``), with a fallback for the older V0 engine
(``llm.llm_engine.model_executor.driver_worker.model_runner.model``). Only its glue (request
building, seeds, EOS handling, the LoRA merge) is tested on the CPU, with a stand-in engine;
``tests/test_rollout_backends.py`` has a GPU test that runs the real engine.

Weight sync: :func:`merged_state_dict` gives the student's weights under the base model's
parameter names (a LoRA student's adapter deltas ``B @ A * scale`` are added to the base
weights out of place: the training model is not touched, so repeated syncs do not drift),
and every tensor is handed to the vLLM model's ``load_weights``, which maps HF names to its
own (fused) layout. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the tensors are copied GPU to GPU, never pickled. After loading, vLLM's prefix cache is reset:
its cached keys/values were computed with the old weights.

Teacher scoring stays in the training engine (exact log-probs over the student's top-k, and
the shared context read once, ``perf.prefix_cache``). Scoring through a vLLM server is not
implemented: vLLM does not use its prefix cache when prompt log-probs are requested, so it
would recompute the context for every row (see ``docs/scale.md``).
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from opcd.errors import ConfigError
from opcd.sampling import probe, rollout
from opcd.tasks.base import derive_seed

BACKENDS = ("hf", "vllm")
VLLM_API = "vLLM 0.10 / 0.11 (V1 engine), with a fallback for the V0 engine"
"""The vLLM API :class:`VllmBackend` was written against (not yet run on a GPU)."""


class RolloutBackend(ABC):
    """Samples the student's responses; follows the trained weights via :meth:`sync_weights`."""

    name: str = ""

    @property
    def own_weights(self) -> bool:
        """True when it samples from its own copy of the weights (kept by :meth:`sync_weights`),
        not from the training model."""
        return False

    @abstractmethod
    def sample(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seeds: list[int] | None = None,
    ) -> rollout.Rollout:
        """``n`` responses per prompt (prompt-major); ``temperature == 0`` is greedy.

        ``seeds``: one per prompt; response ``j`` of prompt ``i`` samples from its own
        random stream derived from ``(seeds[i], j)``.
        """

    def sync_weights(self, model: nn.Module) -> None:  # noqa: B027 - a no-op by default
        """Make the sampler use ``model``'s current weights (after an optimiser step)."""

    def close(self) -> None:  # noqa: B027 - a no-op by default
        """Free what the backend holds (a vLLM engine's GPU memory)."""


class HFBackend(RolloutBackend):
    """:func:`opcd.sampling.rollout.sample` on the training model, or on a copy of it in ``dtype``.

    Without ``dtype`` (or with the model's own) it samples with the training model: no copy,
    nothing to sync. With another dtype it keeps a copy of the student in that dtype
    (:func:`cast_copy`) and :meth:`sync_weights` copies the trained parameters into it.
    """

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 batch_size: int = 16, engine: str = "auto",
                 dtype: torch.dtype | None = None) -> None:
        own = next(model.parameters()).dtype
        self.copy = dtype is not None and dtype != own
        self.model = cast_copy(model, dtype) if self.copy and dtype is not None else model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.engine = engine

    @property
    def own_weights(self) -> bool:
        return self.copy

    def sync_weights(self, model: nn.Module) -> None:
        if not self.copy:
            return
        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), model.parameters(), strict=True):
                if src.requires_grad:  # frozen ones (LoRA's base, a frozen head) never change
                    dst.copy_(src)

    def sample(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seeds: list[int] | None = None,
    ) -> rollout.Rollout:
        # Looked up at call time: benchmarks and tests patch ``opcd.sampling.rollout.sample``.
        return rollout.sample(
            self.model, self.tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, batch_size=self.batch_size, engine=self.engine,
            seeds=seeds,
        )


# --------------------------------------------------------------------------- vLLM
def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose parameters are in ``dtype`` (buffers copied as they are).

    Each parameter is cast straight into the copy (never a second full-precision copy), and
    parameters shared by several modules (tied embeddings) stay shared. The copy is frozen and
    in eval mode.
    """
    import copy

    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()
    }
    out = copy.deepcopy(model, memo)
    return out.eval()


AUTO_BF16_GAIN = 1.5
"""``rollout.dtype=auto`` samples from a bf16 copy only where the probe's bf16 product is at
least this much faster than the best fp32 one (the copy is refreshed after every update and
its samples come from rounded weights: a small gain does not pay for that)."""


def _best(figures: dict[str, float], dtype: torch.dtype) -> float:
    name = str(dtype).removeprefix("torch.")
    return min((s for way, s in figures.items() if way.split("/")[0] == name), default=float("inf"))


def _figures(model: nn.Module, rows: int) -> dict[str, float]:
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 1024)
    return probe.product_seconds(hidden, max(1, rows))


def choose_rollout_dtype(model: nn.Module, rows: int) -> tuple[torch.dtype | None, str]:
    """``rollout.dtype=auto``: bf16 where this CPU multiplies it :data:`AUTO_BF16_GAIN` times
    faster than fp32 (:mod:`opcd.sampling.probe`, fp32 at its best kernel), else the training model
    itself (None). Also returns a line for the log with the figures behind the choice."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return None, (f"rollout.dtype=auto: sampling with the training model itself "
                      f"({str(p.dtype).removeprefix('torch.')} on {p.device.type})")
    figures = _figures(model, rows)
    fp32, bf16 = _best(figures, torch.float32), _best(figures, torch.bfloat16)
    pick = bf16 * AUTO_BF16_GAIN <= fp32
    why = (f"bf16 {fp32 / bf16:.2f}x faster than fp32" if pick else
           f"bf16 {fp32 / bf16:.2f}x the speed of fp32, under {AUTO_BF16_GAIN}x")
    line = (f"rollout.dtype=auto: sampling {'from a bfloat16 copy' if pick else 'in float32'} "
            f"({why}; {probe.describe(figures, int(getattr(model.config, 'hidden_size', 0) or 1024), rows)})")
    return (torch.bfloat16 if pick else None), line


def slow_dtype_note(model: nn.Module, dtype: torch.dtype, rows: int = 8) -> str | None:
    """A warning when ``dtype`` multiplies slower than float32 on this CPU (no bf16/fp16
    matrix units: torch then emulates it, measured at 0.3-2.5 GFLOP/s), else None."""
    if next(model.parameters()).device.type != "cpu" or dtype == torch.float32:
        return None
    figures = _figures(model, rows)
    name = str(dtype).removeprefix("torch.")
    fast, slow = _best(figures, torch.float32), _best(figures, dtype)
    if slow <= fast:
        return None
    return (f"rollout.dtype={name} multiplies {slow / fast:.1f}x slower than float32 on this "
            f"CPU ({slow * 1e3:.2f} ms against {fast * 1e3:.2f} ms for one decode-sized product): "
            "it has no matrix units for that dtype. Set rollout.dtype=auto to let opcd choose.")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_usable(device: torch.device | str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``rollout.backend=vllm`` can run here."""
    if not vllm_installed():
        raise ConfigError(
            "rollout.backend=vllm needs the vllm package, which is not installed here. Install "
            "it on a CUDA machine (`pip install vllm`; opcd's vLLM backend targets "
            f"{VLLM_API}), or use the default rollout.backend=hf."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "rollout.backend=vllm runs on a CUDA GPU only, and this machine has none (torch "
            "sees no CUDA device). Use the default rollout.backend=hf (CPU and GPU)."
        )
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError(
            f"rollout.backend=vllm runs on a CUDA GPU only, but this run trains on {device}. "
            "Train on the GPU, or use the default rollout.backend=hf."
        )


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the base model's parameter names, LoRA adapters merged.

    For a PEFT model, each adapted layer's weight is ``base + delta`` (PEFT's own
    ``get_delta_weight``: ``B @ A * scale``), computed out of place; adapter tensors are left
    out. Other models: their ``state_dict`` (detached).
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()  # type: ignore[assignment,misc]  # noqa: N806
    if not isinstance(model, PeftModel):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    deltas: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
                continue
            if getattr(module, "merged", False):
                continue  # already folded into the base weight
            active = [a for a in getattr(module, "active_adapters", [])
                      if a in getattr(module, "lora_A", {})]
            if active:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in active)
        out: dict[str, Tensor] = {}
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            clean = key.replace(".base_layer.", ".")
            if clean in deltas:
                value = value + deltas[clean].to(value.dtype)
            out[clean] = value.detach()
    return out


def response_from_output(token_ids: Sequence[int], finish_reason: str | None,
                         stop_reason: int | str | None, stop: Sequence[int]) -> tuple[list[int], bool]:
    """One vLLM completion as opcd's response: ``(tokens, ended)``.

    opcd keeps the end-of-sequence token (it was sampled and is trained). vLLM reports why a
    completion stopped (``finish_reason`` ``stop`` or ``length``; ``stop_reason`` the stop
    token id, or None for the model's own EOS); the token is appended when vLLM left it out.
    """
    stop_set = set(stop)
    tokens, ended = rollout.cut_at_eos([int(t) for t in token_ids], stop_set)
    if ended or finish_reason != "stop":
        return tokens, ended
    if isinstance(stop_reason, int):
        return [*tokens, stop_reason], True
    if stop_reason is None and stop:
        return [*tokens, int(stop[0])], True
    return tokens, False  # a stop string (opcd sets none)


class VllmBackend(RolloutBackend):
    """Samples with a vLLM engine on the training GPU; see the module docstring.

    Not yet run on a GPU. ``engine``: an already built ``vllm.LLM`` (tests pass a stand-in);
    otherwise one is built from ``model_path`` (the student's HF folder or hub id) and
    loaded with ``model``'s current weights at once.
    """

    name = "vllm"
    own_weights = True  # type: ignore[assignment]  # the engine's copy

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        engine: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = rollout.eos_ids(model, tokenizer)
        if engine is None:
            if model_path is None:
                raise ValueError("VllmBackend needs model_path (or a built engine)")
            device = next(model.parameters()).device
            check_vllm_usable(device)
            self.llm = _build_engine(model_path, model, gpu_memory_utilization, max_model_len, seed)
            self.sync_weights(model)  # the engine starts from the student's exact weights
        else:
            self.llm = engine

    def sample(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seeds: list[int] | None = None,
    ) -> rollout.Rollout:
        from vllm import SamplingParams

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        # One request per response row, seeded like the HF backend's rows: a row's randomness
        # depends on its seed only (vLLM's prefix cache shares the prompt between them).
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        requests = [{"prompt_token_ids": list(prompts[i])} for i, _ in rows]
        greedy = temperature <= 0
        params = [
            SamplingParams(
                n=1, temperature=0.0 if greedy else float(temperature),
                top_p=1.0 if greedy else float(top_p), max_tokens=int(max_new_tokens),
                stop_token_ids=list(self.stop),
                seed=None if seeds is None else derive_seed("row", seeds[i], j),
            )
            for i, j in rows
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False) if rows else []
        out = rollout.Rollout([], [], [], [])
        for (i, _), result in zip(rows, outputs, strict=True):
            comp = result.outputs[0]
            resp, ended = response_from_output(
                comp.token_ids, getattr(comp, "finish_reason", None),
                getattr(comp, "stop_reason", None), self.stop,
            )
            out.prompt_index.append(i)
            out.response_ids.append(resp)
            out.texts.append(self.tokenizer.decode(resp, skip_special_tokens=True))
            out.truncated.append(not ended)
        return out

    def sync_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights (LoRA merged) into the engine; reset its prefix cache."""
        weights = list(merged_state_dict(model).items())
        llm = self.llm
        if hasattr(llm, "apply_model"):  # V1 engine, in this process
            llm.apply_model(lambda m: m.load_weights(weights))
        else:  # V0 engine
            llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None


def _build_engine(model_path: str, model: nn.Module, gpu_memory_utilization: float,
                  max_model_len: int | None, seed: int) -> Any:
    """A ``vllm.LLM`` for ``model_path`` in this process, in the student's dtype."""
    flag = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if flag != "0":
        raise ConfigError(
            f"rollout.backend=vllm loads the updated weights into an engine in this process, but "
            f"VLLM_ENABLE_V1_MULTIPROCESSING={flag} asks vLLM for a separate engine process. "
            "Unset it (opcd sets it to 0), or use rollout.backend=hf."
        )
    from vllm import LLM

    dtype = next(model.parameters()).dtype
    return LLM(
        model=model_path, tokenizer=model_path, dtype=str(dtype).removeprefix("torch."),
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
        enable_prefix_caching=True,
    )


def build_backend(
    name: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int = 16,
    model_path: str | None = None,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> RolloutBackend:
    """The backend ``name`` (``hf`` or ``vllm``) for ``model``; ``dtype``: see :class:`HFBackend`."""
    if name == "hf":
        return HFBackend(model, tokenizer, batch_size=batch_size, dtype=dtype)
    if name == "vllm":
        return VllmBackend(model, tokenizer, model_path=model_path,
                           gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, seed=seed)
    raise ConfigError(f"rollout.backend={name!r} is not a rollout backend: choose one of {', '.join(BACKENDS)}.")
