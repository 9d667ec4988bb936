"""``opcd bench``: seconds, tokens/s, peak memory and FLOP utilisation of each OPCD phase.

For one model, batch, context length, prompt length and response length it measures:

- ``matmul``: the fp32 matmul throughput of this machine, measured in the same process as
  each measurement below, at its start and at its end (the best of both is the baseline of
  the model-FLOPs utilisation, MFU).
- ``teacher``: scoring ``batch`` responses under the context, naive (every row runs its
  whole prompt) against prefix reuse, in one process: *cold* (the context prefix is
  computed in this call) and *warm* (it is reused: every step after the first for a frozen
  teacher and a fixed context). Both produce the full-vocabulary distributions of the response
  positions (naive: ``log_softmax`` of each micro-batch's logits; fast: 256 positions at a
  time in one reused buffer, as the trainer's loss does); the largest absolute difference of
  their log-probs is reported.
- ``step``: whole OPCD steps (:meth:`opcd.training.trainer.Trainer.train_step`: rollout, teacher,
  update), ``fast`` (the defaults) against ``naive`` (``perf.prefix_cache=false
  perf.chunked_loss=false``), each in a fresh subprocess so that its peak resident memory
  (``ru_maxrss``, a high-water mark) is its own. Responses are forced to ``response``
  tokens (end-of-sequence suppressed) so both modes do the same work.
- ``update``: the update phase alone (forward, backward, loss, optimizer step) on a
  synthetic rollout (random response tokens, no sampling), for its MFU.

Mode ``ovd`` (``--modes fast,ovd``) adds, in the ``step`` phase, whole OVD steps
(:mod:`opcd.methods.ovd_method`, ``method=ovd`` with the default ``perf`` switches) on
the same model and number of responses: ``batch // ovd_group`` prompts with
``ovd_group`` responses each, the frozen student as the verbal teacher, each in its own
subprocess, so its peak memory stands next to the OPCD step's. Its teacher keeps no
logits; its replacements are forced to full length too (``ovd.*`` overrides apply).

MFU counts model FLOPs only: the decoder's matmuls (x2 forward; backward x2 more for input
gradients and x2 for weight gradients of trained weights), causal attention, the output
heads at response positions (the teacher's too); no recomputation, no padding.

Results are printed as a table and appended, with the command line, to a Markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("teacher", "step", "update")
MODES = ("fast", "naive", "ovd")
_RESULT_TAG = "OPCD-BENCH-RESULT "

_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "river bread music glass winter garden letter market bridge candle forest"
)
_WORDS = _WORD_TEXT.split()


@dataclass
class BenchSpec:
    """One benchmark configuration."""

    model: str = "qwen2.5-coder-0.5b-instruct"
    batch: int = 8
    context: int = 2048
    prompt: int = 64
    response: int = 256
    micro_batch: int = 4
    lora: bool = False
    steps: int = 1
    top_k: int = 256
    seed: int = 0
    phases: list[str] = field(default_factory=lambda: ["teacher", "step"])
    modes: list[str] = field(default_factory=lambda: ["fast", "naive"])
    ovd_group: int = 2
    """Mode ``ovd``: responses per prompt (rollout.n); the step has ``batch // ovd_group`` prompts."""
    overrides: list[str] = field(default_factory=list)
    """Extra config overrides for the step/update phases (e.g. train.gradient_checkpointing=true)."""
    matmul_seconds: float = 1.5
    """Time spent measuring the matmul throughput in each worker."""

    def title(self) -> str:
        lora = ", LoRA" if self.lora else ", full fine-tune"
        extra = f", {' '.join(self.overrides)}" if self.overrides else ""
        return (
            f"{self.model}: batch {self.batch}, context {self.context}, prompt {self.prompt}, "
            f"response {self.response}, micro-batch {self.micro_batch}{lora}{extra}"
        )


