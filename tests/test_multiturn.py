"""Multi-turn OPCD on games (opcd.sampling.multiturn): every generated turn is a training row, the
environment's text is only ever in prompts (never in the loss), the teacher sees the
experience, and evaluation plays whole episodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_trainer import tiny_config

from opcd.eval.evaluate import evaluate
from opcd.sampling.multiturn import is_multiturn, play_for_training
from opcd.tasks import build_task
from opcd.tasks.chat import encode_chat
from opcd.tasks.games import GameTask
from opcd.teachers.scoring import pack
from opcd.training.loop import train
from opcd.training.trainer import Trainer

EXPERIENCE = "- EXPERIENCE ITEM: avoid the holes H."


def _game() -> GameTask:
    return GameTask("frozenlake", sizes={"train": 4, "eval": 3, "test": 3}, context=EXPERIENCE)


def test_every_turn_is_a_row_and_environment_text_is_never_trained(tiny: Any) -> None:
    model, tok = tiny
    task = _game()
    assert is_multiturn(task)
    examples = task.examples("train")[:2]
    played = play_for_training(model, tok, task, examples, [0, 1], seed=3, step=0, n=2,
                               max_new_tokens=6, batch_size=8)
    eps = played.episodes
    assert len(eps) == 4  # 2 examples x n=2
    assert len(played.pairs) == sum(e.moves for e in eps) == len(played.rollout.response_ids)
    for row, ((ep, move), pair) in enumerate(zip(played.turn_of, played.pairs, strict=True)):
        turns = eps[ep].turns
        reply = played.rollout.texts[row]
        assert turns[1 + 2 * move] == ("assistant", reply)
        # The student's prompt is the conversation before this reply, without the context;
        # the teacher's is the same conversation with the experience.
        student = task.messages(examples[ep // 2], turns[: 1 + 2 * move], with_context=False)
        teacher = task.messages(examples[ep // 2], turns[: 1 + 2 * move], with_context=True)
        assert pair.student_ids == encode_chat(tok, student)
        assert pair.teacher_ids == encode_chat(tok, teacher)
        assert EXPERIENCE not in tok.decode(pair.student_ids)
        assert EXPERIENCE in tok.decode(pair.teacher_ids)
        if move > 0:  # the previous observation is in the prompt ...
            assert turns[2 * move][1] in tok.decode(pair.student_ids)
        # ... and the loss mask covers exactly the sampled reply tokens.
        resp = played.rollout.response_ids[row]
        batch = pack([pair.student_ids], [resp], pad_id=0)
        assert int(batch.response_mask.sum()) == len(resp)
        assert batch.response_ids[batch.response_mask].tolist() == resp


def test_episodes_do_not_depend_on_the_batch(tiny: Any) -> None:
    model, tok = tiny
    task = _game()
    ex = task.examples("train")[:3]
    together = play_for_training(model, tok, task, ex, [0, 1, 2], seed=1, step=2,
                                 max_new_tokens=6, batch_size=3)
    alone = play_for_training(model, tok, task, ex[1:2], [1], seed=1, step=2,
                              max_new_tokens=6, batch_size=1)
    assert together.episodes[1].turns == alone.episodes[0].turns


def test_train_step_on_a_game_trains_every_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    # (the tiny model reads 512 positions: long conversations keep their last tokens)
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 2, "batch_size": 2},
                      eval={"size": 2, "max_new_tokens": 4}, rollout={"truncate_prompts": True})
    cfg["task"] = {"name": "frozenlake", "train_size": 4, "eval_size": 2, "test_size": 2}
    res = train(cfg, progress=False)
    for m in res.history:
        assert m["trained_turns"] >= 2 and 0.0 <= m["episode_success"] <= 1.0
        assert m["episode_moves"] * 2 == m["trained_turns"]  # n=1: one row per move
        assert m["response_len"] > 0 and m["loss"] == m["loss"]
    assert all(e["n"] == 2 for e in res.evals)


def test_game_evaluation_plays_whole_episodes(tiny: Any) -> None:
    model, tok = tiny
    task = _game()
    res = evaluate(model, tok, task, split="eval", size=2, max_new_tokens=4, batch_size=2)
    assert res.n == 2
    for r in res.records:
        assert r["score"] in (0.0, 1.0) and 1 <= r["moves"] <= task.max_moves
        assert r["response"].count("[assistant]") == r["moves"]


def test_a_game_config_builds_a_multiturn_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from opcd.config import config_from_dict

    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"truncate_prompts": True})
    cfg["task"] = {"name": "sokoban", "train_size": 2, "eval_size": 1, "test_size": 1}
    trainer = Trainer(config_from_dict(cfg), progress=False)
    assert is_multiturn(trainer.task)
    m = trainer.train_step()
    assert m["trained_turns"] >= 1


def test_single_turn_tasks_are_not_multiturn(tiny_model_dir: Path, tmp_path: Path) -> None:
    from opcd.config import config_from_dict

    assert not is_multiturn(build_task(config_from_dict(tiny_config(tiny_model_dir, tmp_path)).task))


def test_game_evaluation_reports_moves_and_invalid_moves(tiny: Any) -> None:
    model, tok = tiny
    res = evaluate(model, tok, _game(), split="eval", size=2, max_new_tokens=4, batch_size=2)
    assert set(res.details) == {"mean_moves", "invalid_moves"}
    assert res.details["mean_moves"] == sum(r["moves"] for r in res.records) / 2
    assert res.details["invalid_moves"] == sum(r["invalid_moves"] for r in res.records)
    assert "mean_moves" in res.details_line()
