"""Distillation losses for On-Policy Context Distillation (OPCD, arXiv 2602.12275).

Setting
-------
The *student* samples a response ``y`` **without** the context ``c``; the *teacher* (the same
kind of model, given the context) scores the same tokens **with** the context. At every
response position ``t`` both produce logits over the vocabulary ``V``. Both sides are divided
by a temperature ``T`` before a full-vocabulary ``log_softmax``::

    log p_s(v) = log_softmax(z_s / T)[v]        log p_t(v) = log_softmax(z_t / T)[v]

Top-k slots
-----------
Summing over all of ``V`` at every position is costly, so the divergences are evaluated on a
set of *slots* ``S_t`` per position (default: the student's top-k tokens, ``k = 256``, picked
from the detached student distribution). ``S_t`` may instead be the teacher's top-k, or the
union of both (up to ``2k`` slots; a token in both lists is counted once, through a validity
mask). The log-probabilities on the slots are the full-vocabulary values gathered at those
indices; they are **not** renormalised over the slots unless ``renormalize=True``, which
subtracts the log-sum-exp over the valid slots from both sides::

    log p~(v) = log p(v) - log sum_{u in S_t} p(u)

``k`` larger than ``|V|`` is clamped to ``|V|``; with ``k = |V|`` every divergence below is
the exact full-vocabulary one.

The rest bucket (default, ``tail=True``)
-----------------------------------------
A divergence summed over the slots alone is not a divergence: it can be negative, and it is
minimised by moving the student's mass *out of* the slots (the loss falls while the model
breaks). So by default every position gets one more bucket holding the rest of the
vocabulary, for both models::

    log p(rest) = log(1 - sum_{v in S_t} p(v))      (log1mexp of the slots' log-sum-exp)

and the divergences below run over these ``|S_t| + 1`` buckets. They are then true
divergences between two distributions: ``>= 0``, 0 only when the bucket distributions are
equal, exact when ``k = |V|`` (the rest is empty), and moving student mass into the rest
raises the loss unless the teacher's rest is at least as large. ``tail=False`` without
``renormalize`` is the reference code's formula (microsoft/LMOps ``opcd/``), kept for
comparison.

Per-token objectives (sum over the valid slots ``v in S_t``, and the rest bucket)
---------------------------------------------------------------------------------
* reverse KL (OPCD's objective)::

      kl_t = sum_v p_s(v) * (log p_s(v) - log p_t(v))

  The gradient is plain autograd of this formula through the student's log-probabilities
  (no sampling estimator, no importance ratio). The teacher is treated as a constant.
* forward KL (the off-policy baseline calls it with teacher slots)::

      fkl_t = sum_v p_t(v) * (log p_t(v) - log p_s(v))

* adaptive KL (``akl``, after Wu et al. 2024, "Rethinking KL divergence in knowledge
  distillation for LLMs"): per token, the buckets are split into the teacher's *head* (its
  most probable buckets up to cumulative mass ``mu = 0.5``) and the rest; with the gaps
  ``g_head = sum_head |p_t - p_s|`` and ``g_tail = sum_tail |p_t - p_s|`` (detached)::

      akl_t = g_head / (g_head + g_tail) * fkl_t + g_tail / (g_head + g_tail) * kl_t

  Forward KL where the student misses the teacher's likely tokens (it moves them fast),
  reverse KL where the mismatch lies in the teacher's unlikely tokens (mode-seeking there).
* generalized Jensen-Shannon divergence ``JSD(beta)`` with the mixture
  ``m = beta * p_t + (1 - beta) * p_s`` (computed in log space with log-sum-exp)::

      jsd_t = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)

  ``beta`` is the teacher's weight in the mixture. ``beta = 0.5`` is the symmetric JSD
  (bounded by ``log 2``). For small ``beta`` it behaves like ``beta * forward KL``, for
  ``beta`` near 1 like ``(1 - beta) * reverse KL``; at exactly ``beta = 0`` or ``beta = 1``
  this formula is identically 0, so ``beta`` must lie strictly in ``(0, 1)`` -- use the
  ``forward_kl`` / ``reverse_kl`` objectives for the end points.
* sampled-token estimator (on-policy distillation): with the per-token advantage
  ``A_t = log p_teacher(y_t) - log p_behaviour(y_t)`` (detached) and the behaviour policy's
  log-probability ``log p_behaviour(y_t)`` recorded when ``y`` was sampled (detached)::

      loss_t = -exp(log p_s(y_t) - log p_behaviour(y_t)) * A_t

  Strictly on-policy the ratio equals 1 but its gradient is ``-A_t * d log p_s(y_t)``.

Reduction
---------
``token_mean`` (default) averages over all response tokens of the batch; ``seq_mean`` is the
paper's per-sequence mean (mean over each sequence's tokens, then over sequences). Passing the
whole batch's totals (see :func:`reduction_totals`) makes gradient accumulation over
micro-batches equal to one big batch.

All functions here are pure tensor functions: no I/O, no models, no configuration objects.
Invalid arguments raise :class:`ValueError` with a message naming the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MODES",
    "OBJECTIVES",
    "SLOT_SOURCES",
    "TokenLoss",
    "akl_slots",
    "chunked_distill_loss",
    "softmax_in_place",
    "distill_token_loss",
    "forward_kl_slots",
    "jsd_slots",
    "log_rest_mass",
    "reduce_token_loss",
    "reduction_totals",
    "reduction_weights",
    "reverse_kl_slots",
    "sampled_token_loss",
    "select_slots",
    "slot_divergence",
    "with_rest_bucket",
    "temperature_log_softmax",
]

OBJECTIVES: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd", "akl")
AKL_HEAD_MASS = 0.5
"""The teacher's cumulative mass that makes the head of :func:`akl_slots`."""
# Smallest rest mass kept finite (float32 cannot tell 1 - sum p from 0 below ~1e-7 anyway).
_REST_FLOOR = 1e-30
SLOT_SOURCES: tuple[str, ...] = ("student", "teacher", "union")
MODES: tuple[str, ...] = ("token_mean", "seq_mean")


