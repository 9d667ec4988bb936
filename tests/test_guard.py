"""The collapse guard and the answers' quality figure, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import tiny_config, weights

from opcd.cli import main
from opcd.config import GuardConfig, config_from_dict
from opcd.errors import CollapseError, NothingToDistil
from opcd.training.guard import CollapseGuard
from opcd.training.loop import train
from opcd.training.trainer import Trainer


def _step(step: int, entropy: float = 1.5, mass: float = 0.95) -> dict[str, Any]:
    return {"step": step, "student_entropy": entropy, "student_topk_mass": mass, "skipped": False}


def test_guard_fires_after_patience_and_restores_the_last_good_weights() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    guard = CollapseGuard(GuardConfig(patience=2), [w])
    guard.mark_good(0)

    def step(n: int, **figures: float) -> Any:
        with torch.no_grad():
            w.fill_(float(n))  # train_step: the rollout (old weights), then the update
        return guard.after_step(_step(n, **figures))

    for n in (1, 2, 3):  # the figures of steps 1-3 measure the weights after 0-2 updates
        assert step(n) is None
    # steps 4 and 5 measure broken weights (after 3 and 4 updates)
    assert step(4, entropy=5.0) is None  # one step: patience
    alarm = step(5, entropy=5.0, mass=0.5)
    assert alarm is not None and alarm.step == 5
    text = alarm.text()
    assert "1.50 to 5.00" in text and "0.950 to 0.500" in text and "2 steps in a row" in text
    assert guard.restore() == 2  # step 3's figures passed: the weights after 2 updates
    assert w.tolist() == [2.0, 2.0, 2.0]


def test_guard_single_bad_step_and_warn_and_off() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    guard = CollapseGuard(GuardConfig(patience=2), [w])
    guard.mark_good(0)
    assert guard.after_step(_step(1)) is None
    assert guard.after_step(_step(2, mass=0.1)) is None  # a lone outlier is forgiven
    assert guard.after_step(_step(3)) is None and guard.streak == 0
    off = CollapseGuard(GuardConfig(action="off"), [w])
    off.mark_good(0)
    assert off.after_step(_step(1)) is None and off.after_step(_step(2, 9.0, 0.1)) is None
    assert off.good is None  # no copies of the weights when off


def test_guard_quality_drop_fires_at_once_and_full_weights_snapshot_at_evals() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    guard = CollapseGuard(GuardConfig(max_quality_drop=1.0), [w])
    guard.per_step = False  # as for full fine-tuning: copies only at passing evaluations
    guard.mark_good(0)
    assert guard.after_eval(0, -1.2) is None  # the start's quality
    for step in (1, 2):
        with torch.no_grad():
            w.fill_(float(step))
        assert guard.after_step(_step(step)) is None
    assert guard.after_eval(2, -1.5) is None  # within 1 nat: the weights after 2 are good
    with torch.no_grad():
        w.fill_(3.0)
    alarm = guard.after_eval(3, -2.5)
    assert alarm is not None and "-1.20 to -2.50" in alarm.text()
    assert guard.restore() == 2 and w.tolist() == [2.0, 2.0]


def test_the_final_evaluation_is_held_to_the_tighter_quality_bound() -> None:
    """Mid-run a learning student may pass through mixed answers (quality -1.4 measured);
    the model presented as the result may not (the reference objective ended at -1.7)."""
    w = torch.nn.Parameter(torch.zeros(2))
    guard = CollapseGuard(GuardConfig(), [w])  # defaults: 2 nats mid-run, 1 at the end
    guard.per_step = False
    guard.mark_good(0)
    assert guard.after_eval(0, 0.05) is None
    with torch.no_grad():
        w.fill_(4.0)
    assert guard.after_eval(4, -1.4) is None  # mid-run: within 2 nats
    with torch.no_grad():
        w.fill_(8.0)
    assert guard.after_eval(8, -0.6, final=True) is None  # a fluent result passes
    alarm = guard.after_eval(8, -1.7, final=True)
    assert alarm is not None and "guard.max_final_quality_drop, for the final model" in alarm.text()
    assert guard.after_eval(8, -1.7) is None  # the same figure mid-run passes
    assert guard.restore() == 8 and w.tolist() == [8.0, 8.0]  # (the -0.6 evaluation passed)


def test_only_the_last_evaluation_of_a_run_is_checked_as_final(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bool]] = []
    real = CollapseGuard.after_eval

    def spy(self: CollapseGuard, step: int, quality: float | None, final: bool = False) -> Any:
        calls.append((step, final))
        return real(self, step, quality, final=final)

    monkeypatch.setattr(CollapseGuard, "after_eval", spy)
    train(tiny_config(tiny_model_dir, tmp_path / "r", train={"steps": 4}, eval={"every": 2}),
          progress=False)
    assert calls == [(0, False), (2, False), (4, True)]


def test_a_collapsing_run_stops_and_keeps_the_last_good_state(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The student's figures go bad from step 3 on (made so here): the run stops at step 4,
    says so, and its final model is the state after 1 update, equal to a 1-step run's."""
    one = train(tiny_config(tiny_model_dir, tmp_path / "one", train={"steps": 1}), progress=False)

    real = Trainer.train_step

    def breaking(self: Trainer) -> dict[str, Any]:
        m = real(self)
        if m["step"] >= 3:
            m["student_entropy"] += 50.0
        return m

    monkeypatch.setattr(Trainer, "train_step", breaking)
    cfg = tiny_config(tiny_model_dir, tmp_path / "broken", train={"steps": 6})
    with pytest.raises(CollapseError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "step 4" in msg and "after 1 steps" in msg and "train.lr" in msg
    run = Path(cfg["run"]["dir"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2, 3, 4]
    guard = [r for r in recs if r["type"] == "guard"]
    assert len(guard) == 1 and guard[0]["step"] == 4 and guard[0]["action"] == "stop"
    a, b = weights(one.final_model), weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert err.value.result.final_model == run / "final"

    # guard.action=warn: the same run goes on to its end, with a warning and a record
    warn = tiny_config(tiny_model_dir, tmp_path / "warn", train={"steps": 5},
                       guard={"action": "warn"})
    res = train(warn, progress=False)
    assert res.steps == 5
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "guard"] == [4, 5]

    # the CLI exits with status 3 and the message
    cli = tiny_config(tiny_model_dir, tmp_path / "cli", train={"steps": 6})
    path = tmp_path / "cli.yaml"
    path.write_text(json.dumps(cli))
    assert main(["train", str(path), "--quiet"]) == 3


def test_quality_figure_is_the_base_models_surprise_given_the_context(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8})
    trainer = Trainer(config_from_dict(cfg), progress=False)
    judge = trainer.quality_judge()
    assert judge is not None
    prompts, responses = [[5, 6, 7, 8], [5, 6, 9]], [[10, 11, 12], []]
    with torch.no_grad():
        for p in trainer.student.parameters():  # the adapter moves; the judge must not
            if p.requires_grad:
                p.add_(0.5)
    got = judge(prompts, responses)
    from opcd.models import load_model

    base, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        logp = torch.log_softmax(base(torch.tensor([prompts[0] + responses[0]])).logits[0], -1)
    rows = logp[3:6]
    entropy = -(rows.exp() * rows).sum(-1)
    want = float((rows.gather(-1, torch.tensor(responses[0])[:, None])[:, 0] + entropy).mean())
    assert got[0] == pytest.approx(want, abs=1e-5) and got[1] is None

    res = trainer.evaluate()
    assert res.quality is not None and res.quality_stderr is not None
    assert all("quality" in r for r in res.records)
    assert "quality" in res.summary()


def test_a_context_that_does_not_lift_the_behaviour_stops_before_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Nothing to distil: the in-context rate is not above the rate without the context (a
    behaviour neither reaches); reported with both rates before any step, unless asked."""
    task = {"behaviour": "contains:zqzqzq"}
    cfg = tiny_config(tiny_model_dir, tmp_path / "a", task=task, eval={"with_context": None})
    with pytest.raises(NothingToDistil) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "0.000 ± 0.000" in msg and "eval.require_lift=false" in msg
    recs = [json.loads(x) for x in (Path(cfg["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in recs] == ["eval", "eval"]  # in-context and base, no step
    forced = tiny_config(tiny_model_dir, tmp_path / "b", task=task,
                         eval={"with_context": None, "require_lift": False})
    assert train(forced, progress=False).steps == 2
