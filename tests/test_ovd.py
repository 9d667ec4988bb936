"""On-policy Verbal Distillation: score reading, group maths, replacement, the loop, config.

The student and the teacher are tiny random models with *different* tokenizers (vocab 320
and 300): OVD only exchanges text with its teacher. Where exact teacher answers matter, a
scripted text-only teacher (:class:`ScriptedTeacher`) stands in, as a black box would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_model, build_tokenizer
from test_trainer import tiny_config, weights

from opcd.config import config_from_dict
from opcd.errors import ConfigError, ModelError
from opcd.methods import onpolicy, ovd_method
from opcd.methods.ovd import (
    Trajectory,
    clipped_policy_loss,
    expected_from_digit_logprobs,
    expected_score,
    fill_group_mean,
    fill_score_prompt,
    group_advantages,
    mix_rewards,
    parse_score,
    prefix_cut,
    rate,
    teacher_trajectory,
    transcript_text,
    turn_advantages,
    turn_score_requests,
)
from opcd.methods.ovd_method import VerbalScorer
from opcd.teachers.verbal import Generation, VerbalTeacher, digit_token_ids
from opcd.training.loop import build_trainer, train
from opcd.training.trainer import Trainer


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher whose tokenizer differs from the student's (vocab 300, not 320)."""
    path = tmp_path_factory.mktemp("ovd-teacher") / "model"
    tok = build_tokenizer(vocab_size=300)
    build_tiny_model(len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ovd_config(student: Path, tmp_path: Path, teacher: Path | None = None, **ovd_keys: Any) -> dict[str, Any]:
    cfg = tiny_config(
        student, tmp_path,
        rollout={"n": 2, "max_new_tokens": 6, "batch_size": 4},
        train={"steps": 2, "batch_size": 2, "micro_batch_size": 4, "lr": 1e-2},
    )
    cfg["method"] = "ovd"
    cfg["ovd"] = ovd_keys
    if teacher is not None:
        cfg["teacher"] = {"mode": "model", "model": str(teacher)}
    return cfg


class ScriptedTeacher(VerbalTeacher):
    """A text-only teacher: scores come from ``verdicts`` in turn (teacher text gets "9"),
    replacements are ``TEACHER_TEXT``. Records every call."""

    TEACHER_TEXT = "La capitale est Rome. Bonjour"

    def __init__(self, verdicts: Sequence[str]) -> None:
        self.verdicts = list(verdicts)
        self.calls: list[dict[str, Any]] = []

    def generate(self, conversations, *, max_new_tokens, temperature, prefills=None):  # type: ignore[no-untyped-def]
        self.calls.append({"conversations": conversations, "prefills": prefills,
                           "max_new_tokens": max_new_tokens, "temperature": temperature})
        out: list[Generation | None] = []
        for conv in conversations:
            content = conv[-1]["content"]
            if content.startswith("You are grading"):
                out.append(Generation("9" if self.TEACHER_TEXT in content else self.verdicts.pop(0), True))
            else:
                out.append(Generation(self.TEACHER_TEXT, True))
        return out


# ---------------------------------------------------------------------------- reading scores
@pytest.mark.parametrize(("text", "score"), [
    ("7", 7.0), ("  3\n", 3.0), ("Score: 7/9", 7.0), ("**Score:** 4", 4.0), ("rating is eight", 8.0),
    ("seven", 7.0), ("Seven.", 7.0), ("I would give it a six out of nine", 6.0),
    ("I rate it 5 out of 9", 5.0), ("8.5", 8.5), ("0", 0.0), ("9/9", 9.0),
    ("garbage", None), ("", None), ("   ", None), ("10", None), ("-1", None),
    ("The answer is 42", None), ("Score: 12", None), ("one of the worst answers", None),
    ("\ufffd\x00}{", None),
])
def test_parse_score(text: str, score: float | None) -> None:
    assert parse_score(text) == score


def test_expected_score_on_hand_made_logits() -> None:
    digit_ids = list(range(2, 12))  # token ids 2..11 are the digits 0..9; 0, 1 are not digits
    logits = torch.full((4, 12), -1e9)
    logits[0, 2:12] = 0.0  # uniform over the digits -> 4.5
    logits[1, 2 + 7] = 5.0  # all on "7"
    logits[2, [2 + 3, 2 + 7]] = 1.0  # half "3", half "7" -> 5
    logits[3, 2:12] = 0.0
    logits[3, 0] = math.log(10.0)  # a non-digit with the digits' total probability: mass 1/2
    score, mass = expected_score(logits, digit_ids)
    assert score.tolist() == pytest.approx([4.5, 7.0, 5.0, 4.5], abs=1e-5)
    assert mass.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5], abs=1e-5)
    # the same from log-probabilities: p(d) renormalised over the digits, sum_d d * p(d)
    p = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2])
    s, m = expected_from_digit_logprobs(p.clamp_min(1e-30).log())
    assert float(s) == pytest.approx((1 * 0.1 + 8 * 0.1 + 9 * 0.2) / 0.4, abs=1e-5)
    assert float(m) == pytest.approx(0.4, abs=1e-6)
    with pytest.raises(ValueError, match="ten digits"):
        expected_score(logits, digit_ids[:9])


