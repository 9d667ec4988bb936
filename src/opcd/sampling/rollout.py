"""Student rollout: sample responses to prompts without the context.

Prompts are left-padded and generated in batches with the KV cache (:func:`decode`: the
prompt is read once, finished rows leave the batch; ``model.generate`` for models whose
cache is not a plain one); generation stops per row at an end-of-sequence token. A
response keeps every generated token up to and including the first EOS (the EOS is a
sampled token and is trained); rows that hit ``max_new_tokens`` are marked truncated. A
prompt prefix every row of a batch shares (a context in the system message: the off-policy
teacher's and in-context evaluation's prompts) is read once for the batch and its
keys/values shared by the rows
(``share_prefix``; the 0.5B on the ~1,180-token knowledge prompts, 8 rows, 24 new tokens:
89 s with the context read in every row, 18 s once, 8 s from a store:
``python benchmarks/micro.py context``, figures in ``benchmarks/results.md``).

Sampling randomness: with ``seeds`` (one per prompt, as the trainer and evaluation pass),
every response row draws from its own generator, seeded from its prompt's seed and its
index among the ``n`` samples. A row's tokens then depend only on the model and its seed,
not on which other rows share its batch or process: the same run gives the same samples
whatever ``rollout.batch_size`` or the number of processes (``opcd.runtime.distributed``), up to
the float rounding of different padding. Without ``seeds``, torch's global RNG is used.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from opcd.runtime.compat import cache_kwarg
from opcd.sampling.packing import packed_linears, should_pack
from opcd.tasks.base import derive_seed
from opcd.teachers.scoring import (
    KV,
    PrefixStore,
    common_prefix_len,
    prefix_cache_supported,
    prefix_kv,
    sdpa_gqa,
)


@dataclass
class Rollout:
    """Responses for a list of prompts (``n`` per prompt, prompt-major order)."""

    prompt_index: list[int]  # which prompt each response answers
    response_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]


def eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a response (the tokenizer's and the generation config's)."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer defines no end-of-sequence token")
    return sorted(ids)


def cut_at_eos(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; (tokens, ended)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1], True
    return tokens, False


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def pick_tokens(
    logits: Tensor, temperature: float, top_p: float,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """Next tokens ``[b]`` from logits ``[b, V]``: greedy at ``temperature == 0``, else
    sampled from ``softmax(logits / T)`` restricted to the top-p set.

    ``generators`` (one per row, on the CPU): row ``i`` inverts its CDF at one uniform draw
    from ``generators[i]``; without them, ``torch.multinomial`` on torch's global RNG.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    probs = scores.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, num_samples=1)[:, 0]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return invert_cdf(probs, u.to(probs.device))


_CDF_BLOCK = 1024


def invert_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Per row, the first token whose cumulative probability exceeds ``u * total`` (``probs``
    ``[b, V]`` non-negative, ``u`` ``[b]`` in [0, 1)): zero-probability tokens are never chosen.

    In two levels, in float64: the sums of blocks of 1024 tokens and their cumulative sum
    find the block, then the cumulative sum inside that one block finds the token, instead of
    a float64 cumulative sum over the whole vocabulary (152k tokens) at every decode step.
    """
    b, vocab = probs.shape
    blocks = -(-vocab // _CDF_BLOCK)
    padded = probs if vocab == blocks * _CDF_BLOCK else F.pad(probs, (0, blocks * _CDF_BLOCK - vocab))
    cells = padded.view(b, blocks, _CDF_BLOCK)
    block_cdf = cells.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    target = u.double() * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True)[:, 0].clamp_(max=blocks - 1)
    rows = torch.arange(b, device=probs.device)
    before = torch.where(block > 0, block_cdf[rows, (block - 1).clamp(min=0)], 0.0)
    inside = cells[rows, block].double()
    cdf = inside.cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (target - before)[:, None], right=True)[:, 0]
    # Past the block's end only by rounding: its last token with any probability.
    last = torch.where(inside > 0, torch.arange(_CDF_BLOCK, device=probs.device), -1).amax(dim=-1)
    picked = torch.where(picked >= _CDF_BLOCK, last, picked)
    return (block * _CDF_BLOCK + picked).clamp_(max=vocab - 1)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded from ``seeds``."""
    out = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(int(s) % (1 << 63))
        out.append(g)
    return out


