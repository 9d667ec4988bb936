"""A fork server for the crash tests: ``opcd`` commands in child processes that die on cue.

Importing torch and transformers takes seconds, so this process imports them once and
then, for each request, forks a child that runs ``opcd.cli.main(argv)`` exactly as
``python -m opcd`` would. The parent never runs a torch computation (only imports), so
forking it is safe. In the child, hooks count *events* once the trainer is built
(rollout batches, optimiser steps, file writes, fsyncs, renames, deletions, metrics lines)
and, at chosen event numbers, SIGKILL the child (a torn metrics line is written first
when the event is a metrics write) or send it SIGINT / SIGTERM.

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout.
  request: {"argv": [...], "kill_at": int|null, "stderr": path|null, "events": path|null,
            "signals": [{"event": "step:rollout", "nth": 2, "signal": "SIGTERM"}, ...]}
  answer:  {"rc": exit status or null, "signal": killing signal or null}
The child writes the list of events it saw to ``events`` when it exits normally.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
from typing import Any

import torch
import transformers.modeling_utils as hf_modeling

import opcd.cli
import opcd.runtime.checkpoint as ckpt_mod
import opcd.sampling.rollout as rollout_mod
import opcd.training.trainer as trainer_mod

torch.set_num_threads(1)  # same arithmetic in every child, and gentle on shared CPUs

_WRITE_MODES = set("wax+")


def _install_hooks(
    kill_at: int | None, signals: dict[tuple[str, int], int], events: list[str]
) -> None:
    state: dict[str, Any] = {"armed": False, "ctx": "run"}
    seen: dict[str, int] = {}

    def event(kind: str, torn: Any = None) -> None:
        if not state["armed"]:
            return
        name = f"{state['ctx']}:{kind}"
        events.append(name)
        seen[name] = seen.get(name, 0) + 1
        if (name, seen[name]) in signals:
            os.kill(os.getpid(), signals[name, seen[name]])
        if len(events) == kill_at:
            if torn is not None:
                torn()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner: Any, name: str, before: str | None = None, after: str | None = None) -> None:
        orig = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            if before:
                event(before)
            out = orig(*a, **k)
            if after:
                event(after)
            return out

        setattr(owner, name, wrapper)

    def in_context(owner: Any, name: str, ctx: str) -> None:
        orig = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            old, state["ctx"] = state["ctx"], ctx
            try:
                return orig(*a, **k)
            finally:
                state["ctx"] = old

        setattr(owner, name, wrapper)

    init = trainer_mod.Trainer.__init__

    def armed_init(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        state["armed"] = True  # events before the model is loaded are not kill points

    trainer_mod.Trainer.__init__ = armed_init  # type: ignore[method-assign]
    in_context(trainer_mod.Trainer, "evaluate", "eval")
    in_context(trainer_mod.Trainer, "train_step", "step")
    in_context(ckpt_mod, "save_checkpoint", "checkpoint")
    in_context(trainer_mod.Trainer, "save_final", "final")
    wrap(rollout_mod, "sample", after="rollout")
    wrap(torch.optim.AdamW, "step", before="update-before", after="update-after")
    wrap(torch, "save", before="torch.save")
    wrap(hf_modeling, "safe_save_file", before="safetensors", after="safetensors-done")
    wrap(os, "fsync", before="fsync")
    wrap(os, "replace", before="rename", after="renamed")
    wrap(shutil, "rmtree", before="rmtree")

    real_open = builtins.open

    def open_hook(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if _WRITE_MODES & set(mode):
            event(f"open:{os.path.basename(str(file))}")
        return real_open(file, mode, *a, **k)

    builtins.open = open_hook  # type: ignore[assignment]
    io.open = open_hook  # type: ignore[assignment]

    write = trainer_mod.MetricsLog.write

    def metrics_write(self: Any, record: dict[str, Any], answers: Any = None) -> None:
        def torn() -> None:  # half a line reaches the disk, then the process dies
            line = json.dumps(record) + "\n"
            with real_open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())

        event("metrics", torn=torn)
        write(self, record, answers)

    trainer_mod.MetricsLog.write = metrics_write  # type: ignore[method-assign]


def _child(req: dict[str, Any]) -> int:
    if req.get("stderr"):
        fd = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stdout is the protocol channel
    os.close(devnull)
    signals = {
        (s["event"], int(s["nth"])): int(getattr(signal, s["signal"])) for s in req.get("signals") or []
    }
    events: list[str] = []
    _install_hooks(req.get("kill_at"), signals, events)
    try:
        rc = opcd.cli.main(req["argv"])
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 99
    if req.get("events"):
        with open(req["events"], "w") as f:
            json.dump(events, f)
    sys.stderr.flush()
    return rc


def main() -> None:
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 98
            try:
                code = _child(req)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            answer = {"rc": None, "signal": os.WTERMSIG(status)}
        else:
            answer = {"rc": os.WEXITSTATUS(status), "signal": None}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