# --------------------------------------------------------------------------- measurements
def matmul_gflops(seconds: float = 1.5) -> float:
    """Best fp32 matmul throughput (GFLOP/s) over square and model-like shapes."""
    import torch

    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 896, 4864)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        flops = 2.0 * m * k * n
        end = time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``ru_maxrss`` is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss_high_water() -> int:
    """Peak resident memory so far (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def _linear_params(module: Any) -> int:
    from torch import nn

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def update_flops(
    model: Any,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    *,
    trained_body: bool,
    trained_head: bool,
) -> float:
    """Model FLOPs of one update: student forward + backward, both output heads.

    ``trained_body``: the decoder's weights get gradients (full fine-tune; under LoRA only
    input gradients flow through the frozen base). ``trained_head``: the student's head gets
    a weight gradient.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    cfg = model.config
    body = _linear_params(decoder)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    layers = cfg.num_hidden_layers
    hv = head.in_features * head.out_features if hasattr(head, "in_features") else 0
    total = 0.0
    for p, r in zip(prompt_lens, response_lens, strict=True):
        n = p + r
        fwd = 2.0 * body * n + 2.0 * layers * d_attn * n * n  # causal: half of the L^2 pairs, x2 matmuls
        bwd = (2.0 if trained_body else 1.0) * 2.0 * body * n + 2.0 * 2.0 * layers * d_attn * n * n
        heads = 2.0 * hv * r * (1 + 1 + (1 if trained_head else 0)) + 2.0 * hv * r  # student fwd/bwd, teacher
        total += fwd + bwd + heads
    return total


# --------------------------------------------------------------------------- synthetic data
def _fit_text(tokenizer: Any, target: int, rng: random.Random, lead: str = "") -> str:
    """A text of about ``target`` tokens (largest word count that does not exceed it)."""
    words = [rng.choice(_WORDS) for _ in range(2 * target + 8)]

    def count(k: int) -> int:
        return len(tokenizer(lead + " ".join(words[:k]), add_special_tokens=False)["input_ids"])

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lead + " ".join(words[:lo])


def synthetic_task(tokenizer: Any, spec: BenchSpec, n_prompts: int) -> tuple[str, list[str]]:
    """A context of ``spec.context`` tokens and ``n_prompts`` distinct prompts of ``spec.prompt``."""
    rng = random.Random(spec.seed)
    context = _fit_text(tokenizer, spec.context, rng, "Lessons learned: ") if spec.context else ""
    prompts = [_fit_text(tokenizer, spec.prompt, rng, f"Question {i}: ") for i in range(n_prompts)]
    return context, prompts


def _random_responses(n: int, length: int, vocab: int, seed: int, avoid: set[int]) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row: list[int] = []
        while len(row) < length:
            t = rng.randrange(vocab)
            if t not in avoid:
                row.append(t)
        out.append(row)
    return out


