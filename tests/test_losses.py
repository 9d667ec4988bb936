"""Tests for opcd.objectives.losses: top-k slot divergences, sampled-token loss and reductions.

Expected values come from independent computations written here: plain-Python ``math`` on a
4-token vocabulary, or brute-force full-vocabulary formulas built from ``exp / sum(exp)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opcd.objectives.losses import (
    TokenLoss,
    distill_token_loss,
    forward_kl_slots,
    jsd_slots,
    reduce_token_loss,
    reduction_totals,
    reverse_kl_slots,
    sampled_token_loss,
    select_slots,
    temperature_log_softmax,
)

F64 = torch.float64

# Hand-made 4-token example used throughout.
#   student top-2 = tokens {0, 1}; teacher top-2 = tokens {2, 1}; union = {0, 1, 2}.
ZS = [2.0, 1.0, 0.0, -1.0]
ZT = [0.0, 1.0, 2.0, 0.0]


# --------------------------------------------------------------------------- reference helpers


def py_logp(z: list[float], temperature: float = 1.0) -> list[float]:
    """Plain-Python log-softmax."""
    scaled = [x / temperature for x in z]
    log_z = math.log(sum(math.exp(x) for x in scaled))
    return [x - log_z for x in scaled]


def py_renorm(logp: list[float], slots: list[int]) -> dict[int, float]:
    log_mass = math.log(sum(math.exp(logp[v]) for v in slots))
    return {v: logp[v] - log_mass for v in slots}


def py_kl(lp: dict[int, float], lq: dict[int, float]) -> float:
    """sum_v p(v) (log p(v) - log q(v)) over the keys of ``lp``."""
    return sum(math.exp(lp[v]) * (lp[v] - lq[v]) for v in lp)


def brute_logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log(exp(z/T) / sum exp(z/T)) written without log_softmax."""
    scaled = logits / temperature
    probs = scaled.exp() / scaled.exp().sum(dim=-1, keepdim=True)
    return probs.log()


def brute_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    renormalize: bool = False,
) -> torch.Tensor:
    """Reverse KL on the student's top-k tokens, computed row by row."""
    out = []
    for zs, zt in zip(student_logits, teacher_logits, strict=True):
        ls = brute_logp(zs, temperature)
        lt = brute_logp(zt.detach(), temperature)
        order = torch.argsort(ls.detach(), descending=True)[:k]
        s, t = ls[order], lt[order]
        if renormalize:
            s = s - s.exp().sum().log()
            t = t - t.exp().sum().log()
        out.append((s.exp() * (s - t)).sum())
    return torch.stack(out)


def py_buckets(ls: list[float], lt: list[float], slots: tuple[int, ...] | list[int]
               ) -> tuple[dict[int, float], dict[int, float]]:
    """Both sides' log-probs over the slots plus the rest bucket (key -1), by plain sums."""
    rest = [v for v in range(len(ls)) if v not in slots]

    def bucket(lp: list[float]) -> dict[int, float]:
        out = {v: lp[v] for v in slots}
        out[-1] = math.log(sum(math.exp(lp[v]) for v in rest))
        return out

    return bucket(ls), bucket(lt)


def rand_logits(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen, dtype=F64) * scale


# --------------------------------------------------------------------------- building blocks


def test_temperature_log_softmax_matches_reference_and_upcasts_half() -> None:
    z = rand_logits(3, 6, seed=0)
    out = temperature_log_softmax(z, 2.5)
    torch.testing.assert_close(out, brute_logp(z, 2.5))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, dtype=F64))
    half = temperature_log_softmax(z.to(torch.bfloat16), 1.0)
    assert half.dtype == torch.float32


def test_select_slots_student_teacher_and_clamp() -> None:
    s = torch.log_softmax(torch.tensor([ZS], dtype=F64), -1)
    t = torch.log_softmax(torch.tensor([ZT], dtype=F64), -1)
    idx, valid = select_slots(s, t, 2, "student")
    assert sorted(idx[0].tolist()) == [0, 1] and bool(valid.all())
    idx, valid = select_slots(s, t, 2, "teacher")
    assert sorted(idx[0].tolist()) == [1, 2] and bool(valid.all())
    idx, valid = select_slots(s, None, 10, "student")
    assert idx.shape == (1, 4) and sorted(idx[0].tolist()) == [0, 1, 2, 3]


