"""The command line end to end on a tiny random model, and its error handling."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from test_trainer import tiny_config

from opcd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_train_and_eval_commands(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path)
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(f), "train.steps=1", "loss.top_k=8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "final model:" in out
    run = Path(cfg["run"]["dir"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "train" for r in recs) == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["top_k"] == 8

    out_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run / "final"), "--task", "system_prompt", "--config", str(f),
                 "--size", "2", "--max-new-tokens", "3", "--output", str(out_json)]) == 0
    line = capsys.readouterr().out
    assert re.search(r"system_prompt/eval without context: \d\.\d{3} ± \d\.\d{3} \(n=2\)", line)
    assert len(json.loads(out_json.read_text())["records"]) == 2
    # the base model as judge: each answer's quality given the context
    assert main(["eval", "--model", str(run / "final"), "--task", "system_prompt", "--config", str(f),
                 "--size", "2", "--max-new-tokens", "3", "--judge", str(tiny_model_dir),
                 "--output", str(out_json)]) == 0
    line = capsys.readouterr().out
    assert re.search(r"quality -?\d+\.\d{3} ± \d\.\d{3} nats/token", line), line
    records = json.loads(out_json.read_text())["records"]
    assert all(isinstance(r["quality"], float) for r in records if r["response"])


def test_user_errors_exit_2_with_one_paragraph(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path)))
    assert main(["train", str(f), "train.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opcd: error: Unknown config key 'train.learning_rate'")
    assert "Traceback" not in err
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "frnch"]) == 2
    assert "Did you mean 'french'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "french", "--split", "test"]) == 2
    assert "Unknown split 'test'" in capsys.readouterr().err


def test_python_m_opcd_help() -> None:
    out = subprocess.run([sys.executable, "-m", "opcd", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "eval", "demo", "models"):
        assert cmd in out.stdout


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert m, "README must show the test command in a ```bash block after <!-- test-command -->"
    assert m.group(1).strip() in ci


def test_demo_command_on_tiny_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "demo"
    # (a random model follows no system prompt: the lift check is switched off)
    assert main(["demo", "--model", str(tiny_model_dir), "--steps", "1", "--run-dir", str(run),
                 "--quiet", "eval.require_lift=false"]) == 0
    out = capsys.readouterr().out
    assert "French rate on" in out and "after OPCD" in out and "quality" in out
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["after"]["quality"], float)  # the judge's figure is reported
    assert summary["steps"] == 1 and summary["before"] is not None and summary["in_context"] is not None
    assert len(summary["examples"]) == 3
    assert (run / "plot.png").is_file() and (run / "metrics.jsonl").is_file()
    # a second demo never overwrites the first run
    assert main(["demo", "--model", str(tiny_model_dir), "--steps", "1", "--run-dir", str(run),
                 "--quiet", "eval.require_lift=false"]) == 0
    assert (tmp_path / "demo-2" / "summary.json").is_file()
