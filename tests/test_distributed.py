"""Multi-process runs (opcd.runtime.distributed, opcd.runtime.sharding): 2 processes under ``accelerate
launch`` (gloo on the CPU), data parallel and FSDP, against one process with the same global
batch, and resuming across process counts and between sharded and unsharded runs.

The launched runs are real child processes (``accelerate launch ... -m opcd train``); the
one-process references run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import save_tiny, sum_tolerance
from test_trainer import tiny_config, weights

from opcd.config import METHODS, config_from_dict
from opcd.errors import ConfigError
from opcd.eval.evaluate import EvalResult, merge_results
from opcd.runtime.distributed import Dist, launched
from opcd.runtime.sharding import FsdpSettings, fsdp_settings_from_env
from opcd.sampling import rollout
from opcd.training.loop import train
from opcd.training.trainer import check_distributed

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp_cpu.yaml"

# ---------------------------------------------------------------------------- units


def test_single_process_is_a_no_op() -> None:
    d = Dist()
    assert not d.enabled and d.is_main and d.shard(5) == [0, 1, 2, 3, 4]
    assert d.sum_floats([1.5, 2.0]) == [1.5, 2.0] and d.gather("x") == ["x"]
    assert d.broadcast(7) == 7 and not d.any(False) and d.any(True)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    d.sum_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_global_figures_divide_sums_over_processes() -> None:
    """Means over the global batch, not means of per-process means; a figure no process has
    is None; counts are summed."""

    class TwoProcesses(Dist):
        """Rank 0 of two, the other's values given (sum_floats adds them)."""

        def __init__(self, other: list[float]) -> None:
            super().__init__(0, 2)
            self.other = other

        def sum_floats(self, values):  # type: ignore[no-untyped-def]
            return [a + b for a, b in zip(values, self.other, strict=True)]

    mine = {"score": (2.0 + 4.0, 2), "frac": (1.0, 4), "none": (0.0, 0)}
    theirs = [9.0, 1, 3.0, 4, 0.0, 0, 5]  # score 9 over 1 row, frac 3 of 4, count 5
    out = TwoProcesses(theirs).global_figures(mine, counts={"rejected": 2})
    assert out == {"score": 5.0, "frac": 0.5, "none": None, "rejected": 7}
    assert isinstance(out["rejected"], int)
    assert Dist().global_figures(mine, counts={"rejected": 2}) == {
        "score": 3.0, "frac": 0.25, "none": None, "rejected": 2}


def test_shards_cover_the_batch_once() -> None:
    shards = [Dist(r, 3).shard(8) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(8))
    assert shards[0] == [0, 3, 6] and shards[2] == [2, 5]


def test_launched_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()


def test_deepspeed_launch_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed.*FSDP config"):
        Dist.from_env()


def test_fsdp_settings_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
                "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(key, raising=False)
    assert fsdp_settings_from_env() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_settings_from_env() == FsdpSettings(True, False)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "SHARD_GRAD_OP")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert fsdp_settings_from_env() == FsdpSettings(False, True)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "sometimes")
    with pytest.raises(ConfigError, match="FSDP_RESHARD_AFTER_FORWARD='sometimes'.*true or false"):
        fsdp_settings_from_env()
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="offloading.*fsdp_offload_params: false"):
        fsdp_settings_from_env()
    assert Dist(0, 1, fsdp=FsdpSettings()).fsdp is None  # one process: nothing to shard


def test_settings_a_multi_process_run_cannot_honour(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path))
    check_distributed(cfg, Dist(0, 2))  # batch 4 on 2 processes: fine
    check_distributed(cfg, Dist())  # anything goes on one process
    with pytest.raises(ConfigError, match=r"train.batch_size=4 .* 8 processes"):
        check_distributed(cfg, Dist(0, 8))
    ovd = config_from_dict(tiny_config(tiny_model_dir, tmp_path), ["method=ovd", "rollout.n=2"])
    check_distributed(ovd, Dist(1, 2))  # data parallel: fine
    sharded = Dist(0, 2, fsdp=FsdpSettings())
    check_distributed(ovd, sharded)  # every method runs sharded now
    offpolicy = config_from_dict(tiny_config(tiny_model_dir, tmp_path), ["method=offpolicy"])
    check_distributed(offpolicy, Dist(1, 2))  # data parallel: fine
    check_distributed(offpolicy, sharded)
    # a method whose table row refuses FSDP is stopped with the fix
    monkeypatch.setitem(METHODS, "ovd", dataclasses.replace(METHODS["ovd"], fsdp=False))
    with pytest.raises(ConfigError, match="method=ovd runs data parallel but not .*FSDP.*--multi_gpu"):
        check_distributed(ovd, sharded)
    check_distributed(cfg, sharded)
    for override in ("lora.enabled=true", "teacher.mode=live", "rollout.dtype=bfloat16"):
        check_distributed(config_from_dict(tiny_config(tiny_model_dir, tmp_path), [override]), sharded)


