"""The teacher behind a server (opcd.teachers.teacher_server), against a stand-in server that answers
in vLLM's ``prompt_logprobs`` format with a real (tiny) model: the scores equal the model's own
log-probs, a sampled-token OPCD run through the server takes the steps of the in-process
frozen teacher, and a bad server or setting gives a clear error."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import sum_tolerance
from test_trainer import tiny_config, weights

from opcd.config import config_from_dict
from opcd.errors import ConfigError
from opcd.teachers.teacher_server import (
    ServerTeacher,
    SparseScores,
    TeacherServerError,
    server_token_loss,
)
from opcd.training.loop import train


class _StandIn:
    """A vLLM-like completions endpoint scoring prompts with ``model``."""

    def __init__(self, model: Any, max_logprobs: int = 20) -> None:
        self.model, self.max_logprobs, self.requests = model, max_logprobs, 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests += 1
                if self.path != "/v1/completions" or body.get("model") != "tiny":
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "model not found"}')
                    return
                answer = json.dumps(stand_in.answer(body["prompt"], body["prompt_logprobs"])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @torch.no_grad()
    def answer(self, ids: list[int], k: int) -> dict[str, Any]:
        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
        k = min(k, self.max_logprobs)
        out: list[Any] = [None]
        for pos in range(1, len(ids)):
            row = logp[pos - 1]
            order = torch.argsort(row, descending=True)
            entry = {str(int(t)): {"logprob": float(row[t]), "rank": r + 1, "decoded_token": "x"}
                     for r, t in enumerate(order[:k])}
            tok = ids[pos]
            rank = int((order == tok).nonzero()[0, 0]) + 1
            entry[str(tok)] = {"logprob": float(row[tok]), "rank": rank, "decoded_token": "x"}
            out.append(entry)
        return {"choices": [{"text": "", "prompt_logprobs": out}]}


@pytest.fixture
def stand_in(tiny: Any) -> Iterator[_StandIn]:
    s = _StandIn(tiny[0])
    yield s
    s.server.shutdown()


def test_scores_are_the_model_log_probs(stand_in: _StandIn, tiny: Any) -> None:
    model, _ = tiny
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    got = ServerTeacher(stand_in.url, "tiny", top_k=4).score(prompts, responses)
    for p, r, s in zip(prompts, responses, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
        want = logp[len(p) - 1 : len(p) + len(r) - 1]
        assert torch.allclose(s.sampled, want.gather(-1, torch.tensor(r)[:, None])[:, 0], atol=1e-5)
        top = want.topk(4, dim=-1)
        assert torch.equal(s.top_ids, top.indices)
        assert torch.allclose(s.top_logp, top.values, atol=1e-5)
    assert ServerTeacher(stand_in.url, "tiny").score([[1, 2]], [[]])[0].sampled.numel() == 0


def test_server_losses_on_hand_made_scores() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], requires_grad=True)
    s_logp = torch.log_softmax(logits.detach(), -1)
    scores = SparseScores(sampled=torch.tensor([-0.5]), top_ids=torch.tensor([[0, 3]]),
                          top_logp=torch.tensor([[-0.3, -1.5]]))
    tl = server_token_loss(logits, scores, torch.tensor([3]), objective="forward_kl",
                           renormalize=False, tail=False)
    want = sum(torch.tensor(t).exp() * (t - s_logp[0, i]) for i, t in ((0, -0.3), (3, -1.5)))
    assert float(tl.loss[0].detach()) == pytest.approx(float(want), abs=1e-6)
    # the default adds the rest bucket: tokens 1 and 2 for the student, 1 - top-2 for the teacher
    tl = server_token_loss(logits, scores, torch.tensor([3]), objective="forward_kl",
                           renormalize=False)
    t_rest = 1 - math.exp(-0.3) - math.exp(-1.5)
    s_rest = float(s_logp[0, 1].exp() + s_logp[0, 2].exp())
    with_rest = float(want) + t_rest * (math.log(t_rest) - math.log(s_rest))
    assert float(tl.loss[0].detach()) == pytest.approx(with_rest, abs=1e-6)
    st = server_token_loss(logits, scores, torch.tensor([3]), objective="sampled_token", renormalize=False)
    assert float(st.kl[0]) == pytest.approx(float(s_logp[0, 3]) + 0.5, abs=1e-6)
    st.loss.sum().backward()  # -A * d log p_s(y): A = -0.5 - log p_s(3)
    adv = -0.5 - float(s_logp[0, 3])
    onehot = torch.nn.functional.one_hot(torch.tensor(3), 4).float()
    assert torch.allclose(logits.grad[0], -adv * (onehot - s_logp[0].exp()), atol=1e-6)


def test_server_errors_name_the_fix(stand_in: _StandIn) -> None:
    with pytest.raises(TeacherServerError, match="cannot be reached.*teacher.server_url"):
        ServerTeacher("http://127.0.0.1:9/v1", "tiny", timeout_s=5).score([[1]], [[2]])
    with pytest.raises(TeacherServerError, match="HTTP 404.*server_model='other'"):
        ServerTeacher(stand_in.url, "other").score([[1]], [[2]])
    stand_in.max_logprobs = 3
    with pytest.raises(TeacherServerError, match="--max-logprobs 8"):
        ServerTeacher(stand_in.url, "tiny", top_k=8).score([[1]], [[2]])


def test_settings_a_server_teacher_cannot_honour(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_config(tiny_model_dir, tmp_path)
    ok = ["teacher.mode=server", "teacher.server_url=http://h:8000/v1", "teacher.server_model=m",
          "loss.objective=sampled_token"]
    config_from_dict(base, ok)
    for extra, message in ((["loss.objective=reverse_kl"], "loss.objective=reverse_kl needs"),
                           (["loss.objective=forward_kl", "loss.union=true"], "loss.union=false"),
                           (["rollout.temperature=0.7"], "rollout.temperature=1.0"),
                           (["teacher.server_top_k=0"], "teacher.server_top_k=0")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(base, ok + extra)
    with pytest.raises(ConfigError, match="needs teacher.server_url"):
        config_from_dict(base, ["teacher.mode=server", "loss.objective=sampled_token"])
    with pytest.raises(ConfigError, match="set teacher.mode=server"):
        config_from_dict(base, ["teacher.server_url=http://h:8000/v1"])


def test_a_run_through_the_server_equals_the_frozen_teacher(
    stand_in: _StandIn, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The stand-in serves the initial student, as the frozen teacher is: same steps."""
    common = {"loss": {"objective": "sampled_token"}, "train": {"steps": 2, "lr": 1e-2}}
    local = train(tiny_config(tiny_model_dir, tmp_path / "local", **common), progress=False)
    served = train(tiny_config(
        tiny_model_dir, tmp_path / "served", **common,
        teacher={"mode": "server", "server_url": stand_in.url, "server_model": "tiny"},
    ), progress=False)
    # Same samples, same losses and gradient norms step by step (the teacher's log-probs differ
    # in the last float bits: one unpadded row per request against padded batches; AdamW's
    # first steps turn such bits of near-zero gradients into visible weight differences, so
    # the weights are not compared).
    assert len(local.history) == len(served.history) == 2
    for x, y in zip(local.history, served.history, strict=True):
        assert x["sample"] == y["sample"] and x["response_len"] == y["response_len"]
        # loss and KL: per-token log-prob differences of the entropy's scale, near 0 at start
        tol = sum_tolerance(x["student_entropy"])
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=tol), key
    assert local.history[1]["loss"] != pytest.approx(local.history[0]["loss"], rel=1e-2)
    start, a = weights(tiny_model_dir), weights(served.final_model)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # it trained
    assert stand_in.requests >= 8  # every row of both steps was scored by the server
    fkl = train(tiny_config(
        tiny_model_dir, tmp_path / "fkl", loss={"objective": "forward_kl", "union": False},
        train={"steps": 1},
        teacher={"mode": "server", "server_url": stand_in.url, "server_model": "tiny",
                 "server_top_k": 5},
    ), progress=False)
    assert len(fkl.history) == 1 and math.isfinite(fkl.history[0]["loss"])
    assert fkl.history[0]["teacher_topk_mass"] > 0  # the 5 served slots carry the teacher's mass