@dataclass
class TokenLoss:
    """Per-token outputs of :func:`distill_token_loss` (all of shape ``[N]``)."""

    loss: Tensor
    """Per-token loss, differentiable with respect to the student's inputs."""
    kl: Tensor
    """Detached reverse KL over the slots plus the rest bucket (over the renormalised slots
    with ``renormalize``): a true divergence, >= 0, whatever the objective, for logging."""
    student_topk_mass: Tensor
    """Detached ``sum_{v in S_t} p_s(v)`` (full-vocabulary probabilities, not renormalised)."""
    teacher_topk_mass: Tensor
    """Detached ``sum_{v in S_t} p_t(v)`` (full-vocabulary probabilities, not renormalised)."""
    student_entropy: Tensor
    """Detached full-vocabulary entropy of the temperature-scaled student distribution."""


# --------------------------------------------------------------------------- validation


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"unknown {name} {value!r}; allowed values: {', '.join(repr(a) for a in allowed)}"
        )


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (number of top-k slots), got {k!r}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(
            f"beta must lie strictly between 0 and 1 (teacher weight in the JSD mixture), "
            f"got {beta!r}; JSD(beta) is identically 0 at beta=0 and beta=1, use "
            f"objective='forward_kl' or 'reverse_kl' for those limits"
        )


def _check_objective_settings(objective: str, slot_source: str, k: int, temperature: float,
                              beta: float) -> None:
    _check_choice("objective", objective, OBJECTIVES)
    _check_choice("slot_source", slot_source, SLOT_SOURCES)
    _check_k(k)
    _check_temperature(temperature)
    if objective == "jsd":
        _check_beta(beta)


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape "
            f"{tuple(b.shape)}; they must be equal"
        )


def _slot_mask(
    student_logp_slots: Tensor, teacher_logp_slots: Tensor, mask: Tensor | None
) -> Tensor:
    _check_same_shape(
        "student_logp_slots", student_logp_slots, "teacher_logp_slots", teacher_logp_slots
    )
    if mask is None:
        return torch.ones_like(student_logp_slots, dtype=torch.bool)
    _check_same_shape("mask", mask, "student_logp_slots", student_logp_slots)
    return mask.to(torch.bool)


# --------------------------------------------------------------------------- building blocks


def temperature_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last (vocabulary) dimension.

    Half-precision inputs (float16 / bfloat16) are upcast to float32 first; float32 and float64
    keep their dtype.
    """
    _check_temperature(temperature)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1:  # x / 1 == x exactly: no [N, V] copy at the default temperature
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def select_slots(
    student_logp: Tensor, teacher_logp: Tensor | None, k: int, source: str = "student"
) -> tuple[Tensor, Tensor]:
    """Choose the slot indices at each position.

    Args:
        student_logp: ``[N, V]`` student log-probabilities (only read, never differentiated).
        teacher_logp: ``[N, V]`` teacher log-probabilities; required unless
            ``source == "student"``.
        k: slots per side; values above ``V`` are clamped to ``V``.
        source: ``"student"`` (student top-k), ``"teacher"`` (teacher top-k) or ``"union"``
            (student top-k together with teacher top-k, ``2k`` columns).

    Returns:
        ``(indices, valid)``: ``indices`` is ``[N, S]`` long, ``valid`` is ``[N, S]`` bool.
        For ``"student"`` / ``"teacher"`` ``S = min(k, V)`` and every slot is valid. For
        ``"union"`` ``S = 2 * min(k, V)``; the indices are sorted by vocabulary id and each
        duplicate (a token in both top-k lists) is marked invalid, so every token counts once.
    """
    _check_choice("slot_source", source, SLOT_SOURCES)
    _check_k(k)
    if student_logp.dim() < 1 or student_logp.shape[-1] < 1:
        raise ValueError(
            f"student_logp must have a non-empty last (vocabulary) dimension, got shape "
            f"{tuple(student_logp.shape)}"
        )
    if source != "student":
        if teacher_logp is None:
            raise ValueError(f"slot_source={source!r} needs teacher_logp, got None")
        _check_same_shape("student_logp", student_logp, "teacher_logp", teacher_logp)
    k_eff = min(k, student_logp.shape[-1])

    with torch.no_grad():
        if source == "student":
            indices = student_logp.detach().topk(k_eff, dim=-1).indices
        elif source == "teacher":
            assert teacher_logp is not None
            indices = teacher_logp.detach().topk(k_eff, dim=-1).indices
        else:
            assert teacher_logp is not None
            both = torch.cat(
                [
                    student_logp.detach().topk(k_eff, dim=-1).indices,
                    teacher_logp.detach().topk(k_eff, dim=-1).indices,
                ],
                dim=-1,
            )
            indices = both.sort(dim=-1).values
            valid = torch.ones_like(indices, dtype=torch.bool)
            # Within one list indices are distinct, so a repeat can only be a shared token:
            # after sorting, its second copy sits right after the first.
            valid[..., 1:] = indices[..., 1:] != indices[..., :-1]
            return indices, valid
    return indices, torch.ones_like(indices, dtype=torch.bool)


def _prepare_slots(
    student_logp_slots: Tensor, teacher_logp_slots: Tensor, mask: Tensor | None, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The slot losses' common start: (student, teacher, valid), both sides renormalised
    over the valid slots when asked."""
    valid = _slot_mask(student_logp_slots, teacher_logp_slots, mask)
    if renormalize:
        student_logp_slots = _masked_renormalize(student_logp_slots, valid)
        teacher_logp_slots = _masked_renormalize(teacher_logp_slots, valid)
    return student_logp_slots, teacher_logp_slots, valid


