"""Off-policy context distillation, the paper's baseline: ``opcd train CONFIG method=offpolicy``.

The teacher (the frozen initial student, or ``teacher.mode=model``) reads the context c and
*generates* the responses, sampled with the rollout settings; the student is trained on
those fixed trajectories *without* c, by

- ``offpolicy.loss: fkl``: forward KL over the teacher's top-k (``loss.top_k``) at every
  position, ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` (:func:`opcd.objectives.losses.slot_divergence`
  on the slots :func:`opcd.objectives.losses.select_slots` gives for ``source="teacher"``), at the
  rollout temperature, renormalised over the slots when ``loss.renormalize``;
- ``offpolicy.loss: sft``: the token negative log-likelihood of the teacher's tokens
  (temperature 1: plain SFT / "seqkd").

Same steps, learning rate and prompts as OPCD (the same :class:`~opcd.training.trainer.DataOrder`),
and the same step: :func:`offpolicy_method` gives :class:`opcd.training.trainer.Trainer` a sampler
that reads the teacher's responses (:class:`StoredResponses`), a scorer that reads their
stored top-k (:class:`StoredTargets`) and the objective (:class:`OffPolicyObjective`), so
the update, logging, evaluation, checkpoints and exact resume are OPCD's.

Teacher responses are generated when a prompt is first drawn and appended to
``teacher_responses.jsonl`` in the run folder: per response its token ids and, per position,
the teacher's top-k token ids and log-probs. Response j of an example is sampled with its
own generator seeded from (``train.seed``, the example's id, j), whichever step first draws
it and whichever process generates it (with opcd's decode loop; a teacher that needs HF
``generate`` seeds per batch, so there the batch layout matters, see
:func:`opcd.sampling.rollout.sample`). Each step's new responses are one group, written as
one fsynced write by the main process; later epochs and resumed runs read them back (a
group torn by a crash is dropped and regenerated identically), so a resumed run equals an
uninterrupted one and the training RNG never depends on what was cached.

Data parallel (accelerate / torchrun): each process trains on its share of the step's
prompts (``Dist.shard``) and generates its share of the step's missing responses; the new
records are gathered so that every process holds the whole store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opcd.errors import ConfigError
from opcd.objectives import losses
from opcd.runtime import checkpoint as ckpt
from opcd.runtime.jsonl import HeaderMismatch, JsonlFile
from opcd.sampling import rollout
from opcd.sampling.rollout import Rollout
from opcd.tasks.base import derive_seed
from opcd.teachers.scoring import PrefixStore, pack, response_hidden
from opcd.training.method import Host, Method, Rows, Targets, Totals

RESPONSES_FILE = "teacher_responses.jsonl"


# --------------------------------------------------------------------------- the objectives
def offpolicy_token_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    tokens: Tensor,
    *,
    objective: str = "fkl",
    temperature: float = 1.0,
    renormalize: bool = False,
    tail: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss ``[N]`` and detached diagnostics.

    Args:
        student_logits: ``[N, V]`` student logits at the response positions (no context).
        teacher_ids, teacher_logp: ``[N, k]`` the teacher's top-k token ids and their
            log-probs (temperature-scaled, full-vocabulary normalised), as stored.
        tokens: ``[N]`` the teacher's sampled tokens.
        objective: ``fkl`` (forward KL over the k slots and, with ``tail``, the rest of the
            vocabulary as one bucket) or ``sft`` (``-log p_s(token)``).
    """
    if objective not in ("fkl", "sft"):
        raise ValueError(f"objective must be 'fkl' or 'sft', got {objective!r}")
    tl = losses.sparse_teacher_loss(student_logits, teacher_ids, teacher_logp,
                                    temperature=temperature, renormalize=renormalize, tail=tail)
    plain = torch.log_softmax(student_logits.float(), dim=-1)
    nll = -plain.gather(-1, tokens[:, None])[:, 0]
    loss = tl.loss if objective == "fkl" else nll
    stats = {"forward_kl": tl.loss.detach(), "nll": nll.detach(),
             "student_topk_mass": tl.student_topk_mass, "teacher_topk_mass": tl.teacher_topk_mass,
             "student_entropy": tl.student_entropy}
    return loss, stats