def test_select_slots_union_dedupes_shared_token() -> None:
    s = torch.log_softmax(torch.tensor([ZS, ZS], dtype=F64), -1)
    t = torch.log_softmax(torch.tensor([ZT, ZS], dtype=F64), -1)
    idx, valid = select_slots(s, t, 2, "union")
    assert idx.shape == (2, 4) and valid.dtype == torch.bool
    # row 0: {0,1} | {2,1} -> {0,1,2}; row 1: identical lists -> {0,1}
    assert sorted(idx[0][valid[0]].tolist()) == [0, 1, 2]
    assert sorted(idx[1][valid[1]].tolist()) == [0, 1]
    assert valid.sum(-1).tolist() == [3, 2]


# --------------------------------------------------------------------------- reverse KL


@pytest.mark.parametrize("k", [7, 50])
def test_reverse_kl_full_vocab_equals_brute_force(k: int) -> None:
    zs, zt = rand_logits(5, 7, seed=1), rand_logits(5, 7, seed=2)
    out = distill_token_loss(zs, zt, k=k)
    ps = brute_logp(zs).exp()
    expected = (ps * (brute_logp(zs) - brute_logp(zt))).sum(-1)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.kl, expected)
    torch.testing.assert_close(out.student_topk_mass, torch.ones(5, dtype=F64))
    torch.testing.assert_close(out.teacher_topk_mass, torch.ones(5, dtype=F64))
    assert bool((out.loss > 0).all())


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("source", ["student", "teacher", "union"])
def test_reverse_kl_zero_when_teacher_equals_student(
    k: int, renormalize: bool, source: str
) -> None:
    z = rand_logits(4, 8, seed=3)
    out = distill_token_loss(z, z.clone(), k=k, renormalize=renormalize, slot_source=source)
    torch.testing.assert_close(out.loss, torch.zeros(4, dtype=F64))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 12),
    source=st.sampled_from(["student", "teacher", "union"]),
)
def test_reverse_kl_renormalized_is_non_negative(seed: int, k: int, source: str) -> None:
    zs, zt = rand_logits(6, 10, seed=seed), rand_logits(6, 10, seed=seed + 1)
    out = distill_token_loss(zs, zt, k=k, renormalize=True, slot_source=source)
    assert bool((out.loss >= -1e-12).all())


def test_reverse_kl_hand_made_plain_renormalized_and_union() -> None:
    zs, zt = torch.tensor([ZS], dtype=F64), torch.tensor([ZT], dtype=F64)
    ls, lt = py_logp(ZS), py_logp(ZT)

    plain = py_kl({v: ls[v] for v in (0, 1)}, {v: lt[v] for v in (0, 1)})
    assert plain == pytest.approx(1.335058629949371)
    out = distill_token_loss(zs, zt, k=2, tail=False)  # the reference code's formula
    assert out.loss.item() == pytest.approx(plain, rel=1e-12)
    assert out.student_topk_mass.item() == pytest.approx(math.exp(ls[0]) + math.exp(ls[1]))
    assert out.teacher_topk_mass.item() == pytest.approx(math.exp(lt[0]) + math.exp(lt[1]))

    renorm = py_kl(py_renorm(ls, [0, 1]), py_renorm(lt, [0, 1]))
    # by hand: p_s~ = (e^2, e)/(e^2+e), p_t~ = (1, e)/(1+e)
    ps0, pt0 = math.e / (math.e + 1), 1 / (1 + math.e)
    by_hand = ps0 * math.log(ps0 / pt0) + (1 - ps0) * math.log((1 - ps0) / (1 - pt0))
    assert renorm == pytest.approx(by_hand)
    out = distill_token_loss(zs, zt, k=2, renormalize=True)
    assert out.loss.item() == pytest.approx(renorm, rel=1e-12)
    assert out.kl.item() == pytest.approx(renorm, rel=1e-12)

    union = py_kl({v: ls[v] for v in (0, 1, 2)}, {v: lt[v] for v in (0, 1, 2)})
    assert union == pytest.approx(1.1654428460408688)
    out = distill_token_loss(zs, zt, k=2, slot_source="union", tail=False)
    assert out.loss.item() == pytest.approx(union, rel=1e-12)
    mass = sum(math.exp(ls[v]) for v in (0, 1, 2))
    assert out.student_topk_mass.item() == pytest.approx(mass)
    # counting the shared token 1 twice would give this (wrong) value
    doubled = union + math.exp(ls[1]) * (ls[1] - lt[1])
    assert out.loss.item() != pytest.approx(doubled, rel=1e-6)

    union_renorm = py_kl(py_renorm(ls, [0, 1, 2]), py_renorm(lt, [0, 1, 2]))
    out = distill_token_loss(zs, zt, k=2, slot_source="union", renormalize=True)
    assert out.loss.item() == pytest.approx(union_renorm, rel=1e-12)


