"""Experiment tracking (``run.report_to``): a run's figures in TensorBoard, wandb or Trackio.

``metrics.jsonl`` in the run folder stays the record of a run; this module sends the same
records to the dashboards practitioners already use. Where it sits in a run
(:func:`opcd.training.loop.train`):

1. before anything is written or loaded, :func:`check_report_to` imports each chosen
   library, so a missing one is a :class:`ConfigError` naming its pip extra
   (``pip install 'opcd[tensorboard]'``, ``opcd[wandb]``, ``opcd[trackio]``);
2. once the checkpoint is restored, the main process opens the trackers
   (:func:`open_trackers`; the other processes of a multi-process run report nothing),
   and they log the config;
3. every record appended to ``metrics.jsonl`` (:class:`opcd.training.trainer.MetricsLog`) goes to
   :meth:`Tracker.log` too: a train step as scalars ``train/<field>`` at its step; an
   evaluation as ``eval/<task>/<field>`` (``score``, ``stderr``, ``quality``, the task's
   own figures; ``eval/<task>/with_context/...`` for the in-context reference) with its
   answers as a table ``eval/<task>/answers``; a collapse guard alarm as ``guard/alarm``
   and a text of its reasons;
4. the trackers are closed when the run ends, however it ends (a wandb run that ended in
   an error is marked failed).

Values that are not finite numbers (the loss of a skipped step) are left out;
``train/skipped`` marks those steps. A tracker that fails while logging is turned off with
a warning and the run goes on (metrics.jsonl has every record). On ``--resume``,
TensorBoard hides the events past the checkpoint (``purge_step``), which the run computes
again; wandb continues the same run (its id is kept in ``<run.dir>/wandb/opcd-run-id``)
and Trackio the run of the same name; both receive the recomputed steps a second time.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import typing
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import yaml
from tqdm.auto import tqdm

from opcd.config import Config, TrackerName
from opcd.errors import ConfigError

TRACKERS: tuple[str, ...] = typing.get_args(TrackerName)
"""The names ``run.report_to`` accepts."""

_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}
"""The module each tracker imports (``torch.utils.tensorboard`` needs the tensorboard package)."""

_TEXT_CELL = 2000
"""Longest cell of a TensorBoard answers table, in characters (TensorBoard renders the
markdown of every cell; the full answers are in the evaluation records)."""

Answers = list[dict[str, Any]]


class Tracker(Protocol):
    """Where a run's records go besides metrics.jsonl."""

    def log(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        """One metrics.jsonl record, with the evaluation's scored answers for an eval record."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's whole config (:meth:`opcd.config.Config.to_dict`)."""

    def close(self, ok: bool = True) -> None:
        """End the run on the tracker's side; ``ok`` false when the run ended in an error."""


# --------------------------------------------------------------------------- libraries
def import_library(name: str) -> ModuleType:
    """The module tracker ``name`` writes through, or a ConfigError naming its pip extra."""
    module = _MODULES[name]
    try:
        return importlib.import_module(module)
    except Exception as e:  # a missing package, or one broken by its dependencies
        reason = f"{type(e).__name__}: {e}".strip().rstrip(":")
        raise ConfigError(
            f"run.report_to includes {name!r}, but {module} cannot be imported ({reason}). "
            f"Install it with `pip install 'opcd[{name}]'`, or remove {name} from run.report_to."
        ) from None


def check_report_to(names: list[str]) -> None:
    """Import every chosen library now, before anything is written or any model loaded."""
    for name in dict.fromkeys(names):
        import_library(name)


# --------------------------------------------------------------------------- records
def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def record_prefix(record: dict[str, Any], task: str) -> str:
    """``train``, ``eval/<task>``, ``eval/<task>/with_context``, ``guard``, or the record's type."""
    kind = str(record.get("type", "record"))
    if kind == "eval":
        return f"eval/{task}/with_context" if record.get("with_context") else f"eval/{task}"
    return kind


def record_scalars(record: dict[str, Any], task: str) -> dict[str, float]:
    """The record's finite numbers (and booleans as 0/1), as ``<prefix>/<field>``."""
    prefix = record_prefix(record, task)
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("type", "step", "with_context"):
            continue
        number = _number(value)
        if number is not None:
            out[f"{prefix}/{key}"] = number
    if record.get("type") == "guard":
        out["guard/alarm"] = 1.0
    return out


def record_texts(record: dict[str, Any]) -> dict[str, str]:
    """The record's texts worth a dashboard: a guard alarm's reasons and action."""
    if record.get("type") != "guard":
        return {}
    reasons = record.get("reasons") or []
    text = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons)
    return {"guard/reasons": f"{text} (guard.action={record.get('action')})"}


