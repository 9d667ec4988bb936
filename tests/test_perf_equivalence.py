"""The fast paths compute the same numbers as the naive ones.

- Teacher prefix reuse (:func:`opcd.teachers.scoring.cached_response_hidden`) against full rows
  (:func:`opcd.teachers.scoring.response_logits` on ``pack``), across context lengths, padding
  layouts, batch sizes, shared and distinct contexts: max |log-prob difference| < 1e-4 (fp32).
- The stored prefix is never modified by its uses and reuse does not depend on history.
- The chunked loss (:func:`opcd.objectives.losses.chunked_distill_loss`) against the unchunked loss:
  same value and gradients (hidden states, head weight, bias).
- One trainer step with ``perf`` on equals one with ``perf`` off.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from opcd.objectives import losses
from opcd.teachers.scoring import (
    PrefixStore,
    _SharedPrefixLayer,
    cached_response_hidden,
    common_prefix_len,
    group_by_prefix,
    pack,
    prefix_kv,
    response_logits,
    uncached_response_hidden,
)

TOL = 1e-4


def _rand(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=g).tolist()


def _rows(ctx_len: int, n: int = 6, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """n teacher prompts = one shared context + distinct prompts; responses of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    ctx = _rand(g, ctx_len)
    prompts = [ctx + _rand(g, 1 + (5 * i) % 11) for i in range(n)]
    responses = [_rand(g, (7 * i) % 13) for i in range(n)]  # includes an empty response
    return prompts, responses


def _logp_rows(model, hidden_rows: list[torch.Tensor]) -> list[torch.Tensor]:
    head = model.get_output_embeddings()
    return [torch.log_softmax(head(h).float(), -1) for h in hidden_rows]


def _reference(model, prompts, responses, side: str) -> list[torch.Tensor]:
    batch = pack(prompts, responses, pad_id=0, padding_side=side)
    logits = response_logits(model, batch)
    return [torch.log_softmax(logits[b, : len(r)], -1) for b, r in enumerate(responses)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()), default=0.0)


# ---------------------------------------------------------------------------- grouping
def test_group_by_prefix_partitions_rows_and_shares_true_prefixes() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _rand(g, 80), _rand(g, 40)
    prompts = [a + _rand(g, 3), b + _rand(g, 5), a + _rand(g, 2), _rand(g, 6), b + [9], a + _rand(g, 4)]
    groups = group_by_prefix(prompts)
    rows = sorted(i for grp in groups for i in grp.rows)
    assert rows == list(range(len(prompts)))
    for grp in groups:
        for i in grp.rows:
            assert grp.shared <= len(prompts[i]) - 1
            assert common_prefix_len(prompts[i], prompts[grp.rows[0]]) >= grp.shared
    by_row = {i: grp for grp in groups for i in grp.rows}
    assert by_row[0] is by_row[2] is by_row[5] and by_row[0].shared >= 80
    assert by_row[1] is by_row[4] and by_row[1].shared >= 40
    # identical prompts (rollout.n > 1) share all but their last token
    same = group_by_prefix([a, a, a])
    assert len(same) == 1 and same[0].shared == len(a) - 1


# ---------------------------------------------------------------------------- prefix reuse
@pytest.mark.parametrize("ctx_len", [0, 5, 63, 64, 65, 200])
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_reuse_equals_full_rows(tiny, ctx_len: int, side: str) -> None:
    model, _ = tiny
    model.eval()
    prompts, responses = _rows(ctx_len)
    with torch.no_grad():
        want = _reference(model, prompts, responses, side)
        for batch_size in (1, 4, 8):
            store = PrefixStore(block=64)
            got = _logp_rows(model, cached_response_hidden(
                model, prompts, responses, 0, store=store, batch_size=batch_size, min_shared=1,
            ))
            assert _max_diff(got, want) < TOL, (ctx_len, side, batch_size)
            assert [len(x) for x in got] == [len(r) for r in responses]