def test_digit_token_ids(tiny) -> None:
    _, tok = tiny
    ids = digit_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == [str(d) for d in range(10)]

    def split_digits(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1, 2] if text == "7" else [int(text)]}

    with pytest.raises(ModelError, match="score_mode=generate"):
        digit_token_ids(split_digits)


def test_fill_score_prompt_keeps_braces_and_picks_the_template() -> None:
    text = fill_score_prompt(None, "What is {x}?", "It is {response}.", "Be kind.")
    assert "Be kind." in text and "What is {x}?" in text and "It is {response}." in text
    assert "Guidance" not in fill_score_prompt(None, "p", "r", None)
    assert fill_score_prompt("{problem}|{response}|{context}", "p", "r", None) == "p|r|"


# ---------------------------------------------------------------------------- group maths
def test_group_advantages_hand_values() -> None:
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 2.0]]))
    s1 = math.sqrt(1 / 3)  # sample std of 1, 0, 0, 1
    assert adv[0].tolist() == pytest.approx([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], rel=1e-5)
    s2 = math.sqrt(2 / 3)  # sample std of 1, 2, 3, 2
    assert adv[1].tolist() == pytest.approx([-1 / s2, 0.0, 1 / s2, 0.0], rel=1e-5)
    equal = group_advantages(torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]]))
    assert torch.equal(equal, torch.zeros(2, 3))  # exactly zero: no signal
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


def test_fill_group_mean_and_mix_rewards() -> None:
    filled = fill_group_mean([None, 6.0, 8.0, None, 2.0, 4.0, None, None], [0, 0, 1, 1, 2, 2, 3, 3])
    assert filled == [6.0, 6.0, 8.0, 8.0, 2.0, 4.0, 4.5, 4.5]
    assert mix_rewards([1.0, 0.0], [9.0, 4.5], 0.25) == pytest.approx([1.0, 0.375])
    assert mix_rewards([1.0, 0.0], [0.0, 9.0], 1.0) == [1.0, 0.0]


def test_clipped_policy_loss() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, clipped = clipped_policy_loss(logp, logp.detach(), adv)  # on-policy: ratio 1
    assert loss.tolist() == pytest.approx([-1.0, 2.0, -0.5]) and not clipped.any()
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 2.0, -0.5])  # -A * d logp
    # ratio 1.5: above 1 + eps with A > 0 -> clipped (no gradient); with A < 0 -> not clipped
    new = torch.tensor([math.log(1.5), math.log(1.5)], requires_grad=True)
    loss, clipped = clipped_policy_loss(new, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_eps=0.2)
    assert loss.tolist() == pytest.approx([-1.2, 1.5]) and clipped.tolist() == [True, False]
    loss.sum().backward()
    assert new.grad.tolist() == pytest.approx([0.0, 1.5])
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_policy_loss(logp, logp, adv, clip_eps=0.0)


