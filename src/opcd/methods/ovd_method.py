"""OVD's three parts (On-policy Verbal Distillation): ``opcd train CONFIG method=ovd``.

Where it sits: :func:`ovd_method` builds the :class:`opcd.training.method.Method` that
:meth:`opcd.training.trainer.Trainer.train_step` runs for ``method: ovd`` (see :mod:`opcd.methods.ovd` for
the verbal teacher and the formulas):

1. the sampler is OPCD's (:class:`opcd.methods.onpolicy.StudentSampler`): ``rollout.n`` responses
   per prompt from the student without the context, a group per prompt;
2. :class:`VerbalScorer`: the teacher's 0-9 verdict on each response; responses scored
   below ``ovd.threshold`` are replaced by teacher text (in the rows, so the student is
   trained on the teacher's tokens) and rated again; rewards (the verdicts, mixed with an
   outcome reward where the task has one) become group-normalised advantages;
3. :class:`PolicyGradientObjective`: a clipped policy gradient on those advantages, the
   loss normalised over all response tokens of the step (``loss.reduction``).

On multi-turn games (FrozenLake, Sokoban) a group is ``rollout.n`` episodes of one problem,
played by the student without the context (:func:`opcd.sampling.multiturn.play_for_training`); the
outcome is success. The teacher rates the whole transcript, or with ``ovd.step_level``
every move in its situation (:func:`opcd.methods.ovd.turn_score_requests`,
:func:`opcd.methods.ovd.turn_advantages`); every move the student generated is trained with its
advantage, environment text never is. Episodes are not replaced by teacher play (the
teacher would have to play the game), so ``ovd.threshold`` does not apply there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opcd.config import Config
from opcd.errors import ConfigError
from opcd.methods.onpolicy import StudentSampler
from opcd.methods.ovd import (
    Ratings,
    Trajectory,
    clipped_policy_loss,
    fill_group_mean,
    fill_score_prompt,
    group_advantages,
    mix_rewards,
    prefix_cut,
    rate,
    teacher_trajectory,
    transcript_text,
    turn_advantages,
    turn_score_requests,
)
from opcd.objectives import losses
from opcd.sampling.multiturn import EpisodeRollout, is_multiturn
from opcd.sampling.rollout import eos_ids
from opcd.tasks.base import Example, Task
from opcd.tasks.chat import student_messages, teacher_messages
from opcd.teachers.scoring import pack, response_hidden
from opcd.teachers.teacher import TeacherWeights
from opcd.teachers.verbal import ModelVerbalTeacher, VerbalTeacher, digit_token_ids
from opcd.training.method import Host, Method, Rows, Targets, Totals

OUTCOME_TASKS = frozenset({"math", "gsm8k", "frozenlake", "sokoban", "safety"})
"""Built-in tasks whose ``score`` is an outcome reward (exact match, success, a verdict)."""


def has_outcome_reward(task: Task) -> bool:
    """Whether ``task.score`` is an outcome reward to train on (a task may say so itself
    with an ``outcome_reward`` attribute); system-prompt scorers are evaluation measures."""
    flag = getattr(task, "outcome_reward", None)
    return flag if isinstance(flag, bool) else task.name in OUTCOME_TASKS


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verbal_teacher(cfg: Config, student: nn.Module, tokenizer: Any, model: nn.Module | None,
                   teacher_tokenizer: Any) -> VerbalTeacher:
    """OVD's teacher: ``teacher.mode`` as a model that writes (a verdict, a replacement)."""
    name = cfg.teacher.model or f"the {cfg.teacher.mode} teacher"
    teacher = ModelVerbalTeacher(cfg.teacher.mode, student, tokenizer, model, teacher_tokenizer,
                                 batch_size=cfg.perf.teacher_batch_size, name=repr(name))
    if cfg.ovd.score_mode == "expected":
        digit_token_ids(teacher.tokenizer, repr(name))  # refuse now, not at the first step
    return teacher


