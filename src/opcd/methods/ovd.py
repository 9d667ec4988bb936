"""On-policy Verbal Distillation (OVD, arXiv 2601.21968): a teacher that only talks.

    opcd train my.yaml method=ovd rollout.n=4 teacher.mode=model teacher.model=NAME

OPCD needs the teacher's log-probabilities of the student's own tokens, so both models
must share a tokenizer and the teacher's logits sit in memory. OVD needs neither: the
teacher reads the student's *text* and answers with a verbal score. Any teacher works (a
different tokenizer, a much larger model, a black box behind an API), and like OPCD the
teacher may see the task's context c, so OVD is a context-distillation method too.

One step (:mod:`opcd.methods.ovd_method`, on the trainer's one step):

1. rollout: the student samples a group of ``rollout.n`` (>= 2) responses to each prompt x,
   without the context;
2. verbal scoring: the teacher rates each response 0-9 through a scoring prompt
   (``ovd.score_prompt``: ``{problem}``, ``{response}``, optionally ``{context}``), read in
   one of two ways (``ovd.score_mode``):

   - ``expected`` (default): one forward pass; the teacher's next-token distribution over
     the ten digit tokens, renormalised over them, gives ``sum_d d * p(d)``
     (:func:`expected_score`). No generation, never unparseable. Needs the logits of a
     local model whose digits 0-9 are single tokens.
   - ``generate``: the teacher writes a few tokens (greedy) and the score is parsed out of
     them (:func:`parse_score`: ``7``, ``Score: 7/9``, ``seven``). Works with any
     text-in/text-out teacher.

   An unparseable score is counted (metric ``unparseable``, with a few raw answers) and
   treated as missing: that response's reward uses its group's mean verbal score, and it
   is never rejected on a score it does not have;
3. verbal rejection sampling: responses scored below ``ovd.threshold`` are replaced by
   teacher text (``ovd.replace``): ``whole``, the teacher answers the student's prompt
   itself (with the context when ``ovd.teacher_context``); or ``suffix``, the first half of
   the student's response is kept, cut back to its last line or sentence end inside that
   half (:func:`prefix_cut`), and the teacher continues it. Scoring every prefix would cost
   one teacher pass per boundary; the half-way cut costs none, and the replaced response is
   scored again as a whole. Teacher text is decoded and re-encoded with the *student's*
   tokenizer (plus the student's end-of-turn token when the teacher finished), so any
   teacher tokenizer works; only response tokens are trained (:class:`Trajectory`). The
   teacher writes at most ``ovd.teacher_max_new_tokens`` of its tokens; the re-encoded
   response is cut at ``max(rollout.max_new_tokens, kept + that)`` student tokens;
4. update: a reward per response, ``r = w * outcome + (1 - w) * verbal / 9`` (``outcome`` =
   ``task.score``, e.g. exact match for math; ``w = ovd.reward_weight``, by default 1 for
   tasks with an outcome reward and 0 otherwise), group-normalised advantages
   ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (:func:`group_advantages`; a group whose
   rewards are all equal gets exactly 0), and the PPO-clipped policy-gradient loss
   (:func:`clipped_policy_loss`, ``ovd.clip_eps``) averaged over all response tokens of the
   step (``loss.reduction``). The step is strictly on-policy: the old log-probs are the
   detached current ones, so the ratio is 1 and only its gradient acts. Teacher tokens in a
   replaced response are trained the same way (as in the paper's GRPO on the
   accepted/replaced group, without an off-policy correction).

Multi-turn games can be scored turn by turn (``ovd.step_level``): :func:`turn_score_requests`
builds one scoring request per assistant turn and :func:`turn_advantages` turns per-turn
scores into per-turn advantages; :class:`opcd.methods.ovd_method.VerbalScorer` rates the
episodes and calls them (or rates whole transcripts, the default).

The teacher itself (:class:`~opcd.teachers.verbal.VerbalTeacher`, a local model as
:class:`~opcd.teachers.verbal.ModelVerbalTeacher`) is in :mod:`opcd.teachers.verbal`;
everything in this module is pure (no I/O, no models).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opcd.teachers.verbal import VerbalTeacher

# --------------------------------------------------------------------------- scoring prompts

SCORE_PROMPT = (
    "You are grading an answer written by a student.\n\n"
    "Guidance the answer should follow:\n{context}\n\n"
    "Task given to the student:\n{problem}\n\n"
    "The student's answer:\n{response}\n\n"
    "How good is this answer: correct, complete, and in line with the task and the guidance? "
    "Rate it from 0 (wrong or useless) to 9 (excellent). Reply with one digit only."
)
"""The built-in scoring request when the teacher sees a context."""

SCORE_PROMPT_NO_CONTEXT = (
    "You are grading an answer written by a student.\n\n"
    "Task given to the student:\n{problem}\n\n"
    "The student's answer:\n{response}\n\n"
    "How good is this answer: correct, complete, and in line with the task? "
    "Rate it from 0 (wrong or useless) to 9 (excellent). Reply with one digit only."
)
"""The built-in scoring request without a context."""

MAX_SCORE = 9
_PLACEHOLDER = re.compile(r"\{(problem|response|context)\}")


def fill_score_prompt(template: str | None, problem: str, response: str, context: str | None) -> str:
    """The scoring request for one response; ``template`` None picks the built-in one.

    Placeholders are replaced in one pass, so braces inside the problem, the response or
    the context are kept as they are. A missing context fills ``{context}`` with nothing.
    """
    if template is None:
        template = SCORE_PROMPT if context else SCORE_PROMPT_NO_CONTEXT
    values = {"problem": problem, "response": response, "context": context or ""}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------- reading scores

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
}
_WORD = "|".join(_NUMBER_WORDS)
_VALUE = rf"(-?\d+(?:\.\d+)?|{_WORD})"
_KEYWORD = re.compile(
    rf"\b(?:score|rating|rate|grade|verdict)\b(?:\s+(?:is|it|of|as))*\s*[:=\-]?\s*(?:an?\s+)?{_VALUE}\b"
)
_FIRST_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_LEAD_WORD = re.compile(rf"^\W*({_WORD})\b(?!\s*[a-z])")
_OUT_OF = re.compile(rf"\b({_WORD})\s*(?:/|out of)\s*(?:9|nine)\b")


def _in_range(token: str) -> float | None:
    value = float(_NUMBER_WORDS[token]) if token in _NUMBER_WORDS else float(token)
    return value if 0 <= value <= MAX_SCORE else None


def parse_score(text: str) -> float | None:
    """The 0-9 score in a teacher's answer, or None when there is no readable one.

    In order: a value after a keyword (``Score: 7/9``, ``rating is 6``, ``grade: seven``);
    else the first number (``7``, ``8.5``, ``7 out of 9``); else a number word followed by
    "out of 9", or opening the answer on its own (``Seven.``, not ``one of the ...``). A
    value outside 0-9 (``10``, ``-1``, ``42``) is not a score: None.
    """
    low = text.strip().lower()
    if not low:
        return None
    m = _KEYWORD.search(low)
    if m:
        return _in_range(m.group(1))
    m = _FIRST_NUMBER.search(low)
    if m:
        return _in_range(m.group(0))
    m = _OUT_OF.search(low)
    if m:
        return _in_range(m.group(1))
    m = _LEAD_WORD.search(low)
    if m:
        return _in_range(m.group(1))
    return None


def expected_from_digit_logprobs(digit_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """``(expected score, digit mass)`` from ``[..., 10]`` log-probabilities of the digits 0-9.

    ``p(d)`` is renormalised over the ten digits; the score is ``sum_d d * p(d)`` in [0, 9].
    The mass is the probability the teacher put on the digits at all (before renormalising):
    a low mass means it was not about to answer with a digit.
    """
    if digit_logprobs.shape[-1] != MAX_SCORE + 1:
        raise ValueError(f"expected 10 digit log-probabilities, got shape {tuple(digit_logprobs.shape)}")
    lp = digit_logprobs.float()
    p = torch.softmax(lp, dim=-1)
    digits = torch.arange(MAX_SCORE + 1, dtype=p.dtype, device=p.device)
    return (p * digits).sum(-1), lp.logsumexp(-1).exp()


def expected_score(logits: Tensor, digit_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Expected verbal score from next-token ``logits`` ``[..., V]`` (see
    :func:`expected_from_digit_logprobs`); ``digit_ids[d]`` is the token id of digit d."""
    if len(digit_ids) != MAX_SCORE + 1:
        raise ValueError(f"need the token ids of the ten digits, got {len(digit_ids)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return expected_from_digit_logprobs(logp[..., list(digit_ids)])


# --------------------------------------------------------------------------- group maths


def fill_group_mean(
    scores: Sequence[float | None], groups: Sequence[int], default: float = MAX_SCORE / 2
) -> list[float]:
    """Missing scores (None) replaced by the mean of their group's known scores.

    A group with no known score at all gets ``default`` everywhere (equal values: no
    advantage from the verbal score in that group).
    """
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} group labels")
    known: dict[int, list[float]] = {}
    for s, g in zip(scores, groups, strict=True):
        if s is not None:
            known.setdefault(g, []).append(float(s))
    means = {g: sum(v) / len(v) for g, v in known.items()}
    return [float(s) if s is not None else means.get(g, default) for s, g in zip(scores, groups, strict=True)]