def test_turn_level_scoring_pieces() -> None:
    turns = [("user", "Rules. Grid."), ("assistant", "[down]"), ("user", "Moved."), ("assistant", "[up]"),
             ("user", "Moved back.")]
    reqs = turn_score_requests(turns, template="{problem}||{response}", context=None)
    assert reqs == ["Rules. Grid.||[Student]\n[down]",
                    "Rules. Grid.||[Student]\n[down]\n\n[Environment]\nMoved.\n\n[Student]\n[up]"]
    adv = turn_advantages([[9.0, 0.0], [9.0, None]], outcomes=[1.0, 0.0], weight=0.0)
    # known turn scores 1, 0, 1 (scaled): mean 2/3, std sqrt(1/3); missing = 0; reward-to-go
    z = (1 - 2 / 3) / math.sqrt(1 / 3)
    zl = (0 - 2 / 3) / math.sqrt(1 / 3)
    assert adv[0] == pytest.approx([z + zl, zl], rel=1e-5) and adv[1] == pytest.approx([z, 0.0], abs=1e-6)
    out = turn_advantages([[1.0], [1.0, 1.0]], outcomes=[1.0, 0.0], weight=1.0)
    assert out[0] == pytest.approx([0.5 / math.sqrt(0.5)], rel=1e-5)  # outcome only: same per turn
    assert out[1] == pytest.approx([-0.5 / math.sqrt(0.5)] * 2, rel=1e-5)


# ---------------------------------------------------------------------------- replacement
def test_prefix_cut_and_teacher_trajectory() -> None:
    pieces = ["Hello", " world", ".", " Next", " line", " more", " text", " end"]

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    assert prefix_cut(list(range(8)), decode) == 3  # half is 4: back to the sentence end
    assert prefix_cut([0, 1, 3, 4, 5, 6], decode) == 3  # no boundary inside the half
    assert prefix_cut([0], decode) == 0
    tr = teacher_trajectory(1, [5, 6], "ab", " cd", True, lambda t: [40, 41], eos_id=2, max_tokens=10)
    assert (tr.response_ids, tr.text, tr.teacher_from, tr.source, tr.truncated) == (
        [5, 6, 40, 41, 2], "ab cd", 2, "student+teacher", False)
    cut = teacher_trajectory(0, [], "", "xyz", True, lambda t: [7, 8, 9], eos_id=2, max_tokens=2)
    assert (cut.response_ids, cut.truncated, cut.source) == ([7, 8], True, "teacher")
    assert Trajectory(0, [1], "a", False).source == "student"


