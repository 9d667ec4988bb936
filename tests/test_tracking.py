"""Experiment tracking (``run.report_to``): what each tracker receives, and the config checks."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from test_trainer import tiny_config

from opcd.config import config_from_dict
from opcd.errors import ConfigError
from opcd.runtime.tracking import (
    TRACKERS,
    TensorBoardTracker,
    Trackers,
    TrackioTracker,
    WandbTracker,
    check_report_to,
    open_trackers,
)
from opcd.training import loop
from opcd.training import trainer as trainer_module
from opcd.training.loop import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TRAIN = {"type": "train", "step": 3, "loss": 0.25, "reverse_kl": 0.125, "grad_norm": 1.5,
         "processes": 1, "skipped": False, "sample": "Bonjour", "time_step": float("nan")}
EVAL = {"type": "eval", "step": 4, "score": 0.75, "stderr": 0.05, "n": 2, "with_context": False,
        "quality": -0.5, "quality_stderr": None, "refusal_rate": 0.5}
ANSWERS = [{"id": "p1", "prompt": "Say hi", "response": "Salut | toi\nligne 2", "score": 1.0},
           {"id": "p2", "prompt": "Count", "response": "one two", "score": 0.5, "quality": -0.25}]


def events(log_dir: Path) -> Any:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc: Any, tag: str) -> list[tuple[int, str]]:
    """The texts of ``tag`` (torch's SummaryWriter files them under ``<tag>/text_summary``)."""
    return [(e.step, e.tensor_proto.string_val[0].decode())
            for e in acc.Tensors(f"{tag}/text_summary")]


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_writes_train_and_eval_scalars_and_the_answers(tmp_path: Path) -> None:
    tb = TensorBoardTracker(tmp_path / "tb", task="french")
    tb.log_config({"train": {"lr": 0.001}, "run": {"report_to": ["tensorboard"]}})
    tb.log(TRAIN)
    tb.log(EVAL, ANSWERS)
    tb.log({"type": "eval", "step": 0, "score": 0.9, "stderr": 0.0, "n": 2, "with_context": True})
    tb.log({"type": "guard", "step": 5, "reasons": ["entropy rose by 4"], "action": "stop"})
    tb.close()

    acc = events(tmp_path / "tb")
    assert scalars(acc, "train/loss") == [(3, pytest.approx(0.25))]
    assert scalars(acc, "train/reverse_kl") == [(3, pytest.approx(0.125))]
    assert scalars(acc, "train/grad_norm") == [(3, pytest.approx(1.5))]
    assert scalars(acc, "train/skipped") == [(3, 0.0)]
    assert scalars(acc, "eval/french/score") == [(4, pytest.approx(0.75))]
    assert scalars(acc, "eval/french/quality") == [(4, pytest.approx(-0.5))]
    assert scalars(acc, "eval/french/refusal_rate") == [(4, pytest.approx(0.5))]
    assert scalars(acc, "eval/french/with_context/score") == [(0, pytest.approx(0.9))]
    assert scalars(acc, "guard/alarm") == [(5, 1.0)]
    tags = acc.Tags()["scalars"]
    # not numbers, not finite, or not figures: left out
    for left_out in ("train/sample", "train/time_step", "train/step", "eval/french/quality_stderr",
                     "eval/french/with_context", "eval/french/step"):
        assert left_out not in tags

    ((step, table),) = text(acc, "eval/french/answers")
    assert step == 4
    lines = table.splitlines()
    assert lines[0] == "| id | prompt | response | score | quality |"
    assert lines[2] == "| p1 | Say hi | Salut \\| toi<br>ligne 2 | 1.0 |  |"
    assert lines[3] == "| p2 | Count | one two | 0.5 | -0.25 |"
    assert text(acc, "guard/reasons") == [(5, "entropy rose by 4 (guard.action=stop)")]
    ((_, config),) = text(acc, "config")
    assert "    train:" in config and "lr: 0.001" in config


def test_tensorboard_resume_hides_the_steps_past_the_checkpoint(tmp_path: Path) -> None:
    first = TensorBoardTracker(tmp_path / "tb", task="t")
    for step in (1, 2, 3):
        first.log({"type": "train", "step": step, "loss": float(step)})
    first.close()
    # resumed from the checkpoint of step 1: steps 2 and 3 are computed again
    again = TensorBoardTracker(tmp_path / "tb", task="t", start=1)
    again.log({"type": "train", "step": 2, "loss": 20.0})
    again.close()
    assert scalars(events(tmp_path / "tb"), "train/loss") == [(1, 1.0), (2, 20.0)]


# --------------------------------------------------------------------------- config
def test_report_to_accepts_a_list_a_name_or_nothing() -> None:
    assert config_from_dict({}).run.report_to == []
    assert config_from_dict({}, ["run.report_to=[tensorboard, wandb]"]).run.report_to == [
        "tensorboard", "wandb"]
    assert config_from_dict({"run": {"report_to": "trackio"}}).run.report_to == ["trackio"]
    assert config_from_dict({}, ["run.report_to=tensorboard"]).run.report_to == ["tensorboard"]
    assert config_from_dict({}, ["run.report_to=tensorboard,trackio"]).run.report_to == [
        "tensorboard", "trackio"]
    assert config_from_dict({}).run.tracking_project == "opcd"


def test_unknown_tracker_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, ["run.report_to=[tensorbord]"])
    message = str(e.value)
    assert "run.report_to[0]='tensorbord'" in message and "Did you mean 'tensorboard'?" in message
    for name in TRACKERS:
        assert repr(name) in message


