"""lm-evaluation-harness through opcd (opcd.eval.harness, `opcd eval --harness`, compare's harness
columns) on the tiny random model and local task files: no network.

The tests that run lm-eval skip where the optional extra is not installed
(`pip install "opcd[harness]"`); the others (the missing-extra error, argument checks, the
parsing of lm-eval's results, compare's wiring with a stand-in) run everywhere.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_trainer import tiny_config

from opcd.cli import main
from opcd.config import config_from_dict, dump_config
from opcd.errors import ConfigError
from opcd.eval import harness
from opcd.eval.compare import compare, parse_spec

# a task of the user's own in the plain lm-eval form (a local JSONL file by absolute path).
# Its regex removes every character before the exact match, so every answer matches: the
# score of the random model is known (1.0) and the include path is shown to be used.
ALWAYS_YAML = """\
task: tmp_always
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [".*"]
metadata:
  version: 1.0
"""


def run_folder(model_dir: Path, tmp_path: Path) -> Path:
    """A finished run folder as `opcd train` leaves it: config.yaml and final/."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(config_from_dict(tiny_config(model_dir, tmp_path / "setup"))))
    shutil.copytree(model_dir, run / "final")
    return run


def always_task(tmp_path: Path) -> Path:
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n"
                            for i in range(4)), encoding="utf-8")
    (folder / "tmp_always.yaml").write_text(
        ALWAYS_YAML.format(data=data, cache=tmp_path / "datasets-cache"), encoding="utf-8")
    return folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------- without lm-eval
def test_missing_extra_is_a_clear_error(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "opcd\[harness\]"'):
        harness.run_harness(str(tiny_model_dir), "opcd_tiny_qa")
    assert main(["eval", str(tiny_model_dir), "--harness", "opcd_tiny_qa"]) == 2
    err = capsys.readouterr().err
    assert 'opcd: error: Evaluating with lm-evaluation-harness needs the optional extra: pip install "opcd[harness]"' in err
    assert "lm-eval==0.4.13" in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--task", "french"], "needs --model PATH_OR_NAME and --task TASK"),
    (["eval", "--model", "m", "--task", "french", "--limit", "3"], "go with --harness"),
    (["eval", "--harness", "opcd_tiny_qa"], "takes one MODEL_OR_RUN"),
    (["eval", "a", "b", "--harness", "opcd_tiny_qa"], "takes one MODEL_OR_RUN"),
    (["eval", "m", "--harness", "opcd_tiny_qa", "--with-context", "--size", "3"],
     "--with-context, --size do not apply to --harness"),
])
def test_eval_arguments_are_checked(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plain_eval_keeps_its_defaults(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from opcd import api
    from opcd.eval.evaluate import EvalResult

    seen: dict[str, Any] = {}

    def fake(model: str, task: str, **kw: Any) -> EvalResult:
        seen.update(model=model, task=task, **kw)
        return EvalResult(task, "eval", False, 0.5, 0.1, 2)

    monkeypatch.setattr(api, "evaluate_model", fake)
    assert main(["eval", "--model", "m", "--task", "french"]) == 0
    assert seen["max_new_tokens"] == 48 and seen["temperature"] == 1.0 and seen["seed"] == 1234
    assert main(["eval", "--model", "m", "--task", "french", "--max-new-tokens", "7"]) == 0
    assert seen["max_new_tokens"] == 7
    assert "french/eval without context: 0.500 ± 0.100 (n=2)" in capsys.readouterr().out


def test_parse_results_names_metrics_and_items() -> None:
    raw: dict[str, Any] = {
        "results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                              "exact_match_stderr,strict-match": 0.1,
                              "exact_match,flexible-extract": 0.5,
                              "exact_match_stderr,flexible-extract": "N/A"},
                    "tiny": {"alias": "tiny", "sample_len": 2, "acc,none": 1.0}},
        "n-samples": {"gsm8k": {"original": 10, "effective": 2}, "tiny": {"original": 2, "effective": 2}},
        "samples": {"gsm8k": [{"doc_id": 0, "filter": "strict-match", "metrics": ["exact_match"],
                               "exact_match": 1.0},
                              {"doc_id": 0, "filter": "flexible-extract", "metrics": ["exact_match"],
                               "exact_match": 0.0}]},
    }
    metrics, n, items = harness.parse_results(raw)
    assert metrics == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,strict-match_stderr": 0.1,
                  "exact_match,flexible-extract": 0.5, "exact_match,flexible-extract_stderr": None},
        "tiny": {"acc": 1.0, "acc_stderr": None},
    }
    assert n == {"gsm8k": 2, "tiny": 2}
    assert items == {"gsm8k": {"exact_match,strict-match": {"0": 1.0},
                               "exact_match,flexible-extract": {"0": 0.0}}}
    res = harness.HarnessResult("m", "/m", metrics, n)
    assert "| gsm8k | exact_match,flexible-extract | 0.500 | - | 2 |" in res.table()