def test_rate_with_a_text_only_teacher_counts_unparseable() -> None:
    teacher = ScriptedTeacher(["7", "Score: 3/9", "no idea", "ten"])
    requests = [fill_score_prompt(None, "2 + 2?", answer, None) for answer in "abcd"]
    r = rate(teacher, requests, mode="generate", max_new_tokens=5)
    assert r.scores == [7.0, 3.0, None, None] and r.raw[2] == "no idea" and r.too_long == 0
    assert teacher.calls[0]["temperature"] == 0.0 and teacher.calls[0]["max_new_tokens"] == 5
    with pytest.raises(NotImplementedError, match="score_mode=generate"):
        rate(teacher, requests, mode="expected")


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_rejected_responses_are_trained_as_teacher_tokens(
    tiny_model_dir: Path, other_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_from_dict(ovd_config(tiny_model_dir, tmp_path, other_teacher_dir,
                                      score_mode="generate", threshold=5, teacher_max_new_tokens=16))
    tr = build_trainer(cfg, progress=False)
    assert isinstance(tr.parts.scorer, VerbalScorer)
    assert tr.teacher.tokenizer.get_vocab() != tr.tokenizer.get_vocab()
    tr.teacher = ScriptedTeacher(["2", "8", "garbage", "7"])  # rows: group 0 = 0, 1; group 1 = 2, 3
    rolls = _spy(monkeypatch, tr.backend, "sample")
    packs = _spy(monkeypatch, ovd_method, "pack")
    m = tr.train_step()

    student_rows = [list(r) for r in rolls[0][2].response_ids]  # (the scorer rewrites the rows)
    (args, _, batch), = packs  # one micro-batch of all four rows
    prefixes, responses = args[0], args[1]
    teacher_ids = tr.tokenizer(ScriptedTeacher.TEACHER_TEXT, add_special_tokens=False)["input_ids"]
    assert responses[0] == teacher_ids + [tr.tokenizer.eos_token_id]  # re-encoded, student EOS
    assert responses[1:] == student_rows[1:]  # kept: the student's own tokens
    # the student's prompt without the context; only response tokens are trained
    assert all("French" not in tr.tokenizer.decode(p) for p in prefixes)
    assert batch.response_mask.sum(1).tolist() == [len(r) for r in responses]
    for b, r in enumerate(responses):
        assert batch.response_ids[b][batch.response_mask[b]].tolist() == r
    # the teacher wrote the replacement from the prompt with the context (teacher_context)
    gen_call = next(c for c in tr.teacher.calls if not c["conversations"][0][-1]["content"].startswith("You are"))
    assert gen_call["prefills"] == [""] and "French" in json.dumps(gen_call["conversations"])

    assert m["rejected"] == 1 and m["replaced_frac"] == 0.25 and m["teacher_score"] == 9.0
    assert m["unparseable"] == 1 and m["unparseable_texts"] == ["garbage"]
    assert m["verbal_score"] == pytest.approx((2 + 8 + 7) / 3)
    # group 1: the unparseable row gets the group mean (7): equal rewards, no advantage
    assert m["zero_adv_groups"] == 0.5
    assert m["reward_weight"] == 0.0 and not m["skipped"]


def test_suffix_replacement_keeps_the_student_prefix(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config_from_dict(ovd_config(tiny_model_dir, tmp_path, score_mode="generate",
                                      replace="suffix", teacher_context=False,
                                      teacher_max_new_tokens=16))
    tr = build_trainer(cfg, progress=False)
    tr.teacher = ScriptedTeacher([])
    tok = tr.tokenizer
    body = tok("Hello world. Bonjour comment allez-vous", add_special_tokens=False)["input_ids"]
    ex = tr.train_examples[0]
    trajs = [Trajectory(0, body + [tok.eos_token_id], tok.decode(body), False),
             Trajectory(0, body, tok.decode(body), True)]
    done, failed = tr.parts.scorer.replace(trajs, [0, 1], [ex])
    assert done == [0, 1] and failed == 0
    k = prefix_cut(body, lambda ids: tok.decode(ids, skip_special_tokens=True))
    assert 0 < k <= len(body) // 2 and tok.decode(body[:k]).endswith(".")
    call = tr.teacher.calls[0]
    assert call["prefills"] == [tok.decode(body[:k])] * 2
    assert "French" not in json.dumps(call["conversations"])  # teacher_context=false
    cont = tok(ScriptedTeacher.TEACHER_TEXT, add_special_tokens=False)["input_ids"]
    for t in trajs:
        assert t.response_ids == body[:k] + cont + [tok.eos_token_id]
        assert t.teacher_from == k and t.source == "student+teacher"
        assert t.text == tok.decode(body[:k]) + ScriptedTeacher.TEACHER_TEXT
    # step-level scoring for a played episode: one verdict per assistant turn
    tr.teacher = ScriptedTeacher(["3", "Score: 8"])
    turns = [("user", "Rules."), ("assistant", "[down]"), ("user", "Moved."), ("assistant", "[right]")]
    assert tr.parts.scorer.score_turns(ex, turns).scores == [3.0, 8.0]


# ---------------------------------------------------------------------------- the loop
def test_train_ovd_with_a_teacher_of_another_tokenizer(
    tiny_model_dir: Path, other_teacher_dir: Path, tmp_path: Path
) -> None:
    res = train(ovd_config(tiny_model_dir, tmp_path, other_teacher_dir, threshold=4.5,
                           replace="suffix"), progress=False)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "verbal_score", "outcome_reward", "replaced_frac", "response_len",
                "time_rollout", "time_score", "time_replace", "time_update", "digit_mass"):
        assert all(isinstance(r[key], float) for r in steps), key
    for r in steps:
        assert 0 <= r["verbal_score"] <= 9 and 0 <= r["replaced_frac"] <= 1
        assert r["unparseable"] == 0 and r["clip_frac"] == 0.0  # expected mode; ratio 1
    assert [e["step"] for e in recs if e["type"] == "eval"] == [0, 2]
    assert (res.run_dir / "checkpoints" / "step-000002").is_dir()
    before, after = weights(tiny_model_dir), weights(res.final_model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ovd_resume_equals_uninterrupted(
    tiny_model_dir: Path, other_teacher_dir: Path, tmp_path: Path
) -> None:
    keys = {"threshold": 9, "reward_weight": 0.5}  # every response replaced: teacher sampling
    a = train(ovd_config(tiny_model_dir, tmp_path / "a", other_teacher_dir, **keys), progress=False)
    b_cfg = ovd_config(tiny_model_dir, tmp_path / "b", other_teacher_dir, **keys)
    b_cfg["train"]["steps"] = 1
    train(b_cfg, progress=False)
    b_cfg["train"]["steps"] = 2
    b = train(b_cfg, resume=True, progress=False)
    wa, wb = weights(a.final_model), weights(b.final_model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(r["replaced_frac"] == 1.0 and r["grad_norm"] > 0 for r in a.history)


def test_unparseable_scores_are_counted_not_fatal(
    tiny_model_dir: Path, other_teacher_dir: Path, tmp_path: Path
) -> None:
    cfg = ovd_config(tiny_model_dir, tmp_path, other_teacher_dir, score_mode="generate", threshold=9)
    cfg["train"]["steps"] = 1
    (m,) = train(cfg, progress=False).history  # the random teacher writes no digit (greedy)
    assert m["unparseable"] == 4 and m["verbal_score"] is None and len(m["unparseable_texts"]) == 3
    assert m["replaced_frac"] == 0.0  # a missing score is no reason to reject
    assert m["zero_adv_groups"] == 1.0 and not m["skipped"]  # equal (imputed) rewards: no signal


def test_lora_frozen_verbal_teacher_is_the_base_with_the_adapter_off(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = ovd_config(tiny_model_dir, tmp_path, threshold=9)
    cfg["lora"] = {"enabled": True, "r": 4}
    cfg["train"]["lr"] = 0.05
    tr = build_trainer(config_from_dict(cfg), progress=False)
    assert tr.teacher.separate_model is None  # no second copy of the weights
    request = [fill_score_prompt(None, "Hello?", "Bonjour.", None)]
    before = rate(tr.teacher, request, mode="expected").scores
    for _ in range(2):
        m = tr.train_step()
    assert m["replaced_frac"] == 1.0 and m["grad_norm"] > 0
    assert rate(tr.teacher, request, mode="expected").scores == before  # base weights


def test_ovd_is_the_trainer_with_ovd_parts(tiny_model_dir: Path, tmp_path: Path) -> None:
    tr = Trainer(config_from_dict(ovd_config(tiny_model_dir, tmp_path)), progress=False)
    assert type(tr) is Trainer and isinstance(tr.parts.scorer, VerbalScorer)
    assert isinstance(tr.parts.sampler, onpolicy.StudentSampler)  # OPCD's sampler
    assert isinstance(tr.parts.objective, ovd_method.PolicyGradientObjective)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.n=1"], r"rollout.n=1 must be at least 2"),
    (["ovd.threshold=10"], r"ovd.threshold=10.0 must be between 0 and 9"),
    (["ovd.threshold=-1"], r"ovd.threshold=-1.0 must be between 0 and 9"),
    (["ovd.reward_weight=1.5"], r"ovd.reward_weight=1.5 must be between 0 and 1"),
    (["ovd.clip_eps=1.5"], r"ovd.clip_eps=1.5 must be in \(0, 1\)"),
    (["ovd.clip_eps=0"], r"ovd.clip_eps=0.0 must be greater than 0"),
    (["ovd.score_prompt=Rate {problem}"], r"must contain \{response\}"),
    (["ovd.score_mode=sample"], r"one of 'generate', 'expected'"),
    (["ovd.replace=half"], r"one of 'whole', 'suffix'"),
    (["ovd.thresold=3"], r"Did you mean ovd.'threshold'"),
    (["method=ovdd"], r"Did you mean 'ovd'"),
])
def test_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": "ovd", "rollout": {"n": 4}}, overrides)


def test_group_size_only_checked_for_ovd() -> None:
    cfg = config_from_dict({"rollout": {"n": 1}, "ovd": {"threshold": 5}})
    assert cfg.method == "opcd" and cfg.ovd.threshold == 5.0
    with pytest.raises(ConfigError, match="ovd.threshold"):
        config_from_dict({"ovd": {"threshold": 12}})
    cfg = config_from_dict({"method": "ovd", "rollout": {"n": 2}}, ["ovd.threshold=0"])
    assert cfg.method == "ovd" and cfg.ovd.score_mode == "expected" and cfg.ovd.replace == "whole"


# ---------------------------------------------------------------------------- memory bench
def test_bench_ovd_step_next_to_opcd_step(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opcd.cli import main
    from opcd.tools import bench

    monkeypatch.setattr(bench.BenchSpec, "matmul_seconds", 0.05)
    spec = bench.BenchSpec(model=str(tiny_model_dir), phases=["step", "update"], modes=["fast", "ovd"])
    assert [(j["phase"], j["mode"]) for j in bench._jobs(spec)] == [
        ("step", "fast"), ("step", "ovd"), ("update", "fast")]  # OVD: whole steps only
    out = tmp_path / "results.md"
    args = ["bench", "--model", str(tiny_model_dir), "--batch", "4", "--context", "20", "--prompt", "5",
            "--response", "4", "--micro-batch", "2", "--top-k", "8", "--phases", "step",
            "--modes", "fast,ovd", "--ovd-group", "2", "--in-process", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| step | ovd |" in printed and "2 prompts x 2, replaced" in printed
    assert "peak RSS ovd / opcd (fast):" in printed and "--ovd-group 2" in out.read_text()


# ---------------------------------------------------------------------------- multi-turn games
class CountingTeacher(VerbalTeacher):
    """Scores requests in turn from ``verdicts`` (cycling) and records the requests."""

    def __init__(self, verdicts: Sequence[str]) -> None:
        self.verdicts = list(verdicts)
        self.requests: list[str] = []

    def generate(self, conversations, *, max_new_tokens, temperature, prefills=None):  # type: ignore[no-untyped-def]
        out = []
        for conv in conversations:
            self.requests.append(conv[-1]["content"])
            out.append(Generation(self.verdicts[(len(self.requests) - 1) % len(self.verdicts)], True))
        return out


def _game_ovd_trainer(tiny_model_dir: Path, tmp_path: Path, **ovd_keys: Any) -> Trainer:
    cfg = ovd_config(tiny_model_dir, tmp_path, score_mode="generate", reward_weight=0.0, **ovd_keys)
    cfg["task"] = {"name": "frozenlake", "train_size": 4, "eval_size": 2, "test_size": 2}
    cfg["rollout"]["truncate_prompts"] = True  # the tiny model reads 512 positions
    tr = build_trainer(config_from_dict(cfg), progress=False)
    assert isinstance(tr.parts.scorer, VerbalScorer) and tr.parts.scorer.episodes
    return tr


def _spy_update(tr: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """What the update trains: (prompt ids, response ids, advantage) of every row."""
    seen: list[tuple[Any, ...]] = []
    original = tr.parts.scorer.score

    def wrapper(rows: Any) -> Any:
        targets = original(rows)
        seen.append(([rows.pairs[i].student_ids for i in rows.roll.prompt_index], rows.responses,
                     targets.advantages.tolist()))
        return targets

    monkeypatch.setattr(tr.parts.scorer, "score", wrapper)
    return seen


def test_ovd_on_a_game_rates_whole_episodes_and_trains_every_move(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _game_ovd_trainer(tiny_model_dir, tmp_path)
    tr.teacher = CountingTeacher(["2", "8", "5", "5"])  # episodes 0, 1 (problem 0); 2, 3 (problem 1)
    plays = _spy(monkeypatch, onpolicy, "play_for_training")
    updates = _spy_update(tr, monkeypatch)
    m = tr.train_step()

    played = plays[0][2]
    assert len(played.episodes) == 4 and len(tr.teacher.requests) == 4  # one rating per episode
    # the teacher read each whole transcript, environment observations included
    for request, ep in zip(tr.teacher.requests, played.episodes, strict=True):
        assert transcript_text(ep.turns) in request
    (prompts, responses, adv), = updates
    # every move the student generated is a row, with the student's own tokens; the
    # environment's text is only ever in prompts
    assert responses == played.rollout.response_ids
    assert prompts == [p.student_ids for p in played.pairs]
    assert len(responses) == sum(ep.moves for ep in played.episodes) == m["trained_turns"]
    # episode-level advantages (verbal only): problem 0 = (2, 8) -> -/+0.707, problem 1 equal -> 0
    per_episode = [-0.7071, 0.7071, 0.0, 0.0]
    assert adv == pytest.approx([per_episode[e] for e, _ in played.turn_of], abs=1e-3)
    assert m["verbal_score"] == pytest.approx(5.0) and m["replaced_frac"] == 0.0
    assert 0.0 <= m["episode_success"] <= 1.0 and not m["skipped"]


def test_step_level_ovd_rates_every_move(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _game_ovd_trainer(tiny_model_dir, tmp_path, step_level=True)
    tr.teacher = CountingTeacher(["1", "7", "4", "garbage", "9"])
    plays = _spy(monkeypatch, onpolicy, "play_for_training")
    updates = _spy_update(tr, monkeypatch)
    m = tr.train_step()

    played = plays[0][2]
    moves = [ep.moves for ep in played.episodes]
    assert len(tr.teacher.requests) == sum(moves)  # one rating per move
    # the request for a move shows the game up to and including that reply, not after it
    first = played.episodes[0]
    assert first.turns[1][1] in tr.teacher.requests[0]
    if first.moves > 1:
        assert first.turns[3][1] not in tr.teacher.requests[0]
    # the per-move advantages are turn_advantages of the scripted scores, group by group
    verdicts = ["1", "7", "4", "garbage", "9"]
    scores = [parse_score(verdicts[k % 5]) for k in range(sum(moves))]
    per_episode, k = [], 0
    for n_moves in moves:
        per_episode.append(scores[k:k + n_moves])
        k += n_moves
    outcome = [float(ep.success) for ep in played.episodes]
    expected = turn_advantages(per_episode[:2], outcome[:2], 0.0) + turn_advantages(per_episode[2:], outcome[2:], 0.0)
    (_, _, adv), = updates
    assert adv == pytest.approx([expected[e][mv] for e, mv in played.turn_of])
    assert m["step_level"] and m["unparseable"] == sum(s is None for s in scores)


def test_step_level_needs_a_game(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="step_level"):
        build_trainer(config_from_dict(ovd_config(tiny_model_dir, tmp_path, step_level=True)),
                      progress=False)