def _masked_renormalize(logp: Tensor, valid: Tensor) -> Tensor:
    """Subtract the log-sum-exp over the valid slots (invalid slots do not contribute)."""
    lse = torch.logsumexp(logp.masked_fill(~valid, -math.inf), dim=-1, keepdim=True)
    return logp - lse


def _kl_terms(logp: Tensor, logq: Tensor, valid: Tensor) -> Tensor:
    """``sum_{valid v} exp(logp) * (logp - logq)`` with ``0 * log 0 = 0``, gradient-safe.

    Slots with ``p = 0`` (``logp = -inf``) or ``valid = False`` contribute exactly 0 and get a
    zero (not NaN) gradient; a slot with ``p > 0`` and ``q = 0`` gives ``+inf`` as it should.
    """
    keep = valid & (logp > -math.inf)
    logp_safe = torch.where(keep, logp, torch.zeros_like(logp))
    logq_safe = torch.where(keep, logq, torch.zeros_like(logq))
    terms = logp_safe.exp() * (logp_safe - logq_safe)
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(dim=-1)


def reverse_kl_slots(
    student_logp_slots: Tensor,
    teacher_logp_slots: Tensor,
    mask: Tensor | None = None,
    renormalize: bool = False,
) -> Tensor:
    """Reverse KL over the slots: ``sum_v p_s(v) (log p_s(v) - log p_t(v))``.

    Args:
        student_logp_slots, teacher_logp_slots: ``[N, S]`` log-probabilities at the slots.
        mask: optional ``[N, S]`` bool validity mask (invalid slots are ignored).
        renormalize: renormalise both sides over the valid slots first.

    Returns:
        ``[N]``; differentiable through both inputs (callers pass a constant teacher).
        Each row needs at least one valid slot.
    """
    student_logp_slots, teacher_logp_slots, valid = _prepare_slots(
        student_logp_slots, teacher_logp_slots, mask, renormalize)
    return _kl_terms(student_logp_slots, teacher_logp_slots, valid)


def forward_kl_slots(
    student_logp_slots: Tensor,
    teacher_logp_slots: Tensor,
    mask: Tensor | None = None,
    renormalize: bool = False,
) -> Tensor:
    """Forward KL over the slots: ``sum_v p_t(v) (log p_t(v) - log p_s(v))``; ``[N]``.

    Arguments as in :func:`reverse_kl_slots`.
    """
    student_logp_slots, teacher_logp_slots, valid = _prepare_slots(
        student_logp_slots, teacher_logp_slots, mask, renormalize)
    return _kl_terms(teacher_logp_slots, student_logp_slots, valid)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012); values of
    ``x`` at or above 0 (rounding) give ``log`` of :data:`_REST_FLOOR`, with zero gradient."""
    x = x.clamp_max(math.log1p(-_REST_FLOOR))
    near = x > -math.log(2.0)
    # each branch sees only the inputs it is stable for: torch.where would otherwise pass
    # the other branch's inf gradient on as NaN (0 * inf)
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, b)


def log_rest_mass(logp: Tensor, indices: Tensor) -> Tensor:
    """``log sum_{v not in indices} p(v)`` per row ``[N]``, from full ``[N, V]`` log-probs,
    summed over the other tokens themselves (detached). Exact where ``1 - sum over the slots``
    is not: when the slots hold nearly all the mass, that difference keeps only a few float32
    digits. Empty rest: log of :data:`_REST_FLOOR`."""
    with torch.no_grad():
        rest = logp.detach().scatter(-1, indices, -math.inf).logsumexp(dim=-1)
    return rest.clamp_min(math.log(_REST_FLOOR))


def with_rest_bucket(
    student_logp_slots: Tensor, teacher_logp_slots: Tensor, mask: Tensor | None = None,
    *, rest: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Append the rest-of-vocabulary bucket to both sides' slots: ``[N, S] -> [N, S + 1]``.

    ``log p(rest) = log(1 - sum_{valid v} p(v))`` per row; the returned mask marks the new
    column valid. The inputs must be full-vocabulary log-probs gathered at the slots (not
    renormalised). Differentiable through the student's slots. ``rest``: both sides' log
    rest masses ``[N]`` computed from the other tokens (:func:`log_rest_mass`), for the
    precise value; the student's gradient still flows through its slots
    (``d log p(rest) / d log p(v) = -p(v) / p(rest)``).
    """
    valid = _slot_mask(student_logp_slots, teacher_logp_slots, mask)

    def from_slots(logp: Tensor) -> Tensor:
        return _log1mexp(torch.logsumexp(logp.masked_fill(~valid, -math.inf), dim=-1))

    if rest is None:
        s_rest, t_rest = from_slots(student_logp_slots), from_slots(teacher_logp_slots)
    else:
        s_value, t_rest = (r.detach().to(student_logp_slots.dtype) for r in rest)
        mass = torch.where(valid, student_logp_slots.exp(), torch.zeros_like(student_logp_slots))
        mass = mass.sum(dim=-1)
        # the value from the other tokens, the gradient of log(1 - slot mass) at that value
        s_rest = s_value - (mass - mass.detach()) / s_value.exp()
    ones = torch.ones_like(valid[..., :1])
    return (torch.cat([student_logp_slots, s_rest.unsqueeze(-1)], dim=-1),
            torch.cat([teacher_logp_slots, t_rest.unsqueeze(-1)], dim=-1),
            torch.cat([valid, ones], dim=-1))