def test_task_names_and_include_folders_are_checked(tmp_path: Path) -> None:
    assert harness.split_tasks("a, b") == ["a", "b"]
    assert harness.split_tasks(["a", "b,c"]) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="No lm-eval task"):
        harness.split_tasks(" , ")
    assert harness.include_paths(None) == [str(harness.PACKAGED_TASKS)]
    assert harness.include_paths(tmp_path) == [str(harness.PACKAGED_TASKS), str(tmp_path.resolve())]
    with pytest.raises(ConfigError, match="does not exist"):
        harness.include_paths(tmp_path / "missing")


def test_run_folder_resolves_to_its_final_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = run_folder(tiny_model_dir, tmp_path)
    assert harness.resolve_model_location(str(run)) == str((run / "final").resolve())
    assert harness.resolve_model_location(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_packaged_task_reads_its_jsonl_from_any_folder(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    import importlib.util

    spec = importlib.util.spec_from_file_location("opcd_harness_utils",
                                                  harness.PACKAGED_TASKS / "utils.py")
    assert spec is not None and spec.loader is not None
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    monkeypatch.chdir(tmp_path)
    ds = utils.load_jsonl_beside({"test": "opcd_tiny_qa.jsonl"}, version=1.0)
    assert len(ds["test"]) == 6 and ds["test"][0]["answer"] == "Paris"


class FakeHarness:
    """Stands in for opcd.eval.harness.evaluate_harness: item i of a model scores i % 2 (the
    second model: 1), and the calls are recorded."""

    def __init__(self, other: str) -> None:
        self.other, self.calls = other, []

    def __call__(self, model: str, tasks: list[str], **kw: Any) -> harness.HarnessResult:
        self.calls.append({"model": model, "tasks": tasks, **kw})
        n = kw["limit"]
        scores = {str(i): 1.0 if model == self.other else float(i % 2) for i in range(n)}
        mean = sum(scores.values()) / n
        samples = [{"doc_id": int(i), "filter": "none", "metrics": ["exact_match"],
                    "exact_match": v, "target": "t", "filtered_resps": ["r"]} for i, v in scores.items()]
        return harness.HarnessResult(model, model, {tasks[0]: {"exact_match": mean,
                                                                "exact_match_stderr": 0.1}},
                                     {tasks[0]: n}, {tasks[0]: {"exact_match": scores}},
                                     samples={tasks[0]: samples})


def test_compare_harness_column_with_a_stand_in(tiny_model_dir: Path, tiny_model_dir_other: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHarness(str(tiny_model_dir_other))
    monkeypatch.setattr(harness, "evaluate_harness", fake)
    include = always_task(tmp_path)
    spec = {
        "tasks": [{"harness": "ifeval_local", "metric": "exact_match", "label": "IFEval (OOD)",
                   "include": str(include), "chat_template": True, "max_gen_toks": 64}],
        "rows": [{"label": "base", "model": str(tiny_model_dir)},
                 {"label": "in-context", "model": str(tiny_model_dir), "with_context": True},
                 {"label": "given context", "model": str(tiny_model_dir), "with_context": True,
                  "context": "Always answer in French."},
                 {"label": "distilled", "model": str(tiny_model_dir_other)}],
        "eval": {"size": 4, "seed": 7}, "output": str(tmp_path / "cmp"), "paired_with": "base",
    }
    res = compare(spec, progress=False)
    assert res.evaluated == 3  # the in-context row has no context of its own for lm-eval
    assert [c["model"] for c in fake.calls] == [str(tiny_model_dir)] * 2 + [str(tiny_model_dir_other)]
    first = fake.calls[0]
    assert first["tasks"] == ["ifeval_local"] and first["limit"] == 4 and first["seed"] == 7
    assert first["include"] == [str(include)] and first["apply_chat_template"] is True
    assert first["max_gen_toks"] == 64 and first["system_instruction"] is None
    assert fake.calls[1]["system_instruction"] == "Always answer in French."
    cells = res.cells
    assert cells["base"]["IFEval (OOD)"].score == 0.5 and cells["distilled"]["IFEval (OOD)"].score == 1.0
    assert "IFEval (OOD)" not in cells["in-context"]
    md = res.markdown.read_text()
    assert "| in-context |" in md and "IFEval (OOD) = lm-eval ifeval_local (exact_match)" in md
    assert "+0.500 ± " in md  # distilled vs base, paired over the 4 items
    answers = sorted((tmp_path / "cmp" / "answers").glob("*.jsonl"))
    assert len(answers) == 3
    lines = [json.loads(x) for x in answers[0].read_text().splitlines()]
    assert lines[0]["task"] == "IFEval (OOD)" and {"id", "score", "target", "response"} <= set(lines[1])
    again = compare(spec, progress=False)  # all cached
    assert again.evaluated == 0 and len(fake.calls) == 3
    (include / "tmp_always.yaml").write_text("task: changed\n")  # a changed task file: new cells
    assert compare(spec, progress=False).evaluated == 3


def test_compare_mixes_harness_and_opcd_columns(tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHarness("none")
    monkeypatch.setattr(harness, "evaluate_harness", fake)
    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    spec = {"tasks": [{"name": "system_prompt", "label": "in-dist",
                       "task": {k: v for k, v in task.items() if k != "name"}},
                      {"harness": "opcd_tiny_qa", "metric": "exact_match", "limit": 2}],
            "rows": [{"label": "base", "model": str(tiny_model_dir)},
                     {"label": "in-context", "model": str(tiny_model_dir), "with_context": True}],
            "eval": {"size": 3, "max_new_tokens": 2, "batch_size": 4},
            "output": str(tmp_path / "cmp")}
    res = compare(spec, progress=False)
    assert res.evaluated == 3 and len(fake.calls) == 1  # in-context: opcd's column only
    assert res.cells["base"]["in-dist"].n == 3 and res.cells["in-context"]["in-dist"].n == 3
    assert res.cells["base"]["opcd_tiny_qa (exact_match)"].n == 2
    head = res.markdown.read_text().split("\n\n")[0]
    assert head.count(" ± ") == 3 and "| in-context | " in head and head.rstrip().endswith("| - |")
    assert compare(spec, progress=False).evaluated == 0


def test_compare_harness_column_spec_errors() -> None:
    rows = [{"model": "m"}]
    with pytest.raises(ConfigError, match="which of its metrics"):
        parse_spec({"tasks": [{"harness": "ifeval"}], "rows": rows})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_spec({"tasks": [{"harness": "ifeval", "metric": "m", "split": "x"}], "rows": rows})
    with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
        parse_spec({"tasks": [{"harness": "ifeval", "metric": "m", "limit": 0}], "rows": rows})
    cols = parse_spec({"tasks": [{"harness": "ifeval", "metric": "prompt_level_strict_acc"}],
                       "rows": rows})[0]
    assert cols[0].label == "ifeval (prompt_level_strict_acc)" and cols[0].harness is not None


# --------------------------------------------------------------------------- with lm-eval
def test_eval_harness_on_a_run_folder(tiny_model_dir: Path, tmp_path: Path, offline: None,
                                      capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval")
    run = run_folder(tiny_model_dir, tmp_path)
    out = tmp_path / "harness.json"
    assert main(["eval", str(run), "--harness", "opcd_tiny_qa,tmp_always", "--harness-include",
                 str(always_task(tmp_path)), "--limit", "3", "--max-new-tokens", "4",
                 "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"lm-eval 0.4.13 on {(run / 'final').resolve()} (cpu, float32, limit 3, seed 1234):" in printed
    assert "| task | metric | value | stderr | n |" in printed
    assert "| tmp_always | exact_match | 1.000 | 0.000 | 3 |" in printed
    data = json.loads(out.read_text())
    tiny = data["metrics"]["opcd_tiny_qa"]
    assert set(tiny) == {"exact_match", "exact_match_stderr"} and 0.0 <= tiny["exact_match"] <= 1.0
    assert data["n"] == {"opcd_tiny_qa": 3, "tmp_always": 3}
    assert data["items"]["tmp_always"]["exact_match"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert [s["doc"]["answer"] for s in data["samples"]["opcd_tiny_qa"]] == ["Paris", "Rome", "Tokyo"]
    assert data["settings"]["seed"] == 1234 and data["settings"]["max_gen_toks"] == 4


def test_unknown_lm_eval_task_names_the_close_ones(tiny_model_dir: Path, offline: None) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError, match="no task 'opcd_tiny_q' .* Did you mean opcd_tiny_qa"):
        harness.run_harness(str(tiny_model_dir), "opcd_tiny_q")


def test_compare_harness_column_runs_lm_eval(tiny_model_dir: Path, tmp_path: Path,
                                             offline: None) -> None:
    pytest.importorskip("lm_eval")
    spec = {"tasks": [{"harness": "opcd_tiny_qa", "metric": "exact_match", "max_gen_toks": 4,
                       "limit": 2, "batch_size": 2}],
            "rows": [{"label": "base", "model": str(tiny_model_dir)}],
            "output": str(tmp_path / "cmp")}
    res = compare(spec, progress=False)
    cell = res.cells["base"]["opcd_tiny_qa (exact_match)"]
    assert cell.n == 2 and 0.0 <= cell.score <= 1.0 and not math.isnan(cell.stderr)
    assert set(cell.items) == {"0", "1"}
    assert compare(spec, progress=False).evaluated == 0
