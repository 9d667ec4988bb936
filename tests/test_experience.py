"""Experience extraction: parsing, merging, budget trimming, the context file, and a tiny
extraction run (stub scorer) that finishes and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer import tiny_config

from opcd.config import TaskConfig, config_from_dict
from opcd.errors import ConfigError, DataError
from opcd.tasks import build_task
from opcd.tools.experience import (
    Experience,
    ParsedItem,
    extract_experience,
    fill_prompt,
    parse_items,
    read_context_file,
    strip_thinking,
    trim_to_budget,
)

M = "- EXPERIENCE ITEM:"


def test_only_marker_lines_are_kept_and_thinking_is_dropped() -> None:
    text = (
        "<think>\n- EXPERIENCE ITEM: a thought, not an insight\n</think>\n"
        "Here are my insights:\n"
        "- EXPERIENCE ITEM: Check units before adding.\n"
        "  * experience item:   Restate the question.  \n"
        "- Something else entirely\n"
        "- EXPERIENCE ITEM:\n"  # empty: dropped
        "1. EXPERIENCE ITEM: (replaces 2, 3) Prefer exact fractions.\n"
        "<think>unfinished thinking - EXPERIENCE ITEM: no"
    )
    items = parse_items(text, M)
    assert items == [
        ParsedItem("Check units before adding."),
        ParsedItem("Restate the question."),
        ParsedItem("Prefer exact fractions.", (2, 3)),
    ]
    assert strip_thinking("reasoning... </think>\n- EXPERIENCE ITEM: x") == "\n- EXPERIENCE ITEM: x"
    assert parse_items("no markers here", M) == []
    assert parse_items("- LESSON: a", "- LESSON:") == [ParsedItem("a")]


def test_merge_duplicates_refresh_and_replacements_resolve_conflicts() -> None:
    exp = Experience(["a first", "b second", "c third"], marker=M)
    added, removed = exp.merge([ParsedItem("A first."), ParsedItem("d new"), ParsedItem("d new")])
    assert added == ["d new"] and removed == []
    assert exp.items == ["b second", "c third", "a first", "d new"]  # the duplicate refreshed
    shown = exp.numbered()
    assert shown.splitlines()[0] == "[1] b second"
    added, removed = exp.merge([ParsedItem("c corrected", (2, 99)), ParsedItem("e", (1,))])
    assert removed == ["b second", "c third"] and added == ["c corrected", "e"]
    assert exp.items == ["a first", "d new", "c corrected", "e"]
    assert exp.render().splitlines()[0] == f"{M} a first"
    assert Experience(marker=M).numbered() == "(none yet)"


def test_budget_drops_whole_items_oldest_first() -> None:
    exp = Experience(["one two three", "four five", "six"], marker="*")

    def words(t: str) -> int:
        return len(t.split())

    assert words(exp.render()) == 9
    dropped = trim_to_budget(exp, words, 4)
    assert dropped == ["one two three", "four five"] and exp.items == ["six"]
    assert trim_to_budget(exp, words, 4) == []
    assert trim_to_budget(exp, words, 1) == ["six"] and exp.items == []  # too long alone


def test_fill_prompt_is_one_pass() -> None:
    out = fill_prompt("{experience}|{problem}|{solution}|{marker}", experience="{problem}",
                      problem="p {solution}", solution="s", marker=M)
    assert out == f"{{problem}}|p {{solution}}|s|{M}"


def test_context_file(tmp_path: Path) -> None:
    f = tmp_path / "exp.txt"
    f.write_text(f"\n{M} one  \n\n{M} two\n")
    assert read_context_file(f) == f"{M} one\n{M} two"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    task = build_task(TaskConfig(name="system_prompt", context_file=str(f), prompts=str(prompts),
                                 behaviour="contains:a"))
    assert task.context(task.examples("train")[0]) == f"{M} one\n{M} two"
    f.write_text("  \n\n")
    with pytest.raises(DataError, match="holds no context"):
        read_context_file(f)
    with pytest.raises(DataError, match="does not exist"):
        read_context_file(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"task": {"context": "x", "context_file": str(f)}})


def test_extraction_finishes_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path)
    cfg["extract"] = {"problems": 3, "runs": 2, "max_new_tokens": 4, "budget_tokens": 110,
                      "dir": str(tmp_path / "extract")}
    calls: list[str] = []

    def writer(request: str) -> str:  # the tiny model writes noise: a scripted extractor
        calls.append(request)
        n = len(calls)
        return f"<think>hmm</think>\n{M} insight number {n}\nnot an item\n{M} keep it short"

    def validate(experience: str) -> tuple[float, float, int]:
        return float(len(experience.splitlines())) - 0.01 * experience.count("number 5"), 0.0, 3

    res = extract_experience(cfg, progress=False, validate=validate, writer=writer)
    assert res.updates_done == 6 and res.resumed == 0 and len(calls) == 6
    trace = [json.loads(x) for x in res.trace_path.read_text().splitlines()]
    assert trace[0]["opcd_extract"] == 1 and trace[1]["baseline"] is True
    ups = trace[2:]
    assert [(r["run"], r["update"]) for r in ups] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert "(none yet)" in calls[0] and "[1] insight number 1" in calls[1]
    assert "Input: " in calls[0] and "Output: " in calls[0]
    assert ups[1]["experience"][-1] == "keep it short"  # the duplicate was refreshed
    assert all(0 < r["tokens"] <= 110 for r in ups)
    assert any(r["dropped"] for r in ups)  # the budget bit
    best = max(ups, key=lambda r: r["val_score"])
    lines = res.experience_path.read_text().splitlines()
    assert lines == [f"{M} {t}" for t in best["experience"]] and lines
    assert res.score == best["val_score"]

    # a crash after the fourth update: the rest is redone, the same as before
    res.trace_path.write_text("\n".join(res.trace_path.read_text().splitlines()[:6]) + "\n{\"run\": 1,")
    calls.clear()
    again = extract_experience(cfg, progress=False, validate=validate, writer=writer)
    assert again.resumed == 4 and len(calls) == 2
    trace2 = [json.loads(x) for x in again.trace_path.read_text().splitlines()]
    assert [(r["run"], r["update"]) for r in trace2[2:]] == [(r["run"], r["update"]) for r in ups]
    assert [r["solution"] for r in trace2[2:]] == [r["solution"] for r in ups]  # seeded per update
    # other settings are refused, --overwrite starts again
    cfg["extract"]["problems"] = 2
    with pytest.raises(ConfigError, match="other settings"):
        extract_experience(cfg, progress=False, validate=validate, writer=writer)
    fresh = extract_experience(cfg, overwrite=True, progress=False, validate=validate, writer=writer)
    assert fresh.resumed == 0 and fresh.updates_done == 4


def test_extraction_with_the_model_itself(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No stubs for generation: the tiny model writes no marker line, so nothing is kept and
    the empty experience is reported, not a crash."""
    cfg = tiny_config(tiny_model_dir, tmp_path)
    cfg["extract"] = {"problems": 1, "runs": 1, "max_new_tokens": 3, "val_size": 2,
                      "dir": str(tmp_path / "x")}
    res = extract_experience(cfg, progress=False)
    assert res.updates_done == 1 and res.items == [] and res.score is None
    assert res.baseline is not None
    assert res.experience_path.read_text() == ""


