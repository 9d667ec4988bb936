"""The OVD step on the shared training loop: ``opcd train CONFIG method=ovd``.

:class:`OvdTrainer` is a :class:`opcd.trainer.Trainer` with a verbal teacher and its own
:meth:`~OvdTrainer.train_step` (rollout of a group per prompt -> verbal scores ->
rejection and replacement -> clipped policy-gradient update, see :mod:`opcd.ovd`).
Everything else (data order, evaluation, metrics.jsonl, checkpoints, exact resume,
signals, non-finite skips) is the trainer's own, unchanged.

On multi-turn games (FrozenLake, Sokoban) a group is ``rollout.n`` episodes of one problem,
played by the student without the context (:func:`opcd.multiturn.play_for_training`); the
outcome is success. The teacher rates the whole transcript, or with ``ovd.step_level``
every move in its situation (:func:`opcd.ovd.turn_score_requests`,
:func:`opcd.ovd.turn_advantages`); every move the student generated is trained with its
advantage, environment text never is. Episodes are not replaced by teacher play (the
teacher would have to play the game), so ``ovd.threshold`` does not apply there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from opcd import losses, rollout
from opcd.chat import student_messages, teacher_messages
from opcd.distributed import Dist
from opcd.errors import ConfigError
from opcd.multiturn import EpisodeRollout, is_multiturn, play_for_training
from opcd.onpolicy import episode_figures
from opcd.ovd import (
    ModelVerbalTeacher,
    Ratings,
    Trajectory,
    VerbalTeacher,
    clipped_policy_loss,
    digit_token_ids,
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
from opcd.scoring import pack, response_hidden
from opcd.tasks.base import Example, Task
from opcd.trainer import Trainer

OUTCOME_TASKS = frozenset({"math", "gsm8k", "frozenlake", "sokoban", "safety"})
"""Built-in tasks whose ``score`` is an outcome reward (exact match, success, a verdict)."""


def has_outcome_reward(task: Task) -> bool:
    """Whether ``task.score`` is an outcome reward to train on (a task may say so itself
    with an ``outcome_reward`` attribute); system-prompt scorers are evaluation measures."""
    flag = getattr(task, "outcome_reward", None)
    return flag if isinstance(flag, bool) else task.name in OUTCOME_TASKS


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class _Update:
    """What one clipped policy-gradient update did."""

    loss: float
    clipped: float
    tokens: float
    grad_norm: float
    skip_reason: str | None
    seconds: float


class OvdTrainer(Trainer):
    """On-policy Verbal Distillation on the shared loop (``method: ovd``)."""

    methods = ("ovd",)
    teacher: VerbalTeacher

    def __init__(self, cfg: Any, *, progress: bool = True, dist: Dist | None = None) -> None:
        super().__init__(cfg, progress=progress, dist=dist)
        o = cfg.ovd
        self.reward_weight = o.reward_weight if o.reward_weight is not None else (
            1.0 if has_outcome_reward(self.task) else 0.0
        )
        eos = self.tokenizer.eos_token_id
        self.eos_id = int(eos) if eos is not None else rollout.eos_ids(self.student, self.tokenizer)[0]
        self.episodes = is_multiturn(self.task)
        if o.step_level and not self.episodes:
            raise ConfigError(
                f"ovd.step_level=true rates every move of a multi-turn game, but task "
                f"{self.task.name!r} has one reply per prompt. Remove ovd.step_level, or use "
                "task.name=frozenlake or sokoban."
            )
        if self.episodes and o.threshold > 0:
            self._say(f"note: ovd.threshold={o.threshold} is not used on {self.task.name}: "
                      "episodes are rated and trained, never replaced by teacher play")

    def _build_teacher(self, model: nn.Module | None, tokenizer: Any) -> VerbalTeacher:
        cfg = self.cfg
        name = cfg.teacher.model or f"the {cfg.teacher.mode} teacher"
        teacher = ModelVerbalTeacher(
            cfg.teacher.mode, self.student, self.tokenizer, model, tokenizer,
            batch_size=cfg.perf.teacher_batch_size, name=repr(name),
        )
        if cfg.ovd.score_mode == "expected":
            digit_token_ids(teacher.tokenizer, repr(name))  # refuse now, not at the first step
        return teacher

    # ------------------------------------------------------------------ teacher calls
    def _context(self, example: Example) -> str | None:
        return self.task.context(example) if self.cfg.ovd.teacher_context else None

    def rate_responses(self, examples: Sequence[Example], texts: Sequence[str]) -> Ratings:
        """The teacher's 0-9 verdict on each response (one example per text)."""
        o = self.cfg.ovd
        requests = [
            fill_score_prompt(o.score_prompt, ex.prompt, text, self._context(ex))
            for ex, text in zip(examples, texts, strict=True)
        ]
        return rate(self.teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)

    def score_turns(self, example: Example, turns: Sequence[tuple[str, str]]) -> Ratings:
        """Step-level OVD: one verdict per assistant turn of a played episode (for the
        multi-turn loop; combine with :func:`opcd.ovd.turn_advantages`)."""
        o = self.cfg.ovd
        requests = turn_score_requests(turns, template=o.score_prompt, context=self._context(example))
        return rate(self.teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)

    def replace(
        self, trajs: list[Trajectory], rows: Sequence[int], examples: Sequence[Example]
    ) -> tuple[list[int], int]:
        """Replace ``trajs[rows]`` by teacher text (in place); (rows replaced, rows whose
        teacher prompt was too long and that keep the student's response)."""
        cfg, o = self.cfg, self.cfg.ovd
        cap = o.teacher_max_new_tokens or cfg.rollout.max_new_tokens
        temperature = o.teacher_temperature if o.teacher_temperature is not None else cfg.rollout.temperature

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        def encode(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        convs, prefills, kept = [], [], []
        for i in rows:
            tr = trajs[i]
            ex = examples[tr.group]
            convs.append(teacher_messages(self.task, ex) if o.teacher_context else student_messages(ex))
            kept_ids: list[int] = []
            if o.replace == "suffix":
                body = tr.response_ids if tr.truncated else tr.response_ids[:-1]  # without EOS
                kept_ids = body[: prefix_cut(body, decode)]
            kept_text = decode(kept_ids) if kept_ids else ""
            prefills.append(kept_text)
            kept.append((kept_ids, kept_text))
        gens = self.teacher.generate(convs, max_new_tokens=cap, temperature=temperature,
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

    # ------------------------------------------------------------------ the step
    def _token_logps(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """log p_student(y_t) at the sampling temperature, ``[N]``. With perf.chunked_loss the
        head runs loss_chunk_tokens at a time and is recomputed in the backward pass, so no
        [tokens, vocab] tensor outlives its chunk."""
        head = self.student.get_output_embeddings()
        T = self.cfg.rollout.temperature

        def part(h: Tensor, t: Tensor) -> tuple[Tensor, None]:
            logits = head(h).float() / T
            return logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1), None

        return losses.chunked(part, hidden, ids, chunk_size=self.cfg.perf.loss_chunk_tokens
                              if self.cfg.perf.chunked_loss else None)[0]

    def _update(self, prompts: Sequence[list[int]], responses: Sequence[list[int]], adv: Tensor) -> _Update:
        """One clipped policy-gradient step on rows (prompt ids, response ids, advantage),
        the loss averaged over all response tokens of the step (``loss.reduction``)."""
        cfg, o = self.cfg, self.cfg.ovd
        t0 = time.perf_counter()
        total_tokens = float(sum(len(r) for r in responses))
        total_seqs = float(sum(1 for r in responses if r))
        loss_sum, clipped = 0.0, 0.0
        self.student.train()
        mb = cfg.train.micro_batch_size
        for start in range(0, len(responses), mb):
            rows = list(range(start, min(start + mb, len(responses))))
            if all(float(adv[i]) == 0.0 or not responses[i] for i in rows):
                continue  # no signal: its gradient would be exactly zero
            sb = pack([prompts[i] for i in rows], [responses[i] for i in rows],
                      self.pad_id, device=self.device)
            mask = sb.response_mask
            weights = losses.reduction_weights(
                mask, cfg.loss.reduction, total_tokens=total_tokens, total_sequences=total_seqs,
            )
            logp = self._token_logps(response_hidden(self.student, sb)[mask], sb.response_ids[mask])
            a_tok = adv[rows].to(self.device, torch.float32)[:, None].expand(mask.shape)[mask]
            per_token, clip = clipped_policy_loss(logp, logp.detach(), a_tok, o.clip_eps)
            loss = (per_token * weights[mask]).sum()
            loss.backward()
            loss_sum += float(loss.detach())
            clipped += float(clip.sum())
            del logp, per_token, loss
        grad_norm, skip_reason = self.optimizer_step(loss_sum)
        return _Update(loss_sum, clipped, total_tokens, grad_norm, skip_reason,
                       time.perf_counter() - t0)

    def train_step(self) -> dict[str, Any]:
        """One OVD step (see :mod:`opcd.ovd`); returns its metrics."""
        if self.episodes:
            return self.episode_step()
        cfg, o = self.cfg, self.cfg.ovd
        n = cfg.rollout.n
        t0 = time.perf_counter()
        idx = self.order.take(cfg.train.batch_size)
        pairs = self.prompt_pairs(idx)
        examples = [p.example for p in pairs]
        roll = rollout.sample(
            self.student, self.tokenizer, [p.student_ids for p in pairs], n=n,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size,
        )
        t_rollout = time.perf_counter() - t0
        groups = roll.prompt_index  # prompt-major: n rows per prompt
        trajs = [Trajectory(g, ids, text, cut) for g, ids, text, cut
                 in zip(groups, roll.response_ids, roll.texts, roll.truncated, strict=True)]
        student_len = _mean([len(r) for r in roll.response_ids]) or 0.0

        # verbal scores, rejection and replacement
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
        unparseable = sum(sum(s is None for s in r.scores) - r.too_long for r in ratings)
        bad_texts = [r.raw[k][:100] for r in ratings for k, s in enumerate(r.scores)
                     if s is None and r.raw[k]][:3]

        # rewards and advantages
        verbal = fill_group_mean(scores, groups)
        outcome = [float(self.task.score(examples[tr.group], tr.text)) for tr in trajs]
        rewards = mix_rewards(outcome, verbal, self.reward_weight)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, n)).view(-1)

        # update: clipped policy gradient, token mean over the whole step
        responses = [tr.response_ids for tr in trajs]
        upd = self._update([pairs[tr.group].student_ids for tr in trajs], responses, adv)
        self.step += 1
        elapsed = time.perf_counter() - t0
        rows_n = max(len(trajs), 1)
        teacher_scores = [scores[i] for i in replaced if scores[i] is not None]
        zero_groups = adv.view(-1, n).eq(0).all(dim=1).float().mean().item()
        mass = [x for r in ratings for x in r.digit_mass if x == x]
        total_tokens = upd.tokens
        return {
            "type": "train",
            "step": self.step,
            "loss": upd.loss,
            "grad_norm": upd.grad_norm,
            "verbal_score": _mean([s for s in first.scores if s is not None]),
            "verbal_score_final": _mean([s for s in scores if s is not None]),
            "teacher_score": _mean(teacher_scores),
            "outcome_reward": sum(outcome) / rows_n,
            "reward": sum(rewards) / rows_n,
            "reward_weight": self.reward_weight,
            "replaced_frac": len(replaced) / rows_n,
            "rejected": len(rejected),
            "replace_failed": failed,
            "unparseable": unparseable,
            **({"unparseable_texts": bad_texts} if bad_texts else {}),
            "too_long": sum(r.too_long for r in ratings),
            "digit_mass": _mean(mass),
            "zero_adv_groups": zero_groups,
            "clip_frac": upd.clipped / max(total_tokens, 1.0),
            "response_len": total_tokens / rows_n,
            "student_response_len": student_len,
            "truncated_frac": sum(tr.truncated for tr in trajs) / rows_n,
            "time_rollout": t_rollout,
            "time_score": t_score,
            "time_replace": t_replace,
            "time_teacher": t_score + t_replace,
            "time_update": upd.seconds,
            **self.step_record_tail(idx, elapsed, total_tokens, trajs[0].text if trajs else "",
                                    upd.skip_reason),
        }

    # ------------------------------------------------------------------ games
    def rate_episodes(self, examples: Sequence[Example], played: EpisodeRollout,
                      groups: Sequence[int]) -> tuple[list[float], Ratings]:
        """One advantage per trained move of ``played`` (its ``turn_of`` order), and the
        teacher's ratings (per episode, or per move with ``ovd.step_level``)."""
        o, n = self.cfg.ovd, self.cfg.rollout.n
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
            ratings = rate(self.teacher, requests, mode=o.score_mode,
                           max_new_tokens=o.score_max_new_tokens)
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
        ratings = rate(self.teacher, requests, mode=o.score_mode, max_new_tokens=o.score_max_new_tokens)
        rewards = mix_rewards(outcome, fill_group_mean(ratings.scores, groups), self.reward_weight)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, n)).view(-1).tolist()
        return [adv[e] for e, _ in played.turn_of], ratings

    def episode_step(self) -> dict[str, Any]:
        """One OVD step on a multi-turn game: play groups of episodes, rate, update."""
        cfg, n = self.cfg, self.cfg.rollout.n
        t0 = time.perf_counter()
        idx = self.order.take(cfg.train.batch_size)
        examples = [self.train_examples[i] for i in idx]
        played = play_for_training(
            self.student, self.tokenizer, self.task, examples, list(range(len(idx))),
            seed=cfg.train.seed, step=self.step, n=n, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
            batch_size=cfg.rollout.batch_size, max_prompt_tokens=self.max_prompt_tokens,
            truncate=cfg.rollout.truncate_prompts,
        )
        t_rollout = time.perf_counter() - t0
        groups = [e // n for e in range(len(played.episodes))]  # n episodes per problem
        t = time.perf_counter()
        row_adv, ratings = self.rate_episodes(examples, played, groups)
        t_score = time.perf_counter() - t
        responses = played.rollout.response_ids
        adv = torch.tensor(row_adv, dtype=torch.float64)
        upd = self._update([p.student_ids for p in played.pairs], responses, adv)
        self.step += 1
        elapsed = time.perf_counter() - t0
        rows_n = max(len(responses), 1)
        known = [s for s in ratings.scores if s is not None]
        success = [float(ep.success) for ep in played.episodes]
        flat = torch.tensor(success).view(-1, n)
        mass = [x for x in ratings.digit_mass if x == x]
        return {
            "type": "train",
            "step": self.step,
            "loss": upd.loss,
            "grad_norm": upd.grad_norm,
            "verbal_score": _mean(known),
            "verbal_score_final": _mean(known),
            "teacher_score": None,
            "outcome_reward": sum(success) / max(len(success), 1),
            "reward_weight": self.reward_weight,
            "step_level": cfg.ovd.step_level,
            "replaced_frac": 0.0,
            "rejected": 0,
            "replace_failed": 0,
            "unparseable": sum(s is None for s in ratings.scores) - ratings.too_long,
            "too_long": ratings.too_long,
            "digit_mass": _mean(mass),
            "same_outcome_groups": flat.eq(flat[:, :1]).all(dim=1).float().mean().item(),
            "zero_adv_rows": sum(a == 0.0 for a in row_adv) / rows_n,
            "clip_frac": upd.clipped / max(upd.tokens, 1.0),
            "response_len": upd.tokens / rows_n,
            "student_response_len": upd.tokens / rows_n,
            "truncated_frac": sum(played.rollout.truncated) / rows_n,
            **episode_figures(self.dist, played),
            "time_rollout": t_rollout,
            "time_score": t_score,
            "time_replace": 0.0,
            "time_teacher": t_score,
            "time_update": upd.seconds,
            **self.step_record_tail(idx, elapsed, upd.tokens,
                                    played.rollout.texts[0] if played.rollout.texts else "",
                                    upd.skip_reason),
        }

    # ------------------------------------------------------------------ display
    def format_step(self, m: dict[str, Any]) -> str:
        return (
            f"step {m['step']:>4} | loss {m['loss']:.4f} | verbal {_fmt(m['verbal_score'], '.2f')} | "
            f"outcome {m['outcome_reward']:.3f} | replaced {m['replaced_frac']:.2f} | "
            f"unparsed {m['unparseable']} | len {m['response_len']:.1f} | "
            f"rollout {m['time_rollout']:.1f}s score {m['time_score']:.1f}s "
            f"replace {m['time_replace']:.1f}s update {m['time_update']:.1f}s"
        )

    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{m['loss']:.4f}", "verbal": _fmt(m["verbal_score"], ".2f"),
                "repl": f"{m['replaced_frac']:.2f}"}