# --------------------------------------------------------------------------- workers
def _teacher_worker(spec: BenchSpec) -> list[dict[str, Any]]:
    import torch

    from opcd.models import load_model
    from opcd.objectives.losses import softmax_in_place
    from opcd.sampling.rollout import eos_ids
    from opcd.tasks.chat import encode_chat
    from opcd.teachers.scoring import pack, response_hidden
    from opcd.teachers.teacher import Teacher

    peak = matmul_gflops(spec.matmul_seconds)
    torch.manual_seed(spec.seed)
    model, tok = load_model(spec.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    context, prompts = synthetic_task(tok, spec, spec.batch)
    msgs = [
        ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": p}]
        for p in prompts
    ]
    t_prompts = [encode_chat(tok, m) for m in msgs]
    vocab = model.get_output_embeddings().out_features
    responses = _random_responses(spec.batch, spec.response, min(vocab, len(tok)), spec.seed,
                                  set(eos_ids(model, tok)))
    n_tokens = sum(len(r) for r in responses)
    teacher = Teacher("live", model)  # the model itself, under no_grad: no copy needed here
    head = model.get_output_embeddings()
    sampled = torch.tensor([t for r in responses for t in r])

    def token_logps(hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> log p(sampled), as the trainer's loss computes the teacher's log-probs:
        256 positions at a time, the full-vocabulary logits and softmax in one reused buffer."""
        buf = hidden.new_empty((min(256, hidden.shape[0]), head.weight.shape[0]))
        out = []
        for s in range(0, hidden.shape[0], 256):
            z = buf[: min(256, hidden.shape[0] - s)]
            torch.mm(hidden[s : s + 256], head.weight.t(), out=z)
            if head.bias is not None:
                z.add_(head.bias)
            picked = z.gather(-1, sampled[s : s + 256, None])[:, 0]
            out.append(picked - softmax_in_place(z)[:, 0])
        return torch.cat(out)

    rows: list[dict[str, Any]] = []
    hidden: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if "naive" in spec.modes:  # as the trainer's naive path: micro-batches of full rows
            t_fwd = t_head = 0.0
            kept = []
            for s in range(0, spec.batch, spec.micro_batch):
                b = pack(t_prompts[s : s + spec.micro_batch], responses[s : s + spec.micro_batch], pad)
                t = time.perf_counter()
                h = response_hidden(model, b)
                t_fwd += time.perf_counter() - t
                t = time.perf_counter()
                logp = torch.log_softmax(head(h).float(), -1)
                logp.gather(-1, b.response_ids.masked_fill(~b.response_mask, 0)[..., None])
                t_head += time.perf_counter() - t
                kept.append(h[b.response_mask])
                del logp
            rows += _teacher_rows("naive", t_fwd, t_head, n_tokens,
                                  f"{spec.micro_batch} full rows per forward")
            hidden["naive"] = torch.cat(kept)
        if "fast" in spec.modes:
            for label in ("cold", "warm"):
                t = time.perf_counter()
                h = torch.cat(teacher.response_hidden(t_prompts, responses, pad))
                t_fwd = time.perf_counter() - t
                t = time.perf_counter()
                token_logps(h)
                t_head = time.perf_counter() - t
                store = teacher.store
                note = (f"prefix {'computed' if label == 'cold' else 'reused'}; "
                        f"store {store.tokens if store else 0} tokens")
                rows += _teacher_rows(f"fast ({label})", t_fwd, t_head, n_tokens, note)
                hidden["fast"] = h
        if len(hidden) == 2:
            diff = 0.0
            for s in range(0, n_tokens, 256):
                a = torch.log_softmax(head(hidden["naive"][s : s + 256]).float(), -1)
                b2 = torch.log_softmax(head(hidden["fast"][s : s + 256]).float(), -1)
                diff = max(diff, float((a - b2).abs().max()))
            for r in rows:
                r["max_logp_diff"] = diff
    best = max(peak, matmul_gflops(spec.matmul_seconds))
    for r in rows:
        r["matmul_gflops"] = best
        r["teacher_prompt_tokens"] = sum(len(p) for p in t_prompts) / len(t_prompts)
    return rows


def _teacher_rows(mode: str, t_fwd: float, t_head: float, tokens: int, note: str) -> list[dict[str, Any]]:
    """Scoring = forward (hidden states) + log-probs (output head, log-softmax); both rows."""
    return [
        _row("teacher", mode, t_fwd + t_head, tokens,
             note=f"{note}; forward {t_fwd:.1f}s + head/log-softmax {t_head:.1f}s"),
        _row("teacher forward", mode, t_fwd, tokens, note="hidden states only"),
    ]


def _row(phase: str, mode: str, seconds: float, tokens: float, **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "mode": mode, "seconds": seconds, "tokens": tokens,
            "tok_s": tokens / seconds if seconds > 0 else float("nan"),
            "load": os.getloadavg()[0], **extra}


@contextlib.contextmanager
def _patched_rollout(spec: BenchSpec, synthetic: bool, vocab: int) -> Iterator[None]:
    """Force every response to ``spec.response`` tokens (or use random tokens, no sampling)."""
    from opcd.sampling import rollout

    original = rollout.sample
    if synthetic:
        def fake(model: Any, tokenizer: Any, prompts: list[list[int]], **kw: Any) -> rollout.Rollout:
            stop = set(rollout.eos_ids(model, tokenizer))
            resp = _random_responses(len(prompts), spec.response, vocab, spec.seed + len(prompts), stop)
            return rollout.Rollout(list(range(len(prompts))), resp, [""] * len(prompts),
                                   [True] * len(prompts))
        rollout.sample = fake  # type: ignore[assignment]
    else:
        rollout.sample = functools.partial(original, ignore_eos=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        rollout.sample = original  # type: ignore[assignment]


def _step_worker(spec: BenchSpec, mode: str, phase: str) -> list[dict[str, Any]]:
    import torch

    from opcd.config import config_from_dict
    from opcd.models import load_tokenizer
    from opcd.training.loop import build_trainer

    peak = matmul_gflops(spec.matmul_seconds)
    tok = load_tokenizer(spec.model)
    n_prompts = max(2 * spec.batch, 4)
    context, prompts = synthetic_task(tok, spec, n_prompts)
    with tempfile.TemporaryDirectory(prefix="opcd-bench-") as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
                                for i, p in enumerate(prompts)), encoding="utf-8")
        naive, ovd = mode == "naive", mode == "ovd"
        group = spec.ovd_group if ovd else 1
        if spec.batch < group:
            raise ValueError(f"mode ovd needs batch >= ovd_group ({spec.batch} < {group})")
        n_rows = spec.batch // group * group
        cfg = config_from_dict({
            "model": spec.model,
            # (--context 0: the task needs some context; the teacher then reads these 3 words)
            "task": {"name": "system_prompt", "context": context or "Answer the question.",
                     "prompts": str(path),
                     "behaviour": "contains:the", "eval_fraction": 0.2},
            "method": "ovd" if ovd else "opcd",
            "rollout": {"max_new_tokens": spec.response, "batch_size": spec.batch,
                        "max_prompt_tokens": spec.context + spec.prompt + 256, "n": group},
            "train": {"batch_size": spec.batch // group, "micro_batch_size": spec.micro_batch,
                      "steps": spec.steps, "lr": 1e-6, "seed": spec.seed},
            "loss": {"top_k": spec.top_k},
            "lora": {"enabled": spec.lora},
            "perf": {"prefix_cache": not naive, "chunked_loss": not naive},
            "run": {"dir": str(Path(tmp) / "run"), "plot": False},
        }, spec.overrides)
        torch.manual_seed(spec.seed)
        trainer = build_trainer(cfg, progress=False)
        vocab = trainer.student.get_output_embeddings().out_features
        rows = []
        # Peak memory up to the optimizer step (rollout, teacher, forward/backward of every
        # micro-batch): what prefix reuse and chunking change. AdamW's state comes after.
        before_step: list[int] = []
        trainer.optimizer.register_step_pre_hook(lambda *a: before_step.append(_rss_high_water()))
        with _patched_rollout(spec, phase == "update", min(vocab, len(tok))):
            for step in range(spec.steps):
                t = time.perf_counter()
                m = trainer.train_step()
                wall = time.perf_counter() - t
                n_tok = m["response_len"] * n_rows
                s_lens = [len(p.student_ids) for p in trainer.prompt_pairs(list(range(spec.batch)))]
                flops = update_flops(
                    trainer.student, s_lens, [spec.response] * spec.batch,
                    trained_body=not spec.lora,
                    trained_head=any(p.requires_grad for p in
                                     trainer.student.get_output_embeddings().parameters()),
                )
                # (the FLOP count includes the OPCD teacher's head: no MFU for OVD)
                mfu = None if ovd else flops / m["time_update"] / (peak * 1e9)
                common = {"step": step + 1, "peak_rss": None, "matmul_gflops": peak}
                if phase == "update":
                    rows.append(_row("update", mode, m["time_update"], n_tok, mfu=mfu,
                                     update_gflop=flops / 1e9, **common))
                    continue
                note = (f"step {step + 1}: rollout {m['time_rollout']:.1f}s, teacher "
                        f"{m['time_teacher']:.1f}s, update {m['time_update']:.1f}s")
                if ovd:
                    note += (f"; {n_rows // group} prompts x {group}, replaced "
                             f"{m['replaced_frac']:.2f}, verbal score {m['verbal_score'] or 0:.2f}")
                rows.append(_row("step", mode, wall, n_tok, **common, note=note))
                which = f"step {step + 1}" if spec.steps > 1 else ""
                rows.append(_row("rollout", mode, m["time_rollout"], n_tok, **common, note=which))
                rows.append(_row("teacher (in step)", mode, m["time_teacher"], n_tok, **common,
                                 note=which))
                rows.append(_row("update (in step)", mode, m["time_update"], n_tok, mfu=mfu,
                                 update_gflop=flops / 1e9, **common, note=which))
    rss = peak_rss_bytes()
    best = max(peak, matmul_gflops(spec.matmul_seconds))  # again at the end: the best of both
    for r in rows:
        r["peak_rss"] = rss
        if before_step:
            r["peak_rss_before_optimizer"] = before_step[0]
        r["matmul_gflops"] = best
        if r.get("mfu") is not None:
            r["mfu"] *= peak / best
    return rows


def _run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = BenchSpec(**job["spec"])
    if job["phase"] == "teacher":
        return _teacher_worker(spec)
    return _step_worker(spec, job["mode"], job["phase"])


def _jobs(spec: BenchSpec) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for phase in spec.phases:
        if phase == "teacher":
            jobs.append({"phase": "teacher", "mode": "both"})
        else:  # OVD is measured as whole steps only
            jobs.extend({"phase": phase, "mode": m} for m in spec.modes
                        if not (m == "ovd" and phase == "update"))
    for j in jobs:
        j["spec"] = asdict(spec)
    return jobs


def _run_subprocess(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One job in a fresh Python process (its own peak memory), results read from stdout."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "opcd.tools.bench", "--worker", json.dumps(job)],
        capture_output=True, text=True, env=env, check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return list(json.loads(line[len(_RESULT_TAG):]))
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"benchmark worker {job['phase']}/{job['mode']} failed (exit {proc.returncode})")


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the measured rows."""
    head = "| phase | mode | seconds | response tok/s | peak RSS GiB | MFU | notes |"
    lines = [head, "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        rss = r.get("peak_rss")
        notes = r.get("note", "")
        if "max_logp_diff" in r:
            notes = (notes + "; " if notes else "") + f"max |Δ log p| {r['max_logp_diff']:.2e}"
        if r.get("peak_rss_before_optimizer") and r["phase"] in ("step", "update"):
            notes = (notes + "; " if notes else "") + (
                f"peak before the 1st optimizer step {r['peak_rss_before_optimizer'] / 2**30:.2f} GiB")
        if r.get("update_gflop"):
            notes = (notes + "; " if notes else "") + f"{r['update_gflop']:.0f} GFLOP"
        lines.append(
            f"| {r['phase']} | {r['mode']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r['tok_s'], '.1f')} "
            f"| {_fmt(rss / 2**30 if rss else None, '.2f')} | "
            f"{_fmt(100 * r['mfu'] if r.get('mfu') is not None else None, '.0f')}{'%' if r.get('mfu') is not None else ''} "
            f"| {notes} |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Ratios fast vs naive, from rows measured in the same run."""
    out = []

    def find(phase: str, mode: str) -> dict[str, Any] | None:
        """The last step's row (with --steps > 1: the steady state, AdamW's moments allocated)."""
        hits = [r for r in rows if r["phase"] == phase and r["mode"] == mode]
        return hits[-1] if hits else None

    for phase, what in (("teacher", "teacher scoring (log-probs)"),
                        ("teacher forward", "teacher forward (hidden states)")):
        naive = find(phase, "naive")
        for label in ("cold", "warm"):
            fast = find(phase, f"fast ({label})")
            if naive and fast:
                out.append(f"{what}, naive / prefix reuse ({label}): "
                           f"{naive['seconds'] / fast['seconds']:.2f}x faster")
    for phase in ("step", "update"):
        f_, n_ = find(phase, "fast"), find(phase, "naive")
        if not (f_ and n_):
            continue
        what = "whole step" if phase == "step" else "teacher + update (synthetic rollout)"
        if f_.get("step", 1) > 1:
            what += f" (step {f_['step']})"
        out.append(f"{what} throughput fast / naive: {f_['tok_s'] / n_['tok_s']:.2f}x")
        for key, label in (("peak_rss", "peak RSS"),
                           ("peak_rss_before_optimizer", "peak RSS before the optimizer step")):
            if f_.get(key) and n_.get(key):
                out.append(f"{what} {label} fast / naive: {f_[key] / n_[key]:.2f} "
                           f"({f_[key] / 2**30:.2f} vs {n_[key] / 2**30:.2f} GiB)")
    sf, sn = find("step", "fast"), find("step", "naive")
    so = find("step", "ovd")
    base = sf or sn
    if so and base:
        label = base["mode"]
        out.append(f"whole step throughput ovd / opcd ({label}): {so['tok_s'] / base['tok_s']:.2f}x")
        if so.get("peak_rss") and base.get("peak_rss"):
            out.append(f"peak RSS ovd / opcd ({label}): {so['peak_rss'] / base['peak_rss']:.2f} "
                       f"({so['peak_rss'] / 2**30:.2f} vs {base['peak_rss'] / 2**30:.2f} GiB)")
    gf = [r["matmul_gflops"] for r in rows if r.get("matmul_gflops")]
    if gf:
        out.append(f"fp32 matmul throughput measured in the workers: {min(gf):.0f}-{max(gf):.0f} GFLOP/s")
    loads = [r["load"] for r in rows if r.get("load") is not None]
    if loads:
        out.append(f"1-minute load average when the rows were taken: {min(loads):.1f}-{max(loads):.1f} "
                   f"(on {os.cpu_count()} CPUs; other work on the machine slows every phase)")
    return out


def write_results(path: Path, spec: BenchSpec, command: str, rows: list[dict[str, Any]]) -> None:
    """Append one run (command, table, ratios) to a Markdown file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = [
        f"\n## {stamp} - {spec.title()}\n",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads\n",
        format_table(rows),
        "",
        *(f"- {line}" for line in summarize(rows)),
        "",
    ]
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# opcd benchmark results\n\nAppended by `opcd bench` (see src/opcd/tools/bench.py).\n")
        f.write("\n".join(text) + "\n")


def run(
    spec: BenchSpec,
    *,
    output: str | Path | None = None,
    command: str = "",
    in_process: bool = False,
    echo: bool = True,
) -> list[dict[str, Any]]:
    """Run every job of ``spec`` (each in a fresh subprocess unless ``in_process``)."""
    for p in spec.phases:
        if p not in PHASES:
            raise ValueError(f"unknown phase {p!r}; choose from {', '.join(PHASES)}")
    for m in spec.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    rows: list[dict[str, Any]] = []
    for job in _jobs(spec):
        if echo:
            print(f"[bench] {job['phase']} / {job['mode']} ...", file=sys.stderr, flush=True)
        rows.extend(_run_job(job) if in_process else _run_subprocess(job))
    if echo:
        print(format_table(rows))
        for line in summarize(rows):
            print(line)
    if output:
        write_results(Path(output), spec, command, rows)
    return rows


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m opcd.tools.bench")
    parser.add_argument("--worker", required=True, help="a job as JSON (internal)")
    args = parser.parse_args(argv)
    rows = _run_job(json.loads(args.worker))
    print(_RESULT_TAG + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