class VerbalScorer:
    """The verbal teacher's verdicts -> rejection and replacement -> advantages (see the
    module's docstring); its figures go to the step record."""

    def __init__(self, host: Host) -> None:
        self.host = host
        cfg, o = host.cfg, host.cfg.ovd
        self.reward_weight = o.reward_weight if o.reward_weight is not None else (
            1.0 if has_outcome_reward(host.task) else 0.0
        )
        eos = host.tokenizer.eos_token_id
        self.eos_id = int(eos) if eos is not None else eos_ids(host.student, host.tokenizer)[0]
        self.episodes = is_multiturn(host.task)
        if o.step_level and not self.episodes:
            raise ConfigError(
                f"ovd.step_level=true rates every move of a multi-turn game, but task "
                f"{host.task.name!r} has one reply per prompt. Remove ovd.step_level, or use "
                "task.name=frozenlake or sokoban."
            )
        if self.episodes and o.threshold > 0:
            host.say(f"note: ovd.threshold={o.threshold} is not used on {host.task.name}: "
                     "episodes are rated and trained, never replaced by teacher play")
        self.n = cfg.rollout.n

    # ------------------------------------------------------------------ teacher calls
    def _context(self, example: Example) -> str | None:
        return self.host.task.context(example) if self.host.cfg.ovd.teacher_context else None

    def rate_responses(self, examples: Sequence[Example], texts: Sequence[str]) -> Ratings:
        """The teacher's 0-9 verdict on each response (one example per text)."""
        o = self.host.cfg.ovd
        requests = [
            fill_score_prompt(o.score_prompt, ex.prompt, text, self._context(ex))
            for ex, text in zip(examples, texts, strict=True)
        ]
        return rate(self.host.teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)

    def score_turns(self, example: Example, turns: Sequence[tuple[str, str]]) -> Ratings:
        """Step-level OVD: one verdict per assistant turn of a played episode (combine with
        :func:`opcd.methods.ovd.turn_advantages`)."""
        o = self.host.cfg.ovd
        requests = turn_score_requests(turns, template=o.score_prompt, context=self._context(example))
        return rate(self.host.teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)

    def replace(
        self, trajs: list[Trajectory], rows: Sequence[int], examples: Sequence[Example]
    ) -> tuple[list[int], int]:
        """Replace ``trajs[rows]`` by teacher text (in place); (rows replaced, rows whose
        teacher prompt was too long and that keep the student's response)."""
        h = self.host
        cfg, o = h.cfg, h.cfg.ovd
        cap = o.teacher_max_new_tokens or cfg.rollout.max_new_tokens
        temperature = o.teacher_temperature if o.teacher_temperature is not None else cfg.rollout.temperature

        def decode(ids: list[int]) -> str:
            return h.tokenizer.decode(ids, skip_special_tokens=True)

        def encode(text: str) -> list[int]:
            return list(h.tokenizer(text, add_special_tokens=False)["input_ids"])

        convs, prefills, kept = [], [], []
        for i in rows:
            tr = trajs[i]
            ex = examples[tr.group]
            convs.append(teacher_messages(h.task, ex) if o.teacher_context else student_messages(ex))
            kept_ids: list[int] = []
            if o.replace == "suffix":
                body = tr.response_ids if tr.truncated else tr.response_ids[:-1]  # without EOS
                kept_ids = body[: prefix_cut(body, decode)]
            kept_text = decode(kept_ids) if kept_ids else ""
            prefills.append(kept_text)
            kept.append((kept_ids, kept_text))
        gens = h.teacher.generate(convs, max_new_tokens=cap, temperature=temperature,
                                  prefills=prefills) if convs else []
        done, failed = [], 0
        for i, gen, (kept_ids, kept_text) in zip(rows, gens, kept, strict=True):
            if gen is None:
                failed += 1
                continue
            limit = max(cfg.rollout.max_new_tokens, len(kept_ids) + cap)
            trajs[i] = teacher_trajectory(trajs[i].group, kept_ids, kept_text, gen.text, gen.ended,
                                          encode, self.eos_id, limit)
            done.append(i)
        return done, failed

    # ------------------------------------------------------------------ the scorer
    def score(self, rows: Rows) -> Targets:
        # FSDP: every process gathers a local teacher's weights once for all its calls (its
        # ratings and replacements differ in number from the other processes')
        weights = getattr(self.host.teacher, "weights", None)
        with weights.whole() if isinstance(weights, TeacherWeights) else contextlib.nullcontext():
            return self._score_episodes(rows) if self.episodes else self._score_responses(rows)

    def _score_responses(self, rows: Rows) -> Targets:
        """Rate, replace the rejected responses in ``rows`` (in place), rate the
        replacements, and the group-normalised advantages."""
        o, n, roll = self.host.cfg.ovd, self.n, rows.roll
        examples = [p.example for p in rows.pairs]
        groups = roll.prompt_index  # prompt-major: n rows per prompt
        trajs = [Trajectory(g, ids, text, cut) for g, ids, text, cut
                 in zip(groups, roll.response_ids, roll.texts, roll.truncated, strict=True)]
        student_len = float(sum(len(r) for r in roll.response_ids))
        t = time.perf_counter()
        first = self.rate_responses([examples[g] for g in groups], roll.texts)
        t_score = time.perf_counter() - t
        scores = list(first.scores)
        rejected = [i for i, s in enumerate(scores) if s is not None and s < o.threshold]
        t = time.perf_counter()
        replaced, failed = self.replace(trajs, rejected, examples)
        t_replace = time.perf_counter() - t
        ratings = [first]
        if replaced:
            t = time.perf_counter()
            again = self.rate_responses([examples[trajs[i].group] for i in replaced],
                                        [trajs[i].text for i in replaced])
            t_score += time.perf_counter() - t
            ratings.append(again)
            for i, s in zip(replaced, again.scores, strict=True):
                scores[i] = s
        # the rows now hold what is trained: the teacher's tokens where it replaced
        roll.response_ids = [tr.response_ids for tr in trajs]
        roll.texts = [tr.text for tr in trajs]
        roll.truncated = [tr.truncated for tr in trajs]
        unparseable = sum(sum(s is None for s in r.scores) - r.too_long for r in ratings)
        bad_texts = [r.raw[k][:100] for r in ratings for k, s in enumerate(r.scores)
                     if s is None and r.raw[k]][:3]
        verbal = fill_group_mean(scores, groups)
        outcome = [float(self.host.task.score(examples[tr.group], tr.text)) for tr in trajs]
        rewards = mix_rewards(outcome, verbal, self.reward_weight)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, n)).view(-1)
        known_first = [s for s in first.scores if s is not None]
        known = [s for s in scores if s is not None]
        teacher_scores = [scores[i] for i in replaced if scores[i] is not None]
        mass = [x for r in ratings for x in r.digit_mass if x == x]
        zero = adv.view(-1, n).eq(0).all(dim=1)
        rows_n = len(trajs)
        figures = self.host.dist.global_figures({
            "verbal_score": (sum(known_first), len(known_first)),
            "verbal_score_final": (sum(known), len(known)),
            "teacher_score": (sum(teacher_scores), len(teacher_scores)),
            "digit_mass": (sum(mass), len(mass)),
            "outcome_reward": (sum(outcome), rows_n),
            "reward": (sum(rewards), rows_n),
            "replaced_frac": (len(replaced), rows_n),
            "student_response_len": (student_len, rows_n),
            "zero_adv_groups": (float(zero.sum()), zero.numel()),
        }, counts={"rejected": len(rejected), "replace_failed": failed, "unparseable": unparseable,
                   "too_long": sum(r.too_long for r in ratings)})
        return Targets(advantages=adv, seconds=t_score + t_replace, figures={
            **figures,
            "reward_weight": self.reward_weight,
            **({"unparseable_texts": bad_texts} if bad_texts else {}),
            "time_score": t_score,
            "time_replace": t_replace,
        })

    def _score_episodes(self, rows: Rows) -> Targets:
        """A game's step: the episodes (or every move) rated, one advantage per trained move."""
        played = rows.played
        assert played is not None
        n = self.n
        examples = rows.problems
        groups = [e // n for e in range(len(played.episodes))]  # n episodes per problem
        t = time.perf_counter()
        row_adv, ratings = self.rate_episodes(examples, played, groups)
        t_score = time.perf_counter() - t
        known = [s for s in ratings.scores if s is not None]
        success = [float(ep.success) for ep in played.episodes]
        flat = torch.tensor(success).view(-1, n)
        same = flat.eq(flat[:, :1]).all(dim=1)
        mass = [x for x in ratings.digit_mass if x == x]
        rows_n = len(rows.responses)
        figures = self.host.dist.global_figures({
            "verbal_score": (sum(known), len(known)),
            "verbal_score_final": (sum(known), len(known)),
            "teacher_score": (0.0, 0),
            "digit_mass": (sum(mass), len(mass)),
            "outcome_reward": (sum(success), len(success)),
            "same_outcome_groups": (float(same.sum()), same.numel()),
            "zero_adv_rows": (sum(a == 0.0 for a in row_adv), rows_n),
            "student_response_len": (sum(len(r) for r in rows.responses), rows_n),
        }, counts={"rejected": 0, "replace_failed": 0,
                   "unparseable": sum(s is None for s in ratings.scores) - ratings.too_long,
                   "too_long": ratings.too_long})
        return Targets(advantages=torch.tensor(row_adv, dtype=torch.float64), seconds=t_score, figures={
            **figures,
            "reward_weight": self.reward_weight,
            "step_level": self.host.cfg.ovd.step_level,
            "replaced_frac": 0.0,
            "time_score": t_score,
            "time_replace": 0.0,
        })

    def rate_episodes(self, examples: Sequence[Example], played: EpisodeRollout,
                      groups: Sequence[int]) -> tuple[list[float], Ratings]:
        """One advantage per trained move of ``played`` (its ``turn_of`` order), and the
        teacher's ratings (per episode, or per move with ``ovd.step_level``)."""
        o, n = self.host.cfg.ovd, self.n
        teacher = self.host.teacher
        eps = played.episodes
        outcome = [float(ep.success) for ep in eps]
        if o.step_level:
            requests: list[str] = []
            owner: list[int] = []
            for e, ep in enumerate(eps):
                reqs = turn_score_requests(ep.turns, template=o.score_prompt,
                                           context=self._context(examples[groups[e]]))
                requests += reqs
                owner += [e] * len(reqs)
            ratings = rate(teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)
            per_episode: list[list[float | None]] = [[] for _ in eps]
            for e, score in zip(owner, ratings.scores, strict=True):
                per_episode[e].append(score)
            move_adv: list[list[float]] = []
            for g in range(len(eps) // n):
                move_adv += turn_advantages(per_episode[g * n:(g + 1) * n],
                                            outcome[g * n:(g + 1) * n], self.reward_weight)
            return [move_adv[e][m] for e, m in played.turn_of], ratings
        requests = [
            fill_score_prompt(o.score_prompt, ep.turns[0][1], transcript_text(ep.turns),
                              self._context(examples[g]))
            for ep, g in zip(eps, groups, strict=True)
        ]
        ratings = rate(teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)
        rewards = mix_rewards(outcome, fill_group_mean(ratings.scores, groups), self.reward_weight)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, n)).view(-1).tolist()
        return [adv[e] for e, _ in played.turn_of], ratings


