"""Logits at response positions: the alignment between the student and the teacher.

Both models read ``prefix + response`` where the prefix differs (the teacher's carries
the context) and the response tokens are the student's exact samples. For each row, the
logits that predict response token j sit at position ``len(prefix) - 1 + j`` (shifted by
the row's padding). :func:`response_logits` gathers the final hidden states at exactly
those positions and applies the output head only there, so the result is ``[B, R, V]``
aligned token by token across models whatever the prefix lengths and padding side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


def response_hidden(model: nn.Module, batch: PackedBatch) -> Tensor:
    """Final hidden states at the positions predicting response tokens: ``[B, R, H]``."""
    decoder, _ = _decoder_and_head(model)
    out = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    idx = batch.target_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)


def response_logits(model: nn.Module, batch: PackedBatch) -> Tensor:
    """Logits ``[B, R, V]`` predicting each response token (fp32)."""
    _, head = _decoder_and_head(model)
    return head(response_hidden(model, batch)).float()