def mix_rewards(outcome: Sequence[float], verbal: Sequence[float], weight: float) -> list[float]:
    """``weight * outcome + (1 - weight) * verbal / 9`` per response."""
    if len(outcome) != len(verbal):
        raise ValueError(f"{len(outcome)} outcome rewards but {len(verbal)} verbal scores")
    return [weight * o + (1 - weight) * v / MAX_SCORE for o, v in zip(outcome, verbal, strict=True)]


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages of ``rewards`` ``[G, N]`` (G groups of N responses to one prompt).

    ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each group, with the sample standard
    deviation (Bessel's correction, as in the usual GRPO implementations). A group whose
    rewards are all equal carries no signal: its advantages are exactly 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, n] with n >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    adv = (r - mean) / (std + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(same, torch.zeros_like(adv), adv).to(rewards.dtype)


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO-clipped surrogate per token: ``(loss [N], clipped [N] bool)``.

    ``ratio = exp(logp - old_logp)``; ``loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``.
    ``old_logp`` and ``advantages`` are constants. Strictly on-policy ``old_logp`` is the
    detached ``logp``: the ratio is 1, nothing is clipped, and the gradient is
    ``-A * d logp``.
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if logp.shape != old_logp.shape or logp.shape != advantages.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    adv = advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).detach()


