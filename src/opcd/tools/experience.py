"""Experiential knowledge extraction (``opcd extract``): the context OPCD then distils.

The procedure (arXiv 2602.12275, see REFERENCE.md §3), for single-turn tasks:

1. an extraction run walks through ``extract.problems`` training problems one at a time;
2. the extractor model solves the problem *without* experience;
3. it is shown ``Input: <problem> / Output: <its own solution>`` (no correctness label) with
   the current experience, numbered, and asked for new general, reusable insights as
   markdown list items starting with the marker (``- EXPERIENCE ITEM:``);
4. only marker lines are kept (``<think>...</think>`` blocks dropped) and merged into the
   experience (:meth:`Experience.merge`: duplicates refresh, ``(replaces N)`` resolves a
   conflict with item N);
5. when the experience exceeds ``extract.budget_tokens`` (the extractor's tokenizer), whole
   items are dropped, oldest first (:func:`trim_to_budget`);
6. validation accuracy with the experience as the task's context is measured after every
   update (:func:`opcd.eval.evaluate.evaluate` on ``extract.val_size`` ``eval`` examples);
7. ``extract.runs`` runs with seeds ``extract.seed + r``; the best-scoring experience wins.

Outputs in ``extract.dir``: ``experience.txt`` (the best experience, one item per line: use
it with ``task.context_file=...``), ``trace.jsonl`` (a settings header, the no-experience
baseline, then one line per update with its experience and validation score) and
``best.json``. Every update's line is appended and fsynced when it finishes, and each
sample is seeded from (run seed, update), so a restart skips the finished updates and
gives the same result as an uninterrupted extraction.

Games (multi-turn): step 2 plays the problem's episode without experience
(``rollout.max_new_tokens`` per move), and the "Output" shown is the whole play: each move
and the environment's answer to it (which tells when a hole ended it or the goal was
reached). Validation plays episodes too (success rate).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opcd.errors import ConfigError
from opcd.runtime.jsonl import HeaderMismatch, JsonlFile
from opcd.tasks.base import read_context_file as read_context_file  # its home before 2026-12

EXTRACT_PROMPT = (
    "You are keeping a short list of general, reusable insights for solving problems of "
    "this kind.\n\n# Current experience\n{experience}\n\n"
    "# A problem that was just attempted (the attempt may be right or wrong; no answer key "
    "is given)\nInput: {problem}\nOutput: {solution}\n\n"
    "Review the attempt. Write new insights that will help on future, different problems: "
    "general strategies, checks and pitfalls, not facts about this particular problem. Do "
    "not repeat an insight that is already listed. If a new insight corrects or contradicts "
    "a listed one, begin it with \"(replaces N)\", N being that insight's number. Write each "
    "insight on its own line starting with \"{marker}\". Write at most 3 insights and "
    "nothing else."
)
"""The insight request; placeholders {experience}, {problem}, {solution}, {marker}."""

NO_EXPERIENCE = "(none yet)"

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s*")
_REPLACES = re.compile(r"^\(\s*replaces?\s+((?:#?\d+\s*(?:,|and)?\s*)+)\)\s*", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(experience|problem|solution|marker)\}")


# --------------------------------------------------------------------------- parsing
def strip_thinking(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks (an unclosed one runs to the end); a
    stray ``</think>`` with no opening tag drops everything before it."""
    text = _THINK.sub("", text)
    low = text.lower()
    if "</think>" in low:
        text = text[low.rfind("</think>") + len("</think>"):]
    return text


@dataclass(frozen=True)
class ParsedItem:
    """One insight as written: its text and the (1-based) earlier items it replaces."""

    text: str
    replaces: tuple[int, ...] = ()


def _marker_core(marker: str) -> str:
    return _BULLET.sub("", marker).strip().casefold()


def parse_items(text: str, marker: str = "- EXPERIENCE ITEM:") -> list[ParsedItem]:
    """The insights in a model's output: only lines starting with ``marker`` count.

    Thinking blocks are dropped first. The list bullet may vary (``-``, ``*``, ``1.``) and
    the marker's case too; empty items are dropped. An item starting with ``(replaces N)``
    or ``(replaces N, M)`` names earlier items it supersedes.
    """
    core = _marker_core(marker)
    out: list[ParsedItem] = []
    for line in strip_thinking(text).splitlines():
        body = _BULLET.sub("", line).strip()
        if not core or not body.casefold().startswith(core):
            continue
        body = body[len(core):].strip().strip("*").strip()
        replaces: tuple[int, ...] = ()
        m = _REPLACES.match(body)
        if m:
            replaces = tuple(int(x) for x in re.findall(r"\d+", m.group(1)))
            body = body[m.end():].strip()
        if body:
            out.append(ParsedItem(" ".join(body.split()), replaces))
    return out