@pytest.mark.parametrize(
    ("k", "temperature", "renormalize"),
    [(3, 1.0, False), (3, 2.0, True), (9, 0.7, False), (2, 1.0, True), (1, 1.0, False)],
)
def test_reverse_kl_gradient_matches_brute_force(
    k: int, temperature: float, renormalize: bool
) -> None:
    zs = rand_logits(4, 9, seed=4).requires_grad_(True)
    zt = rand_logits(4, 9, seed=5)
    out = distill_token_loss(zs, zt, k=k, temperature=temperature, renormalize=renormalize,
                             tail=False)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    (grad,) = torch.autograd.grad((out.loss * weights).sum(), zs)
    ref = brute_reverse_kl(zs, zt, k, temperature, renormalize)
    torch.testing.assert_close(out.loss, ref)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), zs)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().sum() > 0


def test_loss_does_not_backpropagate_into_teacher() -> None:
    zs = rand_logits(3, 5, seed=6).requires_grad_(True)
    zt = rand_logits(3, 5, seed=7).requires_grad_(True)
    out = distill_token_loss(zs, zt, k=3)
    out.loss.sum().backward()
    assert zs.grad is not None and zt.grad is None
    assert not out.kl.requires_grad and not out.student_entropy.requires_grad
    assert not out.student_topk_mass.requires_grad and not out.teacher_topk_mass.requires_grad


def test_temperature_scales_both_sides() -> None:
    zs, zt = torch.tensor([ZS], dtype=F64), torch.tensor([ZT], dtype=F64)
    temp = 2.0
    ls, lt = py_logp(ZS, temp), py_logp(ZT, temp)
    expected = py_kl(dict(enumerate(ls)), dict(enumerate(lt)))
    out = distill_token_loss(zs, zt, k=4, temperature=temp)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    only_student = py_kl(dict(enumerate(ls)), dict(enumerate(py_logp(ZT))))
    only_teacher = py_kl(dict(enumerate(py_logp(ZS))), dict(enumerate(lt)))
    assert out.loss.item() != pytest.approx(only_student, rel=1e-3)
    assert out.loss.item() != pytest.approx(only_teacher, rel=1e-3)
    # entropy of the temperature-scaled student
    entropy = -sum(math.exp(x) * x for x in ls)
    assert out.student_entropy.item() == pytest.approx(entropy, rel=1e-12)
    # scaling both logit sets by T and dividing by T is the identity
    a, b = rand_logits(3, 6, seed=8), rand_logits(3, 6, seed=9)
    for objective in ("reverse_kl", "forward_kl", "jsd"):
        torch.testing.assert_close(
            distill_token_loss(a * 3.0, b * 3.0, k=4, temperature=3.0, objective=objective).loss,
            distill_token_loss(a, b, k=4, objective=objective).loss,
        )


def test_entropy_full_vocab() -> None:
    zs, zt = rand_logits(4, 6, seed=10), rand_logits(4, 6, seed=11)
    out = distill_token_loss(zs, zt, k=2)
    lp = brute_logp(zs)
    torch.testing.assert_close(out.student_entropy, -(lp.exp() * lp).sum(-1))


def test_minus_inf_logits_give_finite_loss_and_gradient() -> None:
    zs = rand_logits(3, 6, seed=12)
    zs[:, 4:] = -math.inf  # e.g. padded vocabulary entries
    zs.requires_grad_(True)
    zt = rand_logits(3, 6, seed=13)
    zt[:, 5] = -math.inf
    for objective in ("reverse_kl", "forward_kl", "jsd"):
        for renormalize in (False, True):
            out = distill_token_loss(
                zs, zt, k=5, objective=objective, renormalize=renormalize, slot_source="student"
            )
            (grad,) = torch.autograd.grad(out.loss.sum(), zs)
            assert torch.isfinite(grad).all(), (objective, renormalize)
            assert torch.isfinite(out.student_entropy).all()
    # the student puts mass on a token the teacher forbids: reverse KL is +inf
    out = distill_token_loss(zt, zs.detach(), k=6)
    assert torch.isinf(out.loss).all()


# --------------------------------------------------------------------------- the rest bucket

