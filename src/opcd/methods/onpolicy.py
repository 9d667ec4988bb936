"""OPCD's three parts (arXiv 2602.12275): the student samples, the teacher reads, the divergence.

Where it sits: :func:`opcd_method` builds the :class:`opcd.training.method.Method` that
:meth:`opcd.training.trainer.Trainer.train_step` runs for ``method: opcd``:

1. :class:`StudentSampler`: the student samples ``rollout.n`` responses y to prompts x
   alone, without the context (any rollout backend; for games, whole episodes);
2. :class:`TeacherScorer`: the teacher reads c + x + the student's exact tokens y, for the
   whole step at once (a server's sparse scores, or the local teacher's response hidden
   states with shared context prefixes read once), or per micro-batch;
3. :class:`DistillObjective`: ``loss.objective`` per token (default forward KL over the
   union of the student's and the teacher's top-k plus the rest of the vocabulary,
   :mod:`opcd.objectives.losses`), normalised over the whole batch's tokens, the output head chunked
   with ``perf.chunked_loss``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from opcd.objectives import losses
from opcd.runtime.distributed import Dist
from opcd.runtime.sharding import gathered
from opcd.sampling.multiturn import EpisodeRollout, is_multiturn, play_for_training
from opcd.tasks.base import derive_seed
from opcd.teachers.scoring import linear_head, pack, response_hidden, response_logits
from opcd.teachers.teacher_server import ServerTeacher, cat_scores, server_token_loss
from opcd.training.method import Host, Method, Rows, Targets, Totals


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at ``position`` in the global batch of step ``step + 1``.

    Fixed by the run's seed and the prompt's place in the run, never by the process or
    micro-batch that samples it (see :mod:`opcd.runtime.distributed`).
    """
    return derive_seed("rollout", seed, step, position)


def episode_figures(dist: Dist, played: EpisodeRollout) -> dict[str, float]:
    """Success rate, moves and invalid moves of a step's episodes (all processes)."""
    eps, n = played.episodes, len(played.episodes)
    return dist.global_figures(
        {"episode_success": (sum(e.success for e in eps), n), "episode_moves": (sum(e.moves for e in eps), n)},
        counts={"invalid_moves": sum(e.invalid_moves for e in eps), "trained_turns": len(played.pairs)})


class StudentSampler:
    """The student's responses to this process's share of the step's prompts (games: every
    reply of whole episodes it plays), without the context."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def sample(self, idx: list[int]) -> Rows:
        h = self.host
        r = h.cfg.rollout
        mine = h.dist.shard(len(idx))  # this process's positions in the global batch
        # FSDP: the student's weights whole while it samples (a no-op without FSDP, or when
        # the backend samples from its own copy).
        sampling = contextlib.nullcontext() if h.backend.own_weights else gathered(h.student)
        if is_multiturn(h.task):
            with sampling:
                played = play_for_training(
                    h.student, h.tokenizer, h.task, [h.train_examples[idx[i]] for i in mine],
                    mine, seed=h.cfg.train.seed, step=h.step, n=r.n, temperature=r.temperature,
                    top_p=r.top_p, max_new_tokens=r.max_new_tokens, batch_size=r.batch_size,
                    max_prompt_tokens=h.max_prompt_tokens, truncate=r.truncate_prompts,
                    backend=h.backend,
                )
            return Rows(played.pairs, played.rollout, episode_figures(h.dist, played), played=played,
                        problems=[h.train_examples[idx[i]] for i in mine])
        pairs = h.prompt_pairs([idx[i] for i in mine], list(mine))
        with sampling:
            roll = h.backend.sample(
                [p.student_ids for p in pairs], n=r.n, temperature=r.temperature, top_p=r.top_p,
                max_new_tokens=r.max_new_tokens,
                seeds=[rollout_seed(h.cfg.train.seed, h.step, i) for i in mine],
            )
        return Rows(pairs, roll)


class TeacherScorer:
    """The teacher's reading of every row, with the context, for the whole step at once: a
    server teacher's sparse scores, or the local teacher's response hidden states (each
    shared context prefix read once with perf.prefix_cache). Without either setting the
    teacher's logits are computed per micro-batch by :class:`DistillObjective`."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def score(self, rows: Rows) -> Targets:
        h = self.host
        perf, t0 = h.cfg.perf, time.perf_counter()
        teacher_ids = [rows.pairs[i].teacher_ids for i in rows.roll.prompt_index]
        if isinstance(h.teacher, ServerTeacher):
            return Targets(sparse=h.teacher.score(teacher_ids, rows.responses),
                           seconds=time.perf_counter() - t0)
        if perf.prefix_cache or perf.chunked_loss:
            hidden = h.teacher.response_hidden(
                teacher_ids, rows.responses, h.pad_id, prefix_cache=perf.prefix_cache,
                batch_size=perf.teacher_batch_size, block=perf.prefix_block_tokens,
                cache_tokens=perf.prefix_cache_tokens)
            return Targets(hidden=hidden, seconds=time.perf_counter() - t0)
        return Targets()


