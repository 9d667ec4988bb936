"""Off-policy context distillation (method=offpolicy): the objectives on hand-made logits,
and a tiny end-to-end run that saves the teacher's responses and reuses them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_trainer import tiny_config, weights

from opcd.config import config_from_dict
from opcd.errors import ConfigError
from opcd.methods.offpolicy import (
    RESPONSES_FILE,
    OffPolicyObjective,
    StoredResponses,
    offpolicy_token_loss,
)
from opcd.objectives import losses
from opcd.training.loop import train
from opcd.training.trainer import Trainer


def test_forward_kl_over_teacher_top_k_by_hand() -> None:
    s_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t_logits = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    t_logp_full = torch.log_softmax(t_logits, -1)
    idx, _ = losses.select_slots(torch.log_softmax(s_logits, -1), t_logp_full, 2, source="teacher")
    assert idx.tolist() == [[1, 2]]  # the teacher's top-2
    t_logp = t_logp_full.gather(-1, idx)
    loss, stats = offpolicy_token_loss(s_logits, idx, t_logp, torch.tensor([1]), objective="fkl",
                                       tail=False)
    s = torch.log_softmax(s_logits, -1)[0]
    t = t_logp_full[0]
    expected = sum(math.exp(t[v]) * (t[v] - s[v]) for v in (1, 2))
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    # with the rest bucket (default): tokens 0 and 3 as one more bucket on both sides
    with_rest, _ = offpolicy_token_loss(s_logits, idx, t_logp, torch.tensor([1]))
    t_rest, s_rest = t[[0, 3]].exp().sum(), s[[0, 3]].exp().sum()
    rest_term = t_rest * (t_rest.log() - s_rest.log())
    assert with_rest.item() == pytest.approx(float(expected + rest_term), rel=1e-5)
    assert stats["teacher_topk_mass"].item() == pytest.approx(float(t[1].exp() + t[2].exp()), rel=1e-5)
    assert stats["student_topk_mass"].item() == pytest.approx(float(s[1].exp() + s[2].exp()), rel=1e-5)
    # renormalised over the slots: the KL between the two renormalised 2-point distributions
    loss_r, _ = offpolicy_token_loss(s_logits, idx, t_logp, torch.tensor([1]), renormalize=True)
    pr, qr = torch.softmax(t_logits[0, [1, 2]], -1), torch.softmax(s_logits[0, [1, 2]], -1)
    assert loss_r.item() == pytest.approx(float((pr * (pr.log() - qr.log())).sum()), rel=1e-5)
    # equal distributions on the slots: zero
    same, _ = offpolicy_token_loss(t_logits, idx, t_logp, torch.tensor([1]))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_sft_is_token_nll_and_has_the_right_gradient() -> None:
    s_logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 0]])
    t_logp = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.2]]))
    tokens = torch.tensor([1, 2])
    loss, stats = offpolicy_token_loss(s_logits, ids, t_logp, tokens, objective="sft",
                                       temperature=0.5)  # SFT ignores the temperature
    expected = [-(1.0 - math.log(math.exp(2) + math.exp(1) + 1)), math.log(3)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert stats["nll"].tolist() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()
    p0 = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    assert s_logits.grad[0].tolist() == pytest.approx((p0 - torch.tensor([0.0, 1.0, 0.0])).tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="fkl"):
        offpolicy_token_loss(s_logits, ids, t_logp, tokens, objective="rkl")


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / RESPONSES_FILE).read_text().splitlines()]


@pytest.mark.parametrize("objective", ["fkl", "sft"])
def test_offpolicy_run_saves_and_reuses_teacher_responses(
    tiny_model_dir: Path, tmp_path: Path, objective: str
) -> None:
    common = {"method": "offpolicy"}
    sections = {"train": {"steps": 2, "batch_size": 4}, "loss": {"top_k": 5},
                "offpolicy": {"loss": objective}, "run": {"save_every": 1}}
    cfg = {**tiny_config(tiny_model_dir, tmp_path / "a", **sections), **common}
    res = train(cfg, progress=False)
    run = res.run_dir
    recs = _records(run)
    assert recs[0]["opcd_offpolicy"] == 1
    body = recs[1:]
    assert len(body) == 8 and {r["group"] for r in body} == {1, 2}  # 9 train prompts, 4 a step
    for r in body:
        assert len(r["topk_ids"]) == len(r["ids"]) == len(r["topk_logprobs"])
        assert all(len(row) == 5 for row in r["topk_ids"])
        assert all(row == sorted(row, reverse=True) for row in r["topk_logprobs"])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["type"] == "train"]
    assert [m["generated"] for m in steps] == [4, 4]
    assert all(m["forward_kl"] >= 0 and math.isfinite(m["loss"]) for m in steps)
    before, after = weights(tiny_model_dir), weights(run / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # Three more steps on resume: step 3 reaches the ninth prompt (new) and the second epoch
    # (saved responses reused), and the file's records are read, not regenerated.
    cfg["train"]["steps"] = 4
    more = train(cfg, resume=True, progress=False)
    steps = [m for m in more.history if m["step"] > 2]
    assert [m["generated"] + m["reused"] for m in steps] == [4, 4]
    assert steps[0]["generated"] == 1 and steps[1]["generated"] == 0
    again = _records(run)
    assert again[: len(recs)] == recs and len(again) == len(recs) + 1

    # the same four steps in one go give the same weights (responses, RNG and data order)
    cfg_b = {**tiny_config(tiny_model_dir, tmp_path / "b", **sections), **common}
    cfg_b["train"]["steps"] = 4
    whole = train(cfg_b, progress=False)
    wa, wb = weights(more.final_model), weights(whole.final_model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _records(whole.run_dir)[1:] == again[1:]


def test_offpolicy_torn_group_is_regenerated_identically(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = {**tiny_config(tiny_model_dir, tmp_path, train={"steps": 1}, loss={"top_k": 3}),
           "method": "offpolicy"}
    res = train(cfg, progress=False)
    path = res.run_dir / RESPONSES_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a crash mid-group
    cfg["train"]["steps"] = 1
    trainer = Trainer(config_from_dict(cfg), progress=False)
    assert trainer.parts is not None and isinstance(trainer.parts.sampler, StoredResponses)
    store = trainer.parts.sampler.open(res.run_dir)
    assert store.responses == {}  # the torn group is not used
    out, generated = trainer.parts.sampler.responses(trainer.order.take(4))
    assert generated == 4
    assert path.read_text().splitlines() == lines


def test_offpolicy_refuses_a_live_teacher() -> None:
    with pytest.raises(ConfigError, match="teacher.mode=live is not supported by method=offpolicy"):
        config_from_dict({"method": "offpolicy", "teacher": {"mode": "live"}})
    with pytest.raises(ConfigError, match="offpolicy.loss"):
        config_from_dict({"offpolicy": {"loss": "kl"}})


def test_chunked_loss_equals_the_whole_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict({**tiny_config(tiny_model_dir, tmp_path, loss={"top_k": 4},
                                          perf={"loss_chunk_tokens": 3}), "method": "offpolicy"})
    trainer = Trainer(cfg, progress=False)
    assert trainer.parts is not None and isinstance(trainer.parts.objective, OffPolicyObjective)
    torch.manual_seed(0)
    hidden = torch.randn(7, 32)
    V = trainer.student.get_output_embeddings().weight.shape[0]
    t_ids = torch.stack([torch.randperm(V)[:4] for _ in range(7)])
    t_logp = torch.log_softmax(torch.randn(7, 4), -1) - 0.5
    tokens = t_ids[:, 0]
    w = torch.full((7,), 1 / 7)
    results = []
    for chunked in (True, False):
        trainer.cfg.perf.chunked_loss = chunked
        h = hidden.clone().requires_grad_(True)
        loss, stats = trainer.parts.objective.chunk_loss(h, t_ids, t_logp, tokens, w)
        loss.backward()
        results.append((loss.detach(), h.grad, stats))
    (l1, g1, s1), (l2, g2, s2) = results
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) and s1[k].shape == (7,) for k in s1)
