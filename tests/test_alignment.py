"""Teacher/student alignment: scored positions are exactly the response tokens."""

from __future__ import annotations

import pytest
import torch

from opcd.teachers.scoring import pack, response_logits


def _rows():
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(3, 300, (n,), generator=g).tolist()

    # teacher prefixes carry contexts of very different lengths; responses differ in length
    student_prefixes = [rand(5), rand(9), rand(3)]
    contexts = [rand(40), rand(2), rand(17)]
    teacher_prefixes = [c + s for c, s in zip(contexts, student_prefixes, strict=True)]
    responses = [rand(7), rand(1), rand(12)]
    return student_prefixes, teacher_prefixes, responses


@pytest.mark.parametrize("side", ["left", "right"])
def test_target_positions_point_at_response_tokens(side: str) -> None:
    _, prefixes, responses = _rows()
    b = pack(prefixes, responses, pad_id=0, padding_side=side)
    for row, resp in enumerate(responses):
        assert b.response_mask[row].sum().item() == len(resp)
        assert b.response_ids[row, : len(resp)].tolist() == resp
        for j, tok in enumerate(resp):
            pos = int(b.target_positions[row, j])
            # the logits at `pos` predict the token at pos + 1, which must be response token j
            assert int(b.input_ids[row, pos + 1]) == tok
            assert int(b.attention_mask[row, pos]) == 1
            # everything before the response in this row is the prefix (context + prompt)
            if j == 0:
                start = pos + 1
                assert b.input_ids[row, start - len(prefixes[row]) : start].tolist() == prefixes[row]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_logits_equal_unpadded(tiny, side: str) -> None:
    model, _ = tiny
    model.eval()
    student_prefixes, teacher_prefixes, responses = _rows()
    for prefixes in (student_prefixes, teacher_prefixes):
        batch = pack(prefixes, responses, pad_id=0, padding_side=side)
        with torch.no_grad():
            got = response_logits(model, batch)
            for row, (p, r) in enumerate(zip(prefixes, responses, strict=True)):
                ids = torch.tensor([p + r])
                full = model(input_ids=ids).logits[0]
                want = full[len(p) - 1 : len(p) - 1 + len(r)]
                diff = (got[row, : len(r)] - want).abs().max().item()
                assert diff < 1e-4, (side, row, diff)


def test_student_and_teacher_rows_align_across_prefix_lengths(tiny) -> None:
    """Same responses under different prefixes: [B, R] slots line up one to one."""
    model, _ = tiny
    s, t, r = _rows()
    sb, tb = pack(s, r, 0, "left"), pack(t, r, 0, "right")
    assert torch.equal(sb.response_ids, tb.response_ids)
    assert torch.equal(sb.response_mask, tb.response_mask)
    with torch.no_grad():
        assert response_logits(model, sb).shape == response_logits(model, tb).shape