class DistillObjective:
    """``loss.objective`` on one micro-batch: the student reads its rows without the context;
    its loss (normalised over the global batch, times ``weight``) and per-token figures."""

    figures = ("reverse_kl", "student_entropy", "student_topk_mass", "teacher_topk_mass")

    def __init__(self, host: Host) -> None:
        self.host = host

    def loss(self, rows: Rows, targets: Targets, sl: slice, totals: Totals, weight: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, tl = self._loss(rows, targets, sl, totals, weight)
        return loss, {"reverse_kl": tl.kl, "student_entropy": tl.student_entropy,
                      "student_topk_mass": tl.student_topk_mass,
                      "teacher_topk_mass": tl.teacher_topk_mass}

    def _loss(self, rows: Rows, targets: Targets, sl: slice, totals: Totals, weight: float
              ) -> tuple[torch.Tensor, losses.TokenLoss]:
        h = self.host
        cfg, perf = h.cfg, h.cfg.perf
        total_tokens, total_seqs = totals[0], totals[1]
        prompt_of = rows.roll.prompt_index[sl]
        sb = pack([rows.pairs[i].student_ids for i in prompt_of], rows.responses[sl], h.pad_id,
                  device=h.device)
        mask = sb.response_mask
        if targets.sparse is not None:  # a server teacher's top-k
            tl = server_token_loss(response_logits(h.student, sb)[mask], cat_scores(targets.sparse[sl]),
                                   sb.response_ids[mask], objective=cfg.loss.objective,
                                   renormalize=cfg.loss.renormalize, tail=cfg.loss.tail)
            return self._reduced(tl, mask, total_tokens, total_seqs) * weight, tl
        if perf.chunked_loss:  # logits of both models exist only loss_chunk_tokens at a time
            s_hidden = response_hidden(h.student, sb)[mask]
            s_head = h.student.get_output_embeddings()  # read after the forward (FSDP)
            s_lin = linear_head(s_head)
            t_head, t_bias = h.teacher.head()
            weights = losses.reduction_weights(
                mask, cfg.loss.reduction, total_tokens=total_tokens, total_sequences=total_seqs) * weight
            return losses.chunked_distill_loss(
                s_hidden, s_lin[0] if s_lin else s_head,
                torch.cat(targets.hidden[sl]).to(h.device), t_head, weights[mask],
                student_bias=s_lin[1] if s_lin else None, teacher_bias=t_bias,
                sampled=sb.response_ids[mask], **self._chunk_settings(),
                chunk_size=perf.loss_chunk_tokens)
        tt = time.perf_counter()
        if targets.hidden is not None:  # perf.prefix_cache: the teacher's hidden states, read once
            t_hidden = torch.zeros((*mask.shape, targets.hidden[0].shape[-1]),
                                   dtype=targets.hidden[0].dtype, device=h.device)
            t_hidden[mask] = torch.cat(targets.hidden[sl]).to(h.device)
            teacher_logits = h.teacher.logits_from_hidden(t_hidden)
            del t_hidden
        else:
            tb = pack([rows.pairs[i].teacher_ids for i in prompt_of], rows.responses[sl], h.pad_id,
                      device=h.device)
            teacher_logits = h.teacher.response_logits(tb)
        targets.seconds += time.perf_counter() - tt
        t_flat = teacher_logits[mask]
        del teacher_logits
        tl = self.token_loss(response_logits(h.student, sb)[mask], t_flat, sb.response_ids[mask])
        return self._reduced(tl, mask, total_tokens, total_seqs) * weight, tl

    def _reduced(self, tl: losses.TokenLoss, mask: torch.Tensor, total_tokens: float,
                 total_sequences: float) -> torch.Tensor:
        """The micro-batch's share of the batch loss from its per-token losses
        (``loss.reduction`` over the whole global batch's token / sequence counts)."""
        per_token = torch.zeros(mask.shape, dtype=tl.loss.dtype, device=mask.device)
        per_token[mask] = tl.loss
        return losses.reduce_token_loss(per_token, mask, self.host.cfg.loss.reduction,
                                        total_tokens=total_tokens, total_sequences=total_sequences)

    def _chunk_settings(self) -> dict[str, Any]:
        """The objective for :func:`opcd.objectives.losses.chunked_distill_loss`: the built-in slot
        objectives by their settings (it then computes them in place), else :meth:`token_loss`."""
        if self.host.cfg.loss.objective == "sampled_token":
            return {"token_loss": self.token_loss}
        return self._slot_settings()

    def _slot_settings(self) -> dict[str, Any]:
        """:func:`opcd.objectives.losses.distill_token_loss`'s settings from the config."""
        cfg = self.host.cfg
        lc = cfg.loss
        return {"objective": lc.objective, "k": lc.top_k, "temperature": cfg.rollout.temperature,
                "renormalize": lc.renormalize, "slot_source": "union" if lc.union else "student",
                "beta": lc.beta, "tail": lc.tail}

    def token_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   sampled: torch.Tensor) -> losses.TokenLoss:
        """The per-token objective of the student's and the teacher's logits at N positions."""
        T = self.host.cfg.rollout.temperature
        if self.host.cfg.loss.objective != "sampled_token":
            return losses.distill_token_loss(student_logits, teacher_logits, **self._slot_settings())
        s_logp = losses.temperature_log_softmax(student_logits, T)
        with torch.no_grad():
            t_logp = losses.temperature_log_softmax(teacher_logits, T)
        t_tok = t_logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        return losses.sampled_token_record(s_logp, t_tok, sampled)


def format_step(m: dict[str, Any]) -> str:
    """The terminal line of an OPCD step's record."""
    return (
        f"step {m['step']:>4} | loss {m['loss']:.4f} | rKL {m['reverse_kl']:.4f} | "
        f"H {m['student_entropy']:.3f} | top-k mass s {m['student_topk_mass']:.3f} "
        f"t {m['teacher_topk_mass']:.3f} | len {m['response_len']:.1f} | "
        f"rollout {m['time_rollout']:.1f}s teacher {m['time_teacher']:.1f}s "
        f"update {m['time_update']:.1f}s | {m['tokens_per_s']:.1f} tok/s"
    )


def postfix(m: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures for an OPCD step."""
    return {"loss": f"{m['loss']:.4f}", "rkl": f"{m['reverse_kl']:.4f}",
            "tok_s": f"{m['tokens_per_s']:.1f}"}


def opcd_method(host: Host) -> Method:
    """OPCD as the parts :meth:`opcd.training.trainer.Trainer.train_step` composes."""
    return Method(StudentSampler(host), TeacherScorer(host), DistillObjective(host),
                  format_step, postfix)