class PolicyGradientObjective:
    """A clipped policy gradient on one micro-batch: each response token's log-prob under
    the student (without the context, at the sampling temperature) times its row's
    advantage; ``clip_frac``: the share of tokens clipped."""

    figures = ("clip_frac",)

    def __init__(self, host: Host) -> None:
        self.host = host

    def loss(self, rows: Rows, targets: Targets, sl: slice, totals: Totals, weight: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.host
        assert targets.advantages is not None
        adv, responses = targets.advantages[sl], rows.responses[sl]
        if not h.dist.fsdp and all(float(a) == 0.0 or not r for a, r in zip(adv, responses, strict=True)):
            # no signal: its gradient would be exactly zero (under FSDP the forward still runs:
            # every process must take part in each micro-batch's gathers)
            return (torch.zeros((), device=h.device, requires_grad=True),
                    {"clip_frac": torch.zeros(0, device=h.device)})
        sb = pack([rows.pairs[i].student_ids for i in rows.roll.prompt_index[sl]], responses,
                  h.pad_id, device=h.device)
        mask = sb.response_mask
        weights = losses.reduction_weights(
            mask, h.cfg.loss.reduction, total_tokens=totals[0], total_sequences=totals[1]) * weight
        logp = self.token_logps(response_hidden(h.student, sb)[mask], sb.response_ids[mask])
        a_tok = adv.to(h.device, torch.float32)[:, None].expand(mask.shape)[mask]
        per_token, clip = clipped_policy_loss(logp, logp.detach(), a_tok, h.cfg.ovd.clip_eps)
        return (per_token * weights[mask]).sum(), {"clip_frac": clip}

    def token_logps(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """log p_student(y_t) at the sampling temperature, ``[N]``. With perf.chunked_loss the
        head runs loss_chunk_tokens at a time and is recomputed in the backward pass, so no
        [tokens, vocab] tensor outlives its chunk."""
        cfg = self.host.cfg
        head = self.host.student.get_output_embeddings()
        T = cfg.rollout.temperature

        def part(h: Tensor, t: Tensor) -> tuple[Tensor, None]:
            logits = head(h).float() / T
            return logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1), None

        return losses.chunked(part, hidden, ids, chunk_size=cfg.perf.loss_chunk_tokens
                              if cfg.perf.chunked_loss else None)[0]


def format_step(m: dict[str, Any]) -> str:
    """The terminal line of an OVD step's record."""
    return (
        f"step {m['step']:>4} | loss {m['loss']:.4f} | verbal {_fmt(m['verbal_score'], '.2f')} | "
        f"outcome {m['outcome_reward']:.3f} | replaced {m['replaced_frac']:.2f} | "
        f"unparsed {m['unparseable']} | len {m['response_len']:.1f} | "
        f"rollout {m['time_rollout']:.1f}s score {m['time_score']:.1f}s "
        f"replace {m['time_replace']:.1f}s update {m['time_update']:.1f}s"
    )


def postfix(m: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures for an OVD step."""
    return {"loss": f"{m['loss']:.4f}", "verbal": _fmt(m["verbal_score"], ".2f"),
            "repl": f"{m['replaced_frac']:.2f}"}


def ovd_method(host: Host) -> Method:
    """OVD as the parts :meth:`opcd.training.trainer.Trainer.train_step` composes."""
    return Method(StudentSampler(host), VerbalScorer(host), PolicyGradientObjective(host),
                  format_step, postfix)