def test_merge_results_restores_item_order() -> None:
    def part(ids: list[int], scores: list[float]) -> EvalResult:
        recs = [{"id": f"e{i}", "score": s} for i, s in zip(ids, scores, strict=True)]
        return EvalResult("t", "eval", False, 0.0, 0.0, len(recs), recs)

    merged = merge_results([part([0, 2, 4], [1, 0, 1]), part([1, 3], [1, 1])])
    assert [r["id"] for r in merged.records] == ["e0", "e1", "e2", "e3", "e4"]
    assert merged.n == 5 and merged.score == pytest.approx(0.8)


def test_seeded_rows_do_not_depend_on_the_batch(tiny: Any) -> None:
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("hello there", "a much longer prompt than that", "hi")]
    seeds = [11, 22, 33]
    kw = dict(n=2, temperature=1.0, max_new_tokens=8)
    together = rollout.sample(model, tok, prompts, seeds=seeds, batch_size=6, **kw)
    alone = [rollout.sample(model, tok, [p], seeds=[s], batch_size=1, **kw) for p, s in
             zip(prompts, seeds, strict=True)]
    assert together.response_ids == [r for a in alone for r in a.response_ids]
    other = rollout.sample(model, tok, prompts, seeds=[12, 22, 33], batch_size=6, **kw)
    assert other.response_ids[2:] == together.response_ids[2:]
    assert other.response_ids[:2] != together.response_ids[:2]


def test_seeded_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.0, 0.2, 0.0, 0.8])
    logits = probs.clamp_min(1e-30).log().expand(4000, 4)
    picked = rollout.pick_tokens(logits, 1.0, 1.0, rollout.row_generators(list(range(4000))))
    counts = torch.bincount(picked, minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # zero-probability tokens never come out
    assert abs(counts[3].item() / 4000 - 0.8) < 0.03


# ---------------------------------------------------------------------------- 2 processes


def _launch(cfg: dict[str, Any], folder: Path, *, resume: bool = False, fsdp: bool = False,
            extra: tuple[str, ...] = ()) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 -m opcd train`` on ``cfg``; with
    ``fsdp``, the shipped ``configs/accelerate/fsdp_cpu.yaml`` instead."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / f"launch-{'resume' if resume else 'start'}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    how = (["--config_file", str(FSDP_CONFIG)] if fsdp else
           ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, *extra,
           "--main_process_port", "0", "-m", "opcd", "train", str(cfg_file), "--quiet",
           *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    (folder / "launch-stderr.txt").write_text(proc.stderr)  # every process's, for a failure
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], moved_from: dict,
                  tol: float = 2e-3) -> None:
    """The weights of two runs that differ only in summation order (processes, padding).

    AdamW's first steps move a weight by about lr * sign(gradient) however small the
    gradient, so rounding-level gradient differences on weights with near-zero gradients
    (many with the rest-of-vocabulary bucket, which gives every output row a small
    gradient) show up as differences of a few percent of lr (lr 1e-2 here) after 2-4 steps;
    a lost micro-batch moves them by the order of lr. AdamW does not see a wrong gradient
    scale at all: the tests compare the gradient norms step by step for that
    (:func:`_assert_same_gradients`).
    """
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - moved_from[k]).abs().max()) for k in a)
    assert moved > 1e-3, "training did not change the weights: the comparison would be empty"
    assert worst < tol, f"weights differ by {worst} (training moved them by {moved})"