def test_prefix_reuse_mixed_contexts_and_repeated_prompts(tiny) -> None:
    """Several contexts in one batch, rollout.n > 1 (identical prompts), a context-free row."""
    model, _ = tiny
    model.eval()
    g = torch.Generator().manual_seed(3)
    c1, c2 = _rand(g, 150), _rand(g, 37)
    p1, p2 = c1 + _rand(g, 6), c2 + _rand(g, 4)
    prompts = [p1, p1, p1, c2 + _rand(g, 9), p2, p2, _rand(g, 5), c1 + _rand(g, 1)]
    responses = [_rand(g, n) for n in (4, 9, 1, 12, 3, 0, 8, 5)]
    with torch.no_grad():
        want = _reference(model, prompts, responses, "left")
        got = _logp_rows(model, cached_response_hidden(
            model, prompts, responses, 0, store=PrefixStore(block=32), batch_size=3,
        ))
        assert _max_diff(got, want) < TOL
        plain = _logp_rows(model, uncached_response_hidden(model, prompts, responses, 0, batch_size=3))
        assert _max_diff(plain, want) < TOL


def test_prefix_store_is_reused_not_mutated_and_history_free(tiny) -> None:
    model, _ = tiny
    model.eval()
    prompts, responses = _rows(150)
    store = PrefixStore(block=64)
    with torch.no_grad():
        first = cached_response_hidden(model, prompts, responses, 0, store=store)
        assert store.misses == 1 and store.hits == 0 and len(store) == 1
        saved = [(k.clone(), v.clone()) for k, v in next(iter(store._entries.values()))]
        again = cached_response_hidden(model, prompts, responses, 0, store=store)
        assert store.hits == 1 and store.misses == 1
        for (k, v), (k0, v0) in zip(next(iter(store._entries.values())), saved, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)  # uses leave the prefix intact
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
        # A store filled by other batches (longer shared prefix, another group) gives the
        # bitwise same result as a fresh one: a resumed run equals an uninterrupted one.
        g = torch.Generator().manual_seed(9)
        other = [p[:150] + [7] * 20 + _rand(g, 3) for p in prompts]
        warm = PrefixStore(block=64)
        cached_response_hidden(model, other, responses, 0, store=warm)
        fresh = cached_response_hidden(model, prompts, responses, 0, store=PrefixStore(block=64))
        reused = cached_response_hidden(model, prompts, responses, 0, store=warm)
        assert warm.hits >= 1
        for a, b in zip(fresh, reused, strict=True):
            assert torch.equal(a, b)


def test_shared_prefix_layer_broadcasts_without_copying_into_itself() -> None:
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    layer = _SharedPrefixLayer(k, v)
    for b in (3, 1):
        nk, nv = torch.randn(b, 2, 2, 4), torch.randn(b, 2, 2, 4)
        keys, values = layer.update(nk, nv)
        assert keys.shape == (b, 2, 7, 4) and torch.equal(keys[:, :, :5], k.expand(b, -1, -1, -1))
        assert torch.equal(values[:, :, 5:], nv)
        assert layer.keys is k and layer.get_seq_length() == 5


def test_prefix_kv_matches_one_pass(tiny) -> None:
    model, _ = tiny
    model.eval()
    tokens = _rows(150)[0][0]
    with torch.no_grad():
        split = prefix_kv(model, tokens, PrefixStore(block=64))  # 128 stored + 22 on top
        whole = prefix_kv(model, tokens, None, block=len(tokens) + 1)
    for (a, b), (c, d) in zip(split, whole, strict=True):
        assert a.shape == c.shape == (1, a.shape[1], len(tokens), a.shape[-1])
        assert float((a - c).abs().max()) < 1e-5 and float((b - d).abs().max()) < 1e-5


# ---------------------------------------------------------------------------- teacher modes
def _teacher_rows(teacher, prompts, responses, **kw):
    return teacher.response_hidden(prompts, responses, 0, **kw)


def test_live_teacher_store_follows_the_weights(tiny) -> None:
    from opcd.teachers.teacher import Teacher

    model, _ = tiny
    teacher = Teacher("live", model)
    prompts, responses = _rows(130)
    before = _teacher_rows(teacher, prompts, responses)
    assert teacher.store is not None and len(teacher.store) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([prompts[0]])).logits.sum().backward()
    opt.step()  # in-place update: the stored prefix is stale now
    after = _teacher_rows(teacher, prompts, responses)
    fresh = _teacher_rows(teacher, prompts, responses, prefix_cache=False)
    assert _max_diff(after, fresh) < TOL
    assert _max_diff(after, before) > 1e-3


