"""Student rollout: sample responses to prompts without the context.

Prompts are left-padded and generated in batches with the KV cache (``model.generate``);
generation stops per row at an end-of-sequence token. A response keeps every generated
token up to and including the first EOS (the EOS is a sampled token and is trained);
rows that hit ``max_new_tokens`` are marked truncated. Sampling uses torch's global RNG,
which the trainer seeds and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


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
) -> Rollout:
    """Sample ``n`` responses per prompt; ``temperature == 0`` means greedy.

    ``ignore_eos`` forbids end-of-sequence tokens so every response has exactly
    ``max_new_tokens`` tokens (benchmarks use it for fixed-size steps).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    stop_set = set(stop)
    was_training = model.training
    model.eval()
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    out = Rollout([], [], [], [])
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            L = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for b, (_, p) in enumerate(chunk):
                ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[b, L - len(p) :] = 1
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
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = gen[:, L:].tolist()
            for (i, _), toks in zip(chunk, new, strict=True):
                resp, ended = cut_at_eos(toks, stop_set)
                out.prompt_index.append(i)
                out.response_ids.append(resp)
                out.texts.append(tokenizer.decode(resp, skip_special_tokens=True))
                out.truncated.append(not ended)
    finally:
        model.train(was_training)
    return out
