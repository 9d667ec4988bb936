"""opcd compare end to end on tiny random models: table (Markdown, CSV), plot, cache."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_trainer import tiny_config

from opcd.cli import main
from opcd.config import config_from_dict, dump_config
from opcd.errors import ConfigError
from opcd.eval.compare import compare, parse_spec, weights_id


def fake_run(tmp_path: Path, model_dir: Path, name: str, method: str) -> Path:
    """A run folder as `opcd train` leaves it: config.yaml, metrics.jsonl, final/."""
    cfg = tiny_config(model_dir, tmp_path / f"{name}-data")
    cfg["method"] = method
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(config_from_dict(cfg)))
    shutil.copytree(model_dir, run / "final")
    recs = [{"type": "eval", "step": 0, "score": 0.1, "stderr": 0.05, "n": 3, "with_context": False}]
    recs += [{"type": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    recs += [{"type": "eval", "step": 3, "score": 0.4, "stderr": 0.1, "n": 3, "with_context": False}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn')
    return run


def test_compare_end_to_end(tiny_model_dir: Path, tiny_model_dir_other: Path, tmp_path: Path) -> None:
    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    extra = {k: v for k, v in task.items() if k != "name"}
    ood = {**extra, "behaviour": "contains:e"}
    opcd_run = fake_run(tmp_path, tiny_model_dir_other, "opcd-run", "opcd")
    off_run = fake_run(tmp_path, tiny_model_dir_other, "off-run", "offpolicy")
    exp = tmp_path / "exp.txt"
    exp.write_text("- EXPERIENCE ITEM: answer in French\n")
    spec = {
        "tasks": [{"name": "system_prompt", "split": "eval", "label": "in-dist", "task": extra},
                  {"name": "system_prompt", "split": "train", "label": "OOD", "task": ood}],
        "rows": [
            {"label": "base", "model": str(tiny_model_dir)},
            {"label": "in-context", "model": str(tiny_model_dir), "with_context": True},
            {"label": "off-policy CD", "run": str(off_run)},
            {"label": "OPCD", "run": str(opcd_run)},
            {"label": "experience", "model": str(tiny_model_dir), "with_context": True,
             "context_file": str(exp)},
        ],
        "eval": {"size": 3, "max_new_tokens": 3, "batch_size": 4},
        "output": str(tmp_path / "out"),
    }
    res = compare(spec, progress=False)
    # 10 cells; the two runs are copies of the same weights: their 2 cells are evaluated once
    assert res.evaluated == 8
    md = res.markdown.read_text()
    for label in ("base", "in-context", "off-policy CD", "OPCD", "experience", "in-dist", "OOD"):
        assert label in md
    assert md.split("\n\n")[0].count(" ± ") == 10
    table = list(csv.DictReader(res.csv.open()))
    assert [r["label"] for r in table] == ["base", "in-context", "off-policy CD", "OPCD", "experience"]
    for r in table:
        assert 0.0 <= float(r["in-dist mean"]) <= 1.0 and int(r["OOD n"]) == 3
        assert float(r["in-dist stderr"]) >= 0.0
    assert res.plot is not None and res.plot.read_bytes()[:4] == b"\x89PNG"
    # the copies share their cells: cached under their weights' hash
    assert res.cells["OPCD"]["in-dist"].score == res.cells["off-policy CD"]["in-dist"].score
    assert weights_id(str(off_run / "final")) == weights_id(str(opcd_run / "final"))

    # rerun through the CLI: every cell from the cache
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(spec_path), "--quiet"]) == 0
    cache = json.loads((tmp_path / "out" / "cache.json").read_text())
    assert len(cache["cells"]) == 8  # the two runs' copies share their cells
    again = compare(spec, progress=False)
    assert again.evaluated == 0
    assert all(c.cached for row in again.cells.values() for c in row.values())
    # another context is another cell
    spec["rows"].append({"label": "other context", "model": str(tiny_model_dir),
                         "with_context": True, "context": "Reply in German."})
    assert compare(spec, progress=False).evaluated == 2


def test_compare_from_run_folders(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path, tiny_model_dir, "r1", "offpolicy")
    out = tmp_path / "cmp"
    assert main(["compare", "--runs", str(run), "--output", str(out), "--size", "2",
                 "--max-new-tokens", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| in-context |" in printed and "offpolicy (r1)" in printed
    assert (out / "results.csv").is_file() and (out / "training.png").is_file()


def test_spec_errors() -> None:
    with pytest.raises(ConfigError, match="needs 'model' or 'run'"):
        parse_spec({"tasks": ["french"], "rows": [{"label": "x"}]})
    with pytest.raises(ConfigError, match="unique"):
        parse_spec({"tasks": ["french"], "rows": [{"label": "a", "model": "m"}] * 2})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_spec({"tasks": ["french"], "rows": [{"model": "m", "ctx": 1}]})
    with pytest.raises(ConfigError, match="no final/ model"):
        parse_spec({"tasks": ["french"], "rows": [{"run": "/nonexistent/run"}]})
    assert main(["compare"]) == 2


def test_details_tables_in_markdown_and_csv() -> None:
    from opcd.eval.compare import Cell, Column, Row, format_csv, format_markdown

    cols = [Column("safety (test)", "safety", "test")]
    rows = [Row("base", "m"), Row("OPCD", "m", run="runs/x")]
    cells = {"base": {"safety (test)": Cell(0.5, 0.1, 8, details={"refusal_rate": 0.25,
                                                                   "parse_failures": 3.0})},
             "OPCD": {"safety (test)": Cell(0.75, 0.1, 8, details={"refusal_rate": 0.5})}}
    md = format_markdown(rows, cols, cells, {"size": 8, "temperature": 1.0, "max_new_tokens": 8,
                                             "seed": 1})
    assert "safety (test), details:" in md
    assert "| base | 3 | 0.250 |" in md and "| OPCD | - | 0.500 |" in md
    csv_text = format_csv(rows, cols, cells)
    head = csv_text.splitlines()[0].split(",")
    assert "safety (test) refusal_rate" in head and "safety (test) parse_failures" in head


def test_a_column_overrides_the_eval_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    extra = {k: v for k, v in task.items() if k != "name"}
    base_col = {"name": "system_prompt", "split": "eval", "label": "plain", "task": extra}
    spec = {"tasks": [base_col], "rows": [{"label": "base", "model": str(tiny_model_dir)}],
            "eval": {"size": 3, "max_new_tokens": 3, "batch_size": 4},
            "output": str(tmp_path / "out")}
    assert compare(spec, progress=False).evaluated == 1
    short = {**base_col, "label": "short", "eval": {"size": 2, "max_new_tokens": 1}}
    spec["tasks"] = [base_col, short]
    res = compare(spec, progress=False)
    # the column without overrides keeps its cached cell; the other is its own cell
    assert res.evaluated == 1 and res.cells["base"]["plain"].cached
    assert res.cells["base"]["plain"].n == 3 and res.cells["base"]["short"].n == 2
    md = res.markdown.read_text()
    assert "Column settings: plain: size 3, max_new_tokens 3; short: size 2, max_new_tokens 1." in md
    assert "over n examples (per column, below)" in md and "seed 1234" in md
    with pytest.raises(ConfigError, match=r"tasks\[1\].eval has unknown keys"):
        parse_spec({**spec, "tasks": [base_col, {**short, "eval": {"max_tokens": 4}}]})


def test_reuse_takes_the_cells_of_another_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    col = {"name": "system_prompt", "split": "eval", "label": "in-dist",
           "task": {k: v for k, v in task.items() if k != "name"}}
    first = {"tasks": [col], "rows": [{"label": "base", "model": str(tiny_model_dir)}],
             "eval": {"size": 2, "max_new_tokens": 2, "batch_size": 4}, "output": str(tmp_path / "a")}
    assert compare(first, progress=False).evaluated == 1
    second = {**first, "output": str(tmp_path / "b"),
              "rows": [*first["rows"], {"label": "in-context", "model": str(tiny_model_dir),
                                        "with_context": True}],
              "reuse": [str(tmp_path / "a"), str(tmp_path / "missing")]}
    res = compare(second, progress=False)
    assert res.evaluated == 1 and res.cells["base"]["in-dist"].cached
    assert not res.cells["in-context"]["in-dist"].cached
    # the first table's cells are copied only where this table uses them
    third = {**first, "output": str(tmp_path / "c"), "reuse": [str(tmp_path / "b")],
             "rows": [second["rows"][1]]}
    assert compare(third, progress=False).evaluated == 0
    assert len(json.loads((tmp_path / "c" / "cache.json").read_text())["cells"]) == 1
    with pytest.raises(ConfigError, match="'reuse' must be a list"):
        parse_spec({**second, "reuse": "runs/x"})


def test_paired_difference_removes_the_items_difficulty() -> None:
    from opcd.eval.compare import Cell, paired_difference

    # items of very different difficulty, the row one point above the base on each
    base = Cell(0.0, 0.0, 4, items={"a": 0.0, "b": 0.2, "c": 0.8, "d": 1.0})
    row = Cell(0.0, 0.0, 4, items={"a": 0.1, "b": 0.3, "c": 0.9, "d": 1.1, "e": 5.0})
    d = paired_difference(row, base)
    assert d.n == 4 and d.mean == pytest.approx(0.1) and d.stderr == pytest.approx(0.0, abs=1e-12)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1) and d.text().endswith("* (n=4)")
    # the difference's error is that of the differences, not of the scores
    row2 = Cell(0.0, 0.0, 4, items={"a": 0.0, "b": 0.4, "c": 0.8, "d": 1.2})
    d = paired_difference(row2, base)
    assert d.mean == pytest.approx(0.1) and d.stderr == pytest.approx(0.0577350, rel=1e-5)
    assert d.low <= 0.0 < d.high and "*" not in d.text()  # differences 0 or 0.2: 0 inside
    assert paired_difference(Cell(0, 0, 0), base) is None


def test_bootstrap_interval_is_repeatable_and_covers_the_mean() -> None:
    from opcd.eval.compare import bootstrap_ci

    values = [float(i % 7) for i in range(200)]
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values)  # a fixed seed
    mean = sum(values) / len(values)
    se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
    # for 200 items the percentile interval is close to mean ± 1.96 standard errors
    assert low == pytest.approx(mean - 1.96 * se, abs=0.4 * se)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.4 * se)


def test_compare_paired_with_a_row(tiny_model_dir: Path, tiny_model_dir_other: Path,
                                   tmp_path: Path) -> None:
    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    col = {"name": "system_prompt", "split": "eval", "label": "in-dist",
           "task": {k: v for k, v in task.items() if k != "name"}}
    rows = [{"label": "base", "model": str(tiny_model_dir)},
            {"label": "other", "model": str(tiny_model_dir_other)}]
    spec = {"tasks": [col], "rows": rows, "eval": {"size": 3, "max_new_tokens": 3, "batch_size": 4},
            "output": str(tmp_path / "out")}
    assert compare(spec, progress=False).evaluated == 2
    cache = json.loads((tmp_path / "out" / "cache.json").read_text())["cells"]
    # every cell keeps each item's score
    assert all(len(c["items"]) == 3 for c in cache.values())
    # and its answers, in a file the cache names
    for c in cache.values():
        lines = (tmp_path / "out" / c["answers"]).read_text().splitlines()
        head, answers = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
        assert head["row"] == c["row"] and len(answers) == 3
        assert {a["id"]: a["score"] for a in answers} == c["items"]
    res = compare({**spec, "paired_with": "base"}, progress=False)
    assert res.evaluated == 0 and res.paired_with == "base"
    md = res.markdown.read_text()
    assert "Paired difference to 'base'" in md
    line = next(x for x in md.splitlines() if x.startswith("| other |") and "(n=3)" in x)
    a, b = res.cells["other"]["in-dist"], res.cells["base"]["in-dist"]
    assert f"{a.score - b.score:+.3f}" in line  # same items: the mean difference of the means
    # a cache from before per-item scores were kept: those cells are evaluated again
    for c in cache.values():
        del c["items"]
    data = json.loads((tmp_path / "out" / "cache.json").read_text())
    data["cells"] = cache
    (tmp_path / "out" / "cache.json").write_text(json.dumps(data))
    assert compare({**spec, "paired_with": "base"}, progress=False).evaluated == 2
    with pytest.raises(ConfigError, match="paired_with 'nobody' is not a row label"):
        parse_spec({**spec, "paired_with": "nobody"})


def test_a_row_with_several_seeds(tiny_model_dir: Path, tiny_model_dir_other: Path,
                                  tmp_path: Path) -> None:
    from opcd.eval.compare import Cell, seed_mean

    task = tiny_config(tiny_model_dir, tmp_path / "data")["task"]
    col = {"name": "system_prompt", "split": "eval", "label": "in-dist",
           "task": {k: v for k, v in task.items() if k != "name"}}
    spec = {"tasks": [col], "eval": {"size": 3, "max_new_tokens": 3, "batch_size": 4},
            "rows": [{"label": "base", "model": str(tiny_model_dir)},
                     {"label": "OPCD", "models": [str(tiny_model_dir), str(tiny_model_dir_other)]}],
            "paired_with": "base", "output": str(tmp_path / "out")}
    res = compare(spec, progress=False)
    assert [r.label for r in res.rows] == ["base", "OPCD (seed 0)", "OPCD (seed 1)", "OPCD"]
    assert res.evaluated == 2  # seed 0 is the base model: the same cell, evaluated once
    s0, s1, mean = (res.cells[x]["in-dist"] for x in ("OPCD (seed 0)", "OPCD (seed 1)", "OPCD"))
    assert mean.score == pytest.approx((s0.score + s1.score) / 2)
    assert mean.items == {i: (s0.items[i] + s1.items[i]) / 2 for i in s0.items}
    md = res.markdown.read_text()
    assert "| OPCD | `2 seeds` |" in md and "| OPCD (seed 1) |" in md
    one = seed_mean([Cell(0.5, 0.1, 4, items={"a": 1.0})])
    assert one.stderr == 0.1 and one.items == {"a": 1.0}
    with pytest.raises(ConfigError, match="needs a label"):
        parse_spec({**spec, "rows": [{"models": ["a", "b"]}]})
    with pytest.raises(ConfigError, match="give one of model, run, runs"):
        parse_spec({**spec, "rows": [{"label": "x", "models": ["a"], "model": "b"}]})


def test_a_cells_identity_leaves_out_settings_only_training_reads() -> None:
    from opcd.eval.compare import _cell_task

    spec = {"tasks": [{"name": "french", "label": "x", "task": {"other_system_prompt_share": 0.5}},
                      "french"],
            "rows": [{"label": "a", "model": "m"}]}
    cols, rows, _, _ = parse_spec(spec)
    shared, plain = (_cell_task(c, rows[0], 4)[1] for c in cols)
    assert shared == plain and "other_system_prompt_share" not in plain
    assert plain["name"] == "french" and "context" in plain
