"""Other system prompts on OPCD's training rows (task.other_system_prompt_share / _rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer import tiny_config

import opcd.tasks
from opcd.config import config_from_dict
from opcd.errors import ConfigError, DataError
from opcd.tasks.base import Example
from opcd.tasks.chat import insert_context, student_messages
from opcd.tasks.other_system_prompts import OtherSystemPrompts, load_pool
from opcd.training.trainer import Trainer


def test_the_context_goes_in_front_of_the_conversations_own_system_message() -> None:
    ex = Example(id="a", prompt="Hi?", system="You are a librarian.")
    msgs = student_messages(ex)
    assert msgs == [{"role": "system", "content": "You are a librarian."},
                    {"role": "user", "content": "Hi?"}]
    assert insert_context(msgs, "Reply in Spanish.") == [
        {"role": "system", "content": "Reply in Spanish.\n\nYou are a librarian."},
        {"role": "user", "content": "Hi?"}]
    # user placement: the system message stays as it is, the context joins the user turn
    assert insert_context(msgs, "C", "user") == [
        {"role": "system", "content": "You are a librarian."}, {"role": "user", "content": "C\n\nHi?"}]
    assert student_messages(Example(id="b", prompt="Hi?")) == [{"role": "user", "content": "Hi?"}]


def test_draws_are_a_share_of_rows_and_repeat_for_the_same_step_and_position() -> None:
    pool = ("S1", "S2", "S3")
    ex = Example(id="a", prompt="q")
    half = OtherSystemPrompts(pool, 0.5, seed=0)
    draws = [half.apply(ex, step, pos)[0].system for step in range(50) for pos in range(8)]
    given = [d for d in draws if d is not None]
    assert 0.4 < len(given) / len(draws) < 0.6
    assert set(given) == set(pool)
    assert [half.apply(ex, 3, p)[0].system for p in range(8)] == draws[24:32]  # resumable
    assert OtherSystemPrompts(pool, 1.0, seed=1).apply(ex, 0, 0)[0].system in pool
    assert all(OtherSystemPrompts(pool, 1.0, 0).apply(ex, s, 0)[0].system in pool
               for s in range(20))
    assert OtherSystemPrompts(pool, 0.0, 0).apply(ex, 0, 0) == (ex, True)
    own = Example(id="b", prompt="q", system="mine")
    assert OtherSystemPrompts(pool, 1.0, 0).apply(own, 0, 0) == (own, True)
    # extra rows (positions from batch_size on) always get one, the batch's rows never at share 0
    extra = OtherSystemPrompts(pool, 0.0, 0, batch_size=4)
    assert all(extra.apply(ex, s, p)[0].system is None for s in range(10) for p in range(4))
    assert all(extra.apply(ex, s, p)[0].system in pool for s in range(10) for p in range(4, 8))
    assert extra.apply(ex, 0, 5)[1] is False  # replace: the teacher sees the other prompt alone
    # the teacher sees the context on a drawn row when composing, not when replacing
    assert OtherSystemPrompts(pool, 1.0, 0, "compose").apply(ex, 0, 0)[1] is True
    assert OtherSystemPrompts(pool, 1.0, 0, "replace").apply(ex, 0, 0)[1] is False


def test_the_pool_is_read_from_a_file_and_bad_files_are_named(tmp_path: Path) -> None:
    builtin = load_pool()
    assert len(builtin) >= 20 and all(s.strip() == s and s for s in builtin)
    # none of the behaviour suite's own prompts: the suite stays an out-of-distribution check
    suite = [json.loads(line)["system_prompt"] for line in
             (Path(opcd.tasks.__file__).parent / "data" / "behaviour_suite.jsonl").read_text().splitlines()]
    assert not set(builtin) & set(suite)
    assert not any(rule in s for s in builtin for rule in ('"Hello there!"', '"- "', '"answer"', "Spanish"))
    f = tmp_path / "pool.txt"
    f.write_text("\ufeffOne.\n\n  Two.  \n", encoding="utf-8")
    assert load_pool(f) == ["One.", "Two."]
    f.write_text("\n \n")
    with pytest.raises(DataError, match="no system prompts"):
        load_pool(f)
    with pytest.raises(DataError, match="does not exist"):
        load_pool(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("task", "extra", "match"),
    [({"other_system_prompt_share": 1.5}, {}, r"\[0, 1\]"),
     ({"other_system_prompt_share": 0.5}, {"method": "ovd"}, "OPCD's one-turn prompts only"),
     ({"other_system_prompts": "pool.txt", "other_system_prompt_share": 0}, {}, "are 0"),
     ({"other_system_prompt_rows": 99}, {}, "between 0 and train.batch_size"),
     ({"other_system_prompt_rows": -1}, {}, "between 0 and train.batch_size"),
     ({"other_system_prompt_rows": 2}, {"method": "offpolicy"}, "OPCD's one-turn prompts only")],
)
def test_bad_settings_are_refused(tiny_model_dir: Path, tmp_path: Path, task: dict, extra: dict,
                                  match: str) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, task=task)
    cfg.update(extra)
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_training_rows_carry_the_system_prompt_to_student_and_teacher(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("You are a librarian.\n")
    cfg = tiny_config(tiny_model_dir, tmp_path, task={"other_system_prompt_share": 1.0,
                                                      "other_system_prompts": str(pool),
                                                      "other_system_prompt_mode": "compose"})
    trainer = Trainer(config_from_dict(cfg), progress=False)
    for pair in trainer.prompt_pairs([0, 1]):
        student = trainer.tokenizer.decode(pair.student_ids)
        teacher = trainer.tokenizer.decode(pair.teacher_ids)
        assert "librarian" in student and "French" not in student
        assert teacher.index("French") < teacher.index("librarian")
    off = tiny_config(tiny_model_dir, tmp_path / "off", task={"other_system_prompt_share": 0})
    replace = tiny_config(tiny_model_dir, tmp_path / "replace", task={  # the default mode
        "other_system_prompt_share": 1.0, "other_system_prompts": str(pool)})
    replacing = Trainer(config_from_dict(replace), progress=False)
    for pair in replacing.prompt_pairs([0, 1]):  # the teacher's prompt is the student's
        assert pair.teacher_ids == pair.student_ids
        assert "librarian" in replacing.tokenizer.decode(pair.teacher_ids)
    plain = Trainer(config_from_dict(off), progress=False)
    assert plain.other_system_prompts is None
    assert all(plain.tokenizer.decode(p.student_ids).count("<|im_start|>system") <= 1
               and "French" not in plain.tokenizer.decode(p.student_ids)
               for p in plain.prompt_pairs([0, 1, 2, 3]))


def test_extra_rows_repeat_the_steps_first_prompts_with_another_system_prompt(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("You are a librarian.\n")
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path, task={
        "other_system_prompt_rows": 2, "other_system_prompts": str(pool)}))
    trainer = Trainer(cfg, progress=False)
    seen = []
    sample = trainer.parts.sampler.sample
    trainer.parts.sampler.sample = lambda idx: seen.append((idx, sample(idx))) or seen[-1][1]
    record = trainer.train_step()
    (idx, rows), = seen
    bs = cfg.train.batch_size
    assert len(idx) == bs + 2 and idx[bs:] == idx[:2]
    assert len(rows.pairs) == bs + 2 and len(rows.responses) == (bs + 2) * cfg.rollout.n
    decode = trainer.tokenizer.decode
    for pair in rows.pairs[:bs]:  # the behaviour's rows: no system prompt, the teacher has the context
        assert "librarian" not in decode(pair.student_ids) and "French" in decode(pair.teacher_ids)
    for plain, pair in zip(rows.pairs[:2], rows.pairs[bs:], strict=True):  # the same prompts, under S
        assert "librarian" in decode(pair.student_ids) and pair.teacher_ids == pair.student_ids
        assert decode(plain.student_ids).split("<|im_start|>user")[-1] == \
            decode(pair.student_ids).split("<|im_start|>user")[-1]
    assert record["step"] == 1 and record["loss"] == record["loss"]  # a finite step was taken