def test_games_extract_from_played_episodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"max_new_tokens": 3})
    cfg["task"] = {"name": "frozenlake", "train_size": 3, "eval_size": 2, "test_size": 2}
    cfg["extract"] = {"problems": 2, "runs": 1, "max_new_tokens": 4, "dir": str(tmp_path / "x")}
    requests: list[str] = []

    def writer(request: str) -> str:
        requests.append(request)
        return f"{M} look before you step"

    res = extract_experience(cfg, progress=False, writer=writer)
    assert res.updates_done == 2 and res.items == ["look before you step"]
    # The "output" shown to the extractor is the played episode: moves and the
    # environment's answers, ending when the move budget is used up or the game ends.
    out = requests[0].split("Output: ", 1)[1]
    assert out.startswith("Move: ") and "Environment: Move 1/5" in out
    trace = [json.loads(x) for x in res.trace_path.read_text().splitlines()]
    assert trace[1]["baseline"] is True and trace[1]["val_n"] == 2  # episodes played


def test_extract_command(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from opcd.cli import main

    cfg = tiny_config(tiny_model_dir, tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["extract", str(path), "extract.problems=1", "extract.runs=1", "extract.max_new_tokens=2",
            "extract.val_size=2", f"extract.dir={tmp_path / 'ex'}", "--quiet"]
    assert main(args) == 0
    assert "1 updates, 0 read back" in capsys.readouterr().out
    assert main(args) == 0
    assert "1 updates, 1 read back" in capsys.readouterr().out
    assert main(["extract", str(path), "extract.prompt=no placeholders"]) == 2
