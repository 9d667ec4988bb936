"""The OPCD training loop (arXiv 2602.12275): rollout -> teacher scoring -> update.

Each step is strictly on-policy:

1. take ``train.batch_size`` prompts x (seeded order, position checkpointed);
2. rollout: the student samples ``rollout.n`` responses y from x alone (no context);
3. teacher: reads c + x + the student's exact tokens y (:mod:`opcd.teacher`);
4. update: the per-token objective (default reverse KL over the student's top-k,
   :mod:`opcd.losses`) normalised over the whole batch's tokens, gradients accumulated
   over micro-batches, clipped, one AdamW step.

Every step is logged to ``metrics.jsonl`` and the terminal; evaluation (without the
context) runs at the start, every ``eval.every`` steps and at the end; checkpoints are
written atomically and ``resume=True`` continues a run exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from opcd import checkpoint as ckpt
from opcd import losses, rollout
from opcd.chat import PromptPair, build_prompt_pair
from opcd.config import Config, config_from_dict, dump_config, flatten, load_config
from opcd.errors import ConfigError, RunFolderError
from opcd.evaluate import EvalResult, evaluate
from opcd.scoring import pack, response_logits
from opcd.tasks import Task, build_task
from opcd.teacher import Teacher

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"train.steps", "run.save_every", "run.keep_last", "eval.every", "run.plot"}


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


# --------------------------------------------------------------------------- run folder
def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create or check the run folder; refuse to mix two different runs in one folder."""
    run_dir = Path(cfg.run.dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; choose one.")
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not resume and _only_unstarted_run(run_dir):
        shutil.rmtree(run_dir)  # a run that failed before its first step: nothing to keep
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            if not saved.is_file():
                raise RunFolderError(
                    f"Run folder {str(run_dir)!r} holds no opcd run (no config.yaml) to resume. "
                    "Check run.dir, or start a new run without --resume."
                )
            old = flatten(load_config(saved).to_dict())
            new = flatten(cfg.to_dict())
            diff = sorted(k for k in new if old.get(k) != new[k] and k not in RESUMABLE_CHANGES)
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff[:6])
                raise RunFolderError(
                    f"Cannot resume {str(run_dir)!r} with a different config ({shown}). Only "
                    f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. Use the "
                    "original settings, another run.dir, or --overwrite to start over."
                )
        else:
            what = "another opcd run" if saved.is_file() else "files that are not an opcd run"
            raise RunFolderError(
                f"Run folder {str(run_dir)!r} already holds {what}. Pass --resume to continue "
                "it, --overwrite to delete it and start again, or choose another run.dir."
            )
    elif resume:
        raise RunFolderError(
            f"Nothing to resume: run folder {str(run_dir)!r} is empty or missing. "
            "Start the run without --resume."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(
            f"Run folder {str(run_dir)!r} is not writable ({e.strerror}). Choose a writable "
            "run.dir or fix its permissions."
        ) from None
    saved.write_text(dump_config(cfg), encoding="utf-8")
    return run_dir


def _only_unstarted_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds just the config of a run that never finished a step."""
    names = {p.name for p in run_dir.iterdir()}
    if not names or not names <= {"config.yaml", "metrics.jsonl"}:
        return False
    metrics = run_dir / "metrics.jsonl"
    return not metrics.is_file() or '"type": "train"' not in metrics.read_text(encoding="utf-8")


class MetricsLog:
    """Append-only JSONL of step and eval records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (they are recomputed after a resume)."""
        if not self.path.is_file():
            return
        keep = [
            line for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- setup
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_student(cfg: Config, model: nn.Module) -> nn.Module:
    """Apply freezing, LoRA and gradient checkpointing to the loaded student."""
    if cfg.train.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    final_model: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds the student, the teacher, the task and the optimiser for one run."""

    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        from opcd.models import check_tokenizers_compatible, load_model

        self.cfg = cfg
        self.progress = progress
        self.device = _device()
        self.task: Task = build_task(cfg.task)
        self.train_examples = self.task.examples("train")
        self._say(f"loading student {cfg.model} ...")
        student, self.tokenizer = load_model(cfg.model, device=self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(student.config, "max_position_embeddings", None)
        self.max_prompt_tokens = cfg.rollout.max_prompt_tokens
        if limit:
            self.max_prompt_tokens = min(self.max_prompt_tokens, limit - cfg.rollout.max_new_tokens)
        teacher_model = None
        if cfg.teacher.mode == "model":
            assert cfg.teacher.model
            self._say(f"loading teacher {cfg.teacher.model} ...")
            teacher_model, teacher_tok = load_model(cfg.teacher.model, device=self.device)
            check_tokenizers_compatible(self.tokenizer, teacher_tok, cfg.model, cfg.teacher.model)
        self.student = setup_student(cfg, student)
        # With full fine-tuning the frozen teacher is a copy taken now, before any update.
        self.teacher = Teacher(cfg.teacher.mode, self.student, teacher_model)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.order = DataOrder(len(self.train_examples), cfg.train.seed)
        self.step = 0
        self.pad_id = int(self.tokenizer.pad_token_id)

    def _say(self, msg: str) -> None:
        if self.progress:
            tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------ one step
    def _prompt_pairs(self, idx: list[int]) -> list[PromptPair]:
        return [
            build_prompt_pair(
                self.tokenizer, self.task, self.train_examples[i],
                max_prompt_tokens=self.max_prompt_tokens,
                truncate=self.cfg.rollout.truncate_prompts,
            )
            for i in idx
        ]

    def train_step(self) -> dict[str, Any]:
        """Run one on-policy step and return its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        idx = self.order.take(cfg.train.batch_size)
        pairs = self._prompt_pairs(idx)
        roll = rollout.sample(
            self.student, self.tokenizer, [p.student_ids for p in pairs], n=cfg.rollout.n,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size,
        )
        t_rollout = time.perf_counter() - t0

        responses = roll.response_ids
        total_tokens = float(sum(len(r) for r in responses))
        total_seqs = float(sum(1 for r in responses if r))
        sums = {"kl": 0.0, "entropy": 0.0, "s_mass": 0.0, "t_mass": 0.0, "loss": 0.0}
        t_teacher = 0.0
        t_update_start = time.perf_counter()
        self.student.train()
        mb = cfg.train.micro_batch_size
        for start in range(0, len(responses), mb):
            sl = slice(start, start + mb)
            resp = responses[sl]
            prompt_of = roll.prompt_index[sl]
            tb = pack([pairs[i].teacher_ids for i in prompt_of], resp, self.pad_id, device=self.device)
            sb = pack([pairs[i].student_ids for i in prompt_of], resp, self.pad_id, device=self.device)
            tt = time.perf_counter()
            teacher_logits = self.teacher.response_logits(tb)
            t_teacher += time.perf_counter() - tt
            student_logits = response_logits(self.student, sb)
            mask = sb.response_mask
            s_flat, t_flat = student_logits[mask], teacher_logits[mask]
            del teacher_logits
            tl = self._token_loss(s_flat, t_flat, sb.response_ids[mask])
            per_token = torch.zeros(mask.shape, dtype=tl.loss.dtype, device=mask.device)
            per_token[mask] = tl.loss
            loss = losses.reduce_token_loss(
                per_token, mask, cfg.loss.reduction,
                total_tokens=total_tokens, total_sequences=total_seqs,
            )
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["kl"] += float(tl.kl.sum())
            sums["entropy"] += float(tl.student_entropy.sum())
            sums["s_mass"] += float(tl.student_topk_mass.sum())
            sums["t_mass"] += float(tl.teacher_topk_mass.sum())
            del student_logits, s_flat, t_flat, tl, per_token, loss
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.student.parameters() if p.requires_grad], cfg.train.max_grad_norm
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t_update_start - t_teacher
        self.step += 1
        elapsed = time.perf_counter() - t0
        tokens = max(total_tokens, 1.0)
        return {
            "type": "train",
            "step": self.step,
            "loss": sums["loss"],
            "reverse_kl": sums["kl"] / tokens,
            "student_entropy": sums["entropy"] / tokens,
            "student_topk_mass": sums["s_mass"] / tokens,
            "teacher_topk_mass": sums["t_mass"] / tokens,
            "grad_norm": float(grad_norm),
            "response_len": total_tokens / max(len(responses), 1),
            "truncated_frac": sum(roll.truncated) / max(len(responses), 1),
            "time_rollout": t_rollout,
            "time_teacher": t_teacher,
            "time_update": t_update,
            "time_step": elapsed,
            "tokens_per_s": total_tokens / elapsed,
            "lr": cfg.train.lr,
            "sample": roll.texts[0][:200] if roll.texts else "",
        }

    def _token_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, sampled: torch.Tensor
    ) -> losses.TokenLoss:
        lc = self.cfg.loss
        T = self.cfg.rollout.temperature
        if lc.objective != "sampled_token":
            return losses.distill_token_loss(
                student_logits, teacher_logits, objective=lc.objective, k=lc.top_k,
                temperature=T, renormalize=lc.renormalize,
                slot_source="union" if lc.union else "student", beta=lc.beta,
            )
        s_logp = losses.temperature_log_softmax(student_logits, T)
        with torch.no_grad():
            t_logp = losses.temperature_log_softmax(teacher_logits, T)
        s_tok = s_logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        t_tok = t_logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        loss = losses.sampled_token_loss(s_tok, s_tok.detach(), t_tok)
        with torch.no_grad():
            ent = -(s_logp.exp() * s_logp).sum(-1)
        # Here the "slots" are the sampled tokens: masses are their probabilities and the KL
        # column is the single-sample estimate log p_s(y_t) - log p_t(y_t).
        return losses.TokenLoss(
            loss=loss, kl=(s_tok - t_tok).detach(), student_topk_mass=s_tok.detach().exp(),
            teacher_topk_mass=t_tok.exp(), student_entropy=ent,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, with_context: bool = False) -> EvalResult:
        e = self.cfg.eval
        return evaluate(
            self.student, self.tokenizer, self.task, split="eval", with_context=with_context,
            size=e.size, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
            seed=e.seed, batch_size=self.cfg.rollout.batch_size,
        )

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir: Path, rng: dict[str, Any]) -> Path:
        return ckpt.save_checkpoint(
            run_dir / "checkpoints", self.step, self.student, self.tokenizer, self.optimizer,
            {"data": self.order.state(), "rng": rng}, self.cfg.run.keep_last,
        )

    def restore(self, run_dir: Path) -> int:
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        if not found:
            return 0
        latest = found[-1]
        state = ckpt.read_state(latest)
        ckpt.load_weights(latest, self.student, lora=self.cfg.lora.enabled)
        ckpt.load_optimizer(latest, self.optimizer)
        self.order = DataOrder(
            len(self.train_examples), self.cfg.train.seed, state["data"]["epoch"], state["data"]["index"]
        )
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step

    def save_final(self, run_dir: Path) -> Path:
        """Save the trained student as a plain HF model (LoRA merged) in ``run_dir/final``."""
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        model = self.student
        if self.cfg.lora.enabled:
            model = model.merge_and_unload()  # type: ignore[operator]
            self.student = model
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final


def _format_step(m: dict[str, Any]) -> str:
    return (
        f"step {m['step']:>4} | loss {m['loss']:.4f} | rKL {m['reverse_kl']:.4f} | "
        f"H {m['student_entropy']:.3f} | top-k mass s {m['student_topk_mass']:.3f} "
        f"t {m['teacher_topk_mass']:.3f} | len {m['response_len']:.1f} | "
        f"rollout {m['time_rollout']:.1f}s teacher {m['time_teacher']:.1f}s "
        f"update {m['time_update']:.1f}s | {m['tokens_per_s']:.1f} tok/s"
    )


def _as_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        if overrides:
            return config_from_dict(config.to_dict(), overrides)
        return config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)


def train(
    config: Config | dict[str, Any] | str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, EvalResult], None] | None = None,
) -> TrainResult:
    """Run OPCD as configured; returns where the results are. The CLI's ``opcd train``."""
    cfg = _as_config(config, overrides)
    build_task(cfg.task)  # bad data is reported before anything is written
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    trainer = Trainer(cfg, progress=progress)
    log = MetricsLog(run_dir / "metrics.jsonl")
    start = trainer.restore(run_dir) if resume else 0
    log.truncate_after(start)
    if resume and start:
        trainer._say(f"resumed {run_dir} at step {start}")

    def run_eval(step: int) -> None:
        res = trainer.evaluate()
        rec = {"type": "eval", "step": step, "score": res.score, "stderr": res.stderr, "n": res.n,
               "with_context": False}
        log.write(rec)
        trainer._say(f"eval @ step {step}: {res.summary()}")
        if on_eval:
            on_eval(step, res)

    if start == 0:
        if cfg.eval.with_context:
            res = trainer.evaluate(with_context=True)
            log.write({"type": "eval", "step": 0, "score": res.score, "stderr": res.stderr,
                       "n": res.n, "with_context": True})
            trainer._say(f"in-context reference: {res.summary()}")
        run_eval(0)

    steps = cfg.train.steps
    bar = tqdm(total=steps, initial=start, desc="opcd", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    save_every = cfg.run.save_every
    try:
        while trainer.step < steps:
            rng_at_start = ckpt.rng_state()
            try:
                m = trainer.train_step()
            except KeyboardInterrupt:
                if trainer.step > 0:
                    trainer.save(run_dir, rng_at_start)
                    trainer._say(
                        f"interrupted: saved a checkpoint at step {trainer.step}; continue with --resume"
                    )
                raise
            if not math.isfinite(m["loss"]):
                trainer._say(f"warning: non-finite loss at step {m['step']}")
            log.write(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", rkl=f"{m['reverse_kl']:.4f}",
                            tok_s=f"{m['tokens_per_s']:.1f}")
            trainer._say(_format_step(m))
            done = trainer.step >= steps
            if done or (cfg.eval.every and trainer.step % cfg.eval.every == 0):
                run_eval(trainer.step)
            if done or (save_every and trainer.step % save_every == 0):
                trainer.save(run_dir, ckpt.rng_state())
    finally:
        bar.close()
    final = trainer.save_final(run_dir)
    history = log.read()
    if cfg.run.plot:
        from opcd.plot import plot_run

        plot_run(history, run_dir / "plot.png")
    return TrainResult(
        run_dir=run_dir, steps=trainer.step, final_model=final,
        history=[r for r in history if r["type"] == "train"],
        evals=[r for r in history if r["type"] == "eval"],
    )