def decode_threads() -> int:
    """CPU threads for the token-by-token steps: ``$OPCD_DECODE_THREADS``, default 0 (leave
    torch's setting, i.e. every core).

    A decode step is a chain of a few hundred small, memory-bound ops, and each op waits for
    every OpenMP thread: on a dedicated CPU more threads are faster (measured on 2 idle
    cores, Qwen2.5-0.5B, 8 rows: 0.23 s per step with 2 threads, 0.43 s with 1), but on a
    CPU shared with other work a descheduled thread stalls every op (the same step, on 2
    cores busy with another job: 1.2-2.1 s with 2 threads, 0.37-0.41 s with 1). Set
    ``OPCD_DECODE_THREADS=1`` there. The prompt read (one large matrix product per layer)
    always keeps all threads.
    """
    try:
        return max(0, int(os.environ.get("OPCD_DECODE_THREADS", "0")))
    except ValueError:
        return 0


@contextlib.contextmanager
def _cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    if n <= 0 or device.type != "cpu" or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[int] | None = None,
    ignore_eos: bool = False,
    threads: int | None = None,
    seeds: list[int] | None = None,
    prefix: KV | None = None,
) -> list[list[int]]:
    """Sample continuations of left-padded prompts with the key/value cache.

    The prompts are read once (prefill, the output head applied only at the last
    position); then one token per live row and step, on ``threads`` CPU threads (default
    :func:`decode_threads`). A row stops at its first ``stop`` token (kept), and finished
    rows leave the batch, so late steps only pay for the rows still generating. Returns the
    new tokens of every row. ``seeds``: one per row (see :func:`pick_tokens`).

    ``prefix``: the keys/values (batch 1, :func:`opcd.teachers.scoring.prefix_kv`) of tokens
    that come before every row's prompt (a context all rows share, read once instead of once
    per row); ``input_ids`` then hold only what follows it, left-padded.
    """
    if seeds is not None and len(seeds) != input_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {input_ids.shape[0]} rows")
    gens = row_generators(seeds) if seeds is not None else None
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    stop_t = torch.tensor(sorted(set(stop or [])), dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    if prefix is None:
        cache = DynamicCache(config=model.config)
    else:  # the pads sit between the prefix and each row's prompt: masked, and skipped by positions
        b = input_ids.shape[0]
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                             for k, v in prefix])
        mask = torch.cat([mask.new_ones((b, prefix[0][0].shape[-2])), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    with sdpa_gqa(decoder):
        out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      use_cache=True, **{cache_kwarg(decoder): cache})
    hidden = out.last_hidden_state[:, -1]
    next_pos = positions[:, -1] + 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    new: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    with _cpu_threads(decode_threads() if threads is None else threads, input_ids.device):
        _decode_steps(decoder, head, cache, hidden, mask, next_pos, rows, new, stop_t,
                      max_new_tokens, temperature, top_p, ignore_eos, gens)
    return new


def _decode_steps(
    decoder: nn.Module, head: nn.Module, cache: DynamicCache, hidden: Tensor, mask: Tensor,
    next_pos: Tensor, rows: Tensor, new: list[list[int]], stop_t: Tensor, max_new_tokens: int,
    temperature: float, top_p: float, ignore_eos: bool,
    gens: list[torch.Generator] | None = None,
) -> None:
    cache_key = cache_kwarg(decoder)
    for step in range(max_new_tokens):
        logits = head(hidden)
        if ignore_eos and stop_t.numel():
            logits[:, stop_t] = -math.inf
        row_gens = None if gens is None else [gens[r] for r in rows.tolist()]
        tokens = pick_tokens(logits, temperature, top_p, row_gens)
        for r, t in zip(rows.tolist(), tokens.tolist(), strict=True):
            new[r].append(t)
        if step == max_new_tokens - 1:
            break
        if not ignore_eos and stop_t.numel():
            live = ~torch.isin(tokens, stop_t)
            if not bool(live.all()):
                if not bool(live.any()):
                    break
                keep = live.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, tokens, mask, next_pos = rows[keep], tokens[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = decoder(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                      use_cache=True, **{cache_key: cache})
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1


MIN_SHARED_PREFIX = 32
""":func:`sample` reads a batch's common prompt prefix once only from this many tokens."""


def shared_prefix_len(prompts: list[list[int]], min_shared: int = MIN_SHARED_PREFIX) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its
    own (whose position predicts the first new token); 0 below ``min_shared``."""
    shared = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        shared = min(shared, common_prefix_len(prompts[0], p))
    return shared if shared >= min_shared else 0


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``prompts`` as left-padded ``input_ids`` and ``attention_mask`` ``[b, longest]``."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    ignore_eos: bool = False,
    engine: str = "auto",
    seeds: list[int] | None = None,
    pack: bool | str | None = None,
    share_prefix: bool = True,
    prefix_store: PrefixStore | None = None,
) -> Rollout:
    """Sample ``n`` responses per prompt; ``temperature == 0`` means greedy.

    ``ignore_eos`` forbids end-of-sequence tokens so every response has exactly
    ``max_new_tokens`` tokens (benchmarks use it for fixed-size steps). ``engine``:
    ``loop`` (:func:`decode`), ``generate`` (``model.generate``) or ``auto`` (``loop``
    for models with a plain key/value cache, else ``generate``). ``seeds``: one per prompt;
    response ``j`` of prompt ``i`` samples with its own generator seeded from
    ``(seeds[i], j)`` (the ``generate`` engine seeds torch's RNG per batch from them
    instead, so only the ``loop`` engine is independent of the batch layout). ``pack``: decode
    with packed copies of the fp32 linear weights (:mod:`opcd.sampling.packing`): True (the fastest
    kernel here), a kernel's name, False; default :func:`opcd.sampling.packing.should_pack` (CPU, fp32,
    a kernel measured faster than the plain product, long enough generations, and
    ``$OPCD_PACKED_DECODE`` not ``0``).

    ``share_prefix`` (``loop`` engine, models with a plain cache): the tokens every prompt of a
    batch starts with (a context, a system message; at least :data:`MIN_SHARED_PREFIX`) are
    read once for the batch, not once per row (:func:`shared_prefix_len`); the samples equal
    the unshared path's up to float rounding. ``prefix_store``: keeps those prefixes' keys/values
    across calls (only for weights that do not change between them, e.g. a frozen teacher:
    the caller checks the store against its weights).
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if engine not in ("auto", "loop", "generate"):
        raise ValueError(f"engine must be auto, loop or generate, got {engine!r}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    stop_set = set(stop)
    was_training = model.training
    model.eval()
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    row_seeds = None if seeds is None else [
        derive_seed("row", seeds[i], j) for i in range(len(prompts)) for j in range(n)
    ]
    out = Rollout([], [], [], [])
    pack_rows = min(batch_size, len(rows))
    if pack is None:
        pack = should_pack(model, max_new_tokens, pack_rows) or False
    packing = contextlib.ExitStack()
    try:
        if pack and rows:
            packing.enter_context(packed_linears(model, pack_rows, pack if isinstance(pack, str) else None))
        plain_cache = prefix_cache_supported(model)
        loop = engine == "loop" or (engine == "auto" and plain_cache)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            shared = shared_prefix_len([p for _, p in chunk]) if loop and share_prefix and plain_cache else 0
            ids, mask = left_padded([p[shared:] for _, p in chunk], pad_id)
            L = ids.shape[1]
            if loop:
                new = decode(
                    model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, stop=stop, ignore_eos=ignore_eos,
                    seeds=None if row_seeds is None else row_seeds[start : start + batch_size],
                    prefix=prefix_kv(model, chunk[0][1][:shared], prefix_store) if shared else None,
                )
            else:
                kwargs = dict(
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop,
                    use_cache=True,
                )
                if ignore_eos:
                    kwargs["min_new_tokens"] = max_new_tokens
                if temperature > 0:
                    kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with contextlib.ExitStack() as stack:
                    if row_seeds is not None:
                        stack.enter_context(torch.random.fork_rng(
                            devices=[] if device.type != "cuda" else [device]))
                        torch.manual_seed(derive_seed("batch", *row_seeds[start : start + batch_size]))
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         **kwargs)
                new = gen[:, L:].tolist()
            for (i, _), toks in zip(chunk, new, strict=True):
                resp, ended = cut_at_eos(toks, stop_set)
                out.prompt_index.append(i)
                out.response_ids.append(resp)
                out.texts.append(tokenizer.decode(resp, skip_special_tokens=True))
                out.truncated.append(not ended)
    finally:
        packing.close()
        model.train(was_training)
    return out
