"""The trainer: the run's state and the one training step every method composes.

Each step (:meth:`Trainer.train_step`) runs the method's parts (:mod:`opcd.training.method`):

1. take ``train.batch_size`` prompts x (seeded order, position checkpointed);
2. the sampler writes the responses (OPCD: the student samples ``rollout.n`` responses y
   from x alone, without the context; off-policy CD: the teacher's stored responses);
3. the scorer attaches the targets (OPCD: the teacher reads c + x + the student's exact
   tokens y, :mod:`opcd.teachers.teacher`; off-policy: the stored top-k);
4. the objective per micro-batch (OPCD: default forward KL over the union of the student's
   and the teacher's top-k plus the rest of the vocabulary, :mod:`opcd.objectives.losses`),
   normalised over the whole batch's tokens, gradients accumulated, then
   :meth:`Trainer.optimizer_step` (clipped, non-finite updates skipped, one AdamW step).

:class:`Trainer` also holds what every method shares: the student (LoRA or full, FSDP),
the rollout backend, evaluation, checkpoints and exact resume. OPCD's parts are
:mod:`opcd.methods.onpolicy`, the off-policy baseline's :mod:`opcd.methods.offpolicy`, OVD's
:mod:`opcd.methods.ovd_method` (its scorer: the verbal teacher's verdicts as advantages). The run
around the steps (run folder, loop, guard, signals) is :mod:`opcd.training.loop`; ``metrics.jsonl``
is :class:`MetricsLog`.

Launched on several processes (``accelerate launch -m opcd train ...``), each process takes
its shard of every step's prompts and the gradients are summed: see :mod:`opcd.runtime.distributed`.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from opcd.config import METHODS, Config
from opcd.errors import (
    CheckpointError,
    ConfigError,
)
from opcd.eval.evaluate import EvalResult, Judge, evaluate, merge_results, teacher_judge
from opcd.methods.onpolicy import opcd_method
from opcd.runtime import checkpoint as ckpt
from opcd.runtime.compat import enable_activation_checkpointing
from opcd.runtime.distributed import Dist
from opcd.runtime.jsonl import JsonlFile
from opcd.runtime.sharding import (
    adapter_keys_to_model_keys,
    full_model_state,
    full_optimizer_state,
    full_trainable_state,
    gathered,
    load_full_model_state,
    load_full_optimizer_state,
    merged_lora_state,
    save_pretrained_full,
    shard_frozen_layers,
    shard_model,
)
from opcd.runtime.tracking import Answers, Trackers
from opcd.sampling.multiturn import is_multiturn
from opcd.sampling.rollout_backends import (
    RolloutBackend,
    build_backend,
    check_vllm_usable,
    choose_rollout_dtype,
    slow_dtype_note,
)
from opcd.tasks import Task, build_task
from opcd.tasks.chat import PromptPair, build_prompt_pair
from opcd.tasks.other_system_prompts import OtherSystemPrompts, load_pool
from opcd.teachers.teacher import Teacher
from opcd.teachers.teacher_server import ServerTeacher
from opcd.training.method import Method, Rows, Targets, Totals


# --------------------------------------------------------------------------- data order
class DataOrder:
    """A seeded shuffle of the training examples, epoch after epoch, with a resumable position."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            out.append(self._perm[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class MetricsLog:
    """Append-only JSONL of step and eval records, consistent with the checkpoints.

    Each record is appended as one whole line, flushed and fsynced, before the step's
    checkpoint is written. On start, :meth:`reset_to` keeps exactly the records that the
    restored checkpoint covers (none on a fresh start) and drops a line torn by a crash, so
    after any number of crashes and resumes every step appears once.

    Every record written also goes to ``trackers`` (``run.report_to``, :mod:`opcd.runtime.tracking`),
    an eval record with its scored answers.
    """

    def __init__(self, path: Path, trackers: Trackers | None = None) -> None:
        self.path = path
        self.trackers = trackers if trackers is not None else Trackers()
        self.file = JsonlFile(path, on_write_error=lambda e: ckpt.write_error(
            "metrics.jsonl", path.parent, e))

    def reset_to(self, step: int) -> None:
        """Keep the records of steps ``<= step`` (nothing when ``step`` is 0), atomically."""
        keep = [
            line for line, rec in self.file.lines()
            if step > 0 and isinstance(rec.get("step"), int) and rec["step"] <= step
        ]
        if not keep and not self.path.exists():
            return
        self.file.rewrite(keep)

    def write(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        self.file.append([record])
        self.trackers.log(record, answers)

    def read(self) -> list[dict[str, Any]]:
        return self.file.read()


class MainLog(MetricsLog):
    """The metrics log as seen from one process of a run: only the main process writes."""

    def __init__(self, path: Path, writes: bool) -> None:
        super().__init__(path)
        self.writes = writes

    def reset_to(self, step: int) -> None:
        if self.writes:
            super().reset_to(step)

    def write(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        if self.writes:
            super().write(record, answers)


# --------------------------------------------------------------------------- setup
def setup_student(cfg: Config, model: nn.Module) -> nn.Module:
    """Apply freezing, LoRA and gradient checkpointing to the loaded student."""
    if cfg.train.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.lora.target_modules if t not in names]
        if missing:
            raise ConfigError(
                f"lora.target_modules {missing} are not modules of this model. Module names "
                f"available include: {', '.join(sorted(n for n in names if n.endswith('proj'))[:12])}."
            )
        lcfg = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def build_optimizer(params: list[nn.Parameter], cfg: Config) -> torch.optim.AdamW:
    """AdamW over ``params``; fused (``perf.fused_optimizer``) where torch supports it.

    The fused and the default AdamW take the same steps up to float rounding; the fused one
    is faster on CPU (measured here: 0.3 s against 2.0 s per step on the 0.5B model) and
    holds no extra copy of the weights' size during the step.
    """
    kw: dict[str, Any] = {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}
    if cfg.perf.fused_optimizer:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(params, **kw)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm to ``max_norm``; the norm before clipping.

    Sharded (FSDP) gradients give a distributed norm, which is made whole here.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def check_distributed(cfg: Config, dist: Dist) -> None:
    """Refuse the settings a multi-process run cannot honour, naming the fix."""
    if not dist.enabled:
        return
    support = METHODS[cfg.method]
    if not support.processes:
        raise ConfigError(
            f"method={cfg.method} runs on one process for now ({dist.world} were launched). "
            "Launch it without accelerate/torchrun, or use method=opcd."
        )
    if dist.fsdp and not support.fsdp:
        raise ConfigError(
            f"method={cfg.method} runs data parallel but not with the student sharded (FSDP) "
            f"for now ({dist.world} processes were launched with an FSDP configuration). Launch "
            "it with `accelerate launch --multi_gpu --num_processes N`, or use method=opcd."
        )
    if cfg.rollout.backend == "vllm":
        raise ConfigError(
            f"rollout.backend=vllm runs on one process for now ({dist.world} were launched). "
            "Launch it without accelerate/torchrun, or use the default rollout.backend=hf."
        )
    if cfg.train.batch_size < dist.world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is smaller than the {dist.world} processes "
            f"launched: every process needs at least one prompt per step. Set train.batch_size "
            f">= {dist.world} (it is the global batch, split between the processes)."
        )


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    final_model: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds the student, the teacher, the task and the optimiser for one run, and runs the
    one training step on the run's method: its sampler, scorer and objective
    (:class:`opcd.training.method.Method`; OPCD: :mod:`opcd.methods.onpolicy`, off-policy CD:
    :mod:`opcd.methods.offpolicy`, OVD: :mod:`opcd.methods.ovd_method`).
    """

    def __init__(self, cfg: Config, *, progress: bool = True, dist: Dist | None = None) -> None:
        from opcd.models import check_tokenizers_compatible, load_model

        self.dist = dist or Dist.from_env()
        check_distributed(cfg, self.dist)
        self.cfg = cfg
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        if cfg.rollout.backend == "vllm":
            check_vllm_usable(self.device)  # before any model is loaded
        self.task: Task = build_task(cfg.task)
        self.train_examples = self.task.examples("train")
        share, extra = cfg.task.other_system_prompt_share, cfg.task.other_system_prompt_rows
        self.other_system_prompts = None
        if share > 0 or extra > 0:
            pool = tuple(load_pool(cfg.task.other_system_prompts))
            self.other_system_prompts = OtherSystemPrompts(
                pool, share, cfg.train.seed, cfg.task.other_system_prompt_mode,
                batch_size=cfg.train.batch_size)
            self.say(f"other system prompts: {share:.0%} of the batch's rows and {extra} extra "
                     f"rows a step get one of {len(pool)} "
                     f"({cfg.task.other_system_prompts or 'the built-in pool'}; "
                     f"task.other_system_prompt_share / _rows, mode {cfg.task.other_system_prompt_mode})")
        self.say(f"loading student {cfg.model} ...")
        student, self.tokenizer = load_model(cfg.model, device=self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(student.config, "max_position_embeddings", None)
        self.max_prompt_tokens = cfg.rollout.max_prompt_tokens
        if limit:
            self.max_prompt_tokens = min(self.max_prompt_tokens, limit - cfg.rollout.max_new_tokens)
        teacher_model = teacher_tok = None
        if cfg.teacher.mode == "model":
            assert cfg.teacher.model
            self.say(f"loading teacher {cfg.teacher.model} ...")
            teacher_model, teacher_tok = load_model(cfg.teacher.model, device=self.device)
            if cfg.method != "ovd":  # OVD reads only the teacher's text: any tokenizer
                check_tokenizers_compatible(self.tokenizer, teacher_tok, cfg.model, cfg.teacher.model)
        if self.dist.fsdp and self.dist.fsdp.activation_checkpointing:
            self.say("fsdp_activation_checkpointing: train.gradient_checkpointing=true")
            cfg.train.gradient_checkpointing = True
        self.student = setup_student(cfg, student)
        # With full fine-tuning the frozen teacher is a copy taken now, before any update
        # (and before the student is sharded; under FSDP the copy's layers are sharded next).
        self.teacher = self._build_teacher(teacher_model, teacher_tok)
        # Before sharding: a sampling copy in rollout.dtype is cast from the whole weights.
        self.backend: RolloutBackend = self._build_backend()
        if self.dist.fsdp:
            self.say(f"sharding the student over {self.dist.world} processes (FSDP) ...")
            shard_model(self.student, self.dist.world, self.device, self.dist.fsdp)
            if getattr(self.teacher, "separate_model", None) is not None:
                # The frozen copy or the other model: its layers sharded too, gathered only
                # while it scores.
                shard_frozen_layers(self.teacher.separate_model, self.dist.world, self.device)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg)
        self.order = DataOrder(len(self.train_examples), cfg.train.seed)
        self.step = 0
        self.consecutive_skips = 0  # steps in a row whose update was dropped (non-finite)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.parts = self._build_method()
        self._opened: Path | None = None
        if cfg.rollout.dtype not in ("model", "auto") and self.dist.is_main:
            note = slow_dtype_note(self.student, getattr(torch, cfg.rollout.dtype))
            if note:
                warn(f"opcd: warning: {note}")

    def _build_backend(self) -> RolloutBackend:
        """The student's sampler (``rollout.backend``): see :mod:`opcd.sampling.rollout_backends`."""
        from opcd.models import resolve_model_ref

        r = self.cfg.rollout
        path = None
        if r.backend == "vllm":
            self.say("starting the vLLM rollout engine ...")
            path = resolve_model_ref(self.cfg.model, pull_missing=False).location
        dtype = None if r.dtype in ("model", "auto") else getattr(torch, r.dtype)
        if r.dtype == "auto" and r.backend == "hf" and self.dist.world == 1 and METHODS[self.cfg.method].rollout_dtype:
            # One process only: processes timing the CPU apart could choose differently.
            dtype, line = choose_rollout_dtype(
                self.student, min(r.batch_size, self.cfg.train.batch_size * r.n))
            self.say(line)
        return build_backend(
            r.backend, self.student, self.tokenizer, batch_size=r.batch_size, model_path=path,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            max_model_len=self.max_prompt_tokens + r.max_new_tokens, seed=self.cfg.train.seed,
            dtype=dtype,
        )

    def _sync_backend(self) -> None:
        """Tell the backend the weights changed; one that samples from its own copy reads them
        (under FSDP, gathered whole for it)."""
        whole = gathered(self.student) if self.backend.own_weights else contextlib.nullcontext()
        with whole:
            self.backend.sync_weights(self.student)

    def _build_teacher(self, model: nn.Module | None, tokenizer: Any) -> Any:
        """The teacher of this method: the log-prob :class:`Teacher` (OPCD, off-policy), a
        :class:`~opcd.teachers.teacher_server.ServerTeacher` for ``teacher.mode=server``, or OVD's
        verbal teacher (:func:`opcd.methods.ovd_method.verbal_teacher`)."""
        t = self.cfg.teacher
        if self.cfg.method == "ovd":
            from opcd.methods.ovd_method import verbal_teacher

            return verbal_teacher(self.cfg, self.student, self.tokenizer, model, tokenizer)
        if t.mode == "server":
            assert t.server_url and t.server_model
            return ServerTeacher(t.server_url, t.server_model, top_k=t.server_top_k,
                                 timeout_s=t.server_timeout_s, concurrency=t.server_concurrency)
        return Teacher(t.mode, self.student, model)

    def say(self, msg: str) -> None:
        """A line on stderr (main process, with progress on)."""
        if self.progress:
            tqdm.write(msg, file=sys.stderr)

    def _build_method(self) -> Method:
        """The run's method as the parts :meth:`train_step` composes."""
        if self.cfg.method == "offpolicy":
            from opcd.methods.offpolicy import offpolicy_method

            return offpolicy_method(self)
        if self.cfg.method == "ovd":
            from opcd.methods.ovd_method import ovd_method

            return ovd_method(self)
        return opcd_method(self)

    def _open_run_dir(self, run_dir: Path) -> None:
        """Let the method's parts open the state they keep in the run folder (once)."""
        if self.parts.open is not None and self._opened != run_dir:
            self.parts.open(run_dir)
            self._opened = run_dir

    def format_step(self, m: dict[str, Any]) -> str:
        """The terminal line of a step's metrics."""
        return self.parts.format_step(m)

    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures for a step."""
        return self.parts.postfix(m)

    # ------------------------------------------------------------------ one step
    def prompt_pairs(self, idx: list[int], positions: list[int] | None = None) -> list[PromptPair]:
        """The prompt pairs of the training examples ``idx``, at ``positions`` of the step's
        batch (default 0, 1, ...; they seed the draw of other system prompts, if any)."""
        mix = self.other_system_prompts
        rows = [(self.train_examples[i], True) for i in idx]
        if mix is not None:
            positions = list(range(len(idx))) if positions is None else positions
            rows = [mix.apply(ex, self.step, pos)
                    for (ex, _), pos in zip(rows, positions, strict=True)]
        return [
            build_prompt_pair(
                self.tokenizer, self.task, ex, max_prompt_tokens=self.max_prompt_tokens,
                truncate=self.cfg.rollout.truncate_prompts, with_context=with_context,
            )
            for ex, with_context in rows
        ]

    def train_step(self) -> dict[str, Any]:
        """One step of the run's method: sample -> score -> objective per micro-batch -> one
        update."""
        sampler, scorer, objective = self.parts.sampler, self.parts.scorer, self.parts.objective
        self._open_run_dir(Path(self.cfg.run.dir))
        t0 = time.perf_counter()
        idx = self.order.take(self.cfg.train.batch_size)
        idx += idx[:self.cfg.task.other_system_prompt_rows]  # again, with another system prompt
        rows = sampler.sample(idx)
        t_rollout = time.perf_counter() - t0
        t_update_start = time.perf_counter()
        self.student.train()
        targets = scorer.score(rows)  # (OVD: may replace responses by the teacher's)
        totals = self.dist.sum_floats([  # the whole (global) batch's, for the normalisation
            sum(len(r) for r in rows.responses), sum(1 for r in rows.responses if r),
            len(rows.responses), sum(rows.roll.truncated)])
        sums = dict.fromkeys(("loss", *objective.figures), 0.0)
        for sl, weight in self.micro_batches(len(rows.responses)):
            loss, figures = objective.loss(rows, targets, sl, totals, weight)
            loss.backward()
            if weight:
                for key, value in (("loss", loss.detach()), *figures.items()):
                    sums[key] += float(value.sum())
            del loss, figures
        sums = dict(zip(sums, self.dist.sum_floats(sums.values()), strict=True))
        grad_norm, skip_reason = self.optimizer_step(sums["loss"])
        self.step += 1
        return self.step_record(idx, rows, targets, totals, sums, grad_norm, skip_reason, t0, t_rollout,
                                targets.seconds, time.perf_counter() - t_update_start - targets.seconds)

    # ------------------------------------------------------------------ the step's parts
    def micro_batches(self, n_rows: int) -> list[tuple[slice, float]]:
        """The micro-batches' row slices and weights. Under FSDP every process runs as many
        forwards/backwards as the busiest one (each is a collective): the others repeat
        their first micro-batch at weight 0."""
        mb = self.cfg.train.micro_batch_size
        starts = list(range(0, n_rows, mb))
        pad = self.dist.max_int(len(starts)) - len(starts) if self.dist.fsdp else 0
        return [(slice(s, s + mb), 1.0) for s in starts] + [(slice(0, mb), 0.0)] * pad

    def step_record(self, idx: list[int], rows: Rows, targets: Targets, totals: Totals, sums: dict[str, float],
                    grad_norm: float, skip_reason: str | None, t0: float, t_rollout: float,
                    t_teacher: float, t_update: float) -> dict[str, Any]:
        """The step's ``metrics.jsonl`` record (the objective's per-token figures over the
        global batch, the sampler's own figures)."""
        total_tokens, _, n_rows, n_truncated = totals
        tokens = max(total_tokens, 1.0)
        return {
            "type": "train",
            "step": self.step,
            "loss": sums["loss"],
            **{key: value / tokens for key, value in sums.items() if key != "loss"},
            "grad_norm": float(grad_norm),
            "response_len": total_tokens / max(n_rows, 1),
            "truncated_frac": n_truncated / max(n_rows, 1),
            "time_rollout": t_rollout,
            "time_teacher": t_teacher,
            "time_update": t_update,
            **rows.figures,
            **targets.figures,
            **self.step_record_tail(idx, time.perf_counter() - t0, total_tokens,
                                    rows.roll.texts[0] if rows.roll.texts else "", skip_reason),
        }

    def optimizer_step(self, loss: float) -> tuple[float, str | None]:
        """The one update every method ends its step with, after its backward passes: sum
        the gradients over processes, clip their global norm (FSDP-aware), step the
        optimiser unless the loss or the norm is not finite, clear the gradients, and let
        the rollout backend sample the new weights. Returns (the norm before clipping, why
        the update was skipped or None).

        A non-finite loss or gradient norm would poison the weights and AdamW's moments:
        that update is dropped (gradients cleared, no optimiser step) and reported."""
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.dist.sum_gradients(trainable)
        grad_norm = clip_gradients(trainable, self.cfg.train.max_grad_norm)
        skip_reason = non_finite_reason(loss, grad_norm)
        if skip_reason is None:
            self.optimizer.step()
            self._sync_backend()  # the next rollout samples the new weights
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skip_reason

    def step_record_tail(self, idx: list[int], elapsed: float, tokens: float, sample: str,
                         skip_reason: str | None) -> dict[str, Any]:
        """The fields every method's step record ends with (time, throughput, skip)."""
        return {
            "time_step": elapsed,
            "tokens_per_s": tokens / elapsed,
            "lr": self.cfg.train.lr,
            "processes": self.dist.world,
            "sample": sample[:200],
            "skipped": skip_reason is not None,
            **({"skip_reason": skip_reason,
                "example_ids": [self.train_examples[i].id for i in idx]} if skip_reason else {}),
        }

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, with_context: bool = False) -> EvalResult:
        """The eval split without (or with) the context; each process scores its shard."""
        e = self.cfg.eval
        judge = self.quality_judge()
        with gathered(self.student):  # FSDP: whole weights while sampling (else a no-op)
            part = evaluate(
                self.student, self.tokenizer, self.task, split="eval", with_context=with_context,
                size=e.size, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                seed=e.seed, batch_size=self.cfg.rollout.batch_size,
                shard=(self.dist.rank, self.dist.world), judge=judge,
            )
        return merge_results(self.dist.gather(part)) if self.dist.enabled else part

    def quality_judge(self) -> Judge | None:
        """The answers' quality figure (:func:`opcd.eval.evaluate.teacher_judge`), judged by the
        frozen base model (or the teacher model) given the context.

        None where no frozen judge is at hand without a second copy of the student (a live
        teacher under full fine-tuning, a server teacher, a verbal teacher), for games, and
        under FSDP (the processes judge different numbers of answers, and a sharded judge
        gathers its weights per call: a collective the processes would not match).
        """
        if is_multiturn(self.task) or not isinstance(self.teacher, Teacher) or self.dist.fsdp:
            return None
        judge = self.teacher
        if judge.mode == "live":
            if not self.cfg.lora.enabled:
                return None
            judge = Teacher("frozen", self.student)  # the base: the adapter switched off
        perf = self.cfg.perf
        return teacher_judge(judge, self.pad_id, self.device, prefix_cache=perf.prefix_cache,
                             batch_size=perf.teacher_batch_size, block=perf.prefix_block_tokens,
                             cache_tokens=perf.prefix_cache_tokens)

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir: Path, rng: dict[str, Any]) -> Path:
        """Checkpoint the state at the end of step ``self.step`` (``rng``: the RNGs then).

        Only the main process writes (every process holds the same weights and optimiser;
        under FSDP every process first takes part in gathering them whole).
        """
        extra: dict[str, Any] = {}
        if self.dist.fsdp:
            # LoRA: only the adapter is written, so only the trainable weights are gathered.
            gather = full_trainable_state if self.cfg.lora.enabled else full_model_state
            model_state = gather(self.student)
            extra = {"optimizer_state": full_optimizer_state(self.student, self.optimizer),
                     "write_model": lambda d: save_pretrained_full(self.student, d, model_state)}
        if not self.dist.is_main:
            return run_dir / "checkpoints" / ckpt.checkpoint_name(self.step)
        return ckpt.save_checkpoint(
            run_dir / "checkpoints", self.step, self.student, self.tokenizer, self.optimizer,
            {"data": self.order.state(), "rng": rng, "consecutive_skips": self.consecutive_skips},
            self.cfg.run.keep_last, **extra,
        )

    def restore(self, run_dir: Path) -> int:
        """Load the newest intact checkpoint (an older one when it is damaged); its step, or 0.

        The teacher needs nothing from the checkpoint: the frozen copy was taken from the
        initial weights in ``__init__`` (before this load), ``live`` reads the restored
        student, ``model`` is reloaded from its own files, and under LoRA the frozen teacher
        is the base with the adapter off.
        """
        self._open_run_dir(run_dir)
        found = ckpt.latest_intact(run_dir / "checkpoints")
        if found is None:
            return 0
        latest, state = found
        try:
            step = int(state["step"])
            epoch, index = int(state["data"]["epoch"]), int(state["data"]["index"])
            rng = state["rng"]
            skips = int(state.get("consecutive_skips", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(latest)!r} has an incomplete state ({e!r})") from None
        sharded = self.dist.fsdp is not None
        load_state = None
        if sharded and self.cfg.lora.enabled:
            adapter = self.student.active_adapter  # type: ignore[union-attr]
            load_state = lambda sd: load_full_model_state(  # noqa: E731
                self.student, adapter_keys_to_model_keys(sd, adapter))
        elif sharded:
            load_state = partial(load_full_model_state, self.student)
        ckpt.load_weights(latest, self.student, lora=self.cfg.lora.enabled, load_state=load_state)
        self._sync_backend()
        ckpt.load_optimizer(
            latest, self.optimizer,
            partial(load_full_optimizer_state, self.student, self.optimizer) if sharded else None,
        )
        self.order = DataOrder(len(self.train_examples), self.cfg.train.seed, epoch, index)
        ckpt.set_rng_state(rng)
        self.step = step
        self.consecutive_skips = skips
        return self.step

    def save_final(self, run_dir: Path) -> Path:
        """Save the trained student as a plain HF model (LoRA merged) in ``run_dir/final``."""
        state = full_model_state(self.student) if self.dist.fsdp else None  # every process
        if not self.dist.is_main:
            return run_dir / "final"
        model = self.student
        if self.cfg.lora.enabled and state is not None:
            state = merged_lora_state(model, state)  # the adapters folded into the base
            model = model.get_base_model()  # type: ignore[operator]
        elif self.cfg.lora.enabled:
            model = model.merge_and_unload()  # type: ignore[operator]
            self.student = model

        def write(tmp: Path) -> None:
            if state is not None and self.cfg.lora.enabled:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            elif state is not None:
                save_pretrained_full(model, tmp, state)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        return ckpt.write_dir_atomically(run_dir / "final", write, "the final model")


def non_finite_reason(loss: float, grad_norm: float) -> str | None:
    """Why a step's update must be dropped (a non-finite loss or gradient norm), or None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    return None


def warn(msg: str) -> None:
    """A warning on stderr that does not break a progress bar."""
    tqdm.write(msg, file=sys.stderr)