OBJECTIVES_ALL = ("reverse_kl", "forward_kl", "jsd", "akl")


def brute_bucket_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                            objective: str, source: str = "student", beta: float = 0.5
                            ) -> torch.Tensor:
    """The divergence over the slots plus the rest bucket, written row by row from
    ``exp / sum(exp)`` probabilities: the rest is the plain sum of the other tokens' mass."""
    out = []
    for zs, zt in zip(student_logits, teacher_logits, strict=True):
        ps = zs.exp() / zs.exp().sum()
        pt = zt.detach().exp() / zt.detach().exp().sum()
        top_s = set(torch.argsort(ps.detach(), descending=True)[:k].tolist())
        top_t = set(torch.argsort(pt, descending=True)[:k].tolist())
        slots = sorted(top_s if source == "student" else top_t if source == "teacher"
                       else top_s | top_t)
        rest = [v for v in range(len(zs)) if v not in slots]
        bs = torch.stack([*ps[slots], ps[rest].sum() if rest else ps.new_zeros(())])
        bt = torch.stack([*pt[slots], pt[rest].sum() if rest else pt.new_zeros(())])
        keep_s, keep_t = bs > 0, bt > 0
        rkl = (bs[keep_s] * (bs[keep_s].log() - bt[keep_s].log())).sum()
        fkl = (bt[keep_t] * (bt[keep_t].log() - bs[keep_t].log())).sum()
        if objective == "reverse_kl":
            out.append(rkl)
        elif objective == "forward_kl":
            out.append(fkl)
        elif objective == "jsd":
            m = beta * bt + (1 - beta) * bs
            out.append(beta * (bt[keep_t] * (bt[keep_t] / m[keep_t]).log()).sum()
                       + (1 - beta) * (bs[keep_s] * (bs[keep_s] / m[keep_s]).log()).sum())
        else:  # akl: the teacher's head up to half its mass, gaps weigh forward vs reverse
            order = torch.argsort(bt, descending=True)
            before = torch.cumsum(bt[order], 0) - bt[order]
            head = order[before < 0.5]
            gap = (bt - bs).detach().abs()
            g_head = gap[head].sum()
            w = g_head / gap.sum()
            out.append(w * fkl + (1 - w) * rkl)
    return torch.stack(out)


@pytest.mark.parametrize("objective", OBJECTIVES_ALL)
@pytest.mark.parametrize(("k", "source"), [(1, "student"), (3, "student"), (3, "teacher"),
                                           (4, "union"), (9, "student")])
def test_rest_bucket_value_and_gradient_match_brute_force(objective: str, k: int,
                                                          source: str) -> None:
    zs = rand_logits(4, 9, seed=40).requires_grad_(True)
    zt = rand_logits(4, 9, seed=41)
    out = distill_token_loss(zs, zt, objective=objective, k=k, slot_source=source)
    ref = brute_bucket_divergence(zs, zt, k, objective, source)
    torch.testing.assert_close(out.loss, ref)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    (grad,) = torch.autograd.grad((out.loss * weights).sum(), zs)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), zs)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("objective", OBJECTIVES_ALL)
def test_rest_bucket_is_exact_when_k_is_the_vocabulary(objective: str) -> None:
    zs = rand_logits(5, 7, seed=42).requires_grad_(True)
    zt = rand_logits(5, 7, seed=43)
    full = distill_token_loss(zs, zt, objective=objective, k=7)
    ref = brute_bucket_divergence(zs, zt, 7, objective)  # no rest: the plain divergence
    torch.testing.assert_close(full.loss, ref)
    (grad,) = torch.autograd.grad(full.loss.sum(), zs)
    assert torch.isfinite(grad).all()  # the empty rest bucket gives no NaN


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12),
       source=st.sampled_from(["student", "teacher", "union"]),
       objective=st.sampled_from(OBJECTIVES_ALL))
def test_rest_bucket_divergences_are_non_negative(seed: int, k: int, source: str,
                                                  objective: str) -> None:
    zs, zt = rand_logits(6, 10, seed=seed), rand_logits(6, 10, seed=seed + 1)
    out = distill_token_loss(zs, zt, k=k, objective=objective, slot_source=source)
    assert bool((out.loss >= -1e-12).all()) and bool((out.kl >= -1e-12).all())
    same = distill_token_loss(zs, zs.clone(), k=k, objective=objective, slot_source=source)
    torch.testing.assert_close(same.loss, torch.zeros(6, dtype=F64), atol=1e-12, rtol=0)


