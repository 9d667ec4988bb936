"""Reliability (docs/reliability.md): crashes, signals, damaged checkpoints, numerical faults,
unusable run folders, untrusted inputs, resumable evaluation.

The crash and signal tests run ``opcd train`` in child processes of ``crash_worker.py`` (a
fork server that imports torch once) which SIGKILL themselves, or signal themselves, at
chosen points of a run; everything else runs in-process on the tiny random model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trainer import tiny_config, weights, write_prompts

import opcd.runtime.checkpoint as ckpt
import opcd.training.trainer as trainer_mod
from opcd.config import Config, config_from_dict, load_config
from opcd.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NumericalError,
    RunFolderError,
)
from opcd.eval.evaluate import evaluate
from opcd.tasks.chat import fill_template, teacher_messages
from opcd.tasks.system_prompt import SystemPromptTask, load_prompts
from opcd.training.loop import train
from opcd.training.trainer import MetricsLog

TESTS = Path(__file__).resolve().parent
TIMING = {"time_rollout", "time_teacher", "time_update", "time_step", "tokens_per_s"}


# ============================================================================ helpers
class Worker:
    """Client of tests/crash_worker.py: runs ``opcd`` commands in forked children."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "crash_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )

    def run(self, argv: list[str], *, kill_at: int | None = None,
            signals: list[dict[str, Any]] | None = None, events: Path | None = None,
            stderr: Path | None = None, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        req = {"argv": argv, "kill_at": kill_at, "signals": signals or [],
               "events": str(events) if events else None, "stderr": str(stderr) if stderr else None}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"crash worker gave no answer in {timeout}s for {argv}"
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def leftovers(run_dir: Path) -> list[str]:
    """Temporary or half-deleted entries left in the run folder or its checkpoints."""
    found = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    return found


class Reference:
    """An uninterrupted run in a crash-worker child, and what it produced."""

    def __init__(self, cfg: dict[str, Any], cfg_file: Path, final: dict[str, torch.Tensor],
                 records: list[dict[str, Any]], events: list[str]) -> None:
        self.cfg, self.cfg_file, self.final, self.records, self.events = (
            cfg, cfg_file, final, records, events)

    def config_for(self, folder: Path) -> Path:
        """The same config, writing into ``folder``."""
        cfg = json.loads(json.dumps(self.cfg))
        cfg["run"]["dir"] = str(folder / "run")
        folder.mkdir(parents=True, exist_ok=True)
        f = folder / "cfg.yaml"
        f.write_text(yaml.safe_dump(cfg))
        return f

    def check(self, run_dir: Path) -> None:
        """The run in ``run_dir`` ended exactly as the uninterrupted one."""
        assert_same_weights(weights(run_dir / "final"), self.final)
        assert comparable(metrics(run_dir)) == self.records  # each step once, same values
        assert not leftovers(run_dir)
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        assert 1 <= len(found) <= self.cfg["run"]["keep_last"]
        for c in found:
            ckpt.verify_checkpoint(c)


@pytest.fixture(scope="module")
def reference(worker: Worker, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tiny_model_dir, base, train={"steps": 3},
                      run={"save_every": 1, "keep_last": 2}, eval={"every": 2, "size": 2})
    f = base / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    ev = base / "events.json"
    out = worker.run(["train", str(f), "--quiet"], events=ev, stderr=base / "stderr.txt")
    assert out == {"rc": 0, "signal": None}, (base / "stderr.txt").read_text()[-2000:]
    run_dir = Path(cfg["run"]["dir"])
    ref = Reference(cfg, f, weights(run_dir / "final"), comparable(metrics(run_dir)),
                    json.loads(ev.read_text()))
    assert [r["step"] for r in ref.records if r["type"] == "train"] == [1, 2, 3]
    return ref


# ============================================================================ crashes
def pick_kill_points(events: list[str], seed: int = 5) -> list[int]:
    """10 seeded event numbers: in checkpoint writes, rollouts, updates, a metrics line, the final save."""
    rng = random.Random(seed)

    def where(pred: Any) -> list[int]:
        return [i for i, e in enumerate(events, start=1) if pred(e)]

    first_ckpt = events.index("checkpoint:renamed") + 1
    pools = [
        (where(lambda e: e.startswith("checkpoint:")), 4),
        (where(lambda e: e == "step:rollout"), 2),
        (where(lambda e: e.startswith("step:update")), 2),
        # a torn metrics line, once a checkpoint exists (so that the resume keeps a prefix)
        ([i for i in where(lambda e: e == "run:metrics") if i > first_ckpt], 1),
        (where(lambda e: e.startswith("final:")), 1),
    ]
    points: list[int] = []
    for pool, k in pools:
        assert len(pool) >= k, events
        points += rng.sample(pool, k)
    return points


def test_sigkill_at_10_points_then_resume_equals_uninterrupted(
    worker: Worker, reference: Reference, tmp_path: Path
) -> None:
    points = pick_kill_points(reference.events)
    for k in points:
        folder = tmp_path / f"kill-{k}"
        f = reference.config_for(folder)
        err = folder / "stderr.txt"
        out = worker.run(["train", str(f), "--quiet"], kill_at=k, stderr=err)
        assert out == {"rc": None, "signal": signal.SIGKILL}, (k, reference.events[k - 1])
        out = worker.run(["train", str(f), "--resume", "--quiet"], stderr=err)
        assert out == {"rc": 0, "signal": None}, (k, err.read_text()[-2000:])
        reference.check(folder / "run")


# ============================================================================ signals
@pytest.mark.parametrize(("signame", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_at_step_boundary_and_resume_continues(
    worker: Worker, reference: Reference, tmp_path: Path, signame: str, code: int
) -> None:
    f = reference.config_for(tmp_path)
    run_dir = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    # save_every=0: the only checkpoint before the end is the one the signal causes.
    argv = ["train", str(f), "run.save_every=0", "--quiet"]
    sig = [{"event": "step:rollout", "nth": 2, "signal": signame}]  # during step 2
    out = worker.run(argv, signals=sig, stderr=err)
    text = err.read_text()
    assert out == {"rc": code, "signal": None}, text[-2000:]
    assert f"Interrupted by {signame} at step 2" in text and "--resume" in text
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000002"]
    assert [r["step"] for r in metrics(run_dir) if r["type"] == "train"] == [1, 2]
    assert not (run_dir / "final").exists() and not leftovers(run_dir)
    out = worker.run(argv + ["--resume"], stderr=err)
    assert out == {"rc": 0, "signal": None}, err.read_text()[-2000:]
    assert_same_weights(weights(run_dir / "final"), reference.final)
    assert comparable(metrics(run_dir)) == reference.records


def test_second_signal_stops_at_once_without_damage(
    worker: Worker, reference: Reference, tmp_path: Path
) -> None:
    f = reference.config_for(tmp_path)
    run_dir = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    sig = [  # the first during step 2, the second while step 2's checkpoint is being written
        {"event": "step:rollout", "nth": 2, "signal": "SIGTERM"},
        {"event": "checkpoint:torch.save", "nth": 2, "signal": "SIGTERM"},
    ]
    out = worker.run(["train", str(f), "--quiet"], signals=sig, stderr=err)
    text = err.read_text()
    assert out == {"rc": 143, "signal": None}, text[-2000:]
    assert "second SIGTERM" in text
    # the half-written checkpoint was discarded; step 1's is intact
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000001"]
    ckpt.verify_checkpoint(run_dir / "checkpoints" / "step-000001")
    assert not leftovers(run_dir)
    out = worker.run(["train", str(f), "--resume", "--quiet"], stderr=err)
    assert out == {"rc": 0, "signal": None}, err.read_text()[-2000:]
    reference.check(run_dir)


def test_sigterm_to_python_m_opcd_train(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The real command line: SIGTERM mid-run -> checkpoint, exit 143, then --resume."""
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 40}, eval={"size": 2})
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["run"]["dir"])
    proc = subprocess.Popen([sys.executable, "-m", "opcd", "train", str(f), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and '"type": "train"' in log.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Interrupted by SIGTERM" in stderr and "--resume" in stderr
    steps = [r["step"] for r in metrics(run_dir) if r["type"] == "train"]
    saved = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert saved and ckpt.checkpoint_step(saved[-1]) == steps[-1] == len(steps) < 40
    # train.steps may change on resume: finish one step later
    res = train(cfg, [f"train.steps={steps[-1] + 1}"], resume=True, progress=False)
    assert [r["step"] for r in res.history] == list(range(1, steps[-1] + 2))


# ============================================================================ damaged checkpoints
def test_damaged_newest_checkpoint_falls_back_with_a_warning(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 3},
                      run={"save_every": 1, "keep_last": 3}, eval={"size": 2})
    first = train(cfg, progress=False)
    want_w, want_m = weights(first.final_model), comparable(metrics(first.run_dir))
    ckpts = first.run_dir / "checkpoints"

    # 1. a truncated weights file in the newest checkpoint
    shard = next((ckpts / "step-000003" / "model").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(ckpt.CheckpointWarning, match=r"step-000003.*truncated.*Falling back"):
        res = train(cfg, resume=True, progress=False)
    assert_same_weights(weights(res.final_model), want_w)
    assert comparable(metrics(res.run_dir)) == want_m
    assert (ckpts / "damaged-step-000003").is_dir()  # set aside, never used again

    # 2. same size, one byte changed: the sha256 catches it
    opt = ckpts / "step-000003" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.warns(ckpt.CheckpointWarning, match="does not match its sha256"):
        res = train(cfg, resume=True, progress=False)
    assert_same_weights(weights(res.final_model), want_w)
    assert comparable(metrics(res.run_dir)) == want_m

    # 3. nothing intact at all: a clear error, not a silent restart
    for c in ckpt.list_checkpoints(ckpts):
        (c / ckpt.STATE_FILE).write_text("{}")
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(CheckpointError, match="--overwrite"):
        train(cfg, resume=True, progress=False)


# ============================================================================ numerical faults
def inject_nan(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int], where: str) -> None:
    """During ``bad_steps``, make the student's training hidden states, hence its logits
    (``where="logits"``), or the gradient norm (``where="grad"``) non-finite.

    Test-only, by monkeypatching: nothing in opcd itself can inject faults."""
    on = {"flag": False}
    orig_setup = trainer_mod.setup_student

    def setup(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
        model = orig_setup(cfg, model)

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            # training mode only: rollouts, evaluation and the frozen teacher stay clean
            if on["flag"] and module.training:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        model.get_decoder().register_forward_hook(hook)  # every logit path starts here
        return model

    orig_step = trainer_mod.Trainer.train_step

    def step(self: trainer_mod.Trainer) -> dict[str, Any]:
        on["flag"] = self.step + 1 in bad_steps
        try:
            return orig_step(self)
        finally:
            on["flag"] = False

    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(*a: Any, **k: Any) -> torch.Tensor:
        norm = orig_clip(*a, **k)
        return torch.tensor(float("inf")) if on["flag"] else norm

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    if where == "logits":
        monkeypatch.setattr(trainer_mod, "setup_student", setup)
    else:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_non_finite_reason() -> None:
    assert trainer_mod.non_finite_reason(0.5, 1.0) is None
    assert trainer_mod.non_finite_reason(float("nan"), 1.0) == "non-finite loss (nan)"
    assert trainer_mod.non_finite_reason(0.5, float("inf")) == "non-finite gradient norm (inf)"


# NaN logits: the loss may come out finite (NaN slots masked) but the gradient does not;
# either way the update must be skipped.
@pytest.mark.parametrize(("where", "reason"), [("logits", "non-finite"),
                                               ("grad", "non-finite gradient norm")])
def test_non_finite_step_is_skipped_and_logged(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any,
    where: str, reason: str,
) -> None:
    inject_nan(monkeypatch, {2}, where)
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 3},
                      run={"save_every": 1, "keep_last": 3}, eval={"size": 2})
    res = train(cfg, progress=False)
    assert res.steps == 3
    bad = [r for r in res.history if r["skipped"]]
    assert [r["step"] for r in bad] == [2]
    assert reason in bad[0]["skip_reason"]
    ids = bad[0]["example_ids"]
    assert len(ids) == 4 and all(i.startswith("p") for i in ids)
    err = capsys.readouterr().err
    assert "step 2" in err and reason in err and ids[0] in err
    # the skipped step changed neither the weights nor the optimiser state; step 3 did
    ck = res.run_dir / "checkpoints"
    w1, w2, w3 = (weights(ck / f"step-00000{i}" / "model") for i in (1, 2, 3))
    assert_same_weights(w1, w2)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    o1, o2 = (torch.load(ck / f"step-00000{i}" / "optimizer.pt", weights_only=True) for i in (1, 2))
    for pid, s in o1["state"].items():
        for name, t in s.items():
            assert torch.equal(t, o2["state"][pid][name]), name


def test_too_many_consecutive_skips_stop_the_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_nan(monkeypatch, {2, 3, 4, 5}, "logits")
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 5, "max_consecutive_skips": 3},
                      run={"save_every": 1}, eval={"size": 2})
    with pytest.raises(NumericalError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert "Stopped at step 4: 3 steps in a row (2, 3, 4)" in msg
    assert "train.max_consecutive_skips=3" in msg and "train.lr" in msg
    recs = metrics(Path(cfg["run"]["dir"]))
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["skipped"] for r in train_recs] == [False, True, True, True]
    assert all(i in msg for i in train_recs[-1]["example_ids"])
    assert not (Path(cfg["run"]["dir"]) / "final").exists()


# ============================================================================ run folder
@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import opcd.models

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the model must not be loaded before the run folder is checked")

    monkeypatch.setattr(opcd.models, "load_model", refuse)


def test_run_folder_under_a_file_is_refused_before_loading(
    tiny_model_dir: Path, tmp_path: Path, no_model_loading: None
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tiny_config(tiny_model_dir, tmp_path, run={"dir": str(blocker / "run")})
    with pytest.raises(RunFolderError, match=r"a-file/run.*Not a directory \[ENOTDIR\]"):
        train(cfg, progress=False)


def test_unwritable_run_folder_is_refused_before_loading(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loading: None
) -> None:
    real = pathlib.Path.write_text

    def read_only(self: Path, *a: Any, **k: Any) -> int:
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    cfg = tiny_config(tiny_model_dir, tmp_path)
    with pytest.raises(RunFolderError, match=r"run'? is not usable: Read-only file system \[EROFS\]"):
        train(cfg, progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores file permissions, so chmod cannot make a folder read-only "
                    "(the monkeypatched test above covers the same path)")
def test_read_only_run_folder_by_permissions(
    tiny_model_dir: Path, tmp_path: Path, no_model_loading: None
) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        cfg = tiny_config(tiny_model_dir, tmp_path, run={"dir": str(parent / "run")})
        with pytest.raises(RunFolderError, match="Permission denied"):
            train(cfg, progress=False)
    finally:
        parent.chmod(0o700)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = torch.save

    def full_disk(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 2}, run={"save_every": 1},
                      eval={"size": 2})
    run_dir = Path(cfg["run"]["dir"])
    with pytest.raises(RunFolderError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert "No space left on device [ENOSPC]" in msg and str(run_dir / "checkpoints") in msg
    assert "disk is full" in msg and "--resume" in msg
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in found] == ["step-000001"]
    ckpt.verify_checkpoint(found[0])
    assert not leftovers(run_dir)
    monkeypatch.undo()
    res = train(cfg, resume=True, progress=False)
    assert [r["step"] for r in res.history] == [1, 2]


# ============================================================================ metrics
def test_metrics_log_survives_a_torn_last_line(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (0, 1, 2):
        log.write({"type": "train", "step": step, "loss": 0.5})
    with log.path.open("a") as f:
        f.write('{"type": "train", "step": 3, "lo')  # the crash
    assert [r["step"] for r in log.read()] == [0, 1, 2]
    log.reset_to(1)
    log.write({"type": "train", "step": 2, "loss": 0.25})
    assert [(r["step"], r["loss"]) for r in log.read()] == [(0, 0.5), (1, 0.5), (2, 0.25)]
    assert log.path.read_text().endswith("\n")
    log.reset_to(0)  # a fresh start keeps nothing
    assert log.read() == []


# ============================================================================ untrusted inputs
def _mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` four times in five, else ``rare``."""
    return st.integers(0, 4).flatmap(lambda i: usual if i else rare)


_SECTION_FIELDS = {
    name: sorted(getattr(Config(), name).__dataclass_fields__)
    for name in ("task", "teacher", "rollout", "loss", "train", "lora", "eval", "run")
}
_FIELDS = sorted({f for fs in _SECTION_FIELDS.values() for f in fs} | set(_SECTION_FIELDS))
_weird = st.sampled_from([
    "nan", "inf", "-inf", "1e999", "2001-13-01", "\ud800", "a\x00b", "{prompt}", "frozen", "jsd",
    "reverse_kl", "system", "user", "1e-5", "", " ", 10**400, -(10**400), float("nan"),
    float("inf"), True, 0, -1, 0.5, 1.5, 3, "q_proj", ["q_proj", 3],
])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     _weird, _weird, _weird)
_keys = st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6), st.integers(), st.booleans())
_values = st.recursive(
    _scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(_keys, ch, max_size=3),
    max_leaves=6,
)
# Mostly well-formed: known sections and fields with odd values, so that validation is
# reached past the first unknown key; sometimes anything at all.
_structured = st.fixed_dictionaries({}, optional={
    "model": _values, "method": _values,
    **{name: _mostly(st.dictionaries(st.sampled_from(fields), _values, max_size=4), _values)
       for name, fields in _SECTION_FIELDS.items()},
})
_config_dicts = _mostly(_structured, st.dictionaries(_keys, _values, max_size=5))
_override_keys = st.sampled_from(
    [f"{sec}.{f}" for sec, fs in _SECTION_FIELDS.items() for f in fs] + ["model", "train", "x.y"]
)
_overrides = st.lists(
    _mostly(
        st.tuples(_override_keys, st.one_of(st.text(max_size=10), _weird.map(str))).map(
            lambda t: f"{t[0]}={t[1]}"),
        st.text(max_size=20),
    ),
    max_size=3,
)
_fuzz = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(_config_dicts, _overrides)
def test_config_from_dict_raises_only_config_errors(data: dict[Any, Any], overrides: list[str]) -> None:
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    assert all(x == x and abs(x) != float("inf") for x in _numbers(cfg.to_dict()))


def _numbers(d: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for v in d.values():
        if isinstance(v, dict):
            out += _numbers(v)
        elif isinstance(v, float):
            out.append(v)
    return out


def _mutate(text: str, rnd: random.Random) -> str:
    for _ in range(rnd.randint(0, 3)):
        i = rnd.randint(0, len(text))
        text = text[:i] + rnd.choice([":", "-", "[", "{", "\n", " ", "'", "!!", "&a", "*a", "\t"]) \
            + text[i + rnd.randint(0, 2):]
    return text


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@_fuzz
@given(st.one_of(
    st.text(max_size=200),
    st.tuples(_config_dicts, st.integers(0, 2**32)).map(
        lambda t: _mutate(yaml.safe_dump(t[0], allow_unicode=False), random.Random(t[1]))),
    st.sampled_from(["a: 1\na: 2\n", "train:\n  lr: 1\n  lr: 2\n", "x: 2001-13-01\n",
                     "train: !!python/object:os.system {}\n", "[" * 2000, "- 1\n- 2\n",
                     "run: {dir: \"\\ud800\"}\n", "train: {steps: 1e999}\n"]),
))
def test_load_config_raises_only_config_errors(fuzz_dir: Path, text: str) -> None:
    f = fuzz_dir / "cfg.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(ConfigError):
        assert isinstance(load_config(f), Config)


@_fuzz
@given(st.binary(max_size=100))
def test_load_config_raw_bytes(fuzz_dir: Path, data: bytes) -> None:
    f = fuzz_dir / "bytes.yaml"
    f.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(f)


def test_duplicate_yaml_key_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-5\n  steps: 3\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"line 4.*duplicate key 'lr'"):
        load_config(f)
    with pytest.raises(ConfigError, match="must be a finite number"):
        config_from_dict({"train": {"lr": float("nan")}})


_row_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.sampled_from(["", " ", "\ud800", "{context}", "{0}{prompt.__class__}"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_rows = st.dictionaries(st.sampled_from(["prompt", "id", "context", "x"]), _row_values, max_size=4)
_lines = st.one_of(
    _rows.map(json.dumps),
    _rows.map(json.dumps).flatmap(lambda s: st.integers(0, len(s)).map(lambda i: s[:i])),
    st.text(max_size=30),
    st.sampled_from(["[" * 100_000, "1" * 5000, '{"prompt": "\\ud800"}', "\ufeff{}", "null",
                     '{"prompt": "ok", "id": true}', '{"prompt": NaN}']),
)


@_fuzz
@given(st.lists(_lines, max_size=6))
def test_load_prompts_raises_only_data_errors(fuzz_dir: Path, lines: list[str]) -> None:
    f = fuzz_dir / "prompts.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    try:
        examples = load_prompts(f)
    except DataError:
        return
    assert examples
    for ex in examples:
        assert isinstance(ex.prompt, str) and ex.prompt.strip()
        ex.prompt.encode("utf-8")  # valid text all the way down
        assert ex.context is None or isinstance(ex.context, str)


@_fuzz
@given(st.binary(max_size=100))
def test_load_prompts_raw_bytes(fuzz_dir: Path, data: bytes) -> None:
    f = fuzz_dir / "bytes.jsonl"
    f.write_bytes(data)
    with contextlib.suppress(DataError):
        load_prompts(f)


def test_dataset_text_is_data_not_a_template(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    tricky = "Explain {context} and {prompt} and {0} {prompt.__class__} %s"
    f.write_text(json.dumps({"prompt": tricky, "context": "say {prompt} {x}"}) + "\n"
                 + json.dumps({"prompt": "second"}) + "\n")
    examples = load_prompts(f)
    assert examples[0].prompt == tricky
    task = SystemPromptTask("t", "ctx", examples, "contains:a", placement="user")
    msgs = teacher_messages(task, examples[0])
    assert msgs[-1]["content"] == f"say {{prompt}} {{x}}\n\n{tricky}"  # one pass, no re-expansion
    assert fill_template("{prompt}|{context}", "{prompt}", "{context}") == "{context}|{prompt}"


# ============================================================================ resumable eval
def _eval_task(tmp_path: Path) -> SystemPromptTask:
    examples = load_prompts(write_prompts(tmp_path / "prompts.jsonl", n=14))
    return SystemPromptTask("t", "Always answer in French.", examples, "contains:e",
                            eval_fraction=0.5)


def test_eval_resumes_and_generates_only_missing_items(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny
    task = _eval_task(tmp_path)
    kw = {"size": 7, "batch_size": 2, "max_new_tokens": 3}
    full = evaluate(model, tok, task, **kw, records_path=tmp_path / "full.jsonl")
    plain = evaluate(model, tok, task, **kw)
    assert plain.records == full.records  # the file changes nothing about the results

    import opcd.sampling.rollout

    real = opcd.sampling.rollout.sample
    generated: list[int] = []

    def interrupted_after_2_batches(model: Any, tok: Any, prompts: list[Any], **k: Any) -> Any:
        if len(generated) == 2:
            raise KeyboardInterrupt
        generated.append(len(prompts))
        return real(model, tok, prompts, **k)

    path = tmp_path / "part.jsonl"
    monkeypatch.setattr(opcd.sampling.rollout, "sample", interrupted_after_2_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, task, **kw, records_path=path)
    assert len(path.read_text().splitlines()) == 1 + 4  # header + two batches

    # a crash mid-append tears the last line: that batch is generated again
    text = path.read_text()
    path.write_text(text[: len(text) - 10])

    def counting(model: Any, tok: Any, prompts: list[Any], **k: Any) -> Any:
        generated.append(len(prompts))
        return real(model, tok, prompts, **k)

    generated.clear()
    monkeypatch.setattr(opcd.sampling.rollout, "sample", counting)
    res = evaluate(model, tok, task, **kw, records_path=path)
    assert generated == [2, 2, 1]  # batches 2-4 only (batch 2 had the torn line)
    assert res.resumed == 2 and res.records == full.records and res.score == full.score
    assert len(path.read_text().splitlines()) == 1 + 7

    generated.clear()
    again = evaluate(model, tok, task, **kw, records_path=path)
    assert generated == [] and again.resumed == 7 and again.records == full.records

    with pytest.raises(ConfigError, match=r"other settings \(seed: 1234 -> 7\)"):
        evaluate(model, tok, task, **{**kw, "seed": 7}, records_path=path)


def test_opcd_eval_output_jsonl(tiny_model_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from opcd.cli import main

    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path)))
    out = tmp_path / "records.jsonl"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "system_prompt", "--config", str(f),
            "--size", "3", "--max-new-tokens", "3", "--output-jsonl", str(out)]
    assert main(argv) == 0
    assert "0 of 3 read back" in capsys.readouterr().out
    assert main(argv) == 0
    assert "3 of 3 read back" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