class _Reference:
    """Run configs on ``model_dir`` (4 steps, micro-batch 1, a checkpoint every 2 steps) and
    the one-process reference run's initial, step-2 and final weights."""

    def __init__(self, model_dir: Path, tmp_path: Path, batch_size: int) -> None:
        self.model_dir, self.tmp_path = model_dir, tmp_path
        self.base = {"train": {"steps": 4, "batch_size": batch_size, "micro_batch_size": 1,
                               "lr": 1e-2},
                     "run": {"save_every": 2, "keep_last": 5}, "eval": {"size": 3, "every": 0}}
        self.initial = weights(model_dir)
        run = train(self.cfg("one", 4), progress=False)
        one = run.run_dir
        self.grad_norms = [m["grad_norm"] for m in run.history]
        self.at_2 = weights(one / "checkpoints" / "step-000002" / "model")
        self.final = weights(one / "final")

    def cfg(self, name: str, steps: int) -> dict[str, Any]:
        c = tiny_config(self.model_dir, self.tmp_path / name,
                        **{k: dict(v) for k, v in self.base.items()})
        c["train"]["steps"] = steps
        return c


def _assert_same_gradients(records: list[dict[str, Any]], grad_norms: list[float]) -> None:
    """Each step's gradient norm (before clipping, summed over the processes) equals the
    one-process run's, up to summation order; checked while the weights agree closely (the
    first two steps)."""
    steps = [r for r in records if r["type"] == "train"][:2]
    assert steps, "no steps to compare"
    for r in steps:
        assert r["grad_norm"] == pytest.approx(grad_norms[r["step"] - 1], rel=1e-4), r["step"]