def test_rest_bucket_is_zero_only_for_equal_buckets() -> None:
    """Two distributions that differ only inside the rest bucket have divergence 0; any
    difference in a slot's or the rest's mass gives a positive one."""
    ps = torch.tensor([[0.5, 0.3, 0.1, 0.1]], dtype=F64)
    inside_rest = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64)  # same top-2, same rest
    moved = torch.tensor([[0.45, 0.3, 0.15, 0.1]], dtype=F64)
    for objective in OBJECTIVES_ALL:
        zero = distill_token_loss(ps.log(), inside_rest.log(), k=2, objective=objective)
        assert zero.loss.item() == pytest.approx(0.0, abs=1e-12), objective
        pos = distill_token_loss(ps.log(), moved.log(), k=2, objective=objective)
        assert pos.loss.item() > 1e-4, objective


@pytest.mark.parametrize("objective", OBJECTIVES_ALL)
def test_moving_student_mass_out_of_the_slots_raises_the_loss(objective: str) -> None:
    """The failure the rest bucket prevents: the student leaks mass from its top-k slots to
    the other tokens. Once its rest exceeds the teacher's, every further leak raises the loss
    (the slot-only formula falls instead, rewarding the broken model)."""
    v, k = 400, 4
    teacher = torch.full((v,), 0.02 / (v - k), dtype=F64)
    teacher[:k] = torch.tensor([0.5, 0.3, 0.1, 0.08], dtype=F64)  # teacher rest: 0.02

    def student(leak: float) -> torch.Tensor:
        p = torch.empty(v, dtype=F64)
        p[:k] = torch.tensor([0.55, 0.25, 0.12, 0.06], dtype=F64) * (1 - leak) / 0.98
        p[k:] = leak / (v - k)  # stays below the slots' probabilities: same top-k
        return p.log().unsqueeze(0)

    leaks = [0.03, 0.1, 0.3, 0.6, 0.9]
    with_rest = [distill_token_loss(student(x), teacher.log()[None], k=k,
                                    objective=objective).loss.item() for x in leaks]
    assert with_rest == sorted(with_rest) and with_rest[-1] > with_rest[0] + 0.1, with_rest
    if objective == "reverse_kl":
        slots_only = [distill_token_loss(student(x), teacher.log()[None], k=k, tail=False,
                                         objective=objective).loss.item() for x in leaks]
        assert slots_only[-1] < slots_only[0]  # the reference formula rewards the leak


@pytest.mark.parametrize("objective", OBJECTIVES_ALL)
def test_rest_bucket_is_precise_in_float32_when_the_slots_hold_nearly_all_mass(
    objective: str
) -> None:
    """A rest of ~1e-6 computed as 1 - (slot mass) keeps a digit or two in float32; summed
    over the other tokens it keeps them all: float32 loss and gradient match float64."""
    zs64 = rand_logits(4, 300, seed=44, scale=1.0)
    zt64 = rand_logits(4, 300, seed=45, scale=1.0)
    zs64[:, :20] += 14.0  # the top-20 hold all but ~1e-6 of the mass, on both sides
    zt64[:, :20] += 13.0
    z32 = zs64.float().requires_grad_(True)
    z64 = zs64.clone().requires_grad_(True)
    out32 = distill_token_loss(z32, zt64.float(), objective=objective, k=20)
    out64 = distill_token_loss(z64, zt64, objective=objective, k=20)
    torch.testing.assert_close(out32.loss.double(), out64.loss, rtol=1e-4, atol=1e-9)
    (g32,) = torch.autograd.grad(out32.loss.sum(), z32)
    (g64,) = torch.autograd.grad(out64.loss.sum(), z64)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-8)


# --------------------------------------------------------------------------- forward KL and JSD


def test_forward_kl_hand_made_student_and_teacher_slots() -> None:
    zs, zt = torch.tensor([ZS], dtype=F64), torch.tensor([ZT], dtype=F64)
    ls, lt = py_logp(ZS), py_logp(ZT)
    for source, slots in (("student", (0, 1)), ("teacher", (1, 2)), ("union", (0, 1, 2))):
        expected = py_kl({v: lt[v] for v in slots}, {v: ls[v] for v in slots})
        out = distill_token_loss(zs, zt, objective="forward_kl", k=2, slot_source=source,
                                 tail=False)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12), source
        # the logged kl is always the reverse KL over the same slots and the rest bucket
        rev = py_kl(*py_buckets(ls, lt, slots))
        assert out.kl.item() == pytest.approx(rev, rel=1e-12), source
    full = py_kl(dict(enumerate(lt)), dict(enumerate(ls)))
    out = distill_token_loss(zs, zt, objective="forward_kl", k=4)
    assert out.loss.item() == pytest.approx(full, rel=1e-12)