def _key(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(" .;:!")


@dataclass
class Experience:
    """The accumulated insights, oldest first (item bodies, without the marker)."""

    items: list[str] = field(default_factory=list)
    marker: str = "- EXPERIENCE ITEM:"

    def render(self) -> str:
        """One item per line, each starting with the marker (the context text)."""
        return "\n".join(f"{self.marker} {t}" for t in self.items)

    def numbered(self) -> str:
        """The items as shown to the extractor: ``[N] text``, or a note when empty."""
        if not self.items:
            return NO_EXPERIENCE
        return "\n".join(f"[{i}] {t}" for i, t in enumerate(self.items, 1))

    def merge(self, new: Sequence[ParsedItem]) -> tuple[list[str], list[str]]:
        """Add ``new`` items; returns (added, removed).

        Rules: an item equal to an existing one (ignoring case, spacing and final
        punctuation) is not added twice: the existing one is refreshed (moved to the end, so
        budget trimming keeps it longest); ``(replaces N)`` removes item N of the list as it
        was shown (numbers out of range are ignored); a repeat within ``new`` counts once.
        """
        before = list(self.items)
        doomed = {n - 1 for it in new for n in it.replaces if 1 <= n <= len(before)}
        kept = [t for i, t in enumerate(before) if i not in doomed]
        removed = [before[i] for i in sorted(doomed)]
        added: list[str] = []
        for it in new:
            k = _key(it.text)
            same = [t for t in kept if _key(t) == k]
            if same:
                kept = [t for t in kept if _key(t) != k]
                kept.append(same[0])
                continue
            kept.append(it.text)
            added.append(it.text)
        self.items = kept
        return added, removed


def trim_to_budget(exp: Experience, count_tokens: Callable[[str], int], budget: int) -> list[str]:
    """Drop whole items, oldest first, until ``count_tokens(exp.render()) <= budget``;
    returns the dropped items (an item longer than the budget on its own is dropped too)."""
    dropped: list[str] = []
    while exp.items and count_tokens(exp.render()) > budget:
        dropped.append(exp.items.pop(0))
    return dropped


def fill_prompt(template: str, *, experience: str, problem: str, solution: str, marker: str) -> str:
    """Fill the insight request in one pass (nothing in the values is interpreted)."""
    values = {"experience": experience, "problem": problem, "solution": solution, "marker": marker}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------- extraction
class ContextOverride:
    """A task seen through another context: every example's context is ``context``."""

    def __init__(self, base: Any, context: str) -> None:
        self.base = base
        self.name = base.name
        self.placement = base.placement
        self.user_template = base.user_template
        self.splits = base.splits
        self.multi_turn = getattr(base, "multi_turn", False)
        self._context = context

    def examples(self, split: str) -> list[Any]:
        return self.base.examples(split)

    def context(self, example: Any) -> str | None:
        return self._context

    def score(self, example: Any, response: str) -> float:
        return self.base.score(example, response)

    def score_details(self, examples: Any, responses: Any) -> dict[str, float]:
        return self.base.score_details(examples, responses)

    def check_split(self, split: str) -> None:
        self.base.check_split(split)

    # Games: the same episodes, with this context shown when ``with_context``.
    def new_episode(self, example: Any) -> Any:
        return self.base.new_episode(example)

    def messages(self, example: Any, turns: Any, *, with_context: bool) -> list[dict[str, str]]:
        from opcd.tasks.episodes import conversation_messages

        return conversation_messages(
            turns, context=self._context if with_context else None,
            placement=self.placement, user_template=self.user_template,
        )

    def describe(self) -> str:
        return f"{self.base.describe()} (context overridden)"


@dataclass
class ExtractResult:
    """What an extraction produced."""

    experience_path: Path
    trace_path: Path
    items: list[str]
    score: float | None
    """Validation score of the kept experience."""
    baseline: float | None
    """Validation score without any experience (the task's student prompt)."""
    run: int | None
    update: int | None
    updates_done: int
    resumed: int
    """Updates read back from the trace instead of computed."""


Validator = Callable[[str], tuple[float, float, int]]
"""experience text -> (score, standard error, n)."""
Writer = Callable[[str], str]
"""insight request -> the extractor's raw answer."""


class _Trace:
    """The append-only trace: a settings header, then records (torn lines dropped)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings

    def load(self) -> list[dict[str, Any]]:
        file = JsonlFile(self.path, kind="opcd_extract", settings=self.settings)
        try:
            found = file.load()
        except HeaderMismatch as e:
            if e.foreign:
                raise ConfigError(
                    f"{str(self.path)!r} is not an opcd extraction trace; choose another extract.dir."
                ) from None
            raise ConfigError(
                f"{str(self.path)!r} was written by an extraction with other settings "
                f"({', '.join(e.changed[:6]) or 'unknown'}). Use the same settings to continue it, "
                "another extract.dir, or --overwrite to start again."
            ) from None
        if not file.is_clean(len(found) + 1):
            file.rewrite([json.dumps(file.header(), ensure_ascii=False), *(line for line, _ in found)])
        return [rec for _, rec in found]

    def append(self, rec: dict[str, Any]) -> None:
        JsonlFile(self.path).append([rec])


def _generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], *, seed: int,
              temperature: float, max_new_tokens: int) -> str:
    import torch

    from opcd.sampling import rollout
    from opcd.tasks.chat import encode_chat

    ids = encode_chat(tokenizer, messages)
    with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
        torch.manual_seed(seed)
        out = rollout.sample(model, tokenizer, [ids], n=1, temperature=temperature, top_p=1.0,
                             max_new_tokens=max_new_tokens, batch_size=1)
    return out.texts[0]


def _play_transcript(model: Any, tokenizer: Any, task: Any, example: Any, *, seed: int,
                     temperature: float, max_new_tokens: int) -> str:
    """Games: play ``example``'s episode without experience; its moves and the environment's
    answers (which say when the goal is reached or a hole ends it) as one text."""
    from opcd.sampling.multiturn import play

    played = play(model, tokenizer, task, [example], [seed], temperature=temperature,
                  max_new_tokens=max_new_tokens, batch_size=1, max_prompt_tokens=1 << 30)
    turns = played.episodes[0].turns[1:]
    return "\n".join(f"{'Move' if role == 'assistant' else 'Environment'}: {text.strip()}"
                     for role, text in turns)


def extract_experience(
    config: Any,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    validate: Validator | None = None,
    writer: Writer | None = None,
) -> ExtractResult:
    """Extract experience for ``config``'s task (``opcd extract``); see the module docstring.

    ``validate`` replaces the validation evaluation and ``writer`` the extractor's insight
    generation (tests, or a model behind an API); by default both use the extractor model.
    """
    import torch
    from tqdm.auto import tqdm

    from opcd.config import as_config
    from opcd.eval.evaluate import evaluate
    from opcd.models import load_model
    from opcd.runtime import checkpoint as ckpt
    from opcd.tasks import build_task
    from opcd.tasks.base import derive_seed
    from opcd.tasks.chat import student_messages

    cfg = as_config(config, overrides)
    x, ev = cfg.extract, cfg.eval
    task = build_task(cfg.task)  # its own context is never shown: the experience replaces it
    from opcd.sampling.multiturn import is_multiturn

    games = is_multiturn(task)
    train_ex = task.examples("train")
    task.examples("eval")
    out_dir = Path(x.dir)
    if overwrite and out_dir.exists():
        for name in ("trace.jsonl", "experience.txt", "best.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = x.model or cfg.model
    settings = {
        **{k: v for k, v in dataclasses.asdict(x).items() if k != "dir"},
        "extractor": extractor, "task": dataclasses.asdict(cfg.task),
        "eval": {"max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "seed": ev.seed},
        "custom_validate": validate is not None, "custom_writer": writer is not None,
    }
    trace = _Trace(out_dir / "trace.jsonl", settings)
    done = trace.load()
    say = (lambda m: tqdm.write(m, file=sys.stderr)) if progress else (lambda m: None)
    say(f"loading extractor {extractor} ...")
    model, tok = load_model(extractor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def default_validate(context: str | None) -> tuple[float, float, int]:
        t = ContextOverride(task, context) if context else task
        with torch.no_grad():
            res = evaluate(model, tok, t, split="eval", with_context=context is not None,
                           size=x.val_size, max_new_tokens=ev.max_new_tokens,
                           temperature=ev.temperature, seed=ev.seed,
                           batch_size=cfg.rollout.batch_size)
        return res.score, res.stderr, res.n

    def score(context: str) -> tuple[float, float, int]:
        return validate(context) if validate is not None else default_validate(context)

    template = x.prompt or EXTRACT_PROMPT
    by_key = {(r["run"], r["update"]): r for r in done if "run" in r and "update" in r}
    baseline = next((r for r in done if r.get("baseline")), None)
    if baseline is None:
        b = (None, None, 0) if validate is not None else default_validate(None)
        baseline = {"baseline": True, "val_score": b[0], "val_stderr": b[1], "val_n": b[2]}
        trace.append(baseline)
        say(f"baseline (no experience): {b[0]}")
    resumed = 0
    total = x.runs * min(x.problems, len(train_ex))
    bar = tqdm(total=total, desc="extract", unit="update", disable=not progress, file=sys.stderr)
    records: list[dict[str, Any]] = []
    try:
        for r in range(x.runs):
            run_seed = x.seed + r
            rng = random.Random(derive_seed("extract", run_seed))
            picks = rng.sample(range(len(train_ex)), min(x.problems, len(train_ex)))
            exp = Experience(marker=x.marker)
            for u, i in enumerate(picks, 1):
                prev = by_key.get((r, u))
                if prev is not None:
                    exp.items = list(prev["experience"])
                    records.append(prev)
                    resumed += 1
                    bar.update(1)
                    continue
                ex = train_ex[i]
                if games:
                    solution = _play_transcript(model, tok, task, ex, seed=derive_seed("solve", run_seed, u),
                                                temperature=x.temperature,
                                                max_new_tokens=cfg.rollout.max_new_tokens)
                else:
                    solution = _generate(model, tok, student_messages(ex),
                                         seed=derive_seed("solve", run_seed, u),
                                         temperature=x.temperature, max_new_tokens=x.max_new_tokens)
                request = fill_prompt(template, experience=exp.numbered(), problem=ex.prompt,
                                      solution=solution, marker=x.marker)
                if writer is not None:
                    raw = writer(request)
                else:
                    raw = _generate(model, tok, [{"role": "user", "content": request}],
                                    seed=derive_seed("insight", run_seed, u),
                                    temperature=x.temperature, max_new_tokens=x.max_new_tokens)
                added, removed = exp.merge(parse_items(raw, x.marker))
                dropped = trim_to_budget(exp, count_tokens, x.budget_tokens)
                s = score(exp.render()) if exp.items else (None, None, 0)
                rec = {
                    "run": r, "seed": run_seed, "update": u, "example_id": ex.id,
                    "solution": solution[:2000], "raw": raw[:4000], "added": added,
                    "replaced": removed, "dropped": dropped, "experience": list(exp.items),
                    "tokens": count_tokens(exp.render()) if exp.items else 0,
                    "val_score": s[0], "val_stderr": s[1], "val_n": s[2],
                }
                trace.append(rec)
                records.append(rec)
                bar.update(1)
                say(f"run {r} update {u}: +{len(added)} -{len(removed) + len(dropped)} items, "
                    f"{len(exp.items)} kept, validation {s[0]}")
    finally:
        bar.close()
    scored = [rec for rec in records if rec["val_score"] is not None]
    best = max(scored, key=lambda rec: rec["val_score"]) if scored else None  # first of ties
    items = list(best["experience"]) if best else []
    exp_path = out_dir / "experience.txt"
    ckpt.atomic_write_text(exp_path, "".join(f"{x.marker} {t}\n" for t in items))
    summary = {
        "run": best["run"] if best else None, "update": best["update"] if best else None,
        "val_score": best["val_score"] if best else None,
        "val_stderr": best["val_stderr"] if best else None,
        "baseline": baseline.get("val_score"), "items": len(items),
    }
    ckpt.atomic_write_text(out_dir / "best.json", json.dumps(summary, indent=1) + "\n")
    if best is None:
        say("no update produced any experience item: experience.txt is empty (check the "
            "extractor's answers in trace.jsonl, the marker, or use a stronger extract.model)")
    return ExtractResult(
        experience_path=exp_path, trace_path=trace.path, items=items,
        score=summary["val_score"], baseline=summary["baseline"], run=summary["run"],
        update=summary["update"], updates_done=len(records), resumed=resumed,
    )
