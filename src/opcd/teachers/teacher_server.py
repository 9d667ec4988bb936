"""A teacher behind a vLLM server (``teacher.mode=server``), for teachers too large to hold
next to the student.

Each row (the teacher's prompt, i.e. context + prompt, followed by the student's response)
goes to the server's OpenAI-compatible completions endpoint as token ids, with vLLM's
``prompt_logprobs`` parameter: the server returns, for every prompt position, the log-prob of
the token actually there and of its ``top_k`` most likely tokens. opcd keeps those of the
response positions: the teacher's log-prob of each sampled token and its top-k
(:class:`SparseScores`). That is enough for two objectives, computed exactly:

- ``loss.objective=sampled_token``: needs only ``log p_t(y_t)``;
- ``loss.objective=forward_kl`` over the *teacher's* top-k slots.

The reverse KL and JSD over the student's top-k need the teacher's log-probs at the
student's slots, which the server does not return: they are refused at start.

What is given up against the in-process teacher (docs/scale.md): vLLM does not use its
prefix cache when prompt log-probs are requested, so every row's context is recomputed on
the server (the in-process teacher reads it once per run); the server returns at most its
``--max-logprobs`` (20 by default) per position; and its log-probs are of the raw model
output, so the rollout temperature must be 1.0. Written and tested against a stand-in
server that follows vLLM's response format (``tests/test_teacher_server.py``), not against
vLLM itself.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opcd.errors import OpcdError


class TeacherServerError(OpcdError):
    """The teacher server could not be reached or answered something unusable."""


@dataclass
class SparseScores:
    """The teacher's scores of one response (R tokens)."""

    sampled: Tensor
    """``[R]`` log p_t of each response token."""
    top_ids: Tensor
    """``[R, k]`` the teacher's k most likely token ids at each position (long)."""
    top_logp: Tensor
    """``[R, k]`` their log-probs (full-vocabulary normalised)."""


class ServerTeacher:
    """Scores rows through a vLLM server (see the module docstring)."""

    mode = "server"

    def __init__(self, url: str, model: str, top_k: int = 20, timeout_s: float = 300.0,
                 concurrency: int = 8) -> None:
        self.url = url.rstrip("/") + "/completions"
        self.model, self.top_k, self.timeout_s = model, top_k, timeout_s
        self.concurrency = max(1, concurrency)

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[SparseScores]:
        """The teacher's :class:`SparseScores` of each ``prompt + response`` row."""
        rows = list(zip(prompts, responses, strict=True))
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda pr: self._score_row(*pr), rows))

    def _score_row(self, prompt: list[int], response: list[int]) -> SparseScores:
        if not response:
            empty = torch.zeros((0, self.top_k))
            return SparseScores(torch.zeros(0), empty.long(), empty)
        body = {"model": self.model, "prompt": list(prompt) + list(response), "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": self.top_k}
        reply = self._post(body)
        try:
            per_position = reply["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise TeacherServerError(
                f"the teacher server at {self.url} answered without choices[0].prompt_logprobs "
                "(is it a vLLM server? Other OpenAI-compatible servers do not return prompt "
                "log-probs)."
            ) from None
        if not isinstance(per_position, list) or len(per_position) != len(prompt) + len(response):
            raise TeacherServerError(
                f"the teacher server at {self.url} returned prompt log-probs for "
                f"{len(per_position) if isinstance(per_position, list) else 'no'} positions, "
                f"expected {len(prompt) + len(response)}: does it serve a model with the "
                "student's tokenizer?"
            )
        return self._parse(per_position[len(prompt):], response)

    def _parse(self, entries: list[Any], response: list[int]) -> SparseScores:
        k = self.top_k
        sampled, ids, logps = [], [], []
        for token, entry in zip(response, entries, strict=True):
            if not isinstance(entry, dict) or str(token) not in entry:
                raise TeacherServerError(
                    f"the teacher server at {self.url} gave no log-prob for response token "
                    f"{token}: its answer does not follow vLLM's prompt_logprobs format."
                )
            sampled.append(float(entry[str(token)]["logprob"]))
            ranked = sorted(((int(v["rank"]), int(t), float(v["logprob"])) for t, v in entry.items()
                             if int(v["rank"]) <= k))
            if len(ranked) < k:
                raise TeacherServerError(
                    f"the teacher server at {self.url} returned {len(ranked)} top log-probs per "
                    f"position, fewer than teacher.server_top_k={k}: start vLLM with "
                    f"--max-logprobs {k} (or more), or lower teacher.server_top_k."
                )
            ids.append([t for _, t, _ in ranked[:k]])
            logps.append([lp for _, _, lp in ranked[:k]])
        return SparseScores(torch.tensor(sampled), torch.tensor(ids, dtype=torch.long),
                            torch.tensor(logps))

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise TeacherServerError(
                f"the teacher server at {self.url} refused a scoring request (HTTP {e.code}: "
                f"{detail}). Check teacher.server_model={self.model!r} is the name it serves."
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise TeacherServerError(
                f"the teacher server at {self.url} cannot be reached ({e}). Start it (e.g. "
                f"`vllm serve MODEL --max-logprobs {self.top_k}`) or fix teacher.server_url."
            ) from None
        except json.JSONDecodeError:
            raise TeacherServerError(f"the teacher server at {self.url} answered with invalid JSON") from None


def server_token_loss(student_logits: Tensor, scores: SparseScores, sampled: Tensor, *,
                      objective: str, renormalize: bool, tail: bool = True) -> Any:
    """Per-token :class:`opcd.objectives.losses.TokenLoss` of the student's ``[N, V]`` logits against the
    server teacher's sparse scores of the same N tokens (temperature 1)."""
    from opcd.objectives import losses

    if objective == "sampled_token":
        s_logp = torch.log_softmax(student_logits.float(), dim=-1)
        return losses.sampled_token_record(s_logp, scores.sampled.to(s_logp.device), sampled)
    device = student_logits.device
    return losses.sparse_teacher_loss(student_logits, scores.top_ids.to(device),
                                      scores.top_logp.to(device), renormalize=renormalize, tail=tail)


def cat_scores(parts: list[SparseScores]) -> SparseScores:
    """One :class:`SparseScores` of the rows' tokens in order."""
    return SparseScores(torch.cat([p.sampled for p in parts]), torch.cat([p.top_ids for p in parts]),
                        torch.cat([p.top_logp for p in parts]))
