"""Evaluation: score a model's responses on a task split, with or without the context.

Responses are sampled in batches, each item with its own generator seeded from ``seed``
and the item's id (:func:`item_seed`): an item's response does not depend on the batch
size, on the other items, or on how the items are split between processes (``shard``),
and evaluating in the middle of training never touches the training run's random stream.
The result is the mean score with its standard error and every response, so runs can be
compared and read.

With a ``judge`` (training passes the frozen base model with the context) every answer
also gets a *quality* figure: how natural the judge finds it, given the context and the
prompt, in nats per token: its log-prob of each token minus the expected log-prob at that
position (see :func:`teacher_judge`), 0 for answers the judge would
write itself. It tells natural answers from garbage that a behaviour scorer might pass
(broken text in the right language, say): the same figure for the base model's answers
without the context and for its answers with the context (the ceiling, about 0) sits
beside the student's.

With ``records_path`` an evaluation is resumable: each finished batch's records are
appended to that JSONL file (flushed and fsynced); run again with the same settings, the
items already there are read back and only the missing batches are generated, giving the
same records as an uninterrupted evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opcd.errors import ConfigError, RunFolderError
from opcd.runtime.jsonl import HeaderMismatch, JsonlFile
from opcd.sampling import rollout
from opcd.sampling.multiturn import is_multiturn, play
from opcd.sampling.packing import packed_linears, should_pack
from opcd.tasks.base import Task, derive_seed
from opcd.tasks.chat import encode_chat, student_messages, teacher_messages
from opcd.teachers.teacher import Teacher


@dataclass
class EvalResult:
    """Mean score, its standard error, and the scored responses."""

    task: str
    split: str
    with_context: bool
    score: float
    stderr: float
    n: int
    records: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    """How many records were read back from ``records_path`` instead of generated."""
    details: dict[str, float] = field(default_factory=dict)
    """The task's own figures beyond the score (:func:`score_details`): refusal and
    over-refusal rates, parse failures, invalid moves, ..."""
    quality: float | None = None
    """Mean over the answers of the judge's figure, in nats per token (None without a judge);
    see the module docstring."""
    quality_stderr: float | None = None

    def summary(self) -> str:
        where = "with context" if self.with_context else "without context"
        text = f"{self.task}/{self.split} {where}: {self.score:.3f} ± {self.stderr:.3f} (n={self.n})"
        if self.quality is not None:
            text += f", quality {self.quality:.3f} ± {self.quality_stderr or 0.0:.3f} nats/token"
        return text

    def details_line(self) -> str:
        """The task's extra figures on one line ('' when it has none)."""
        return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) and not v.is_integer() else f"{k} {v:g}"
                         for k, v in self.details.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


Judge = Callable[[list[list[int]], list[list[int]]], list["float | None"]]
"""``(prompts with the context, response token ids) -> quality`` of each response in nats
per token (None for an empty one)."""


def teacher_judge(teacher: Teacher, pad_id: int, device: torch.device | str, *,
                  prefix_cache: bool = True, batch_size: int = 8, block: int = 64,
                  cache_tokens: int = 16384) -> Judge:
    """The quality figure's judge: ``teacher`` (a frozen model) reads each answer after the
    prompt with the context and scores it by the mean over its tokens of
    ``log p(y_t) + H_t``, its log-prob of the token minus the expected value (its entropy
    ``H_t`` at that position). Answers the judge itself would sample score about 0 (the
    in-context answers are the ceiling), fluent answers it finds unlikely below, garbage far
    below (log p ~ -15 where H ~ 2). Plain log-probs would rank low-entropy text above
    high-entropy text whatever its quality."""

    @torch.no_grad()
    def rate(prompts: list[list[int]], responses: list[list[int]]) -> list[float | None]:
        out: list[float | None] = [None] * len(responses)
        keep = [i for i, r in enumerate(responses) if r]
        if not keep:
            return out
        hidden = teacher.response_hidden(
            [prompts[i] for i in keep], [responses[i] for i in keep], pad_id,
            prefix_cache=prefix_cache, batch_size=batch_size, block=block,
            cache_tokens=cache_tokens)
        for i, h in zip(keep, hidden, strict=True):
            logp = torch.log_softmax(teacher.logits_from_hidden(h.to(device)), dim=-1)
            ids = torch.tensor(responses[i], device=logp.device)[:, None]
            entropy = -(logp.exp() * logp).nan_to_num_(nan=0.0).sum(-1)
            out[i] = float((logp.gather(-1, ids)[:, 0] + entropy).mean())
        return out

    return rate


