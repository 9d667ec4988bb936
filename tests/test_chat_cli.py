"""``opcd chat``: scripted conversations on the tiny random model, the prompts each lane's
model reads, seeded reproducibility, run folders and the user errors."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_trainer import tiny_config

from opcd.cli import main
from opcd.config import config_from_dict, dump_config
from opcd.errors import ConfigError, DataError, ModelError, RunFolderError
from opcd.sampling import rollout
from opcd.tasks.chat import encode_chat
from opcd.tools.interactive import (
    ChatContext,
    ChatOptions,
    Lane,
    chat_session,
    format_event,
    open_chat,
    plan_lanes,
    transcript,
)

CONTEXT = "Always answer in French."
SHORT = ChatOptions(max_new_tokens=5, seed=7)


def _decode(tok: Any, ids: tuple[int, ...]) -> str:
    return tok.decode(list(ids))


class RecordingSample:
    """Stands in for :func:`opcd.sampling.rollout.sample`: records every call, answers fixed text."""

    def __init__(self, answer: str = "Bonjour") -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: Any, tokenizer: Any, prompts: list[list[int]], **kw: Any) -> rollout.Rollout:
        self.calls.append({"model": model, "prompts": prompts, **kw})
        return rollout.Rollout([0], [[5, 6]], [f" {self.answer} {len(self.calls)} "], [False])


def test_scripted_conversation_keeps_history_resets_and_exits(tiny) -> None:
    model, tok = tiny
    lane = Lane("model", model, tok)
    lines = iter(["Hello there", "", "What is the capital of Italy?", "/reset", "Hello again",
                  "/exit", "never read"])
    events = list(chat_session([lane], lines, SHORT))
    assert [e.kind for e in events] == ["user", "answer", "user", "answer", "reset", "user", "answer"]
    assert next(lines) == "never read"  # nothing after /exit was consumed
    answers = [e for e in events if e.kind == "answer"]
    assert [e.turn for e in answers] == [1, 2, 3]
    assert {e.label for e in answers} == {"model"}
    assert all(isinstance(e.truncated, bool) and len(e.prompt_ids) > 0 for e in answers)
    # turn 2 reads turn 1 (question and the model's own answer); after /reset nothing
    second, third = _decode(tok, answers[1].prompt_ids), _decode(tok, answers[2].prompt_ids)
    assert "Hello there" in second and second.count("<|im_start|>assistant") == 2
    assert "Hello there" not in third and "capital" not in third
    assert third.count("<|im_start|>assistant") == 1
    assert lane.history[0] == {"role": "user", "content": "Hello again"}


def test_with_context_prompt_holds_the_context(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    fake = RecordingSample()
    monkeypatch.setattr(rollout, "sample", fake)
    lanes = [Lane("without context", model, tok), Lane("with context", model, tok, ChatContext(CONTEXT))]
    events = list(chat_session(lanes, ["Hi", "And now?"], ChatOptions(max_new_tokens=9, temperature=0.5)))
    assert [e.kind for e in events] == ["user", "answer", "answer", "user", "answer", "answer"]
    assert len(fake.calls) == 4
    plain, ctx = fake.calls[0]["prompts"][0], fake.calls[1]["prompts"][0]
    assert plain == encode_chat(tok, [{"role": "user", "content": "Hi"}])
    assert ctx == encode_chat(tok, [{"role": "system", "content": CONTEXT},
                                    {"role": "user", "content": "Hi"}])
    assert CONTEXT in tok.decode(ctx) and CONTEXT not in tok.decode(plain)
    # the second turn: still one system message, each lane after its own first answer
    later = tok.decode(fake.calls[3]["prompts"][0])
    assert later.count(CONTEXT) == 1 and "Bonjour 2" in later and "Bonjour 1" not in later
    assert "Bonjour 1" in tok.decode(fake.calls[2]["prompts"][0])
    # sampling settings passed through; both lanes of a turn share a seed, turns differ
    assert all(c["max_new_tokens"] == 9 and c["temperature"] == 0.5 and c["n"] == 1 for c in fake.calls)
    seeds = [c["seeds"][0] for c in fake.calls]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]
    assert events[1].text == "Bonjour 1"  # stripped


def test_user_placement_fills_the_first_user_turn(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    fake = RecordingSample()
    monkeypatch.setattr(rollout, "sample", fake)
    lane = Lane("m", model, tok, ChatContext(CONTEXT, "user", "Hint: {context}\n---\n{prompt}"))
    list(chat_session([lane], ["first", "second"], SHORT))
    assert fake.calls[0]["prompts"][0] == encode_chat(
        tok, [{"role": "user", "content": f"Hint: {CONTEXT}\n---\nfirst"}])
    second = tok.decode(fake.calls[1]["prompts"][0])
    assert second.count(CONTEXT) == 1 and "<|im_start|>user\nsecond" in second


def test_side_by_side_two_labelled_answers_per_turn(tiny_model_dir: Path) -> None:
    setup = open_chat(str(tiny_model_dir), context=CONTEXT, side_by_side=True)
    assert [lane.label for lane in setup.lanes] == ["without context", "with context"]
    assert setup.lanes[0].model is setup.lanes[1].model  # loaded once
    assert CONTEXT in setup.header
    events = list(chat_session(setup.lanes, ["Bonjour", "Encore"], SHORT))
    assert [(e.kind, e.label) for e in events] == [
        ("user", ""), ("answer", "without context"), ("answer", "with context")] * 2
    tok = setup.lanes[0].tokenizer
    for without, with_ctx in ((events[1], events[2]), (events[4], events[5])):
        assert CONTEXT not in _decode(tok, without.prompt_ids)
        assert CONTEXT in _decode(tok, with_ctx.prompt_ids)
    text = [format_event(e) for e in events]
    assert text[0] == "you> Bonjour"
    assert text[1].startswith("[without context] ") and text[2].startswith("[with context] ")


def test_same_seed_same_transcript(tiny) -> None:
    model, tok = tiny

    def run(seed: int) -> str:
        lanes = [Lane("a", model, tok), Lane("b", model, tok, ChatContext(CONTEXT))]
        return transcript(lanes, ["Hello", "Tell me more", "/reset", "Hello"],
                          ChatOptions(max_new_tokens=12, seed=seed))

    first = run(3)
    assert first == run(3)
    assert first != run(4)
    assert first.count("you> ") == 3 and "-- history cleared --" in first


def test_unknown_command_literal_slash_and_window(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    fake = RecordingSample()
    monkeypatch.setattr(rollout, "sample", fake)
    lane = Lane("m", model, tok)
    events = list(chat_session([lane], ["/help", "//path/to/x"], SHORT))
    assert events[0].kind == "note" and "/reset" in events[0].text
    assert events[1].text == "/path/to/x" and len(fake.calls) == 1
    # a turn that cannot fit the model's window is not answered, and not kept
    monkeypatch.setattr(model.config, "max_position_embeddings", 30)
    events = list(chat_session([lane], ["a long question " * 5], SHORT))
    assert [e.kind for e in events] == ["user", "note"] and "window" in events[1].text
    assert len(fake.calls) == 1 and len(lane.history) == 2


def test_options_are_checked() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            ChatOptions(**bad)


# --------------------------------------------------------------------------- run folders
def _run_folder(tiny_model_dir: Path, tmp_path: Path, *, final: bool = True) -> Path:
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path / "setup"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if final:
        shutil.copytree(tiny_model_dir, run / "final")
    return run


def test_run_folder_lanes(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = _run_folder(tiny_model_dir, tmp_path)
    final = str(run / "final")
    assert plan_lanes(str(run)) == [("model", final, None)]
    (base_label, base, ctx), (label, model, none) = plan_lanes(str(run), compare_base=True)
    assert (base_label, base, label, model, none) == ("base + context", str(tiny_model_dir),
                                                      "distilled", final, None)
    assert ctx is not None and ctx.text == CONTEXT and ctx.placement == "system"
    lanes = plan_lanes(str(run), side_by_side=True)
    assert [(x[0], x[1]) for x in lanes] == [("without context", final), ("with context", final)]
    assert lanes[1][2] is not None and lanes[1][2].text == CONTEXT
    # a given context replaces the run's
    assert plan_lanes(str(run), compare_base=True, context="Be brief.")[0][2].text == "Be brief."


def test_plan_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="not both"):
        plan_lanes(str(tiny_model_dir), context="x", context_file=str(missing))
    with pytest.raises(DataError, match=r"--context-file .*nope\.txt.* does not exist"):
        plan_lanes(str(tiny_model_dir), context_file=str(missing))
    with pytest.raises(DataError, match="cannot be read"):
        plan_lanes(str(tiny_model_dir), context_file=str(tmp_path))  # a folder
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no context"):
        plan_lanes(str(tiny_model_dir), context_file=str(blank))
    with pytest.raises(ConfigError, match="--context is empty"):
        plan_lanes(str(tiny_model_dir), context="  ")
    with pytest.raises(ConfigError, match="--side-by-side .* --context"):
        plan_lanes(str(tiny_model_dir), side_by_side=True)
    with pytest.raises(ConfigError, match="--compare-base needs a run folder"):
        plan_lanes(str(tiny_model_dir), compare_base=True)
    with pytest.raises(ConfigError, match="Choose one"):
        plan_lanes(str(tiny_model_dir), side_by_side=True, compare_base=True, context="x")
    with pytest.raises(ModelError, match="no model or run folder"):
        plan_lanes(str(tmp_path / "runs-typo"))
    unfinished = _run_folder(tiny_model_dir, tmp_path, final=False)
    with pytest.raises(RunFolderError, match=r"no final/ model yet.*--resume"):
        plan_lanes(str(unfinished))
    good = tmp_path / "ctx.txt"
    good.write_text("Line one.\n\nLine two.  \n", encoding="utf-8")
    (_, _, ctx), = plan_lanes(str(tiny_model_dir), context_file=str(good))
    assert ctx is not None and ctx.text == "Line one.\nLine two."


# --------------------------------------------------------------------------- the command
def _chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str],
          stdin: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_command_end_to_end(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tiny_model_dir), "--context", CONTEXT, "--side-by-side", "--max-new-tokens", "6",
            "--seed", "5"]
    code, out, err = _chat(monkeypatch, capsys, args, "Hello\n/reset\nBye\n/exit\nignored\n")
    assert code == 0, err
    assert "opcd chat:" in err and "/reset" in err and CONTEXT in err
    assert out.startswith("you> Hello\n[without context] ")
    assert out.count("[without context] ") == 2 and out.count("[with context] ") == 2
    assert "-- history cleared --" in out and "you> Bye" in out and "ignored" not in out
    # the same command again: the same transcript
    assert _chat(monkeypatch, capsys, args, "Hello\n/reset\nBye\n/exit\nignored\n")[1] == out
    # the API gives that transcript too
    setup = open_chat(str(tiny_model_dir), context=CONTEXT, side_by_side=True)
    assert transcript(setup.lanes, ["Hello", "/reset", "Bye"],
                      ChatOptions(max_new_tokens=6, seed=5)) + "\n" == out


def test_chat_command_run_folder_compare_base(tiny_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tiny_model_dir, tmp_path)
    code, out, err = _chat(monkeypatch, capsys, [str(run), "--compare-base", "--max-new-tokens", "4"],
                           "Salut\n")  # ends at EOF
    assert code == 0, err
    assert "[base + context]" in out and "[distilled]" in out and "the run's task" in err
    code, out, err = _chat(monkeypatch, capsys, [str(run), "--max-new-tokens", "4"], "Salut\n")
    assert code == 0 and "[model] " in out and str(run / "final") in err


@pytest.mark.parametrize(("args", "message"), [
    (["MISSING"], "no model or run folder"),
    (["./no/such/model"], "does not exist"),
    (["MODEL", "--context", "x", "--context-file", "f.txt"], "not both"),
    (["MODEL", "--context-file", "MISSING"], "--context-file"),
    (["MODEL", "--side-by-side"], "--side-by-side shows the model without and with a context"),
    (["MODEL", "--compare-base"], "--compare-base needs a run folder"),
    (["MODEL", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
])
def test_chat_command_errors(args: list[str], message: str, tiny_model_dir: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tiny_model_dir) if a == "MODEL" else str(tmp_path / "missing") if a == "MISSING"
            else a for a in args]
    code, out, err = _chat(monkeypatch, capsys, args, "Hello\n")
    assert code == 2
    assert err.startswith("opcd: error: ") and message in err
    assert "Traceback" not in err and out == ""


def test_chat_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = capsys.readouterr().out
    for flag in ("--context", "--context-file", "--side-by-side", "--compare-base", "--seed",
                 "--max-new-tokens", "--temperature"):
        assert flag in text