# --------------------------------------------------------------------------- replacement


_BOUNDARY = re.compile(r"(\n|[.!?][\"')\]]*)$")


def prefix_cut(ids: Sequence[int], decode: Callable[[list[int]], str]) -> int:
    """How many of a response's tokens ``suffix`` replacement keeps.

    The first half (rounded down), cut back to the last token inside it that ends a line
    or a sentence (the text then ends with a newline or ``.!?``, not with a space, which
    would be a poor place for the teacher to continue); the half itself when there is no
    boundary. ``ids`` exclude the end-of-sequence token.
    """
    half = len(ids) // 2
    for k in range(half, 0, -1):
        if _BOUNDARY.search(decode(list(ids[:k]))):
            return k
    return half


@dataclass
class Trajectory:
    """One response as it is trained: the student's tokens, or teacher text re-encoded.

    ``response_ids`` are student-tokenizer ids appended to the student's prompt; all of
    them are trained, none of the prompt. ``teacher_from`` is the index of the first
    teacher token (None: all the student's own samples; 0: all the teacher's).
    """

    group: int
    response_ids: list[int]
    text: str
    truncated: bool
    teacher_from: int | None = None

    @property
    def source(self) -> str:
        if self.teacher_from is None:
            return "student"
        return "teacher" if self.teacher_from == 0 else "student+teacher"


def teacher_trajectory(
    group: int,
    kept_ids: list[int],
    kept_text: str,
    teacher_text: str,
    teacher_ended: bool,
    encode: Callable[[str], list[int]],
    eos_id: int,
    max_tokens: int,
) -> Trajectory:
    """A replaced response: ``kept_ids`` (the student's kept prefix, possibly empty), then
    the teacher's text encoded with the student's tokenizer, then the student's ``eos_id``
    when the teacher finished; at most ``max_tokens`` tokens (cut: truncated, no EOS)."""
    ids = list(kept_ids) + encode(teacher_text)
    truncated = not teacher_ended
    if teacher_ended:
        ids.append(eos_id)
    if len(ids) > max_tokens:
        ids, truncated = ids[:max_tokens], True
    return Trajectory(group, ids, kept_text + teacher_text, truncated, teacher_from=len(kept_ids))


# --------------------------------------------------------------------------- multi-turn

Turn = tuple[str, str]


def transcript_text(turns: Sequence[Turn]) -> str:
    """An episode's turns after the first user turn, as text the teacher can read."""
    lines = []
    for role, content in turns[1:]:
        who = "Student" if role == "assistant" else "Environment"
        lines.append(f"[{who}]\n{content}")
    return "\n\n".join(lines)