def akl_slots(
    student_logp_slots: Tensor,
    teacher_logp_slots: Tensor,
    mask: Tensor | None = None,
    renormalize: bool = False,
    *,
    head_mass: float = AKL_HEAD_MASS,
) -> Tensor:
    """Adaptive KL over the slots: forward and reverse KL mixed per token by where the two
    distributions differ (the teacher's head or its tail, see the module docstring); ``[N]``.

    The mixing weights are detached; arguments as in :func:`reverse_kl_slots`.
    """
    student_logp_slots, teacher_logp_slots, valid = _prepare_slots(
        student_logp_slots, teacher_logp_slots, mask, renormalize)
    fkl = _kl_terms(teacher_logp_slots, student_logp_slots, valid)
    rkl = _kl_terms(student_logp_slots, teacher_logp_slots, valid)
    with torch.no_grad():
        p_t = torch.where(valid, teacher_logp_slots.exp(), torch.zeros_like(teacher_logp_slots))
        p_s = torch.where(valid, student_logp_slots.exp(), torch.zeros_like(student_logp_slots))
        sorted_t, order = p_t.sort(dim=-1, descending=True)
        # a bucket is in the head while the mass before it is below head_mass (so the head
        # always holds the teacher's most probable bucket)
        before = sorted_t.cumsum(dim=-1) - sorted_t
        head = torch.zeros_like(valid).scatter(-1, order, before < head_mass) & valid
        gap = (p_t - p_s).abs()
        g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(dim=-1)
        g_tail = torch.where(head, torch.zeros_like(gap), gap).sum(dim=-1)
        w_head = g_head / (g_head + g_tail).clamp_min(1e-12)
    return w_head * fkl + (1.0 - w_head) * rkl


def jsd_slots(
    student_logp_slots: Tensor,
    teacher_logp_slots: Tensor,
    mask: Tensor | None = None,
    renormalize: bool = False,
    *,
    beta: float = 0.5,
) -> Tensor:
    """Generalized JSD over the slots; ``[N]``.

    ``m = beta * p_t + (1 - beta) * p_s`` and
    ``jsd = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``. ``beta`` is the teacher's weight
    in the mixture and must satisfy ``0 < beta < 1`` (the formula is 0 at both end points).
    Other arguments as in :func:`reverse_kl_slots`.
    """
    _check_beta(beta)
    student_logp_slots, teacher_logp_slots, valid = _prepare_slots(
        student_logp_slots, teacher_logp_slots, mask, renormalize)
    # Slots that are invalid or have p_s = p_t = 0 contribute nothing; give them finite
    # placeholder values so the log-sum-exp below has a NaN-free gradient.
    dead = ~valid | ((student_logp_slots == -math.inf) & (teacher_logp_slots == -math.inf))
    zeros = torch.zeros_like(student_logp_slots)
    s = torch.where(dead, zeros, student_logp_slots)
    t = torch.where(dead, zeros, teacher_logp_slots)
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)], dim=0), dim=0)
    live = ~dead
    return beta * _kl_terms(t, log_m, live) + (1.0 - beta) * _kl_terms(s, log_m, live)


# --------------------------------------------------------------------------- per-token losses


def distill_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    objective: str = "reverse_kl",
    k: int = 256,
    temperature: float = 1.0,
    renormalize: bool = False,
    slot_source: str = "student",
    beta: float = 0.5,
    tail: bool = True,
) -> TokenLoss:
    """Per-token distillation loss at the response positions.

    Args:
        student_logits: ``[N, V]`` raw student logits (no context) at the N response positions.
        teacher_logits: ``[N, V]`` raw teacher logits (with context) at the same positions;
            detached here, the teacher is a constant target.
        objective: ``"reverse_kl"`` (OPCD), ``"forward_kl"``, ``"jsd"`` or ``"akl"``.
        k: top-k slots per side (clamped to ``V``).
        temperature: ``T > 0``; both sides use ``log_softmax(logits / T)``.
        renormalize: renormalise both sides over the slots before the divergence.
        slot_source: ``"student"``, ``"teacher"`` or ``"union"`` (see :func:`select_slots`).
        beta: teacher weight of the JSD mixture, ``0 < beta < 1``; only read (and validated)
            when ``objective == "jsd"``.
        tail: add the rest-of-vocabulary bucket to the slots (see the module docstring);
            ignored with ``renormalize`` (the renormalised slots hold all the mass).

    Returns:
        :class:`TokenLoss` with ``[N]`` tensors.
    """
    _check_objective_settings(objective, slot_source, k, temperature, beta)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got shape "
            f"{tuple(student_logits.shape)}"
        )

    student_logp = temperature_log_softmax(student_logits, temperature)
    teacher_logp = temperature_log_softmax(teacher_logits.detach(), temperature).to(
        student_logp.dtype
    )
    indices, valid = select_slots(student_logp, teacher_logp, k, slot_source)
    s_slots = student_logp.gather(-1, indices)
    t_slots = teacher_logp.gather(-1, indices)
    rest = ((log_rest_mass(student_logp, indices), log_rest_mass(teacher_logp, indices))
            if tail and not renormalize else None)
    loss = slot_divergence(s_slots, t_slots, valid, objective=objective,
                           renormalize=renormalize, beta=beta, tail=tail, rest=rest)
    with torch.no_grad():
        full = student_logp.detach()
        # -sum p log p with 0 log 0 = 0, in one [N, V] buffer: where p == 0 the product is
        # 0 (finite log p) or nan (log p = -inf), and nan becomes 0.
        prod = full.exp().mul_(full)
        entropy = -prod.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)
    return _token_loss_record(loss, s_slots, t_slots, valid, renormalize, entropy)


def sparse_teacher_loss(
    student_logits: Tensor, teacher_ids: Tensor, teacher_logp: Tensor, *,
    temperature: float = 1.0, renormalize: bool = False, tail: bool = True,
) -> TokenLoss:
    """Forward KL of the student's ``[N, V]`` logits to a teacher known only by its top-k:
    token ids ``[N, k]`` and their full-vocabulary log-probs ``[N, k]`` (stored by the
    off-policy baseline, returned by a teacher server), over those k slots and, with
    ``tail``, the rest of the vocabulary as one bucket. The one sparse-teacher divergence:
    :func:`opcd.methods.offpolicy.offpolicy_token_loss` and
    :func:`opcd.teachers.teacher_server.server_token_loss` build on it.

    Returns a :class:`TokenLoss` whose ``loss`` is that forward KL (differentiable) and whose
    ``kl`` is the reverse KL over the same slots (logged); the masses and the student's
    entropy are detached.
    """
    s_logp = temperature_log_softmax(student_logits, temperature)
    s_slots = s_logp.gather(-1, teacher_ids)
    loss = slot_divergence(s_slots, teacher_logp, objective="forward_kl",
                           renormalize=renormalize, tail=tail)
    with torch.no_grad():
        kl = slot_divergence(s_slots, teacher_logp, renormalize=renormalize)
        entropy = -(s_logp.exp() * s_logp).sum(-1)
    return TokenLoss(loss=loss, kl=kl, student_topk_mass=s_slots.detach().exp().sum(-1),
                     teacher_topk_mass=teacher_logp.exp().sum(-1), student_entropy=entropy)