def test_lora_frozen_teacher_keeps_its_store_across_adapter_updates(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    from opcd.teachers.teacher import Teacher

    model, _ = tiny
    student = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    teacher = Teacher("frozen", student)
    prompts, responses = _rows(130)
    first = _teacher_rows(teacher, prompts, responses)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.add_(0.3)
    assert teacher.store is not None
    misses = teacher.store.misses
    again = _teacher_rows(teacher, prompts, responses)
    assert teacher.store.misses == misses  # base weights unchanged: prefix reused
    full = _teacher_rows(teacher, prompts, responses, prefix_cache=False)
    assert _max_diff(again, first) == 0.0 and _max_diff(again, full) < 1e-5
    w, b = teacher.head()
    with torch.no_grad(), student.disable_adapter():
        ref = student.get_output_embeddings()(full[1])
    assert torch.allclose(torch.nn.functional.linear(full[1], w, b), ref)


# ---------------------------------------------------------------------------- chunked loss
def _loss_case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, R, H, V = 5, 8, 16, 50
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, :] = False
    mask[4, 6:] = False
    n = int(mask.sum())
    hs = torch.randn(n, H, generator=g, dtype=dtype)
    ht = torch.randn(n, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    wt = torch.randn(V, H, generator=g, dtype=dtype)
    sampled = torch.randint(0, V, (n,), generator=g)
    return mask, hs, ht, w, b, wt, sampled


def _unchunked(mask, hs, w, b, ht, wt, mode, **kw):
    tl = losses.distill_token_loss(torch.nn.functional.linear(hs, w, b), ht @ wt.T, **kw)
    per = torch.zeros(mask.shape, dtype=tl.loss.dtype)
    per[mask] = tl.loss
    return losses.reduce_token_loss(per, mask, mode, total_tokens=40.0, total_sequences=6.0), tl


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize(
    "kw",
    [
        {"objective": "reverse_kl", "k": 7},
        {"objective": "reverse_kl", "k": 7, "renormalize": True},
        {"objective": "forward_kl", "k": 5, "slot_source": "union"},
        {"objective": "jsd", "k": 50, "beta": 0.3, "temperature": 0.7},
        {"objective": "reverse_kl", "k": 3, "slot_source": "teacher"},
        {"objective": "reverse_kl", "k": 7, "tail": False},  # the reference code's formula
        {"objective": "akl", "k": 6, "slot_source": "union"},
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("head", ["weight", "callable"])
def test_chunked_loss_equals_unchunked(mode: str, kw: dict, chunk: int, head: str) -> None:
    mask, hs, ht, w, b, wt, _ = _loss_case()
    hs.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    ref, ref_tl = _unchunked(mask, hs, w, b, ht, wt, mode, **kw)
    ref_grads = torch.autograd.grad(ref, [hs, w, b])
    weights = losses.reduction_weights(mask, mode, total_tokens=40.0, total_sequences=6.0,
                                       dtype=torch.float64)[mask]
    student_head = w if head == "weight" else (lambda x: torch.nn.functional.linear(x, w, b))
    loss, tl = losses.chunked_distill_loss(
        hs, student_head, ht, wt, weights, student_bias=b if head == "weight" else None,
        chunk_size=chunk, **kw,
    )
    grads = torch.autograd.grad(loss, [hs, w, b])
    assert abs(float(loss) - float(ref)) < 1e-12
    for got, want in zip(grads, ref_grads, strict=True):
        assert float((got - want).abs().max()) < 1e-12
    for field in ("loss", "kl", "student_topk_mass", "teacher_topk_mass", "student_entropy"):
        assert torch.allclose(getattr(tl, field), getattr(ref_tl, field).detach(), atol=1e-12), field


@pytest.mark.parametrize(
    "kw",
    [
        {"objective": "reverse_kl", "k": 64},
        {"objective": "reverse_kl", "k": 64, "renormalize": True, "temperature": 0.6},
        {"objective": "forward_kl", "k": 16, "slot_source": "union"},
        {"objective": "jsd", "k": 32, "beta": 0.7, "slot_source": "teacher"},
        {"objective": "reverse_kl", "k": 5000},  # k above the vocabulary: every token
        {"objective": "akl", "k": 64, "tail": False},
    ],
)
def test_in_place_chunks_equal_the_generic_token_loss_fp32(kw: dict) -> None:
    """The built-in objectives (computed in two reused [chunk, V] buffers) against the same
    objective passed as a token-loss callable (fresh tensors, autograd through log-softmax),
    in fp32 on a 3,000-token vocabulary, with a teacher that nearly rules some tokens out."""
    g = torch.Generator().manual_seed(3)
    n, H, V = 37, 24, 3000
    hs = torch.randn(n, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    b = torch.randn(V, generator=g).requires_grad_(True)
    ht, wt = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    bt = torch.zeros(V)
    bt[::7] = -30.0  # tokens the teacher almost never emits
    weights = torch.rand(n, generator=g)
    generic = losses._default_token_loss(**kw)
    results = []
    for token_loss in (None, generic):
        loss, tl = losses.chunked_distill_loss(hs, w, ht, wt, weights, student_bias=b,
                                               teacher_bias=bt, chunk_size=10,
                                               token_loss=token_loss, **kw)
        results.append((loss, tl, torch.autograd.grad(loss, [hs, w, b])))
    (fast, fast_tl, fast_g), (ref, ref_tl, ref_g) = results
    assert torch.isfinite(fast.detach()) and abs(float(fast.detach()) - float(ref.detach())) <= 1e-5 * max(1.0, abs(float(ref)))
    for got, want in zip(fast_g, ref_g, strict=True):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    for field in ("loss", "kl", "student_topk_mass", "teacher_topk_mass", "student_entropy"):
        torch.testing.assert_close(getattr(fast_tl, field), getattr(ref_tl, field),
                                   rtol=1e-4, atol=1e-5, msg=field)


def test_chunked_loss_fp32_custom_token_loss_and_frozen_head() -> None:
    """fp32, a caller's token loss (the trainer's sampled-token path), a frozen head."""
    mask, hs, ht, w, b, wt, sampled = _loss_case(dtype=torch.float32, seed=1)
    hs.requires_grad_(True)

    def sampled_token(s_logits, t_logits, tokens):
        s = torch.log_softmax(s_logits, -1).gather(-1, tokens[:, None])[:, 0]
        t = torch.log_softmax(t_logits, -1).gather(-1, tokens[:, None])[:, 0]
        loss = losses.sampled_token_loss(s, s.detach(), t)
        zero = torch.zeros_like(s)
        return losses.TokenLoss(loss, (s - t).detach(), s.detach().exp(), t.exp(), zero)

    zs = torch.nn.functional.linear(hs, w, b)
    ref_tl = sampled_token(zs, ht @ wt.T, sampled)
    per = torch.zeros(mask.shape)
    per[mask] = ref_tl.loss
    ref = losses.reduce_token_loss(per, mask, "seq_mean")
    (ref_grad,) = torch.autograd.grad(ref, [hs])
    weights = losses.reduction_weights(mask, "seq_mean")[mask]
    loss, tl = losses.chunked_distill_loss(hs, w, ht, wt, weights, student_bias=b, sampled=sampled,
                                           token_loss=sampled_token, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, [hs])
    assert abs(float(loss) - float(ref)) < 1e-6
    assert float((grad - ref_grad).abs().max()) < 1e-6
    assert torch.allclose(tl.kl, ref_tl.kl, atol=1e-6)


@pytest.mark.parametrize("head", ["weight", "callable"])
def test_chunked_loss_with_a_wider_teacher(head: str) -> None:
    """Cross-size: the teacher's hidden size differs from the student's (0.5B 896 vs 1.5B
    1536); only the vocabulary is shared. A study run with the 1.5B teacher hit a shape
    check that wanted equal hidden sizes."""
    mask, hs, _, w, b, _, _ = _loss_case()
    g = torch.Generator().manual_seed(5)
    ht = torch.randn(hs.shape[0], 11, generator=g, dtype=hs.dtype)
    wt = torch.randn(w.shape[0], 11, generator=g, dtype=hs.dtype)
    hs.requires_grad_(True)
    kw = {"objective": "reverse_kl", "k": 7}
    ref, _ = _unchunked(mask, hs, w, b, ht, wt, "token_mean", **kw)
    (ref_grad,) = torch.autograd.grad(ref, [hs])
    weights = losses.reduction_weights(mask, "token_mean", total_tokens=40.0, total_sequences=6.0,
                                       dtype=torch.float64)[mask]
    student_head = w if head == "weight" else (lambda x: torch.nn.functional.linear(x, w, b))
    loss, _ = losses.chunked_distill_loss(hs, student_head, ht, wt, weights,
                                          student_bias=b if head == "weight" else None,
                                          chunk_size=4, **kw)
    (grad,) = torch.autograd.grad(loss, [hs])
    assert abs(float(loss) - float(ref)) < 1e-12
    assert float((grad - ref_grad).abs().max()) < 1e-12


def test_reduction_weights_match_reduce_token_loss() -> None:
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(4, 6, generator=g) > 0.4
    per = torch.randn(4, 6, generator=g)
    for mode in losses.MODES:
        for totals in ({}, {"total_tokens": 30.0, "total_sequences": 9.0}):
            w = losses.reduction_weights(mask, mode, **totals)
            assert torch.allclose((per * w).sum(), losses.reduce_token_loss(per, mask, mode, **totals))
    with pytest.raises(ValueError, match="mode"):
        losses.reduction_weights(mask, "sum")


def test_chunked_loss_rejects_bad_shapes() -> None:
    mask, hs, ht, w, b, wt, _ = _loss_case()
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_distill_loss(hs, w, ht, wt, torch.ones(len(hs)), chunk_size=0)
    with pytest.raises(ValueError, match=r"\[N, H_teacher\]"):
        losses.chunked_distill_loss(hs, w, ht[:-1], wt, torch.ones(len(hs)))
    with pytest.raises(ValueError, match="token_weights"):
        losses.chunked_distill_loss(hs, w, ht, wt, torch.ones(3))


# ---------------------------------------------------------------------------- trainer
@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"loss": {"reduction": "seq_mean", "top_k": 16}, "teacher": {"mode": "live"}},
        {"loss": {"objective": "sampled_token"}},
        {"lora": {"enabled": True, "r": 4}},
    ],
    ids=["default", "seq_mean-live", "sampled_token", "lora"],
)
def test_trainer_step_fast_equals_naive(tiny_model_dir: Path, tmp_path: Path, sections: dict) -> None:
    from test_trainer import tiny_config

    from opcd.config import config_from_dict
    from opcd.training.trainer import Trainer

    variants = {"naive": {"prefix_cache": False, "chunked_loss": False},
                "fast": {"loss_chunk_tokens": 3, "prefix_block_tokens": 8}}
    if not sections:  # each switch alone
        variants["cache-only"] = {"chunked_loss": False, "prefix_block_tokens": 8}
        variants["chunk-only"] = {"prefix_cache": False, "loss_chunk_tokens": 5}
    results = {}
    for name, perf in variants.items():
        cfg = tiny_config(tiny_model_dir, tmp_path / name, perf=perf,
                          **copy.deepcopy(sections))
        cfg["rollout"]["max_new_tokens"] = 12
        torch.manual_seed(0)
        tr = Trainer(config_from_dict(cfg), progress=False)
        # SGD: AdamW's normalisation would blow float noise in near-zero gradients up to lr.
        tr.optimizer = torch.optim.SGD([p for p in tr.student.parameters() if p.requires_grad], lr=0.5)
        metrics = [tr.train_step() for _ in range(2)]
        params = {n: p.detach().clone() for n, p in tr.student.named_parameters() if p.requires_grad}
        results[name] = (metrics, params)
    naive_m, naive_p = results["naive"]
    for name in variants:
        m, p = results[name]
        for a, b in zip(m, naive_m, strict=True):
            assert a["sample"] == b["sample"]  # same rollouts
            for key in ("loss", "reverse_kl", "student_entropy", "student_topk_mass",
                        "teacher_topk_mass"):
                assert abs(a[key] - b[key]) < 1e-5, (name, key, a[key], b[key])
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, b["grad_norm"])
        for k in naive_p:
            assert float((p[k] - naive_p[k]).abs().max()) < 1e-4, (name, k)