def test_forward_kl_gradient_is_minus_teacher_prob_on_slots() -> None:
    s = torch.log_softmax(rand_logits(3, 5, seed=14), -1).requires_grad_(True)
    t = torch.log_softmax(rand_logits(3, 5, seed=15), -1)
    (grad,) = torch.autograd.grad(forward_kl_slots(s, t).sum(), s)
    torch.testing.assert_close(grad, -t.exp())


def py_jsd(ls: dict[int, float], lt: dict[int, float], beta: float) -> float:
    ps = {v: math.exp(x) for v, x in ls.items()}
    pt = {v: math.exp(x) for v, x in lt.items()}
    m = {v: beta * pt[v] + (1 - beta) * ps[v] for v in ls}
    kl_t = sum(pt[v] * math.log(pt[v] / m[v]) for v in ls)
    kl_s = sum(ps[v] * math.log(ps[v] / m[v]) for v in ls)
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
def test_jsd_hand_made(beta: float) -> None:
    zs, zt = torch.tensor([ZS], dtype=F64), torch.tensor([ZT], dtype=F64)
    ls, lt = py_logp(ZS), py_logp(ZT)
    slots = (0, 1)
    expected = py_jsd({v: ls[v] for v in slots}, {v: lt[v] for v in slots}, beta)
    out = distill_token_loss(zs, zt, objective="jsd", k=2, beta=beta, tail=False)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    buckets = py_jsd(*py_buckets(ls, lt, slots), beta)
    out = distill_token_loss(zs, zt, objective="jsd", k=2, beta=beta)
    assert out.loss.item() == pytest.approx(buckets, rel=1e-12)
    full = py_jsd(dict(enumerate(ls)), dict(enumerate(lt)), beta)
    out = distill_token_loss(zs, zt, objective="jsd", k=4, beta=beta)
    assert out.loss.item() == pytest.approx(full, rel=1e-12)
    assert 0 < full < math.log(2)
    renorm = py_jsd(py_renorm(ls, [0, 1]), py_renorm(lt, [0, 1]), beta)
    out = distill_token_loss(zs, zt, objective="jsd", k=2, beta=beta, renormalize=True)
    assert out.loss.item() == pytest.approx(renorm, rel=1e-12)
    union = py_jsd({v: ls[v] for v in (0, 1, 2)}, {v: lt[v] for v in (0, 1, 2)}, beta)
    out = distill_token_loss(zs, zt, objective="jsd", k=2, beta=beta, slot_source="union",
                             tail=False)
    assert out.loss.item() == pytest.approx(union, rel=1e-12)


def test_jsd_symmetric_at_half_and_not_otherwise() -> None:
    s = torch.log_softmax(rand_logits(5, 8, seed=16), -1)
    t = torch.log_softmax(rand_logits(5, 8, seed=17), -1)
    torch.testing.assert_close(jsd_slots(s, t, beta=0.5), jsd_slots(t, s, beta=0.5))
    zs, zt = rand_logits(5, 8, seed=18), rand_logits(5, 8, seed=19)
    torch.testing.assert_close(
        distill_token_loss(zs, zt, objective="jsd", k=8).loss,
        distill_token_loss(zt, zs, objective="jsd", k=8).loss,
    )
    assert not torch.allclose(jsd_slots(s, t, beta=0.2), jsd_slots(t, s, beta=0.2))
    # beta -> 0 behaves like beta * forward KL, beta -> 1 like (1 - beta) * reverse KL
    eps = 1e-8
    torch.testing.assert_close(
        jsd_slots(s, t, beta=eps) / eps, forward_kl_slots(s, t), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        jsd_slots(s, t, beta=1 - eps) / eps, reverse_kl_slots(s, t), rtol=1e-4, atol=1e-6
    )


def test_jsd_gradient_matches_brute_force() -> None:
    zs = rand_logits(3, 6, seed=20).requires_grad_(True)
    zt = rand_logits(3, 6, seed=21)
    beta = 0.3
    out = distill_token_loss(zs, zt, objective="jsd", k=6, beta=beta)
    ps = brute_logp(zs).exp()
    pt = brute_logp(zt).exp()
    m = beta * pt + (1 - beta) * ps
    ref = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(out.loss, ref)
    (g1,) = torch.autograd.grad(out.loss.sum(), zs)
    (g2,) = torch.autograd.grad(ref.sum(), zs)
    torch.testing.assert_close(g1, g2)


