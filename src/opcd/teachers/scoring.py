"""Logits at response positions: the alignment between the student and the teacher.

Both models read ``prefix + response`` where the prefix differs (the teacher's carries
the context) and the response tokens are the student's exact samples. For each row, the
logits that predict response token j sit at position ``len(prefix) - 1 + j`` (shifted by
the row's padding). :func:`response_logits` gathers the final hidden states at exactly
those positions and applies the output head only there, so the result is ``[B, R, V]``
aligned token by token across models whatever the prefix lengths and padding side.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from opcd.runtime.compat import cache_kwarg, output_cache


@dataclass
class PackedBatch:
    """Padded ``prefix + response`` rows and where each response sits."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    position_ids: Tensor  # [B, L]
    target_positions: Tensor  # [B, R] index of the logits predicting response token j
    response_ids: Tensor  # [B, R] (pad where masked)
    response_mask: Tensor  # [B, R] bool


def pack(
    prefixes: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    padding_side: str = "left",
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Concatenate and pad each row; record the positions that predict response tokens."""
    if len(prefixes) != len(responses):
        raise ValueError(f"{len(prefixes)} prefixes but {len(responses)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = [p + r for p, r in zip(prefixes, responses, strict=True)]
    L = max(len(r) for r in rows)
    R = max(1, max(len(r) for r in responses))
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.zeros((B, R), dtype=torch.long)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    rmask = torch.zeros((B, R), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prefixes, responses, strict=True)):
        if not p:
            raise ValueError("every row needs a non-empty prefix (the prompt)")
        offset = L - len(p) - len(r) if padding_side == "left" else 0
        ids[b, offset : offset + len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[b, offset : offset + len(p) + len(r)] = 1
        n = len(r)
        if n:
            resp[b, :n] = torch.tensor(r, dtype=torch.long)
            rmask[b, :n] = True
        # logits at position i predict token i+1: response token j is predicted at
        # offset + len(p) - 1 + j; masked slots point at the last prefix position.
        tgt[b] = offset + len(p) - 1 + torch.arange(R).clamp(max=max(n - 1, 0))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(
        ids.to(device), mask.to(device), position_ids.to(device), tgt.to(device),
        resp.to(device), rmask.to(device),
    )


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} does not expose a decoder and an output head")
    return decoder, head


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def sdpa_gqa(model: nn.Module) -> Iterator[None]:
    """On the CPU, let SDPA read grouped-query key/value heads without repeating them.

    Whenever an attention mask is passed, transformers' SDPA path copies every key/value
    head ``num_heads / num_kv_heads`` times (7x for Qwen2.5-0.5B) before the kernel; torch's
    CPU kernels take ``enable_gqa=True`` with a mask and give the same results (forward
    and backward), so the copy is skipped here through transformers' own switch. Left
    alone on other devices (CUDA's fused kernels do not take a mask with GQA).
    """
    device = next(model.parameters()).device
    if device.type != "cpu" or _FORCE_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


def _final_hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _sharded_final_hidden(model: nn.Module, decoder: nn.Module, batch: PackedBatch) -> Tensor:
    """The decoder's output, through the *whole* model's forward (logits of one position).

    Under FSDP the root unit (embeddings, final norm, head) is gathered by the whole model's
    forward hooks and stays gathered until its backward: calling the decoder alone would
    skip them. The head's weight is then whole when the loss reads it.
    """
    seen: list[Tensor] = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: seen.append(_final_hidden(out)))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[-1]


def response_hidden(model: nn.Module, batch: PackedBatch) -> Tensor:
    """Final hidden states at the positions predicting response tokens: ``[B, R, H]``."""
    from opcd.runtime.sharding import is_sharded

    decoder, _ = _decoder_and_head(model)
    with sdpa_gqa(model):
        if is_sharded(model):
            hidden = _sharded_final_hidden(model, decoder, batch)
        else:
            hidden = _final_hidden(decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ))
    idx = batch.target_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)


def response_logits(model: nn.Module, batch: PackedBatch) -> Tensor:
    """Logits ``[B, R, V]`` predicting each response token (fp32)."""
    _, head = _decoder_and_head(model)
    return head(response_hidden(model, batch)).float()


# --------------------------------------------------------------------------- prefix reuse
#
# The teacher reads ``context + prompt + response`` for every sampled response. Rows that
# share a context share a long token prefix (chat-template head + context, often more), and
# the attention of a causal decoder makes the keys/values of those positions independent of
# what follows. So the prefix is run once (batch 1), its per-layer keys/values are kept, and
# each row only runs its own suffix (the rest of its prompt + the response) against them.
#
# Layout of one suffix micro-batch (right padding, so the real tokens of every row sit at the
# positions a full forward would give them)::
#
#     keys:     [ shared prefix, P tokens (one copy, broadcast) | row suffix ... pad pad ]
#     queries:                                                  [ row suffix ... pad pad ]
#     position_ids = P + 0, 1, 2, ...      attention_mask = ones(P) ++ suffix mask
#
# Padding sits after each row's real tokens: those keys are masked and those queries are
# never read, so no real position changes.
#
# Which prefix is cached, and reproducibility: a group's shared prefix (the longest common
# token prefix of its teacher prompts, which is robust to how the context and the prompt
# tokenise at their boundary) is cut at a multiple of ``block`` tokens. That block-aligned
# part is computed in one pass and stored under its exact tokens; the few tokens between
# it and the group's shared length are run once per group (batch 1) on top of it. A stored
# prefix is therefore bitwise what a fresh computation gives, whatever happened before, so
# results do not depend on the cache's history (a resumed run equals an uninterrupted one).


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PrefixGroup:
    """Rows whose prompts share their first ``shared`` tokens (``shared`` may be 0)."""

    rows: list[int]
    shared: int


def group_by_prefix(
    prompts: list[list[int]], *, group_cost: int = 32, min_shared: int = 16
) -> list[PrefixGroup]:
    """Partition rows into groups that share a prompt prefix, minimising tokens computed.

    Rows are sorted by their tokens, so rows with long common prefixes are neighbours; a
    dynamic programme over contiguous runs of that order chooses the groups minimising
    ``sum_g [shared_g + sum_{i in g} (len_i - shared_g) + group_cost]``. A group's shared
    length is capped at its shortest prompt minus one (every row keeps at least one prompt
    token in its suffix: that position predicts the first response token); below
    ``min_shared`` tokens it is set to 0 (plain batched forward). Deterministic.
    """
    n = len(prompts)
    if n == 0:
        return []
    if any(not p for p in prompts):
        raise ValueError("every row needs a non-empty prompt")
    order = sorted(range(n), key=lambda i: prompts[i])
    adj = [common_prefix_len(prompts[order[k]], prompts[order[k + 1]]) for k in range(n - 1)]
    lens = [len(prompts[i]) for i in order]
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        shared = lens[j - 1] - 1
        total = 0
        for i in range(j - 1, -1, -1):  # group = sorted rows i .. j-1
            total += lens[i]
            shared = min(shared, lens[i] - 1)
            if i < j - 1:
                shared = min(shared, adj[i])
            s = shared if shared >= min_shared else 0
            m = j - i
            cost = best[i] + s + (total - m * s) + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[PrefixGroup] = []
    j = n
    while j > 0:
        i = cut[j]
        rows = order[i:j]
        shared = min(lens[i:j]) - 1
        for k in range(i, j - 1):
            shared = min(shared, adj[k])
        groups.append(PrefixGroup(rows=rows, shared=shared if shared >= min_shared else 0))
        j = i
    groups.reverse()
    return groups


KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values [1, kv_heads, P, head_dim]


class PrefixStore:
    """Block-aligned prefixes' keys/values, by exact tokens, least recently used evicted.

    ``fingerprint`` identifies the weights the entries were computed with; :meth:`check`
    empties the store when it changes (a live teacher after an optimizer step).
    """

    def __init__(self, block: int = 64, max_tokens: int = 16384) -> None:
        if block < 1 or max_tokens < 0:
            raise ValueError("block must be >= 1 and max_tokens >= 0")
        self.block = block
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self._tokens = 0
        self.fingerprint: Any = None
        self.hits = 0
        self.misses = 0
        self.computed_tokens = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return self._tokens

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def check(self, fingerprint: Any) -> None:
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def get(self, tokens: tuple[int, ...]) -> KV | None:
        kv = self._entries.get(tokens)
        if kv is not None:
            self._entries.move_to_end(tokens)
        return kv

    def put(self, tokens: tuple[int, ...], kv: KV) -> None:
        if len(tokens) > self.max_tokens or tokens in self._entries:
            return
        self._entries[tokens] = kv
        self._tokens += len(tokens)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)


class _SharedPrefixLayer(DynamicLayer):
    """A cache layer holding one prefix (batch 1) that every row of a batch attends to.

    ``update`` returns ``prefix (broadcast to the batch) ++ new`` and never modifies the
    stored prefix, so the same object serves every micro-batch.
    """

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        b = key_states.shape[0]
        keys = torch.cat([self.keys.expand(b, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(b, -1, -1, -1), value_states], dim=-2)
        return keys, values


def prefix_cache_supported(model: nn.Module) -> bool:
    """True when every layer of the model keeps a plain, full-attention key/value cache."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - any model without a standard cache: no reuse
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _kv_of(cache: Any) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _run_prefix(decoder: nn.Module, tokens: list[int], start: int, past: KV | None, device: Any) -> KV:
    """Keys/values of ``past`` (covering positions < start) extended by ``tokens``."""
    cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    pos = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)
    with sdpa_gqa(decoder):
        out = decoder(input_ids=ids, position_ids=pos, use_cache=True,
                      **{cache_kwarg(decoder): cache})
    return _kv_of(output_cache(out))


def prefix_kv(
    model: nn.Module, tokens: list[int], store: PrefixStore | None = None, block: int = 64
) -> KV:
    """Per-layer keys/values ``[1, kv_heads, len(tokens), head_dim]`` of ``tokens``.

    The first ``block * (len // block)`` tokens come from ``store`` when it holds them
    (else they are computed in one pass and stored); the rest is computed on top.
    """
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    if store is not None:
        block = store.block
    base = (len(tokens) // block) * block
    kv: KV | None = None
    if base:
        key = tuple(tokens[:base])
        kv = store.get(key) if store is not None else None
        if kv is None:
            kv = _run_prefix(decoder, tokens[:base], 0, None, device)
            if store is not None:
                store.misses += 1
                store.computed_tokens += base
                store.put(key, kv)
        else:
            store.hits += 1  # type: ignore[union-attr]
            store.reused_tokens += base  # type: ignore[union-attr]
    if base < len(tokens):
        kv = _run_prefix(decoder, tokens[base:], base, kv, device)
        if store is not None:
            store.computed_tokens += len(tokens) - base
    assert kv is not None
    return kv


def _suffix_hidden(
    decoder: nn.Module,
    prefix: KV | None,
    shared: int,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    device: Any,
) -> list[Tensor]:
    """Final hidden states predicting each row's response tokens, given a shared prefix."""
    suffixes = [p[shared:] + r for p, r in zip(prompts, responses, strict=True)]
    B, Q = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.full((B, Q), pad_id, dtype=torch.long)
    mask = torch.zeros((B, shared + Q), dtype=torch.long)
    mask[:, :shared] = 1
    for b, s in enumerate(suffixes):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, shared : shared + len(s)] = 1
    pos = (shared + torch.arange(Q)).unsqueeze(0).expand(B, -1)
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        kwargs[cache_kwarg(decoder)] = Cache(layers=[_SharedPrefixLayer(k, v) for k, v in prefix])
    with sdpa_gqa(decoder):
        out = decoder(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
            use_cache=prefix is not None, **kwargs,
        )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    rows = []
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        first = len(p) - shared - 1  # the last prompt token predicts response token 0
        rows.append(hidden[b, first : first + len(r)])
    return rows


def cached_response_hidden(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    *,
    store: PrefixStore | None = None,
    batch_size: int = 8,
    block: int = 64,
    min_shared: int = 16,
) -> list[Tensor]:
    """Per row, the final hidden states ``[len(response), H]`` predicting its response tokens.

    Equal (up to float rounding) to :func:`response_hidden` on ``pack(prompts, responses)``,
    but each group of rows sharing a prompt prefix runs that prefix once (see above). Models
    whose cache is not a plain full-attention one fall back to that uncached computation.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    if not prefix_cache_supported(model):
        return uncached_response_hidden(model, prompts, responses, pad_id, batch_size=batch_size)
    decoder, _ = _decoder_and_head(model)
    out: list[Tensor | None] = [None] * len(prompts)
    for group in group_by_prefix(prompts, min_shared=min_shared):
        shared = group.shared
        prefix = prefix_kv(model, prompts[group.rows[0]][:shared], store, block) if shared else None
        rows = sorted(group.rows, key=lambda i: -(len(prompts[i]) + len(responses[i])))
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            hidden = _suffix_hidden(
                decoder, prefix, shared, [prompts[i] for i in chunk],
                [responses[i] for i in chunk], pad_id, device,
            )
            for i, h in zip(chunk, hidden, strict=True):
                out[i] = h
    return [h for h in out if h is not None]


def uncached_response_hidden(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    *,
    batch_size: int = 8,
) -> list[Tensor]:
    """Per row hidden states as in :func:`cached_response_hidden`, every row in full."""
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    for s in range(0, len(prompts), batch_size):
        batch = pack(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id, device=device)
        hidden = response_hidden(model, batch)
        for b, r in enumerate(responses[s : s + batch_size]):
            rows.append(hidden[b, : len(r)])
    return rows


def linear_head(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` when ``head`` is a plain linear layer, else None."""
    if type(head) is nn.Linear:
        return head.weight, head.bias
    return None