def slot_divergence(s_slots: Tensor, t_slots: Tensor, valid: Tensor | None = None, *,
                    objective: str = "reverse_kl", renormalize: bool = False,
                    beta: float = 0.5, tail: bool = True,
                    rest: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The per-token divergence ``[N]`` from both models' full-vocabulary log-probabilities
    at the slots ``[N, S]``: the one sparse divergence every method uses (on-policy, off-policy
    over stored teacher top-k, server teacher). ``tail`` adds the rest bucket (unless
    ``renormalize``; ``rest``: its precise log-masses, see :func:`with_rest_bucket`);
    ``objective`` is one of :data:`OBJECTIVES`."""
    _check_choice("objective", objective, OBJECTIVES)
    if tail and not renormalize:
        s_slots, t_slots, valid = with_rest_bucket(s_slots, t_slots, valid, rest=rest)
    if objective == "reverse_kl":
        return reverse_kl_slots(s_slots, t_slots, valid, renormalize)
    if objective == "forward_kl":
        return forward_kl_slots(s_slots, t_slots, valid, renormalize)
    if objective == "akl":
        return akl_slots(s_slots, t_slots, valid, renormalize)
    return jsd_slots(s_slots, t_slots, valid, renormalize, beta=beta)


def _token_loss_record(loss: Tensor, s_slots: Tensor, t_slots: Tensor, valid: Tensor,
                       renormalize: bool, entropy: Tensor) -> TokenLoss:
    """:class:`TokenLoss` of ``loss`` with the detached KL and top-k masses of the slots."""
    with torch.no_grad():
        s_det = s_slots.detach()
        zero = torch.zeros_like(s_det)
        kl = slot_divergence(s_det, t_slots, valid, renormalize=renormalize)
        student_mass = torch.where(valid, s_det.exp(), zero).sum(dim=-1)
        teacher_mass = torch.where(valid, t_slots.exp(), zero).sum(dim=-1)
    return TokenLoss(
        loss=loss,
        kl=kl,
        student_topk_mass=student_mass,
        teacher_topk_mass=teacher_mass,
        student_entropy=entropy,
    )


def sampled_token_loss(
    student_logp_sampled: Tensor,
    behaviour_logp_sampled: Tensor,
    teacher_logp_sampled: Tensor,
) -> Tensor:
    """Sampled-token (on-policy distillation) policy-gradient loss; ``[N]``.

    ``A_t = log p_teacher(y_t) - log p_behaviour(y_t)`` (detached) and
    ``loss_t = -exp(log p_s(y_t) - log p_behaviour(y_t)) * A_t``. Only
    ``student_logp_sampled`` carries gradient; the behaviour and teacher log-probabilities are
    detached. Strictly on-policy (behaviour = detached current student) the ratio is 1 and the
    gradient is ``-A_t * d log p_s(y_t)``.
    """
    _check_same_shape(
        "student_logp_sampled",
        student_logp_sampled,
        "behaviour_logp_sampled",
        behaviour_logp_sampled,
    )
    _check_same_shape(
        "student_logp_sampled", student_logp_sampled, "teacher_logp_sampled", teacher_logp_sampled
    )
    behaviour = behaviour_logp_sampled.detach()
    advantage = teacher_logp_sampled.detach() - behaviour
    ratio = torch.exp(student_logp_sampled - behaviour)
    return -ratio * advantage


def sampled_token_record(student_logp: Tensor, teacher_logp_sampled: Tensor, sampled: Tensor) -> TokenLoss:
    """The sampled-token objective as a :class:`TokenLoss`, from the student's ``[N, V]``
    log-probs, the teacher's ``[N]`` log-probs of the sampled tokens and those tokens.

    Here the "slots" are the sampled tokens: the masses are their probabilities and the KL
    column is the single-sample estimate ``log p_s(y_t) - log p_t(y_t)``.
    """
    s_tok = student_logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    t_tok = teacher_logp_sampled.detach()
    with torch.no_grad():
        entropy = -(student_logp.exp() * student_logp).sum(-1)
    return TokenLoss(loss=sampled_token_loss(s_tok, s_tok.detach(), t_tok),
                     kl=(s_tok - t_tok).detach(), student_topk_mass=s_tok.detach().exp(),
                     teacher_topk_mass=t_tok.exp(), student_entropy=entropy)


# --------------------------------------------------------------------------- reduction


def reduction_totals(mask: Tensor) -> tuple[float, float]:
    """``(total_tokens, total_sequences)`` of a ``[B, R]`` response mask.

    ``total_tokens`` is ``mask.sum()``; ``total_sequences`` counts the rows with at least one
    response token. Sum these over all micro-batches of a step and pass the sums to
    :func:`reduce_token_loss` to make accumulation match one big batch.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, R], got shape {tuple(mask.shape)}")
    m = mask.to(torch.float64)
    return float(m.sum().item()), float((m.sum(dim=-1) > 0).sum().item())


def _check_total(name: str, value: float | None) -> None:
    if value is not None and not float(value) > 0:
        raise ValueError(f"{name} must be > 0 when given, got {value!r}")


