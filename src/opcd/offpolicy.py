"""Off-policy context distillation, the paper's baseline: ``opcd train CONFIG method=offpolicy``.

The teacher (the frozen initial student, or ``teacher.mode=model``) reads the context c and
*generates* the responses, sampled with the rollout settings; the student is trained on
those fixed trajectories *without* c, by

- ``offpolicy.loss: fkl``: forward KL over the teacher's top-k (``loss.top_k``) at every
  position, ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` (:func:`opcd.losses.slot_divergence`
  on the slots :func:`opcd.losses.select_slots` gives for ``source="teacher"``), at the
  rollout temperature, renormalised over the slots when ``loss.renormalize``;
- ``offpolicy.loss: sft``: the token negative log-likelihood of the teacher's tokens
  (temperature 1: plain SFT / "seqkd").

Same steps, learning rate and prompts as OPCD (the same :class:`~opcd.trainer.DataOrder`):
:class:`OffPolicyTrainer` is a :class:`~opcd.trainer.Trainer` whose step reads the teacher's
responses instead of sampling the student, so logging, evaluation, checkpoints and exact
resume are shared.

Teacher responses are generated when a prompt is first drawn and appended to
``teacher_responses.jsonl`` in the run folder: per response its token ids and, per position,
the teacher's top-k token ids and log-probs. Each step's new responses are one group,
sampled in a forked RNG seeded from (``train.seed``, step) and written as one fsynced
write; later epochs and resumed runs read them back (a group torn by a crash is dropped and
regenerated identically), so a resumed run equals an uninterrupted one and the training
RNG never depends on what was cached.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from opcd import checkpoint as ckpt
from opcd import losses, rollout
from opcd.distributed import Dist
from opcd.errors import ConfigError
from opcd.jsonl import HeaderMismatch, JsonlFile
from opcd.scoring import pack, response_hidden
from opcd.tasks.base import derive_seed
from opcd.teacher import Teacher
from opcd.trainer import Trainer

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

    def add_group(self, recs: list[dict[str, Any]]) -> None:
        self.file.append(recs)
        for rec in recs:
            self.responses[(rec["example"], int(rec["sample"]))] = rec


# --------------------------------------------------------------------------- the trainer
class OffPolicyTrainer(Trainer):
    """Off-policy context distillation on the shared loop (``method: offpolicy``)."""

    method = "offpolicy"

    def __init__(self, cfg: Any, *, progress: bool = True, dist: Dist | None = None) -> None:
        super().__init__(cfg, progress=progress, dist=dist)
        self.store: ResponseStore | None = None

    def _build_teacher(self, model: nn.Module | None, tokenizer: Any) -> Teacher:
        if tokenizer is not None:  # the student learns the teacher's token ids directly
            from opcd.models import check_tokenizers_compatible

            check_tokenizers_compatible(self.tokenizer, tokenizer, self.cfg.model,
                                        str(self.cfg.teacher.model))
        return Teacher(self.cfg.teacher.mode, self.student, model)

    def open_store(self, run_dir: Path) -> ResponseStore:
        cfg = self.cfg
        settings = json.loads(json.dumps({
            "model": cfg.model, "teacher": vars(cfg.teacher), "task": vars(cfg.task),
            "rollout": vars(cfg.rollout), "top_k": cfg.loss.top_k, "seed": cfg.train.seed,
            "context_sha256": hashlib.sha256(
                "\x1f".join(str(self.task.context(ex)) for ex in self.train_examples).encode()
            ).hexdigest(),
        }))
        self.store = ResponseStore(Path(run_dir) / RESPONSES_FILE, settings)
        self.store.load()
        return self.store

    def restore(self, run_dir: Path) -> int:
        self.open_store(run_dir)
        return super().restore(run_dir)

    def _responses(self, idx: list[int]) -> tuple[list[dict[str, Any]], int, float]:
        """The teacher's responses for ``idx`` (prompt-major, ``rollout.n`` each), generating
        the missing ones as this step's group; (records, how many generated, seconds)."""
        cfg = self.cfg
        assert self.store is not None
        n = cfg.rollout.n
        ids = [self.train_examples[i].id for i in idx]
        missing: list[int] = []
        for j, ex_id in enumerate(ids):
            if any((ex_id, s) not in self.store.responses for s in range(n)) and \
                    ex_id not in {ids[m] for m in missing}:
                missing.append(j)
        t0 = time.perf_counter()
        if missing:
            self.store.add_group(self._generate([idx[j] for j in missing], group=self.step + 1))
        seconds = time.perf_counter() - t0
        out = [self.store.responses[(ex_id, s)] for ex_id in ids for s in range(n)]
        return out, len(missing) * n, seconds

    @torch.no_grad()
    def _generate(self, idx: list[int], group: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        T, k = cfg.rollout.temperature, cfg.loss.top_k
        pairs = self._prompt_pairs(idx)
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
            torch.manual_seed(derive_seed("offpolicy", cfg.train.seed, group))
            with self.teacher._scorer() as model:
                roll = rollout.sample(
                    model, self.tokenizer, [p.teacher_ids for p in pairs], n=cfg.rollout.n,
                    temperature=T, top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                    batch_size=cfg.rollout.batch_size,
                )
        recs: list[dict[str, Any]] = []
        bs = cfg.perf.teacher_batch_size
        for start in range(0, len(roll.response_ids), bs):
            rows = range(start, min(start + bs, len(roll.response_ids)))
            resp = [roll.response_ids[r] for r in rows]
            tb = pack([pairs[roll.prompt_index[r]].teacher_ids for r in rows], resp, self.pad_id,
                      device=self.device)
            logp = losses.temperature_log_softmax(self.teacher.response_logits(tb), T)
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            for b, r in enumerate(rows):
                L = len(resp[b])
                recs.append({
                    "example": self.train_examples[idx[roll.prompt_index[r]]].id,
                    "sample": r % cfg.rollout.n, "group": group, "group_size": 0,
                    "ids": resp[b], "truncated": roll.truncated[r], "text": roll.texts[r],
                    "topk_ids": top.indices[b, :L].tolist(),
                    "topk_logprobs": top.values[b, :L].float().cpu().tolist(),
                })
        for rec in recs:
            rec["group_size"] = len(recs)
        # what training reads is exactly what a later run reads back from the file
        return [json.loads(json.dumps(rec)) for rec in recs]

    def _chunk_loss(self, hidden: Tensor, t_ids: Tensor, t_logp: Tensor, tokens: Tensor,
                    weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted loss of the positions in ``hidden`` ``[N, H]`` (head applied chunk by
        chunk and recomputed in the backward pass when perf.chunked_loss)."""
        cfg = self.cfg
        head = self.student.get_output_embeddings()

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

    def train_step(self) -> dict[str, Any]:
        """One off-policy step: the teacher's responses for this step's prompts (generated
        once), then one update of the student on them without the context."""
        cfg = self.cfg
        if self.store is None:
            self.open_store(Path(cfg.run.dir))
        t0 = time.perf_counter()
        idx = self.order.take(cfg.train.batch_size)
        pairs = self._prompt_pairs(idx)
        recs, generated, t_teacher = self._responses(idx)
        n = cfg.rollout.n
        prompt_of = [j // n for j in range(len(recs))]
        responses = [r["ids"] for r in recs]
        total_tokens = float(sum(len(r) for r in responses))
        total_seqs = float(sum(1 for r in responses if r))
        sums = {"loss": 0.0, "forward_kl": 0.0, "nll": 0.0, "student_topk_mass": 0.0,
                "teacher_topk_mass": 0.0, "student_entropy": 0.0}
        t_update_start = time.perf_counter()
        self.student.train()
        mb = cfg.train.micro_batch_size
        for start in range(0, len(recs), mb):
            rows = [r for r in range(start, min(start + mb, len(recs))) if responses[r]]
            if not rows:
                continue
            sb = pack([pairs[prompt_of[r]].student_ids for r in rows], [responses[r] for r in rows],
                      self.pad_id, device=self.device)
            mask = sb.response_mask
            weights = losses.reduction_weights(
                mask, cfg.loss.reduction, total_tokens=total_tokens, total_sequences=total_seqs,
            )[mask]
            t_ids = torch.tensor([p for r in rows for p in recs[r]["topk_ids"]], dtype=torch.long,
                                 device=self.device)
            t_logp = torch.tensor([p for r in rows for p in recs[r]["topk_logprobs"]],
                                  dtype=torch.float32, device=self.device)
            loss, stats = self._chunk_loss(response_hidden(self.student, sb)[mask], t_ids, t_logp,
                                           sb.response_ids[mask], weights)
            loss.backward()
            sums["loss"] += float(loss.detach())
            for key, value in stats.items():
                sums[key] += float(value.sum())
            del loss, stats
        grad_norm, skip_reason = self.optimizer_step(sums["loss"])
        t_update = time.perf_counter() - t_update_start
        self.step += 1
        elapsed = time.perf_counter() - t0
        tokens = max(total_tokens, 1.0)
        rows_n = max(len(recs), 1)
        return {
            "type": "train",
            "step": self.step,
            "loss": sums["loss"],
            "forward_kl": sums["forward_kl"] / tokens,
            "nll": sums["nll"] / tokens,
            "student_entropy": sums["student_entropy"] / tokens,
            "student_topk_mass": sums["student_topk_mass"] / tokens,
            "teacher_topk_mass": sums["teacher_topk_mass"] / tokens,
            "grad_norm": grad_norm,
            "response_len": total_tokens / rows_n,
            "truncated_frac": sum(bool(r["truncated"]) for r in recs) / rows_n,
            "generated": generated,
            "reused": len(recs) - generated,
            "time_teacher": t_teacher,
            "time_update": t_update,
            **self.step_record_tail(idx, elapsed, total_tokens, recs[0]["text"] if recs else "",
                                    skip_reason),
        }

    def format_step(self, m: dict[str, Any]) -> str:
        return (
            f"step {m['step']:>4} | loss {m['loss']:.4f} | fKL {m['forward_kl']:.4f} | "
            f"NLL {m['nll']:.3f} | top-k mass s {m['student_topk_mass']:.3f} "
            f"t {m['teacher_topk_mass']:.3f} | len {m['response_len']:.1f} | "
            f"teacher {m['time_teacher']:.1f}s ({m['generated']} new, {m['reused']} reused) "
            f"update {m['time_update']:.1f}s"
        )

    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{m['loss']:.4f}", "fkl": f"{m['forward_kl']:.4f}",
                "new": str(m["generated"])}