# ---------------------------------------------------------------------------- rollout
def test_decode_loop_equals_generate_greedy_with_early_stops(tiny) -> None:
    """The sampling loop (finished rows leave the batch) equals model.generate."""
    from opcd.sampling import rollout

    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [_rand(g, n) for n in (5, 9, 3, 12, 7)]
    free = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=12, engine="generate")
    # make tokens the rows really produce end-of-sequence tokens, at different steps
    stops = sorted({free.response_ids[0][2], free.response_ids[3][6]})
    model.generation_config.eos_token_id = stops
    want = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=12, engine="generate")
    got = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=12, engine="loop")
    assert got.response_ids == want.response_ids and got.truncated == want.truncated
    assert len({len(r) for r in got.response_ids}) > 1  # rows did stop early
    fixed = rollout.sample(model, tok, prompts, max_new_tokens=9, ignore_eos=True)
    assert all(len(r) == 9 and not set(r) & set(stops) for r in fixed.response_ids)


def test_top_p_filter_matches_transformers() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    from opcd.sampling.rollout import _top_p_filter

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5, 0.9, 0.999):
        want = TopPLogitsWarper(top_p=p)(None, scores.clone())
        assert torch.equal(_top_p_filter(scores.clone(), p), want)


def test_decode_threads_are_restored_and_results_equal(tiny, monkeypatch) -> None:
    from opcd.sampling import rollout

    model, tok = tiny
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    before = torch.get_num_threads()
    monkeypatch.setenv("OPCD_DECODE_THREADS", "1")  # one thread for the decode steps
    assert rollout.decode_threads() == 1
    one = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=6)
    assert torch.get_num_threads() == before
    monkeypatch.delenv("OPCD_DECODE_THREADS")  # default: leave torch's setting
    assert rollout.decode_threads() == 0
    same = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=6)
    assert one.response_ids == same.response_ids
    monkeypatch.setenv("OPCD_DECODE_THREADS", "x")
    assert rollout.decode_threads() == 0