def reduce_token_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> Tensor:
    """Reduce a ``[B, R]`` per-token loss to a scalar.

    Args:
        per_token: ``[B, R]`` per-token values; entries where ``mask`` is 0 are ignored even if
            they are NaN or infinite.
        mask: ``[B, R]`` response mask (bool or 0/1 float weights).
        mode: ``"token_mean"``: ``sum(per_token * mask) / total_tokens`` (default
            ``total_tokens = mask.sum()``, at least 1). ``"seq_mean"`` (the paper's
            per-sequence mean): ``sum_b [sum_t per_token * mask / max(len_b, 1)] /
            total_sequences``, where ``len_b`` is row b's token count; the default
            ``total_sequences`` counts the rows with at least one token (empty rows add 0 to the
            numerator and are not counted; at least 1).
        total_tokens, total_sequences: the totals over the *whole* batch when this call sees
            one micro-batch (see :func:`reduction_totals`); then the sum of the micro-batch
            results equals the one-batch value, in values and in gradients.
    """
    _check_choice("mode", mode, MODES)
    _check_same_shape("per_token", per_token, "mask", mask)
    if per_token.dim() != 2:
        raise ValueError(f"per_token and mask must have shape [B, R], got {tuple(mask.shape)}")
    _check_total("total_tokens", total_tokens)
    _check_total("total_sequences", total_sequences)

    weights = mask.to(per_token.dtype)
    masked = torch.where(weights != 0, per_token * weights, torch.zeros_like(per_token))
    if mode == "token_mean":
        denom = weights.sum().clamp_min(1.0) if total_tokens is None else total_tokens
        return masked.sum() / denom
    lengths = weights.sum(dim=-1)
    per_sequence = masked.sum(dim=-1) / lengths.clamp_min(1.0)
    if total_sequences is None:
        return per_sequence.sum() / (lengths > 0).sum().clamp_min(1).to(per_token.dtype)
    return per_sequence.sum() / total_sequences


# --------------------------------------------------------------------------- memory-bounded