def answers_table(answers: Answers) -> tuple[list[str], list[list[Any]]]:
    """Columns (every field of any answer, in first-seen order) and rows of the answers."""
    columns = list(dict.fromkeys(key for answer in answers for key in answer))
    rows = [[_cell(answer.get(key)) for key in columns] for answer in answers]
    return columns, rows


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """The table as markdown (how TensorBoard's text tab shows tables)."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        if len(text) > _TEXT_CELL:
            text = text[:_TEXT_CELL] + " ..."
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _step(record: dict[str, Any]) -> int:
    step = record.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


# --------------------------------------------------------------------------- trackers
class TensorBoardTracker:
    """Event files under ``log_dir`` (``<run.dir>/tensorboard``), through torch's SummaryWriter."""

    def __init__(self, log_dir: Path, task: str, start: int = 0) -> None:
        module = import_library("tensorboard")
        self.task = task
        # Events of steps after ``start`` (left by a run that went on past its checkpoint)
        # are hidden: the run writes those steps again.
        self.writer = module.SummaryWriter(str(log_dir), purge_step=start + 1 if start else 0)

    def log(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        step = _step(record)
        for tag, value in record_scalars(record, self.task).items():
            self.writer.add_scalar(tag, value, step)
        for tag, text in record_texts(record).items():
            self.writer.add_text(tag, text, step)
        if answers:
            tag = f"{record_prefix(record, self.task)}/answers"
            self.writer.add_text(tag, markdown_table(*answers_table(answers)), step)
        self.writer.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        # indented four spaces: a markdown code block, shown as written
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run (``WANDB_MODE=offline`` / ``disabled`` are honoured by wandb itself).

    Every figure is plotted against the run's ``step`` (wandb's own step counter only
    counts calls), so a resumed run may log a step again."""

    def __init__(self, run_dir: Path, project: str, name: str, task: str, resume: bool) -> None:
        self.wandb = import_library("wandb")
        self.task = task
        id_file = run_dir / "wandb" / "opcd-run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else ""
        run_id = run_id or uuid.uuid4().hex[:12]
        try:
            self.run = self.wandb.init(project=project, name=name, dir=str(run_dir), id=run_id,
                                       resume="allow" if resume else None)
        except Exception as e:
            raise ConfigError(
                f"wandb could not start a run ({type(e).__name__}: {e}). Log in with `wandb "
                "login`, or set WANDB_MODE=offline (sync later with `wandb sync`), or remove "
                "wandb from run.report_to."
            ) from None
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run.define_metric("step")
        self._defined: set[str] = set()

    def _axis(self, keys: list[str]) -> None:
        for key in keys:
            group = key.split("/", 1)[0] + "/*"
            if group not in self._defined:
                self.run.define_metric(group, step_metric="step")
                self._defined.add(group)

    def log(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        data: dict[str, Any] = dict(record_scalars(record, self.task))
        for tag, text in record_texts(record).items():
            data[tag] = self.wandb.Table(columns=["text"], data=[[text]])
        if answers:
            columns, rows = answers_table(answers)
            data[f"{record_prefix(record, self.task)}/answers"] = self.wandb.Table(
                columns=columns, data=rows)
        self._axis(list(data))
        self.run.log({"step": _step(record), **data})

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class TrackioTracker:
    """A Trackio run (local by default, a Hugging Face Space with ``TRACKIO_SPACE_ID``),
    through its wandb-like ``init`` / ``log`` / ``finish``; it starts with the config."""

    def __init__(self, project: str, name: str, task: str, resume: bool) -> None:
        self.trackio = import_library("trackio")
        self.project, self.name, self.task, self.resume = project, name, task, resume
        self.run: Any = None

    def _start(self, config: dict[str, Any] | None) -> None:
        try:
            self.run = self.trackio.init(project=self.project, name=self.name, config=config,
                                         resume="allow" if self.resume else "never")
        except Exception as e:
            raise ConfigError(
                f"trackio could not start a run ({type(e).__name__}: {e}). Check "
                "run.tracking_project and the TRACKIO_* settings, or remove trackio from "
                "run.report_to."
            ) from None

    def log(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        if self.run is None:
            self._start(None)
        data: dict[str, Any] = dict(record_scalars(record, self.task))
        for tag, text in record_texts(record).items():
            data[tag] = self.trackio.Table(columns=["text"], data=[[text]])
        if answers:
            columns, rows = answers_table(answers)
            data[f"{record_prefix(record, self.task)}/answers"] = self.trackio.Table(
                columns=columns, data=rows)
        self.trackio.log(data, step=_step(record))

    def log_config(self, config: dict[str, Any]) -> None:
        if self.run is None:
            self._start(config)
        elif isinstance(getattr(self.run, "config", None), dict):
            self.run.config.update(config)

    def close(self, ok: bool = True) -> None:
        if self.run is not None:
            self.trackio.finish()


class Trackers:
    """All of a run's trackers as one; a tracker that fails while logging is turned off
    with a warning (metrics.jsonl, written first, keeps the record)."""

    def __init__(self, trackers: dict[str, Tracker] | None = None) -> None:
        self.trackers: dict[str, Tracker] = dict(trackers or {})

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: typing.Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as e:
                del self.trackers[name]
                _warn(f"opcd: warning: tracking to {name} failed ({what}: {type(e).__name__}: "
                      f"{e}); {name} is off for the rest of the run (metrics.jsonl has every "
                      "record).")
                with contextlib.suppress(Exception):  # it failed already
                    tracker.close(ok=False)

    def log(self, record: dict[str, Any], answers: Answers | None = None) -> None:
        self._each(f"step {record.get('step')}", lambda t: t.log(record, answers))

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("config", lambda t: t.log_config(config))

    def close(self, ok: bool = True) -> None:
        trackers, self.trackers = self.trackers, {}
        for name, tracker in trackers.items():
            try:
                tracker.close(ok)
            except Exception as e:
                _warn(f"opcd: warning: closing the {name} tracker failed "
                      f"({type(e).__name__}: {e}).")


def open_trackers(cfg: Config, run_dir: Path, start: int = 0, resume: bool = False) -> Trackers:
    """Open ``cfg.run.report_to``'s trackers for the run in ``run_dir`` (continuing after
    step ``start``) and log the config; a tracker that cannot start is a ConfigError and
    the ones already open are closed."""
    name, task, project = run_dir.resolve().name, cfg.task.name, cfg.run.tracking_project
    opened: dict[str, Tracker] = {}
    try:
        for which in dict.fromkeys(cfg.run.report_to):
            if which == "tensorboard":
                opened[which] = TensorBoardTracker(run_dir / "tensorboard", task, start)
            elif which == "wandb":
                opened[which] = WandbTracker(run_dir, project, name, task, resume)
            elif which == "trackio":
                opened[which] = TrackioTracker(project, name, task, resume)
            else:  # the config allows only TRACKERS
                raise ConfigError(f"Unknown tracker {which!r} in run.report_to; use one of "
                                  f"{', '.join(TRACKERS)}.")
        for tracker in opened.values():
            tracker.log_config(cfg.to_dict())
    except BaseException:
        Trackers(opened).close(ok=False)
        raise
    return Trackers(opened)


def _warn(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)
