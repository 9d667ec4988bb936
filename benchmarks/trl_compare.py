"""The closest TRL trainer on the same model, batch and data as `opcd bench`: one timed step.

TRL is NOT a dependency of opcd. Run this with a separate virtualenv that has TRL::

    python3 -m venv /work/venv-trl
    /work/venv-trl/bin/pip install torch==2.13.0
    /work/venv-trl/bin/pip install -e /work/main trl==1.13.0 transformers==5.23.0 \\
        peft==0.21.2 accelerate==1.15.0
    /work/venv-trl/bin/python benchmarks/trl_compare.py --context 2048 --response 256

(TRL 1.13.0 with transformers 5.23.0 / peft 0.21.2 / accelerate 1.15.0 / datasets 5.2.0 is
the combination checked here; the pins keep transformers at the toolkit's version.)

The trainer is ``trl.experimental.sdft.SDFTTrainer`` (self-distillation with a *privileged
context*: the student samples from the prompt alone, a frozen copy of the initial student
scores the same tokens with the context): the same on-policy context-distillation setting
as opcd. Settings matched to ``opcd bench``: the same synthetic context and prompts
(:func:`opcd.tools.bench.synthetic_task`), the context placed before the prompt in the user turn
(opcd: ``task.placement=user``, template ``{context}\\n\\n{prompt}``), ``batch`` rollouts
per step generated together, ``micro-batch`` rows per forward/backward (gradient
accumulation), responses forced to ``response`` tokens (``min_new_tokens``), loss over the
student's top-k renormalised (opcd: ``loss.renormalize=true``), reverse KL
(``distillation_alpha=1``), fp32 on the CPU, full fine-tuning, AdamW, no gradient
checkpointing (TRL's default is on; ``--gradient-checkpointing`` turns it back on).

It prints a table row and appends it, with the command, to ``--output``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's default; off here to match opcd's default (train.gradient_checkpointing)")
    p.add_argument("--output", default="benchmarks/results.md")
    args = p.parse_args(argv)

    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opcd.models import load_tokenizer, resolve_model_ref
    from opcd.tools.bench import BenchSpec, matmul_gflops, peak_rss_bytes, synthetic_task

    peak = matmul_gflops()
    spec = BenchSpec(model=args.model, batch=args.batch, context=args.context, prompt=args.prompt,
                     response=args.response, micro_batch=args.micro_batch, top_k=args.top_k,
                     seed=args.seed)
    tok = load_tokenizer(args.model)
    context, prompts = synthetic_task(tok, spec, args.batch * args.steps)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "privileged_context": context} for q in prompts
    ])
    location = resolve_model_ref(args.model).location
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        cfg = SDFTConfig(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.batch // args.micro_batch, num_generations=1,
            max_completion_length=args.response, generation_kwargs={"min_new_tokens": args.response},
            max_prompt_length=None, teacher_prompt_template="{privileged_context}\n\n{prompt}",
            distillation_mode="topk_logits", distillation_topk=args.top_k, distillation_alpha=1.0,
            teacher_model_kind="base", max_steps=args.steps, learning_rate=1e-6, temperature=1.0,
            top_p=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
            shuffle_dataset=False, seed=args.seed, model_init_kwargs={"dtype": torch.float32},
            gradient_checkpointing=args.gradient_checkpointing,
        )
        torch.manual_seed(args.seed)
        trainer = SDFTTrainer(model=location, args=cfg, train_dataset=data, processing_class=tok)
        phase = {"rollout": 0.0, "teacher": 0.0}
        generate, forward = trainer._generate, trainer._forward_logits

        def timed_generate(*a, **k):
            t = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                phase["rollout"] += time.perf_counter() - t

        def timed_forward(model, *a, **k):
            t = time.perf_counter()
            try:
                return forward(model, *a, **k)
            finally:
                if model is trainer.teacher_model:
                    phase["teacher"] += time.perf_counter() - t

        trainer._generate, trainer._forward_logits = timed_generate, timed_forward
        steps: list[dict[str, float]] = []  # wall and phase seconds of each optimizer step

        class StepTimes(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                steps.append({"start": time.perf_counter(), **phase})

            def on_step_end(self, *a: Any, **k: Any) -> None:
                s = steps[-1]
                s["wall"] = time.perf_counter() - s["start"]
                for key in phase:
                    s[key] = phase[key] - s[key]

        trainer.add_callback(StepTimes())
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    tokens = args.batch * args.response * args.steps
    rss = peak_rss_bytes()
    rest = wall - phase["rollout"] - phase["teacher"]
    name = f"TRL {trl.__version__} SDFTTrainer"
    rows = [f"| step | {name} | {wall:.2f} | {tokens / wall:.1f} | "
            f"{rss / 2**30:.2f} | - | {args.steps} step(s): rollout {phase['rollout']:.1f}s, teacher "
            f"{phase['teacher']:.1f}s, student forward/backward/optimizer {rest:.1f}s |"]
    if args.steps > 1:  # each step alone: the first one also allocates AdamW's moments
        for i, s in enumerate(steps, 1):
            if "wall" in s:
                rows.append(
                    f"| step {i} | {name} | {s['wall']:.2f} | "
                    f"{args.batch * args.response / s['wall']:.1f} | - | - | rollout "
                    f"{s['rollout']:.1f}s, teacher {s['teacher']:.1f}s, student forward/backward/"
                    f"optimizer {s['wall'] - s['rollout'] - s['teacher']:.1f}s |")
    table = ("| phase | mode | seconds | response tok/s | peak RSS GiB | MFU | notes |\n"
             "|---|---|---:|---:|---:|---:|---|\n" + "\n".join(rows))
    print(table)
    command = "/work/venv-trl/bin/python benchmarks/trl_compare.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} - TRL comparison: {spec.title()}\n\n"
                    f"Command: `{command}`  \nfp32 matmul throughput in this process: "
                    f"{peak:.0f} GFLOP/s\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