def test_slot_mask_excludes_slots() -> None:
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=F64))
    t = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=F64))
    mask = torch.tensor([[True, True, False]])
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.3)
    assert reverse_kl_slots(s, t, mask).item() == pytest.approx(expected)
    expected_fwd = 0.2 * math.log(0.2 / 0.5)
    assert forward_kl_slots(s, t, mask).item() == pytest.approx(expected_fwd)
    rs, rt = 0.5 / 0.8, 0.2 / 0.5
    expected_renorm = rs * math.log(rs / rt) + (1 - rs) * math.log((1 - rs) / (1 - rt))
    assert reverse_kl_slots(s, t, mask, renormalize=True).item() == pytest.approx(expected_renorm)
    expected_jsd = py_jsd(
        {0: math.log(0.5), 1: math.log(0.3)}, {0: math.log(0.2), 1: math.log(0.3)}, 0.4
    )
    assert jsd_slots(s, t, mask, beta=0.4).item() == pytest.approx(expected_jsd)


# --------------------------------------------------------------------------- sampled token


def test_sampled_token_loss_value_and_gradient_on_policy() -> None:
    logits = rand_logits(4, 5, seed=22).requires_grad_(True)
    teacher_logits = rand_logits(4, 5, seed=23)
    y = torch.tensor([0, 3, 2, 4])
    student_logp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    teacher_logp = torch.log_softmax(teacher_logits, -1).gather(-1, y[:, None]).squeeze(-1)
    behaviour = student_logp.detach().clone()
    loss = sampled_token_loss(student_logp, behaviour, teacher_logp)
    advantage = teacher_logp - behaviour
    torch.testing.assert_close(loss, -advantage)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    probs = brute_logp(logits.detach()).exp()
    onehot = torch.nn.functional.one_hot(y, 5).to(F64)
    expected = -advantage[:, None] * (onehot - probs)  # -A_t * d log p_s(y_t) / d logits
    torch.testing.assert_close(grad, expected)


def test_sampled_token_loss_off_policy_ratio_and_detached_targets() -> None:
    student = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    behaviour = torch.tensor([-1.5, -1.0], dtype=F64, requires_grad=True)
    teacher = torch.tensor([-0.5, -3.0], dtype=F64, requires_grad=True)
    loss = sampled_token_loss(student, behaviour, teacher)
    expected = [-math.exp(-1.0 + 1.5) * (-0.5 + 1.5), -math.exp(-2.0 + 1.0) * (-3.0 + 1.0)]
    assert loss.tolist() == pytest.approx(expected)
    loss.sum().backward()
    assert student.grad is not None
    assert student.grad.tolist() == pytest.approx(expected)  # d/ds of -exp(s-b)A = loss
    assert behaviour.grad is None and teacher.grad is None


# --------------------------------------------------------------------------- reduction