# --------------------------------------------------------------------------- the store
class ResponseStore:
    """``teacher_responses.jsonl``: a settings header, then one record per teacher response.

    A record: ``example`` (id), ``sample`` (0..n-1), ``group`` (the step that generated it)
    and ``group_size``, ``ids`` (response tokens), ``truncated``, ``text``, ``topk_ids`` and
    ``topk_logprobs`` (one list of k per response token). Only complete groups are read.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.responses: dict[tuple[str, int], dict[str, Any]] = {}
        self.file = JsonlFile(path, kind="opcd_offpolicy", settings=settings,
                              on_write_error=lambda e: ckpt.write_error(RESPONSES_FILE, path.parent, e))

    def load(self) -> None:
        try:
            found = self.file.load()
        except HeaderMismatch:
            raise ConfigError(
                f"{str(self.path)!r} holds teacher responses of other settings (model, teacher, "
                "context, rollout or loss.top_k). Use another run.dir or --overwrite."
            ) from None
        except OSError as e:
            raise ConfigError(f"{str(self.path)!r} cannot be read ({e}).") from None
        groups: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for line, rec in found:
            groups.setdefault(int(rec.get("group", -1)), []).append((line, rec))
        keep = [json.dumps(self.file.header())]
        for members in groups.values():
            if len(members) == members[0][1].get("group_size"):
                for line, rec in members:
                    keep.append(line)
                    self.responses[(rec["example"], int(rec["sample"]))] = rec
        if len(keep) != len(found) + 1:
            self.file.rewrite(keep)  # torn groups go: they are regenerated, identically

    def add_group(self, recs: list[dict[str, Any]], write: bool = True) -> None:
        """Hold ``recs``; append them to the file as one write when ``write`` (the main
        process: the others hold the same records)."""
        if write:
            self.file.append(recs)
        for rec in recs:
            self.responses[(rec["example"], int(rec["sample"]))] = rec


# --------------------------------------------------------------------------- the parts
class StoredResponses:
    """The sampler: the teacher's responses (with the context) to this step's prompts, read
    from the store, the missing ones generated as this step's group and stored."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.store: ResponseStore | None = None

    def open(self, run_dir: Path) -> ResponseStore:
        """The run folder's ``teacher_responses.jsonl``, read (torn groups dropped)."""
        h = self.host
        cfg = h.cfg
        settings = json.loads(json.dumps({
            "model": cfg.model, "teacher": vars(cfg.teacher), "task": vars(cfg.task),
            "rollout": vars(cfg.rollout), "top_k": cfg.loss.top_k, "seed": cfg.train.seed,
            "context_sha256": hashlib.sha256(
                "\x1f".join(str(h.task.context(ex)) for ex in h.train_examples).encode()
            ).hexdigest(),
            "sampling": "per-example seeds",  # files of the per-step seeding are refused
        }))
        self.store = ResponseStore(Path(run_dir) / RESPONSES_FILE, settings)
        self.store.load()
        return self.store

    def sample(self, idx: list[int]) -> Rows:
        h = self.host
        mine = h.dist.shard(len(idx))  # this process's positions in the global batch
        recs, generated = self.responses(idx, mine)
        n = h.cfg.rollout.n
        roll = Rollout(prompt_index=[j // n for j in range(len(recs))],
                       response_ids=[r["ids"] for r in recs], texts=[r["text"] for r in recs],
                       truncated=[bool(r["truncated"]) for r in recs])
        figures = h.dist.global_figures({}, counts={"generated": generated, "reused": len(recs)})
        figures["reused"] -= figures["generated"]
        return Rows(h.prompt_pairs([idx[i] for i in mine], list(mine)), roll, figures, stored=recs)

    def responses(self, idx: list[int], mine: list[int] | None = None
                  ) -> tuple[list[dict[str, Any]], int]:
        """The teacher's responses at positions ``mine`` of ``idx`` (default all;
        prompt-major, ``rollout.n`` each), after generating the step's missing ones as its
        group (each process its share); (records, how many of the group this process generated)."""
        h = self.host
        assert self.store is not None, "open the run folder first"
        n = h.cfg.rollout.n
        mine = list(range(len(idx))) if mine is None else mine
        ids = [h.train_examples[i].id for i in idx]
        missing: list[int] = []  # the same on every process: they hold the same store
        for i, ex_id in zip(idx, ids, strict=True):
            if any((ex_id, s) not in self.store.responses for s in range(n)) and i not in missing:
                missing.append(i)
        generated = 0
        if missing:
            share = missing[h.dist.rank::h.dist.world]
            perf = h.cfg.perf  # the prefix store is checked against the weights before they are gathered
            store = h.teacher.prefix_store(perf.prefix_block_tokens, perf.prefix_cache_tokens) \
                if perf.prefix_cache else None
            with h.teacher.weights.whole():  # FSDP: every process gathers, even with no share
                own = self._generate(share, group=h.step + 1, store=store) if share else []
            generated = len(own)
            order = {h.train_examples[i].id: pos for pos, i in enumerate(missing)}
            group = sorted((r for part in h.dist.gather(own) for r in part),
                           key=lambda r: (order[r["example"]], r["sample"]))
            for rec in group:
                rec["group_size"] = len(group)
            self.store.add_group(group, write=h.dist.is_main)
        out = [self.store.responses[(ids[j], s)] for j in mine for s in range(n)]
        return out, generated

    @torch.no_grad()
    def _generate(self, idx: list[int], group: int, store: PrefixStore | None = None
                  ) -> list[dict[str, Any]]:
        """The teacher's ``rollout.n`` responses to each of ``idx``, with the context, and
        their top-k log-probs (``group_size`` is set by the caller, once the whole group is known).
        ``store``: the teacher's prefix store (checked against its weights by the caller)."""
        h = self.host
        cfg = h.cfg
        T, k = cfg.rollout.temperature, cfg.loss.top_k
        pairs = h.prompt_pairs(idx)
        seeds = [derive_seed("offpolicy", cfg.train.seed, h.train_examples[i].id) for i in idx]
        perf = cfg.perf
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None), \
                h.teacher.weights.scorer() as model:
            roll = rollout.sample(
                model, h.tokenizer, [p.teacher_ids for p in pairs], n=cfg.rollout.n,
                temperature=T, top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                batch_size=cfg.rollout.batch_size, seeds=seeds, share_prefix=perf.prefix_cache,
                prefix_store=store,
            )
        # the teacher's log-probs of its own samples, the shared context read once (perf.prefix_cache)
        hidden = h.teacher.response_hidden(
            [pairs[i].teacher_ids for i in roll.prompt_index], roll.response_ids, h.pad_id,
            prefix_cache=perf.prefix_cache, batch_size=perf.teacher_batch_size,
            block=perf.prefix_block_tokens, cache_tokens=perf.prefix_cache_tokens)
        recs: list[dict[str, Any]] = []
        for r, hid in enumerate(hidden):
            logp = losses.temperature_log_softmax(h.teacher.logits_from_hidden(hid), T)
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            recs.append({
                "example": h.train_examples[idx[roll.prompt_index[r]]].id,
                "sample": r % cfg.rollout.n, "group": group, "group_size": 0,
                "ids": roll.response_ids[r], "truncated": roll.truncated[r], "text": roll.texts[r],
                "topk_ids": top.indices.tolist(),
                "topk_logprobs": top.values.float().cpu().tolist(),
            })
        # what training reads is exactly what a later run reads back from the file
        return [json.loads(json.dumps(rec)) for rec in recs]