@pytest.mark.parametrize("project", ["", "a/b", "x" * 129])
def test_unusable_project_name(project: str) -> None:
    with pytest.raises(ConfigError, match="run.tracking_project"):
        config_from_dict({"run": {"tracking_project": project}})


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "torch.utils.tensorboard"),
                                              ("wandb", "wandb"), ("trackio", "trackio")])
def test_a_missing_library_names_its_extra(monkeypatch: pytest.MonkeyPatch, name: str,
                                           module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like
    with pytest.raises(ConfigError) as e:
        check_report_to([name])
    assert f"pip install 'opcd[{name}]'" in str(e.value)
    assert f"remove {name} from run.report_to" in str(e.value)


def test_train_reports_a_missing_library_before_writing_anything(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tiny_config(tmp_path / "no-model-needed", tmp_path, run={"report_to": ["wandb"]})
    with pytest.raises(ConfigError, match=r"opcd\[wandb\]"):
        train(cfg, progress=False)
    assert not Path(cfg["run"]["dir"]).exists()


# --------------------------------------------------------------------------- wandb, trackio
class Table:
    def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
        self.columns, self.data = columns, data


class FakeWandbRun:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls
        self.config = types.SimpleNamespace(
            update=lambda d, allow_val_change=False: calls.append(("config", d)))

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.calls.append(("define_metric", (name, step_metric)))

    def log(self, data: dict[str, Any]) -> None:
        self.calls.append(("log", data))

    def finish(self, exit_code: int | None = None) -> None:
        self.calls.append(("finish", exit_code))


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("wandb")

    def init(**kwargs: Any) -> FakeWandbRun:
        calls.append(("init", kwargs))
        return FakeWandbRun(calls)

    module.init = init  # type: ignore[attr-defined]
    module.Table = Table  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


@pytest.fixture
def fake_trackio(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("trackio")

    def init(**kwargs: Any) -> Any:
        calls.append(("init", kwargs))
        return types.SimpleNamespace(config=dict(kwargs.get("config") or {}))

    module.init = init  # type: ignore[attr-defined]
    module.log = lambda metrics, step=None: calls.append(("log", (step, metrics)))  # type: ignore[attr-defined]
    module.finish = lambda: calls.append(("finish", None))  # type: ignore[attr-defined]
    module.Table = Table  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trackio", module)
    return calls


def test_wandb_gets_init_config_figures_table_and_finish(fake_wandb: list[tuple[str, Any]],
                                                         tmp_path: Path) -> None:
    tracker = WandbTracker(tmp_path, project="proj", name="run-a", task="french", resume=False)
    tracker.log_config({"train": {"lr": 0.001}})
    tracker.log(TRAIN)
    tracker.log(EVAL, ANSWERS)
    tracker.close()

    kinds = [kind for kind, _ in fake_wandb]
    assert kinds[0] == "init" and kinds[-1] == "finish"
    init = fake_wandb[0][1]
    run_id = (tmp_path / "wandb" / "opcd-run-id").read_text().strip()
    assert init == {"project": "proj", "name": "run-a", "dir": str(tmp_path), "id": run_id,
                    "resume": None}
    assert ("config", {"train": {"lr": 0.001}}) in fake_wandb
    assert ("define_metric", ("train/*", "step")) in fake_wandb
    assert ("define_metric", ("eval/*", "step")) in fake_wandb
    logs = [data for kind, data in fake_wandb if kind == "log"]
    assert logs[0] == {"step": 3, "train/loss": 0.25, "train/reverse_kl": 0.125,
                       "train/grad_norm": 1.5, "train/processes": 1.0, "train/skipped": 0.0}
    table = logs[1].pop("eval/french/answers")
    assert logs[1] == {"step": 4, "eval/french/score": 0.75, "eval/french/stderr": 0.05,
                       "eval/french/n": 2.0, "eval/french/quality": -0.5,
                       "eval/french/refusal_rate": 0.5}
    assert table.columns == ["id", "prompt", "response", "score", "quality"]
    assert table.data[1] == ["p2", "Count", "one two", 0.5, -0.25]
    assert fake_wandb[-1] == ("finish", 0)


def test_wandb_resume_continues_the_same_run_and_marks_a_failure(
        fake_wandb: list[tuple[str, Any]], tmp_path: Path) -> None:
    WandbTracker(tmp_path, "proj", "run-a", "t", resume=False).close()
    first_id = fake_wandb[0][1]["id"]
    fake_wandb.clear()
    WandbTracker(tmp_path, "proj", "run-a", "t", resume=True).close(ok=False)
    assert fake_wandb[0][1]["id"] == first_id and fake_wandb[0][1]["resume"] == "allow"
    assert fake_wandb[-1] == ("finish", 1)


def test_wandb_that_cannot_start_is_a_config_error(monkeypatch: pytest.MonkeyPatch,
                                                   fake_wandb: list[tuple[str, Any]],
                                                   tmp_path: Path) -> None:
    def refuse(**kwargs: Any) -> None:
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    with pytest.raises(ConfigError, match="WANDB_MODE=offline"):
        WandbTracker(tmp_path, "proj", "run-a", "t", resume=False)


def test_trackio_gets_init_with_config_figures_table_and_finish(
        fake_trackio: list[tuple[str, Any]]) -> None:
    tracker = TrackioTracker(project="proj", name="run-a", task="french", resume=True)
    tracker.log_config({"train": {"lr": 0.001}})
    tracker.log(TRAIN)
    tracker.log(EVAL, ANSWERS)
    tracker.close()

    assert fake_trackio[0] == ("init", {"project": "proj", "name": "run-a",
                                        "config": {"train": {"lr": 0.001}}, "resume": "allow"})
    (step, train_figures), (eval_step, eval_figures) = [d for k, d in fake_trackio if k == "log"]
    assert step == 3 and train_figures["train/loss"] == 0.25 and "step" not in train_figures
    assert eval_step == 4 and eval_figures["eval/french/score"] == 0.75
    table = eval_figures["eval/french/answers"]
    assert table.columns[:3] == ["id", "prompt", "response"]
    assert table.data[0][:3] == ["p1", "Say hi", "Salut | toi\nligne 2"]
    assert fake_trackio[-1] == ("finish", None)


def test_a_failing_tracker_is_turned_off_and_the_others_go_on(
        fake_trackio: list[tuple[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        closed: list[bool] = []

        def log(self, record: dict[str, Any], answers: Any = None) -> None:
            raise OSError("disk full")

        def log_config(self, config: dict[str, Any]) -> None: ...

        def close(self, ok: bool = True) -> None:
            self.closed.append(ok)

    trackio = TrackioTracker("proj", "r", "t", resume=False)
    both = Trackers({"broken": Broken(), "trackio": trackio})
    both.log({"type": "train", "step": 1, "loss": 1.0})
    both.log({"type": "train", "step": 2, "loss": 2.0})
    both.close()
    assert [d[0] for k, d in fake_trackio if k == "log"] == [1, 2]
    assert Broken.closed == [False]
    assert "tracking to broken failed" in capsys.readouterr().err


def test_open_trackers_closes_the_open_ones_when_one_cannot_start(
        monkeypatch: pytest.MonkeyPatch, fake_wandb: list[tuple[str, Any]],
        fake_trackio: list[tuple[str, Any]], tmp_path: Path) -> None:
    def refuse(**kwargs: Any) -> None:
        raise ValueError("bad project")

    monkeypatch.setattr(sys.modules["trackio"], "init", refuse)
    cfg = config_from_dict({"run": {"dir": str(tmp_path / "run"),
                                    "report_to": ["tensorboard", "wandb", "trackio"]}})
    with pytest.raises(ConfigError, match="trackio could not start"):
        open_trackers(cfg, tmp_path / "run")
    assert fake_wandb[-1] == ("finish", 1)


# --------------------------------------------------------------------------- end to end
def test_training_reports_what_metrics_jsonl_holds(tiny_model_dir: Path, tmp_path: Path,
                                                   fake_wandb: list[tuple[str, Any]]) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, run={"report_to": ["tensorboard", "wandb"]})
    res = train(cfg, progress=False)
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = events(res.run_dir / "tensorboard")
    steps = [r for r in records if r["type"] == "train"]
    assert [s for s, _ in scalars(acc, "train/loss")] == [r["step"] for r in steps] == [1, 2]
    for (_, value), r in zip(scalars(acc, "train/loss"), steps, strict=True):
        assert value == pytest.approx(r["loss"], rel=1e-6, abs=1e-7)
    evals = [r for r in records if r["type"] == "eval"]
    got = scalars(acc, "eval/system_prompt/score")
    assert [(s, pytest.approx(v)) for s, v in got] == [(r["step"], r["score"]) for r in evals]
    answers = text(acc, "eval/system_prompt/answers")
    assert [s for s, _ in answers] == [0, 2]
    assert answers[0][1].count("\n") == 1 + cfg["eval"]["size"]  # header, rule, one row each
    assert "report_to" in text(acc, "config")[0][1]
    # the same records in wandb, one log call each, and a clean finish
    logged = [d for k, d in fake_wandb if k == "log"]
    assert [d["step"] for d in logged] == [r["step"] for r in records]
    assert fake_wandb[-1] == ("finish", 0)


def test_trackers_are_closed_when_training_fails(tiny_model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 fake_wandb: list[tuple[str, Any]]) -> None:
    def boom(self: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", boom)
    cfg = tiny_config(tiny_model_dir, tmp_path, run={"report_to": "wandb"})
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, progress=False)
    logged = [d for k, d in fake_wandb if k == "log"]
    assert [d["step"] for d in logged] == [0]  # the evaluation before the first step
    assert fake_wandb[-1] == ("finish", 1)


def test_tracker_folders_do_not_keep_a_run_that_never_trained(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "wandb").mkdir()
    (run / "config.yaml").write_text("model: x\n")
    (run / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 0}) + "\n")
    assert loop._only_unstarted_run(run)  # a plain rerun starts it again
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1}) + "\n")
    assert not loop._only_unstarted_run(run)