def test_reduce_token_loss_hand_made() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert reduce_token_loss(per_token, mask).item() == pytest.approx(7.0 / 3.0)
    # (1+2)/2 and 4/1 averaged over the 2 non-empty rows
    assert reduce_token_loss(per_token, mask, "seq_mean").item() == pytest.approx(2.75)
    assert reduce_token_loss(per_token, mask, total_tokens=7).item() == pytest.approx(1.0)
    assert reduce_token_loss(
        per_token, mask, "seq_mean", total_sequences=11
    ).item() == pytest.approx(5.5 / 11)
    assert reduction_totals(mask) == (3.0, 2.0)
    # masked-out entries are ignored even if NaN / inf
    poisoned = per_token.clone()
    poisoned[~mask] = math.nan
    poisoned[2, 2] = math.inf
    assert reduce_token_loss(poisoned, mask).item() == pytest.approx(7.0 / 3.0)
    assert reduce_token_loss(poisoned, mask, "seq_mean").item() == pytest.approx(2.75)
    # an all-empty mask gives 0, not NaN
    empty = torch.zeros_like(mask)
    assert reduce_token_loss(per_token, empty).item() == 0.0
    assert reduce_token_loss(per_token, empty, "seq_mean").item() == 0.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_reduce_token_loss_accumulation_equals_one_batch(mode: str) -> None:
    gen = torch.Generator().manual_seed(24)
    weight = torch.randn(6, dtype=F64, generator=gen).requires_grad_(True)
    features = torch.randn(4, 5, 6, dtype=F64, generator=gen)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool
    )

    def per_token(rows: slice) -> torch.Tensor:
        return (features[rows] @ weight) ** 2

    full = reduce_token_loss(per_token(slice(None)), mask, mode)
    (g_full,) = torch.autograd.grad(full, weight)

    totals = [reduction_totals(mask[:2]), reduction_totals(mask[2:])]
    total_tokens = sum(t[0] for t in totals)
    total_sequences = sum(t[1] for t in totals)
    assert (total_tokens, total_sequences) == (9.0, 3.0)
    parts = [
        reduce_token_loss(
            per_token(rows),
            mask[rows],
            mode,
            total_tokens=total_tokens,
            total_sequences=total_sequences,
        )
        for rows in (slice(0, 2), slice(2, 4))
    ]
    accumulated = parts[0] + parts[1]
    torch.testing.assert_close(accumulated, full)
    g_acc = sum(torch.autograd.grad(p, weight)[0] for p in parts)
    torch.testing.assert_close(g_acc, g_full)
    # without the global totals, averaging the micro-batch means differs
    local = [reduce_token_loss(per_token(r), mask[r], mode) for r in (slice(0, 2), slice(2, 4))]
    assert not torch.allclose((local[0] + local[1]) / 2, full)


# --------------------------------------------------------------------------- validation


def test_bad_arguments_raise_helpful_value_errors() -> None:
    z = rand_logits(2, 5, seed=25)
    with pytest.raises(ValueError, match=r"unknown objective 'kl'.*'reverse_kl'.*'jsd'"):
        distill_token_loss(z, z, objective="kl")
    with pytest.raises(ValueError, match=r"unknown slot_source 'both'.*'union'"):
        distill_token_loss(z, z, slot_source="both")
    with pytest.raises(ValueError, match=r"unknown slot_source 'x'.*'student'"):
        select_slots(z, z, 2, "x")
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match=r"k must be an integer >= 1"):
            distill_token_loss(z, z, k=bad_k)
    for bad_t in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
            distill_token_loss(z, z, temperature=bad_t)
        with pytest.raises(ValueError, match=r"temperature"):
            temperature_log_softmax(z, bad_t)
    for bad_beta in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"beta must lie strictly between 0 and 1"):
            distill_token_loss(z, z, objective="jsd", beta=bad_beta)
        with pytest.raises(ValueError, match=r"beta"):
            jsd_slots(z, z, beta=bad_beta)
    # beta is only read by the JSD objective
    assert isinstance(distill_token_loss(z, z, beta=0.0), TokenLoss)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        distill_token_loss(z, rand_logits(2, 6, seed=26))
    with pytest.raises(ValueError, match=r"shape mismatch"):
        reverse_kl_slots(z, z[:, :3])
    with pytest.raises(ValueError, match=r"shape mismatch"):
        forward_kl_slots(z, z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"needs teacher_logp"):
        select_slots(z, None, 2, "union")
    with pytest.raises(ValueError, match=r"unknown mode 'sum'.*'token_mean'.*'seq_mean'"):
        reduce_token_loss(z, z > 0, "sum")
    with pytest.raises(ValueError, match=r"shape mismatch"):
        reduce_token_loss(z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"total_tokens must be > 0"):
        reduce_token_loss(z, z > 0, total_tokens=0)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        sampled_token_loss(z[0], z[0], z[0, :3])


def test_chunked_equals_one_call_and_records_each_chunk_once() -> None:
    from opcd.objectives.losses import chunked

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(11, 8, requires_grad=True)
    ids = torch.randint(0, 50, (11,))

    def logp(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        z = head(h).log_softmax(-1)
        return z.gather(-1, t[:, None])[:, 0], h.shape[0]

    whole, aux = chunked(logp, hidden, ids, chunk_size=None)
    (g_whole,) = torch.autograd.grad(whole.sum(), hidden)
    parts, sizes = chunked(logp, hidden, ids, chunk_size=4)
    (g_parts,) = torch.autograd.grad(parts.sum(), hidden)  # the backward recomputes each chunk
    assert aux == [11] and sizes == [4, 4, 3]  # recorded in the forward pass only
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(g_parts, g_whole)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked(logp, hidden, ids, chunk_size=0)