class StoredTargets:
    """The scorer: each row's stored top-k token ids and log-probs (read with its response)."""

    def score(self, rows: Rows) -> Targets:
        assert rows.stored is not None
        return Targets(sparse=rows.stored)


class OffPolicyObjective:
    """``offpolicy.loss`` on one micro-batch of stored responses, read by the student without
    the context (:func:`offpolicy_token_loss`), the output head chunked with
    ``perf.chunked_loss``."""

    figures = ("forward_kl", "nll", "student_topk_mass", "teacher_topk_mass", "student_entropy")

    def __init__(self, host: Host) -> None:
        self.host = host

    def loss(self, rows: Rows, targets: Targets, sl: slice, totals: Totals, weight: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.host
        assert targets.sparse is not None
        recs = targets.sparse[sl]
        prompt_of = rows.roll.prompt_index[sl]
        keep = [r for r in range(len(recs)) if recs[r]["ids"]]
        if not keep:  # only empty responses: nothing to learn here
            zero = torch.zeros(0, device=h.device)
            return torch.zeros((), device=h.device, requires_grad=True), dict.fromkeys(self.figures, zero)
        sb = pack([rows.pairs[prompt_of[r]].student_ids for r in keep], [recs[r]["ids"] for r in keep],
                  h.pad_id, device=h.device)
        mask = sb.response_mask
        weights = losses.reduction_weights(
            mask, h.cfg.loss.reduction, total_tokens=totals[0], total_sequences=totals[1])[mask] * weight
        t_ids = torch.tensor([p for r in keep for p in recs[r]["topk_ids"]], dtype=torch.long,
                             device=h.device)
        t_logp = torch.tensor([p for r in keep for p in recs[r]["topk_logprobs"]],
                              dtype=torch.float32, device=h.device)
        return self.chunk_loss(response_hidden(h.student, sb)[mask], t_ids, t_logp,
                               sb.response_ids[mask], weights)

    def chunk_loss(self, hidden: Tensor, t_ids: Tensor, t_logp: Tensor, tokens: Tensor,
                   weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted loss of the positions in ``hidden`` ``[N, H]`` (head applied chunk by
        chunk and recomputed in the backward pass when perf.chunked_loss)."""
        cfg = self.host.cfg
        head = self.host.student.get_output_embeddings()

        def part(h: Tensor, ti: Tensor, tl: Tensor, tok: Tensor, w: Tensor
                 ) -> tuple[Tensor, dict[str, Tensor]]:
            loss, stats = offpolicy_token_loss(
                head(h).float(), ti, tl, tok, objective=cfg.offpolicy.loss,
                temperature=cfg.rollout.temperature, renormalize=cfg.loss.renormalize,
                tail=cfg.loss.tail,
            )
            return (loss * w).sum()[None], stats

        sums, parts = losses.chunked(
            part, hidden, t_ids, t_logp, tokens, weights,
            chunk_size=cfg.perf.loss_chunk_tokens if cfg.perf.chunked_loss else None)
        return sums.sum(), {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def format_step(m: dict[str, Any]) -> str:
    """The terminal line of an off-policy step's record."""
    return (
        f"step {m['step']:>4} | loss {m['loss']:.4f} | fKL {m['forward_kl']:.4f} | "
        f"NLL {m['nll']:.3f} | top-k mass s {m['student_topk_mass']:.3f} "
        f"t {m['teacher_topk_mass']:.3f} | len {m['response_len']:.1f} | "
        f"teacher {m['time_rollout']:.1f}s ({m['generated']} new, {m['reused']} reused) "
        f"update {m['time_update']:.1f}s"
    )


def postfix(m: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures for an off-policy step."""
    return {"loss": f"{m['loss']:.4f}", "fkl": f"{m['forward_kl']:.4f}", "new": str(m["generated"])}


def offpolicy_method(host: Host) -> Method:
    """Off-policy CD as the parts :meth:`opcd.training.trainer.Trainer.train_step` composes."""
    sampler = StoredResponses(host)
    return Method(sampler, StoredTargets(), OffPolicyObjective(host), format_step, postfix,
                  open=sampler.open)
