"""A training run from start to end: the run folder, the loop, the guard, signals.

:func:`train` (the CLI's ``opcd train``) checks the config and the data, prepares the run
folder (new, resumed or overwritten), builds the trainer with the method's parts
(:func:`build_trainer`) and runs the loop: the in-context ceiling and the first
evaluation (stopping when the context does not lift the behaviour), then steps, each
logged to ``metrics.jsonl`` and watched by the collapse guard (:mod:`opcd.training.guard`),
evaluations every ``eval.every`` steps, checkpoints, and the final model. SIGINT / SIGTERM
finish the current step and save a checkpoint (:class:`StopSignals`); a run breaking the
model stops and keeps its last good state. What one step does is :meth:`Trainer.train_step`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from opcd.config import (
    METHODS,
    Config,
    as_config,
    dump_config,
    flatten,
    ignored_settings,
    load_config,
)
from opcd.errors import (
    CollapseError,
    ConfigError,
    NothingToDistil,
    NumericalError,
    RunFolderError,
    TrainingInterrupted,
)
from opcd.eval.evaluate import EvalResult
from opcd.runtime import checkpoint as ckpt
from opcd.runtime.distributed import Dist
from opcd.runtime.tracking import Trackers, check_report_to, open_trackers
from opcd.tasks import build_task
from opcd.training.guard import Alarm, CollapseGuard
from opcd.training.trainer import MainLog, MetricsLog, Trainer, TrainResult, check_distributed, warn

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.steps", "train.max_consecutive_skips", "run.save_every", "run.keep_last", "eval.every",
    "run.plot", "guard.action", "guard.max_entropy_rise", "guard.min_topk_mass_ratio",
    "guard.max_quality_drop", "guard.max_final_quality_drop", "guard.patience", "run.report_to",
    "run.tracking_project",
}


# --------------------------------------------------------------------------- run folder
def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create or check the run folder; refuse to mix two different runs in one folder.

    Called before any model is loaded, so an unusable folder (no permission, a path through
    a regular file, a full disk) is reported at once, as a :class:`RunFolderError` naming
    the folder and the OS error.
    """
    run_dir = Path(cfg.run.dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; choose one.")
    try:
        _check_run_dir(cfg, run_dir, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        ckpt.atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    except OSError as e:
        raise RunFolderError(
            f"Run folder {str(run_dir)!r} is not usable: {ckpt.os_error_text(e)}. Choose a "
            "writable run.dir (or fix its permissions, or free disk space). No model was loaded."
        ) from None
    return run_dir


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> None:
    saved = run_dir / "config.yaml"
    if run_dir.is_dir() and not resume and _only_unstarted_run(run_dir):
        shutil.rmtree(run_dir)  # a run that failed before its first step: nothing to keep
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not run_dir.is_dir():
            raise RunFolderError(
                f"Run folder {str(run_dir)!r} exists and is not a folder. Choose another run.dir."
            )
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


def _only_unstarted_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds just the config of a run that never finished a step."""
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith((".tmp-", ".write-test"))}
    if not names or not names <= {"config.yaml", "metrics.jsonl", "tensorboard", "wandb"}:
        return False
    metrics = run_dir / "metrics.jsonl"
    return not metrics.is_file() or '"type": "train"' not in metrics.read_text(
        encoding="utf-8", errors="replace"
    )


def build_trainer(cfg: Config, *, progress: bool = True, dist: Dist | None = None) -> Trainer:
    """The trainer of ``cfg.method``: one :class:`Trainer` whose step composes the method's
    sampler, scorer and objective (:mod:`opcd.training.method`)."""
    return Trainer(cfg, progress=progress, dist=dist)


class HardStop(KeyboardInterrupt):
    """Raised by a second SIGINT / SIGTERM: stop now (the run folder stays consistent)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stderr(msg: str) -> None:
    # os.write, not print: safe inside a signal handler that interrupted another write.
    with contextlib.suppress(OSError):
        os.write(2, msg.encode("utf-8", "replace"))


class StopSignals:
    """SIGINT / SIGTERM during a run.

    The first signal sets :attr:`signum`; the loop finishes the current step, saves a
    checkpoint and stops. A second one raises :class:`HardStop` at once (checkpoints and
    metrics are written atomically, so nothing is corrupted) and puts the previous handlers
    back. Only installed from the main thread (Python allows handlers only there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._old.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _stderr(f"\nopcd: {name} received: finishing the current step, saving a checkpoint, "
                    f"then stopping (send {name} again to stop at once).\n")
            return
        self._restore()
        _stderr(f"\nopcd: second {name}: stopping now. The run folder keeps its last complete "
                "checkpoint; continue with --resume.\n")
        raise HardStop(signum)


def train(
    config: Config | dict[str, Any] | str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, EvalResult], None] | None = None,
) -> TrainResult:
    """Run OPCD (or OVD: ``method: ovd``) as configured; returns where the results are.
    The CLI's ``opcd train``.

    Raises :class:`TrainingInterrupted` after SIGINT / SIGTERM (a checkpoint of the last
    finished step is saved first) and :class:`NumericalError` after
    ``train.max_consecutive_skips`` steps in a row with a non-finite loss or gradient norm.
    """
    cfg = as_config(config, overrides)
    ignored = ignored_settings(cfg)
    if ignored:
        warn(f"opcd: note: {', '.join(ignored)} not read by method={cfg.method} (its objective: "
             f"{METHODS[cfg.method].objective}); remove {'them' if len(ignored) > 1 else 'it'}.")
    build_task(cfg.task)  # bad data is reported before anything is written
    dist = Dist.from_env()
    check_distributed(cfg, dist)
    # A missing tracker library or an unusable folder is reported before loading; only the
    # main process reports to trackers and writes the folder.
    failure: tuple[str, str] | None = None
    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        try:
            check_report_to(cfg.run.report_to)
            run_dir = prepare_run_dir(cfg, resume, overwrite)
        except (ConfigError, RunFolderError) as e:
            failure = (type(e).__name__, str(e))
            dist.broadcast(failure)
            raise
    failure = dist.broadcast(failure)
    if failure is not None:
        raise (ConfigError if failure[0] == "ConfigError" else RunFolderError)(failure[1])
    with StopSignals() as stop:
        return _run(cfg, run_dir, resume, progress, on_eval, stop, dist)


def _run(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    progress: bool,
    on_eval: Callable[[int, EvalResult], None] | None,
    stop: StopSignals,
    dist: Dist,
) -> TrainResult:
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if dist.fsdp:
        # Sharding the student is collective, so every process builds the trainer at once,
        # after the main process has pulled the models (a pull happens once).
        if dist.is_main:
            from opcd.models import resolve_model_ref

            for ref in (cfg.model, cfg.teacher.model if cfg.teacher.mode == "model" else None):
                if ref:
                    resolve_model_ref(ref)
        dist.barrier()
        trainer = build_trainer(cfg, progress=progress, dist=dist)
    else:
        if not dist.is_main:
            dist.barrier()  # the main process loads first (a model pull happens once)
        trainer = build_trainer(cfg, progress=progress, dist=dist)
        if dist.is_main:
            dist.barrier()
    log = MainLog(run_dir / "metrics.jsonl", dist.is_main)
    start = trainer.restore(run_dir) if resume else 0
    if dist.is_main:
        ckpt.clean_stale(run_dir)
    log.reset_to(start)  # records past the checkpoint are recomputed, exactly once
    if resume:
        trainer.say(f"resumed {run_dir} at step {start}" if start
                     else f"no checkpoint in {run_dir} yet: starting again from step 0")
    log.trackers = _open_trackers(cfg, run_dir, start, resume, dist)
    ok = False
    try:
        result = _train(cfg, run_dir, trainer, log, start, progress, on_eval, stop, dist)
        ok = True
        return result
    finally:
        log.trackers.close(ok)


def _open_trackers(cfg: Config, run_dir: Path, start: int, resume: bool, dist: Dist) -> Trackers:
    """``run.report_to``'s trackers on the main process (none elsewhere); a tracker that
    cannot start stops every process with its ConfigError."""
    if not cfg.run.report_to:
        return Trackers()
    trackers, failure = Trackers(), None
    if dist.is_main:
        try:
            trackers = open_trackers(cfg, run_dir, start, resume)
        except ConfigError as e:
            failure = str(e)
    failure = dist.broadcast(failure)
    if failure is not None:
        raise ConfigError(failure)
    return trackers


def _train(
    cfg: Config,
    run_dir: Path,
    trainer: Trainer,
    log: MainLog,
    start: int,
    progress: bool,
    on_eval: Callable[[int, EvalResult], None] | None,
    stop: StopSignals,
    dist: Dist,
) -> TrainResult:
    """Evaluate, train and evaluate from step ``start``; the final model and the result."""
    guard = CollapseGuard(cfg.guard, [p for p in trainer.student.parameters() if p.requires_grad],
                          log.read() if start else None)
    guard.mark_good(start)

    def eval_record(step: int, res: EvalResult, with_context: bool) -> dict[str, Any]:
        return {"type": "eval", "step": step, "score": res.score, "stderr": res.stderr,
                "n": res.n, "with_context": with_context, "quality": res.quality,
                "quality_stderr": res.quality_stderr, **res.details}

    def run_eval(step: int, final: bool = False) -> tuple[EvalResult, Alarm | None]:
        res = trainer.evaluate()
        log.write(eval_record(step, res, False), answers=res.records)
        trainer.say(f"eval @ step {step}: {res.summary()}")
        if on_eval:
            on_eval(step, res)
        return res, guard.after_eval(step, res.quality, final=final)

    stopping = dist.any(stop.signum is not None)  # the same decision on every process
    if start == 0 and not stopping:  # (a signal while loading: stop before evaluating)
        ceiling = None
        if wants_ceiling(cfg):
            ceiling = trainer.evaluate(with_context=True)
            log.write(eval_record(0, ceiling, True), answers=ceiling.records)
            trainer.say(f"in-context reference: {ceiling.summary()}")
        base, _ = run_eval(0)
        if ceiling is not None and cfg.eval.require_lift and ceiling.score <= base.score:
            raise NothingToDistil(_no_lift_message(ceiling, base, run_dir))

    steps = cfg.train.steps
    bar = tqdm(total=steps, initial=start, desc=cfg.method, unit="step",
               disable=not (progress and dist.is_main), file=sys.stderr, dynamic_ncols=True)
    save_every = cfg.run.save_every
    limit = cfg.train.max_consecutive_skips
    bad: list[dict[str, Any]] = []  # the current run of skipped steps
    saved: Path | None = None
    alarm: Alarm | None = None
    try:
        while trainer.step < steps and not stopping:
            m = trainer.train_step()
            log.write(m)
            bar.update(1)
            bar.set_postfix(**trainer.postfix(m))
            alarm = guard.after_step(m)
            if m["skipped"]:
                trainer.consecutive_skips += 1
                bad.append(m)
                warn(f"warning: step {m['step']}: {m['skip_reason']}: update skipped "
                      f"({trainer.consecutive_skips}/{limit} in a row); examples: "
                      f"{', '.join(m['example_ids'])}")
                if trainer.consecutive_skips >= limit:
                    raise NumericalError(_numerical_message(cfg, run_dir, bad, trainer.step))
            else:
                trainer.consecutive_skips = 0
                bad.clear()
                trainer.say(trainer.format_step(m))
            done = trainer.step >= steps
            stopping = dist.any(stop.signum is not None)
            if alarm is None and (done or (cfg.eval.every and trainer.step % cfg.eval.every == 0)):
                alarm = run_eval(trainer.step, final=done)[1]
            if alarm is not None:
                if _collapse_alarm(cfg, log, alarm):
                    break
                alarm = None  # guard.action=warn: said, go on
            if done or (save_every and trainer.step % save_every == 0) or stopping:
                saved = trainer.save(run_dir, ckpt.rng_state())
    finally:
        bar.close()
    if stopping and trainer.step < steps and alarm is None:
        raise _interrupted(stop.signum or signal.SIGTERM, run_dir, trainer.step, saved)
    restored = guard.restore() if alarm is not None else None
    final = trainer.save_final(run_dir)
    dist.barrier()  # the final model and metrics are complete before any process returns
    history = log.read()
    if cfg.run.plot and dist.is_main:
        from opcd.eval.plot import plot_run

        plot_run(history, run_dir / "plot.png", title=f"{cfg.method.upper()} run")
    result = TrainResult(
        run_dir=run_dir, steps=trainer.step, final_model=final,
        history=[r for r in history if r["type"] == "train"],
        evals=[r for r in history if r["type"] == "eval"],
    )
    if alarm is not None:
        raise CollapseError(_collapse_message(cfg, alarm, restored, final), result)
    if cfg.run.push_to_hub and dist.is_main:  # the model is saved: a failed push only warns
        from opcd.tools.hub import push_after_training

        push_after_training(run_dir, cfg.run.push_to_hub, cfg.run.hub_private, say=warn)
    return result


def wants_ceiling(cfg: Config) -> bool:
    """Whether a run measures the in-context score at its start (``eval.with_context``)."""
    if cfg.eval.with_context is not None:
        return cfg.eval.with_context
    return cfg.task.name in ("french", "system_prompt", "suite", "knowledge")


def _no_lift_message(ceiling: EvalResult, base: EvalResult, run_dir: Path) -> str:
    return (
        f"Nothing to distil: with the context the model scores {ceiling.score:.3f} ± "
        f"{ceiling.stderr:.3f}, without it {base.score:.3f} ± {base.stderr:.3f} on the "
        f"same {ceiling.n} held-out prompts, so the context does not raise the behaviour and "
        "distillation cannot put it into the weights. Check that the behaviour scorer "
        "(task.behaviour) measures what the context asks for and that the model follows the "
        "context (`opcd eval --model MODEL --task TASK --with-context` shows its answers), or set "
        f"eval.require_lift=false to train anyway (run folder: {str(run_dir)!r})."
    )


def _collapse_alarm(cfg: Config, log: MetricsLog, alarm: Alarm) -> bool:
    """Record and announce a guard alarm; whether the run stops (``guard.action``)."""
    stops = cfg.guard.action == "stop"
    log.write({"type": "guard", "step": alarm.step, "reasons": alarm.reasons,
               "action": cfg.guard.action})
    if not stops:
        warn(f"opcd: warning: collapse guard at step {alarm.step}: {alarm.text()}. The model "
              "may be breaking (guard.action=warn: training goes on).")
    return stops


def _collapse_message(cfg: Config, alarm: Alarm, restored: int | None, final: Path) -> str:
    lc = cfg.loss
    fixes = [f"a lower train.lr (now {cfg.train.lr:g})"]
    if not lc.tail and not lc.renormalize and lc.objective != "sampled_token":
        fixes.insert(0, "loss.tail=true (the divergence without the rest bucket rewards "
                        "moving mass out of the top-k slots)")
    if lc.objective == "reverse_kl":
        fixes.append("loss.objective=forward_kl or akl")
    return (
        f"Collapse guard: the student was breaking at step {alarm.step}: {alarm.text()}. "
        f"Training stopped and the last state that passed every check (after {restored} "
        f"steps) was saved as {str(final)!r}; the checkpoints after it hold the broken "
        f"weights. To change: {', '.join(fixes)}; or loosen the guard (guard.* bounds, "
        "guard.action=warn) if the change is wanted."
    )


def _interrupted(signum: int, run_dir: Path, step: int, saved: Path | None) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    if saved is not None:
        where = f"checkpoint of step {step} saved in {str(saved)!r}"
    elif step > 0:
        where = f"the checkpoint of step {step} is in {str(run_dir / 'checkpoints')!r}"
    else:
        where = "no step had finished, so there was nothing to save"
    return TrainingInterrupted(
        f"Interrupted by {name} at step {step}: {where}. Continue with `opcd train CONFIG "
        f"--resume` (same config and run.dir {str(run_dir)!r}; train.steps may change).",
        signum,
    )


def _numerical_message(cfg: Config, run_dir: Path, bad: list[dict[str, Any]], step: int) -> str:
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    last = f"the last checkpoint ({found[-1].name}) is intact" if found else "no checkpoint was written"
    reasons = sorted({m["skip_reason"].split(" (")[0] for m in bad})
    return (
        f"Stopped at step {step}: {len(bad)} steps in a row ({', '.join(str(m['step']) for m in bad)}) "
        f"had a {' / '.join(reasons)}, so their updates were skipped "
        f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}). Examples in the last "
        f"bad batch: {', '.join(bad[-1]['example_ids'])}. The skipped steps did not change the "
        f"weights and {last}. Usual causes: a learning rate too high (train.lr={cfg.train.lr}) "
        "or a degenerate example: lower train.lr or train.max_grad_norm, check those examples, "
        "or raise train.max_consecutive_skips. Each skipped step is logged in "
        f"{str(run_dir / 'metrics.jsonl')!r}."
    )