def turn_score_requests(
    turns: Sequence[Turn], *, template: str | None, context: str | None
) -> list[str]:
    """One scoring request per assistant turn of an episode (step-level OVD).

    ``turns`` start with the first user turn (the problem: rules and initial state); the
    request for assistant turn k shows the transcript up to and including that reply, so
    the teacher rates the step in its situation.
    """
    if not turns or turns[0][0] != "user":
        raise ValueError("an episode starts with a user turn")
    problem = turns[0][1]
    requests = []
    for k, (role, _) in enumerate(turns):
        if role == "assistant":
            requests.append(fill_score_prompt(template, problem, transcript_text(turns[: k + 1]), context))
    return requests


def turn_advantages(
    turn_scores: Sequence[Sequence[float | None]],
    outcomes: Sequence[float],
    weight: float,
    eps: float = 1e-6,
) -> list[list[float]]:
    """Per-turn advantages of one group of episodes (step-level OVD).

    The verbal part follows GRPO with process supervision: every known turn score of the
    group (scaled to [0, 1]) is normalised by the mean and standard deviation over all the
    group's turns, a missing one counts as the group mean (0), and a turn's advantage is the
    sum of the normalised scores from that turn to the end of its episode. The outcome part
    is the group-normalised outcome, the same for every turn of an episode. The two are
    mixed by ``weight`` (the outcome's share).
    """
    if len(turn_scores) != len(outcomes) or len(outcomes) < 2:
        raise ValueError("need one score list and one outcome per episode, at least two episodes")
    known = [float(s) / MAX_SCORE for ep in turn_scores for s in ep if s is not None]
    mean = sum(known) / len(known) if known else 0.0
    std = math.sqrt(sum((k - mean) ** 2 for k in known) / (len(known) - 1)) if len(known) > 1 else 0.0
    outcome_adv = group_advantages(torch.tensor([list(outcomes)], dtype=torch.float64))[0].tolist()
    out = []
    for ep, a_out in zip(turn_scores, outcome_adv, strict=True):
        norm = [0.0 if s is None or std == 0 else (float(s) / MAX_SCORE - mean) / (std + eps) for s in ep]
        to_go = [sum(norm[k:]) for k in range(len(norm))]
        out.append([weight * a_out + (1 - weight) * v for v in to_go])
    return out


@dataclass
class Ratings:
    """The teacher's verdicts on a list of scoring requests."""

    scores: list[float | None]
    raw: list[str]
    """What the teacher wrote (generate mode); empty in expected mode."""
    digit_mass: list[float] = field(default_factory=list)
    """Expected mode: the probability on the digits 0-9 before renormalising."""
    too_long: int = 0
    """Requests too long for the teacher's context (their score is missing)."""


def rate(
    teacher: VerbalTeacher, requests: Sequence[str], *, mode: str, max_new_tokens: int = 8
) -> Ratings:
    """Ask ``teacher`` for a 0-9 score of each request (a user turn), as ``mode`` says."""
    conversations = [[{"role": "user", "content": r}] for r in requests]
    if mode == "expected":
        rows = teacher.digit_logprobs(conversations)
        scores: list[float | None] = []
        mass: list[float] = []
        for row in rows:
            if row is None:
                scores.append(None)
                mass.append(float("nan"))
                continue
            s, m = expected_from_digit_logprobs(row)
            scores.append(float(s))
            mass.append(float(m))
        return Ratings(scores, [""] * len(rows), mass, sum(r is None for r in rows))
    if mode == "generate":
        gens = teacher.generate(conversations, max_new_tokens=max_new_tokens, temperature=0.0)
        raw = [g.text if g is not None else "" for g in gens]
        scores = [parse_score(g.text) if g is not None else None for g in gens]
        return Ratings(scores, raw, [], sum(g is None for g in gens))
    raise ValueError(f"unknown score mode {mode!r}; use expected or generate")


__all__ = [
    "SCORE_PROMPT",
    "SCORE_PROMPT_NO_CONTEXT",
    "Ratings",
    "Trajectory",
    "clipped_policy_loss",
    "expected_from_digit_logprobs",
    "expected_score",
    "fill_group_mean",
    "fill_score_prompt",
    "group_advantages",
    "mix_rewards",
    "parse_score",
    "prefix_cut",
    "rate",
    "teacher_trajectory",
    "transcript_text",
    "turn_advantages",
    "turn_score_requests",
]