def test_shared_prefix_is_read_once_and_samples_stay_the_same(tiny) -> None:
    """A context every prompt starts with is read once per batch (from a store across calls);
    greedy and seeded samples equal the path that reads it in every row."""
    from opcd.sampling import rollout
    from opcd.teachers.scoring import PrefixStore

    model, tok = tiny
    model = model.double()  # the two paths differ only by float rounding: make it negligible
    g = torch.Generator().manual_seed(3)
    context = _rand(g, 70)
    prompts = [context + _rand(g, n) for n in (4, 9, 1, 6)]
    assert rollout.shared_prefix_len(prompts) == 70
    assert rollout.shared_prefix_len([context[:20] + [5], context[:20] + [6]]) == 0  # too short
    assert rollout.shared_prefix_len([context, context]) == 69  # one token of its own left
    free = rollout.sample(model, tok, prompts, temperature=0, max_new_tokens=10, share_prefix=False)
    model.generation_config.eos_token_id = [free.response_ids[1][3]]  # a row stops early
    store = PrefixStore(block=16)
    early = []
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seeds=[1, 2, 3, 4], n=2)):
        want = rollout.sample(model, tok, prompts, max_new_tokens=10, share_prefix=False, **kw)
        for _ in range(2):  # the second call finds the context's first 64 tokens in the store
            got = rollout.sample(model, tok, prompts, max_new_tokens=10, prefix_store=store, **kw)
            assert got.response_ids == want.response_ids and got.truncated == want.truncated
        early.append(not all(want.truncated))
    assert store.hits == 3 and store.misses == 1 and len(store) == 1
    assert early[0]