def quality_of(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Mean and standard error of the records' quality figures (None when there are none)."""
    values = [float(r["quality"]) for r in records if r.get("quality") is not None]
    if not values:
        return None, None
    return mean_stderr(values)


def item_seed(seed: int, item_id: str) -> int:
    """The sampling seed of the evaluation item ``item_id``."""
    return derive_seed("eval", seed, item_id)


class RecordsFile:
    """The JSONL of a resumable evaluation: a header line with the settings, then records."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.file = JsonlFile(self.path, kind="opcd_eval", settings=settings,
                              on_write_error=self._write_error)

    def load(self) -> dict[str, dict[str, Any]]:
        """Records already written (by id); writes the header into a new file.

        A file written with other settings is refused (its records would not be the ones
        these settings give); a line torn by a crash is dropped.
        """
        try:
            found = self.file.load()
        except OSError as e:
            raise ConfigError(f"Eval records file {str(self.path)!r} cannot be read ({e}).") from None
        except HeaderMismatch as e:
            if e.foreign:
                raise ConfigError(
                    f"{str(self.path)!r} is not an opcd eval records file (no header line). Pass "
                    "another path, or delete the file."
                ) from None
            shown = ", ".join(f"{k}: {e.old.get(k)!r} -> {self.settings.get(k)!r}" for k in e.changed[:5])
            raise ConfigError(
                f"Eval records file {str(self.path)!r} was written by an evaluation with other "
                f"settings ({shown}). Use the same settings, another path, or delete the file."
            ) from None
        done: dict[str, dict[str, Any]] = {}
        kept = [json.dumps(self.file.header(), ensure_ascii=False)]
        for line, rec in found:
            if _valid_record(rec) and rec["id"] not in done:
                done[rec["id"]] = rec
                kept.append(line)
        if not self.file.is_clean(len(kept)):
            # drop torn or foreign lines, so that appends start on a fresh line
            self.file.rewrite(kept)
        return done

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append one batch's records in a single write, flushed and fsynced."""
        self.file.append(records)

    def _write_error(self, e: OSError) -> Exception:
        from opcd.runtime import checkpoint as ckpt

        return RunFolderError(
            f"Could not write the eval records file {str(self.path)!r}: "
            f"{ckpt.os_error_text(e)}. Free disk space or choose another path; the records "
            "already written are kept and a new run with the same settings continues them."
        )


def _valid_record(rec: Any) -> bool:
    return (
        isinstance(rec, dict) and isinstance(rec.get("id"), str)
        and isinstance(rec.get("response"), str) and isinstance(rec.get("batch"), int)
        and isinstance(rec.get("score"), (int, float)) and not isinstance(rec.get("score"), bool)
    )


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: str = "eval",
    with_context: bool = False,
    size: int | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 1234,
    batch_size: int = 16,
    records_path: str | Path | None = None,
    records_meta: dict[str, Any] | None = None,
    shard: tuple[int, int] = (0, 1),
    judge: Judge | None = None,
) -> EvalResult:
    """Sample one response per example of ``split`` (the first ``size``) and score it.

    ``judge``: also rate each answer's quality (single-turn tasks; see the module docstring).

    ``records_path``: a JSONL file that makes the evaluation resumable (see the module
    docstring); ``records_meta`` adds identifying settings (such as the model) to its header.
    ``shard=(rank, world)``: evaluate only items ``rank::world`` (combine the shards' results
    with :func:`merge_results`).
    """
    examples = task.examples(split)
    if size is not None:
        examples = examples[:size]
    rank, world = shard
    examples = examples[rank::world]
    build = (lambda ex: teacher_messages(task, ex)) if with_context else student_messages
    prompts = [encode_chat(tokenizer, build(ex)) for ex in examples]
    store = None
    done: dict[str, dict[str, Any]] = {}
    if records_path is not None:
        settings = {
            "task": task.name, "split": split, "with_context": with_context,
            "size": len(examples), "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "sampling": "per-item",
            **(records_meta or {}),
            **({"quality": True} if judge is not None else {}),
        }
        store = RecordsFile(records_path, settings)
        done = store.load()
    results: dict[str, dict[str, Any]] = {}
    resumed = 0
    # The weights do not change during an evaluation: pack them once for all its batches
    # (each sample() call would otherwise pack and free its own copy; see opcd.sampling.packing).
    rows = min(batch_size, len(examples))
    kernel = should_pack(model, max_new_tokens, rows) if any(ex.id not in done for ex in examples) else None
    with (torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None),
          packed_linears(model, rows, kernel) if kernel else contextlib.nullcontext()):
        for b, start in enumerate(range(0, len(examples), batch_size)):
            batch = examples[start : start + batch_size]
            if all(ex.id in done for ex in batch):
                results.update({ex.id: done[ex.id] for ex in batch})
                resumed += len(batch)
                continue
            seeds = [item_seed(seed, ex.id) for ex in batch]
            if is_multiturn(task):
                new = _play_batch(model, tokenizer, task, batch, seeds, b, with_context=with_context,
                                  temperature=temperature, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
                if store is not None:
                    store.append([r for r in new if r["id"] not in done])
                results.update({r["id"]: r for r in new})
                continue
            out = rollout.sample(
                model, tokenizer, prompts[start : start + batch_size], n=1,
                temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                batch_size=batch_size, seeds=seeds,
            )
            quality: list[float | None] = [None] * len(out.texts)
            if judge is not None:
                with_ctx = [encode_chat(tokenizer, teacher_messages(task, batch[i]))
                            for i in out.prompt_index]
                quality = judge(with_ctx, out.response_ids)
            new = []
            for i, text, q in zip(out.prompt_index, out.texts, quality, strict=True):
                ex = batch[i]
                s = float(task.score(ex, text))
                new.append({"id": ex.id, "prompt": ex.prompt, "response": text, "score": s,
                            "batch": b, **({"quality": q} if judge is not None else {})})
            if store is not None:
                store.append([r for r in new if r["id"] not in done])
            results.update({r["id"]: r for r in new})
    keep = ("id", "prompt", "response", "score", "quality", "moves", "invalid_moves")
    records = [{k: results[ex.id][k] for k in keep if k in results[ex.id]} for ex in examples]
    scores = [float(r["score"]) for r in records]
    mean, se = mean_stderr(scores)
    q, q_se = quality_of(records)
    return EvalResult(task.name, split, with_context, mean, se, len(scores), records, resumed,
                      score_details(task, examples, records), q, q_se)


def score_details(task: Task, examples: list[Any], records: list[dict[str, Any]]) -> dict[str, float]:
    """The task's figures beyond the mean score, from the evaluation's records.

    Games: mean moves and invalid moves of the played episodes. Other tasks: their
    :meth:`~opcd.tasks.base.Task.score_details` without the score and n already reported.
    """
    if not records:
        return {}
    if is_multiturn(task):
        n = len(records)
        return {"mean_moves": sum(float(r.get("moves", 0)) for r in records) / n,
                "invalid_moves": float(sum(int(r.get("invalid_moves", 0)) for r in records))}
    found = task.score_details(examples, [str(r.get("response", "")) for r in records])
    return {k: float(v) for k, v in found.items() if k not in ("score", "n")}


def _play_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, batch: list[Any],
    seeds: list[int], b: int, *, with_context: bool, temperature: float, max_new_tokens: int,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Multi-turn tasks (games): play each item's episode to its end; score 1 on success.

    ``max_new_tokens`` is per reply; the record's response is the whole conversation after
    the first prompt (replies and observations).
    """
    played = play(model, tokenizer, task, batch, seeds, with_context=with_context,
                  temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  max_prompt_tokens=1 << 30)
    new = []
    for ex, ep in zip(batch, played.episodes, strict=True):
        transcript = "\n".join(f"[{role}] {text}" for role, text in ep.turns[1:])
        new.append({"id": ex.id, "prompt": ex.prompt, "response": transcript,
                    "score": float(ep.success), "moves": ep.moves,
                    "invalid_moves": ep.invalid_moves, "batch": b})
    return new


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """One result from the shards of an evaluation (records in item order, as unsharded)."""
    first = parts[0]
    world = len(parts)
    n = sum(len(p.records) for p in parts)
    records = [parts[i % world].records[i // world] for i in range(n)]
    mean, se = mean_stderr([float(r["score"]) for r in records])
    q, q_se = quality_of(records)
    return EvalResult(first.task, first.split, first.with_context, mean, se, n, records,
                      sum(p.resumed for p in parts), quality=q, quality_stderr=q_se)