def reduction_weights(
    mask: Tensor,
    mode: str = "token_mean",
    *,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[B, R]`` weights ``w`` with ``(per_token * w).sum() == reduce_token_loss(per_token, mask, ...)``.

    Zero where ``mask`` is 0. Lets a loss computed token by token (or chunk by chunk) be
    reduced exactly like :func:`reduce_token_loss`, with the same arguments.
    """
    _check_choice("mode", mode, MODES)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, R], got shape {tuple(mask.shape)}")
    _check_total("total_tokens", total_tokens)
    _check_total("total_sequences", total_sequences)
    weights = mask.to(dtype)
    if mode == "token_mean":
        denom = weights.sum().clamp_min(1.0) if total_tokens is None else total_tokens
        return weights / denom
    lengths = weights.sum(dim=-1, keepdim=True)
    if total_sequences is None:
        n_seq = (lengths > 0).sum().clamp_min(1).to(weights.dtype)
    else:
        n_seq = torch.tensor(float(total_sequences), dtype=dtype, device=mask.device)
    return weights / lengths.clamp_min(1.0) / n_seq


TokenLossFn = Callable[[Tensor, Tensor, "Tensor | None"], TokenLoss]
"""``(student_logits [n, V], teacher_logits [n, V], sampled [n] or None) -> TokenLoss``."""


def _default_token_loss(**kwargs: object) -> TokenLossFn:
    def fn(student_logits: Tensor, teacher_logits: Tensor, sampled: Tensor | None) -> TokenLoss:
        return distill_token_loss(student_logits, teacher_logits, **kwargs)  # type: ignore[arg-type]

    return fn


def _upcast(logits: Tensor) -> Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _project(hidden: Tensor, head: Tensor | Callable[[Tensor], Tensor], bias: Tensor | None) -> Tensor:
    if isinstance(head, Tensor):
        return _upcast(torch.nn.functional.linear(hidden, head, bias))
    return _upcast(head(hidden))


def _cat_tokens(parts: list[TokenLoss], like: Tensor) -> TokenLoss:
    if not parts:
        empty = like.new_zeros((0,), dtype=torch.float32)
        return TokenLoss(empty, empty, empty, empty, empty)
    return TokenLoss(
        *(torch.cat([getattr(p, f).detach() for p in parts]) for f in
          ("loss", "kl", "student_topk_mass", "teacher_topk_mass", "student_entropy"))
    )


@dataclass(frozen=True)
class _SlotSpec:
    """The settings of :func:`distill_token_loss`, for the in-place chunk computation."""

    objective: str
    k: int
    temperature: float
    renormalize: bool
    slot_source: str
    beta: float
    tail: bool = True


def softmax_in_place(x: Tensor) -> Tensor:
    """Turn ``x`` (logits ``[n, V]``) into ``softmax(x)`` in place; return ``logsumexp(x)`` ``[n, 1]``."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    x.sub_(m).exp_()
    total = x.sum(dim=-1, keepdim=True)
    x.div_(total)
    return m + total.log()


def _in_place_chunk(
    hs: Tensor, w_s: Tensor, b_s: Tensor | None, ht: Tensor, w_t: Tensor, b_t: Tensor | None,
    weights: Tensor, spec: _SlotSpec, buf_s: Tensor, buf_t: Tensor,
) -> tuple[TokenLoss, Tensor, Tensor]:
    """One chunk of :func:`distill_token_loss`, both models' ``[n, V]`` logits computed into
    two preallocated buffers and never copied: ``(token loss, weighted sum, dz)``, ``dz`` (the
    gradient of the weighted sum w.r.t. the student's logits) a view of ``buf_s``.

    The loss reads the student's log-probabilities only at the slots, ``s_i = z_i / T - lse``,
    so with ``g = d loss / d s`` (from the slot-level objective, a few hundred columns) the
    logits' gradient is ``(scatter(g) - softmax(z / T) * sum(g)) / T``: the softmax is made
    in place in ``buf_s`` and turned into ``dz`` there. The teacher's buffer then holds the
    entropy's ``p log p``. Slots are chosen on the logits (same order as the log-probs).
    """
    n = hs.shape[0]
    z, zt = buf_s[:n], buf_t[:n]
    torch.mm(hs, w_s.t(), out=z)
    torch.mm(ht, w_t.t(), out=zt)
    if b_s is not None:
        z.add_(b_s)
    if b_t is not None:
        zt.add_(b_t)
    T = spec.temperature
    if T != 1:
        z.div_(T)
        zt.div_(T)
    idx, valid = select_slots(z, zt, spec.k, spec.slot_source)
    z_slots, zt_slots = z.gather(-1, idx), zt.gather(-1, idx)
    t_slots = zt_slots - softmax_in_place(zt)
    s_slots = (z_slots - softmax_in_place(z)).requires_grad_()  # z now holds softmax(z / T)
    rest = None
    if spec.tail and not spec.renormalize:
        # both rest masses summed over the other tokens (see log_rest_mass), in zt's buffer
        floor = math.log(_REST_FLOOR)
        t_rest = zt.scatter_(-1, idx, 0.0).sum(dim=-1).log().clamp_min(floor)
        s_rest = zt.copy_(z).scatter_(-1, idx, 0.0).sum(dim=-1).log().clamp_min(floor)
        rest = (s_rest, t_rest)
    torch.xlogy(z, z, out=zt)
    entropy = -zt.sum(dim=-1)
    with torch.enable_grad():
        loss = slot_divergence(s_slots, t_slots, valid, objective=spec.objective,
                               renormalize=spec.renormalize, beta=spec.beta, tail=spec.tail,
                               rest=rest)
        lc = (loss * weights.to(loss.dtype)).sum()
        (g,) = torch.autograd.grad(lc, s_slots)
    z.mul_(-g.sum(dim=-1, keepdim=True)).scatter_add_(-1, idx, g)
    if T != 1:
        z.div_(T)
    tl = _token_loss_record(loss.detach(), s_slots, t_slots, valid, spec.renormalize, entropy)
    return tl, lc.detach(), z


def _generic_chunk(
    hs: Tensor, w_s: Tensor, b_s: Tensor | None, ht: Tensor, w_t: Tensor | Callable[[Tensor], Tensor],
    b_t: Tensor | None, weights: Tensor, sampled: Tensor | None, fn: TokenLossFn, need_grad: bool,
) -> tuple[TokenLoss, Tensor, Tensor | None]:
    """One chunk through any token loss ``fn`` on fresh logits; the logits' gradient by
    autograd (None when nothing needs it). Same return as :func:`_in_place_chunk`."""
    z_t = _project(ht, w_t, b_t)
    z = _upcast(torch.nn.functional.linear(hs, w_s, b_s))
    with torch.enable_grad():
        z.requires_grad_(need_grad)
        tl = fn(z, z_t, sampled)
        lc = (tl.loss * weights.to(tl.loss.dtype)).sum()
        dz = torch.autograd.grad(lc, z)[0] if need_grad else None
    return tl, lc.detach(), dz


class _FusedHeadLoss(torch.autograd.Function):
    """``sum_t w_t * loss_t`` over chunks of tokens, the output head fused in.

    Forward projects one chunk of hidden states at a time to logits, evaluates the token
    loss, and immediately turns its gradient into gradients for the hidden states, the head
    weight and bias (``dz @ W``, ``dz^T @ h``, ``sum dz``): no ``[tokens, V]`` tensor outlives
    its chunk and nothing is recomputed. Backward scales the stored gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor,
        w_t: Tensor | Callable[[Tensor], Tensor], b_t: Tensor | None, weights: Tensor,
        sampled: Tensor | None, fn: TokenLossFn | _SlotSpec, chunk: int, parts: list[TokenLoss],
    ) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # head gradients are sums over chunks: accumulate half-precision ones in fp32
        acc = torch.float32 if w_s.dtype in (torch.float16, torch.bfloat16) else w_s.dtype
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if need_w else None
        grad_b = (torch.zeros(b_s.shape, dtype=acc, device=b_s.device)
                  if need_b and b_s is not None else None)
        total = torch.zeros((), dtype=torch.float64, device=h_s.device)
        if isinstance(fn, _SlotSpec):
            assert isinstance(w_t, Tensor)
            rows = min(chunk, h_s.shape[0])
            buf_s = h_s.new_empty((rows, w_s.shape[0]))
            buf_t = h_s.new_empty((rows, w_t.shape[0]))
        for s in range(0, h_s.shape[0], chunk):
            e = min(s + chunk, h_s.shape[0])
            hs = h_s[s:e]
            with torch.no_grad():
                if isinstance(fn, _SlotSpec):
                    tl, lc, dz = _in_place_chunk(hs, w_s, b_s, h_t[s:e], w_t, b_t, weights[s:e],
                                                 fn, buf_s, buf_t)
                else:
                    tl, lc, dz = _generic_chunk(hs, w_s, b_s, h_t[s:e], w_t, b_t, weights[s:e],
                                                None if sampled is None else sampled[s:e], fn,
                                                need_h or need_w or need_b)
            total += lc.double()
            parts.append(tl)
            if dz is None:
                continue
            if grad_h is not None:
                grad_h[s:e] = dz.to(hs.dtype) @ w_s
            if grad_w is not None:
                grad_w.addmm_(dz.to(acc).t(), hs.to(acc))
            if grad_b is not None:
                grad_b += dz.to(acc).sum(0)
            del dz, tl, lc
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(w_s.dtype),
            None if grad_b is None else grad_b.to(b_s.dtype),  # type: ignore[union-attr]
        )
        return total.to(torch.float64 if h_s.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        # in place: these buffers belong to this call (a head's gradient is the head's size)
        scaled = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in (grad_h, grad_w, grad_b))
        return (*scaled, None, None, None, None, None, None, None, None)


def chunked(
    fn: Callable[..., tuple[Tensor, Any]], *token_args: Tensor | None, chunk_size: int | None,
) -> tuple[Tensor, list[Any]]:
    """``fn`` over the tokens ``chunk_size`` at a time, recomputed in the backward pass.

    ``fn(*args) -> (per_token [n], aux)`` gets each argument's rows of one chunk (``None``
    arguments stay ``None``) and typically projects hidden states through the output head:
    only one chunk's ``[n, V]`` logits exist at a time, in the forward pass and again in the
    backward pass (activation checkpointing). Returns the per-token values of all tokens
    (differentiable) and each chunk's ``aux`` from the forward pass (the backward's
    recomputation does not add to it). ``chunk_size`` None: one call, no recomputation.
    This is the one chunked output head of opcd: the on-policy objectives with a callable
    head (a LoRA-wrapped one), the off-policy baseline and OVD run through it.
    """
    if chunk_size is None:
        out, aux = fn(*token_args)
        return out, [aux]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    from torch.utils.checkpoint import checkpoint

    auxes: list[Any] = []
    recording = [True]

    def one(*args: Tensor | None) -> Tensor:
        out, aux = fn(*args)
        if recording[0]:
            auxes.append(aux)
        return out

    n = next(a.shape[0] for a in token_args if a is not None)
    outs = [checkpoint(one, *(None if a is None else a[s:s + chunk_size] for a in token_args),
                       use_reentrant=False)
            for s in range(0, n, chunk_size)]
    recording[0] = False
    if not outs:
        return fn(*(None if a is None else a[:0] for a in token_args))[0], auxes
    return torch.cat(outs), auxes


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head: Tensor | Callable[[Tensor], Tensor],
    teacher_hidden: Tensor,
    teacher_head: Tensor | Callable[[Tensor], Tensor],
    token_weights: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    sampled: Tensor | None = None,
    token_loss: TokenLossFn | None = None,
    chunk_size: int = 256,
    objective: str = "reverse_kl",
    k: int = 256,
    temperature: float = 1.0,
    renormalize: bool = False,
    slot_source: str = "student",
    beta: float = 0.5,
    tail: bool = True,
) -> tuple[Tensor, TokenLoss]:
    """Weighted sum of per-token losses, computed ``chunk_size`` tokens at a time.

    Equal in value and gradients to projecting all hidden states to logits and calling
    :func:`distill_token_loss` (or ``token_loss``) on them, then ``(loss * token_weights).sum()``
    -- but only ``[chunk_size, V]`` logits exist at any time, for both models.

    Args:
        student_hidden: ``[N, H]`` final hidden states at the response positions; gradients
            flow back into them (and into the head weight/bias when those require grad).
        student_head: the output head's ``[V, H]`` weight, or any callable ``[n, H] -> [n, V]``
            (e.g. a LoRA-wrapped head); with a callable, each chunk is recomputed in backward
            (activation checkpointing) instead of fusing the gradient into the forward.
        teacher_hidden, teacher_head: the same for the teacher (never differentiated).
        token_weights: ``[N]`` reduction weights (see :func:`reduction_weights`).
        sampled: ``[N]`` sampled token ids, passed to ``token_loss``.
        token_loss: ``(student_logits, teacher_logits, sampled) -> TokenLoss`` for one chunk;
            default :func:`distill_token_loss` with the keyword arguments below.
        chunk_size: tokens per chunk.

    Returns:
        ``(loss, tokens)``: the scalar weighted sum (differentiable) and the detached per-token
        :class:`TokenLoss` of all ``N`` tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if (student_hidden.dim() != 2 or teacher_hidden.dim() != 2
            or teacher_hidden.shape[0] != student_hidden.shape[0]):
        raise ValueError(  # the hidden sizes may differ: a larger teacher (cross-size)
            f"student_hidden and teacher_hidden must be [N, H_student] and [N, H_teacher], got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if token_weights.shape != student_hidden.shape[:1]:
        raise ValueError(f"token_weights must be [N] = {student_hidden.shape[0]}, got {tuple(token_weights.shape)}")
    fn = token_loss or _default_token_loss(
        objective=objective, k=k, temperature=temperature, renormalize=renormalize,
        slot_source=slot_source, beta=beta, tail=tail,
    )
    teacher_hidden = teacher_hidden.detach()
    parts: list[TokenLoss] = []
    if isinstance(student_head, Tensor):
        # The built-in objectives on full-precision plain heads: logits in two reused
        # buffers (no [chunk, V] temporaries, hence no fresh pages to fault in per chunk).
        dtypes = {student_hidden.dtype, student_head.dtype, teacher_hidden.dtype,
                  None if not isinstance(teacher_head, Tensor) else teacher_head.dtype}
        if (token_loss is None and len(dtypes) == 1
                and dtypes <= {torch.float32, torch.float64}):
            _check_objective_settings(objective, slot_source, k, temperature, beta)
            fn = _SlotSpec(objective, k, temperature, renormalize, slot_source, beta, tail)  # type: ignore[assignment]
        loss = _FusedHeadLoss.apply(
            student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias,
            token_weights.detach(), sampled, fn, chunk_size, parts,
        )
        return loss, _cat_tokens(parts, student_hidden)

    def one_chunk(hs: Tensor, ht: Tensor, w: Tensor, samp: Tensor | None) -> tuple[Tensor, TokenLoss]:
        with torch.no_grad():
            z_t = _project(ht, teacher_head, teacher_bias)
        tl = fn(_project(hs, student_head, student_bias), z_t, samp)
        return (tl.loss * w.to(tl.loss.dtype)).sum()[None], tl

    sums, parts = chunked(one_chunk, student_hidden, teacher_hidden, token_weights.detach(), sampled,
                          chunk_size=chunk_size)
    total = sums.sum() if sums.numel() else student_hidden.new_zeros((), dtype=_upcast(student_hidden).dtype)
    return total, _cat_tokens(parts, student_hidden)