def test_two_processes_equal_one_and_resume_across_counts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ref = _Reference(tiny_model_dir, tmp_path, batch_size=4)
    cfg, initial, one_at_2, one_final = ref.cfg, ref.initial, ref.at_2, ref.final

    # Two processes, 2 steps: the same weights as one process at step 2 ...
    two = cfg("two", 2)
    _launch(two, tmp_path / "two")
    two_dir = Path(two["run"]["dir"])
    _assert_close(weights(two_dir / "final"), one_at_2, initial)
    recs = [json.loads(r) for r in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in recs if r["type"] == "train"] == [2, 2]
    _assert_same_gradients(recs, ref.grad_norms)
    assert len([r for r in recs if r["type"] == "eval"]) == 2  # step 0 and the end, written once
    # ... resumed on ONE process to step 4: the weights of the uninterrupted run.
    shutil.rmtree(two_dir / "final")
    two["train"]["steps"] = 4
    train(two, resume=True, progress=False)
    _assert_close(weights(two_dir / "final"), one_final, initial)

    # One process to step 2, resumed on TWO processes to step 4: the same again.
    mixed = cfg("mixed", 2)
    train(mixed, progress=False)
    mixed["train"]["steps"] = 4
    _launch(mixed, tmp_path / "mixed", resume=True)
    mixed_dir = Path(mixed["run"]["dir"])
    recs = [json.loads(r) for r in (mixed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in recs if r["type"] == "train"] == [1, 1, 2, 2]
    _assert_close(weights(mixed_dir / "final"), one_final, initial)


def test_ovd_on_two_processes_equals_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """OVD data parallel: each process samples, rates and normalises its own prompts' groups;
    the gradients are summed and the step's figures are over the global batch. The verdicts
    are the teacher's expected digit (deterministic) and nothing is replaced, so two
    processes give the one-process run's weights and figures. One step: from the second on,
    weights that differ by rounding can flip the sign of a group's advantages where its
    verdicts nearly tie (a tiny random teacher's expected digits do)."""
    from test_ovd import ovd_config

    def cfg(name: str) -> dict[str, Any]:
        c = ovd_config(tiny_model_dir, tmp_path / name, score_mode="expected", threshold=0)
        c["train"].update(steps=1, batch_size=4, micro_batch_size=2)
        c["eval"].update(size=2, every=0)
        return c

    one = train(cfg("one"), progress=False)
    two = cfg("two")
    _launch(two, tmp_path / "two")
    two_dir = Path(two["run"]["dir"])
    recs = [json.loads(r) for r in (two_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["processes"] for r in steps] == [2]
    a, b = one.history[0], steps[0]
    for key in ("loss", "grad_norm", "verbal_score", "reward", "digit_mass",
                "student_response_len", "zero_adv_groups", "response_len"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    _assert_close(weights(two_dir / "final"), weights(one.final_model), weights(tiny_model_dir))


def test_fsdp_ovd_equals_one_process_and_replaces_without_waiting(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    """OVD with the student sharded: the frozen teacher (a sharded copy) gathered once per
    step for all of a process's ratings and replacements. Without replacements the step is
    the one-process step; with every response rejected (threshold 9 > the random teacher's
    expected digits, ~4.5)
    each process generates its own replacements inside that gather, a different number of
    forwards per process, and the run still finishes."""
    from test_ovd import ovd_config

    def cfg(name: str, threshold: int) -> dict[str, Any]:
        c = ovd_config(tiny_model_dir, tmp_path / name, score_mode="expected", threshold=threshold)
        c["train"].update(steps=1, batch_size=3, micro_batch_size=2)
        c["eval"].update(size=2, every=0)
        return c

    one = train(cfg("one", 0), progress=False)
    sharded = cfg("sharded", 0)
    _launch(sharded, tmp_path / "sharded", fsdp=True)
    sharded_dir = Path(sharded["run"]["dir"])
    step = [json.loads(r) for r in (sharded_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["type"] == "train"][0]
    for key in ("loss", "grad_norm", "verbal_score", "reward", "student_response_len"):
        assert step[key] == pytest.approx(one.history[0][key], rel=1e-4, abs=1e-6), key
    # the gradient is the one-process gradient (its norm above); AdamW's first update (about
    # lr * sign(g)) turns summation-order differences of near-zero gradients (rows whose
    # advantages nearly cancel) into visible ones: the FrozenLake test's looser bound
    _assert_close(weights(sharded_dir / "final"), weights(one.final_model), weights(tiny_model_dir),
                  tol=5e-3)

    replacing = cfg("replacing", 9)
    _launch(replacing, tmp_path / "replacing", fsdp=True)
    step = [json.loads(r) for r in (Path(replacing["run"]["dir"]) / "metrics.jsonl")
            .read_text().splitlines() if json.loads(r)["type"] == "train"][0]
    assert step["processes"] == 2 and step["replaced_frac"] == 1.0


def test_offpolicy_on_two_processes_equals_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The off-policy baseline data parallel: each process generates its share of a step's
    missing teacher responses (each response seeded by its example, not by who generates
    it), the main process writes the whole group, every process trains on its share of the
    prompts. Two processes write the one-process run's responses file and take its steps,
    including a step that reuses stored responses (batch 4 of 9 training prompts: step 3
    starts the second epoch)."""

    def cfg(name: str) -> dict[str, Any]:
        c = tiny_config(tiny_model_dir, tmp_path / name, loss={"top_k": 4},
                        train={"steps": 3, "batch_size": 4, "micro_batch_size": 2})
        c["eval"].update(size=2, every=0)
        return {**c, "method": "offpolicy"}

    one = train(cfg("one"), progress=False)
    two = cfg("two")
    _launch(two, tmp_path / "two")
    two_dir = Path(two["run"]["dir"])
    stored = [(two_dir if i else one.run_dir) / "teacher_responses.jsonl" for i in (0, 1)]
    # the same records (after the header, which names each run's prompts file); the teacher's
    # log-probs to rounding: it scored them in other batches
    a, b = ([json.loads(line) for line in f.read_text().splitlines()[1:]] for f in stored)
    assert [(r["example"], r["sample"], r["group"], r["ids"], r["topk_ids"]) for r in a] == \
        [(r["example"], r["sample"], r["group"], r["ids"], r["topk_ids"]) for r in b]
    assert torch.allclose(torch.tensor([x for r in a for row in r["topk_logprobs"] for x in row]),
                          torch.tensor([x for r in b for row in r["topk_logprobs"] for x in row]),
                          atol=1e-5)
    recs = [json.loads(r) for r in (two_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["processes"] for r in steps] == [2, 2, 2]
    for a, b in zip(one.history, steps, strict=True):
        assert (b["generated"], b["reused"]) == (a["generated"], a["reused"])
        for key in ("loss", "grad_norm", "forward_kl", "nll", "response_len"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert any(r["reused"] for r in steps)
    _assert_close(weights(two_dir / "final"), weights(one.final_model), weights(tiny_model_dir))


def test_fsdp_equals_one_process_and_resumes_across_counts(tmp_path: Path) -> None:
    """The student sharded over 2 processes (tied head, an uneven split of batch 3 with
    micro-batch 1: one process runs a zero-weight micro-batch) takes the one-process steps;
    its checkpoints resume unsharded, and an unsharded checkpoint resumes sharded."""
    model_dir = save_tiny(tmp_path / "tied", tie=True)
    ref = _Reference(model_dir, tmp_path, batch_size=3)
    cfg, initial, one_at_2, one_final = ref.cfg, ref.initial, ref.at_2, ref.final

    sharded = cfg("sharded", 2)
    _launch(sharded, tmp_path / "sharded", fsdp=True)
    sharded_dir = Path(sharded["run"]["dir"])
    _assert_close(weights(sharded_dir / "final"), one_at_2, initial)
    _assert_close(weights(sharded_dir / "checkpoints" / "step-000002" / "model"), one_at_2, initial)
    saved = json.loads((sharded_dir / "final" / "config.json").read_text())
    assert saved["architectures"] == json.loads((model_dir / "config.json").read_text())["architectures"]
    recs = [json.loads(r) for r in (sharded_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in recs if r["type"] == "train"] == [2, 2]
    _assert_same_gradients(recs, ref.grad_norms)
    # The sharded checkpoint (weights and AdamW moments) resumed on ONE process.
    shutil.rmtree(sharded_dir / "final")
    sharded["train"]["steps"] = 4
    train(sharded, resume=True, progress=False)
    _assert_close(weights(sharded_dir / "final"), one_final, initial)

    # Layers kept gathered from forward to backward, and recomputed in the backward
    # (fsdp_activation_checkpointing): the same steps.
    kept = cfg("kept", 2)
    _launch(kept, tmp_path / "kept", fsdp=True, extra=(
        "--fsdp_reshard_after_forward", "false", "--fsdp_activation_checkpointing", "true"))
    _assert_close(weights(Path(kept["run"]["dir"]) / "final"), one_at_2, initial)

    # An unsharded checkpoint resumed sharded.
    mixed = cfg("mixed", 2)
    train(mixed, progress=False)
    mixed["train"]["steps"] = 4
    _launch(mixed, tmp_path / "mixed", resume=True, fsdp=True)
    _assert_close(weights(Path(mixed["run"]["dir"]) / "final"), one_final, initial)


def test_fsdp_plays_games_with_uneven_turn_counts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """FrozenLake episodes (3 per step over 2 processes) give each process its own number of
    trained turns and, with micro-batch 1, of micro-batches; the sharded run still equals the
    one-process run."""
    def cfg(name: str) -> dict[str, Any]:
        c = tiny_config(tiny_model_dir, tmp_path / name,
                        train={"steps": 2, "batch_size": 3, "micro_batch_size": 1, "lr": 1e-2},
                        eval={"size": 2, "max_new_tokens": 4, "every": 0},
                        rollout={"truncate_prompts": True})
        c["task"] = {"name": "frozenlake", "train_size": 4, "eval_size": 2, "test_size": 2}
        return c

    one = train(cfg("one"), progress=False)
    sharded = cfg("sharded")
    _launch(sharded, tmp_path / "sharded", fsdp=True)
    sharded_dir = Path(sharded["run"]["dir"])
    recs = [json.loads(r) for r in (sharded_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["trained_turns"] for r in steps] == [m["trained_turns"] for m in one.history]
    assert steps[0]["trained_turns"] % 2 == 1  # 2 episodes on one process, 1 on the other
    # The gradients are the one-process gradients up to summation order (step 1's norm) ...
    assert steps[0]["grad_norm"] == pytest.approx(one.history[0]["grad_norm"], rel=1e-5)
    # The loss (~1e-7 here) is a sum of terms of the entropy's scale that cancel: compare it
    # at the rounding error of those terms, not relative to the tiny result.
    for r, m in zip(steps, one.history, strict=True):
        assert r["loss"] == pytest.approx(m["loss"], rel=1e-4,
                                          abs=sum_tolerance(m["student_entropy"]))
    # ... which AdamW's first steps amplify where a gradient is near zero (its update is
    # about lr * sign(g)): a looser bound on the weights than the even-split tests need.
    _assert_close(weights(sharded_dir / "final"), weights(one.final_model), weights(tiny_model_dir),
                  tol=5e-3)


@pytest.mark.parametrize("variant", ["model", "live", "live-naive", "bf16-rollout", "offpolicy",
                                     "offpolicy-lora"])
def test_fsdp_variants(variant: str, tiny_model_dir: Path, tiny_model_dir_other: Path,
                       tmp_path: Path) -> None:
    """Under FSDP, teacher.mode=model (the other model's layers sharded and gathered to score),
    teacher.mode=live (the sharded student gathered to score; also with the naive computation,
    which scores per micro-batch), rollout.dtype=bfloat16 (a whole bf16 copy per process,
    synced from the gathered weights) and the off-policy baseline (the frozen copy, or the
    LoRA base, gathered once to sample and score its responses; batch 3: one process
    generates 2 and the other 1 of a step's) take the one-process steps."""
    t = ({"mode": "model", "model": str(tiny_model_dir_other)} if variant == "model"
         else {"mode": "live"} if variant.startswith("live") else {})
    perf = {"prefix_cache": False, "chunked_loss": False} if variant == "live-naive" else {}
    roll = {"dtype": "bfloat16"} if variant == "bf16-rollout" else {}
    sections: dict[str, dict[str, Any]] = {}
    if variant.startswith("offpolicy"):  # a context long enough to be sampled from once per batch
        sections = {"loss": {"top_k": 4}, "task": {"context": "Always answer in French. " * 12}}
    if variant == "offpolicy-lora":
        sections["lora"] = {"enabled": True, "r": 4, "alpha": 8}

    def cfg(name: str) -> dict[str, Any]:
        c = tiny_config(tiny_model_dir, tmp_path / name,
                        train={"steps": 2, "batch_size": 3 if sections else 4,
                               "micro_batch_size": 2, "lr": 1e-2},
                        eval={"size": 2, "every": 0}, teacher=t, perf=perf, rollout=roll, **sections)
        return {**c, "method": "offpolicy"} if sections else c

    one = train(cfg("one"), progress=False)
    sharded = cfg("sharded")
    _launch(sharded, tmp_path / "sharded", fsdp=True)
    _assert_close(weights(Path(sharded["run"]["dir"]) / "final"), weights(one.final_model),
                  weights(tiny_model_dir))


def test_fsdp_lora_equals_one_process_and_resumes_across_counts(tmp_path: Path) -> None:
    """LoRA under FSDP (the base and adapters sharded; the frozen teacher is the base with the
    adapter off, gathered to score): the merged final model of the one-process run, and
    adapter checkpoints that resume sharded or not."""
    model_dir = save_tiny(tmp_path / "tied", tie=True)
    initial = weights(model_dir)

    def cfg(name: str, steps: int) -> dict[str, Any]:
        return tiny_config(model_dir, tmp_path / name,
                           train={"steps": steps, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2},
                           run={"save_every": 2, "keep_last": 5}, eval={"size": 2, "every": 0},
                           lora={"enabled": True, "r": 4, "alpha": 8})

    one_at_2 = weights(train(cfg("one2", 2), progress=False).final_model)
    one_final = weights(train(cfg("one4", 4), progress=False).final_model)

    sharded = cfg("sharded", 2)
    _launch(sharded, tmp_path / "sharded", fsdp=True)
    sharded_dir = Path(sharded["run"]["dir"])
    _assert_close(weights(sharded_dir / "final"), one_at_2, initial)  # merged, base names
    shutil.rmtree(sharded_dir / "final")
    sharded["train"]["steps"] = 4
    train(sharded, resume=True, progress=False)  # the sharded adapter checkpoint, one process
    _assert_close(weights(sharded_dir / "final"), one_final, initial)

    mixed = cfg("mixed", 2)
    train(mixed, progress=False)
    mixed["train"]["steps"] = 4
    _launch(mixed, tmp_path / "mixed", resume=True, fsdp=True)  # a one-process checkpoint, sharded
    _assert_close(weights(Path(mixed["run"]["dir"]) / "final"), one_final, initial)


def test_a_sharded_teachers_prefix_cache_follows_its_own_shards(tiny_model_dir: Path) -> None:
    """The prefix cache's fingerprint reads each sharded weight's own shard: an optimiser
    step on the student changes a live teacher's, never a frozen copy's, and gathering the
    weights (new tensors every time) changes neither. One process, a 1-process FSDP mesh."""
    import torch.distributed as torch_dist
    from transformers import AutoModelForCausalLM

    from opcd.runtime.sharding import FsdpSettings, gathered, shard_frozen_layers, shard_model
    from opcd.teachers.teacher import Teacher

    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        frozen = Teacher("frozen", student)  # the copy, taken before sharding
        cpu = torch.device("cpu")
        shard_model(student, 1, cpu, FsdpSettings())
        shard_frozen_layers(frozen.separate_model, 1, cpu)
        live = Teacher("live", student)
        before = frozen._fingerprint(), live._fingerprint()
        with gathered(student), gathered(frozen.separate_model):
            pass
        assert (frozen._fingerprint(), live._fingerprint()) == before
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        student(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        opt.step()
        assert frozen._fingerprint() == before[0] and live._fingerprint() != before[1]
    finally:
        torch_dist.destroy_process_group()
