"""Micro-benchmarks behind the changes recorded in results.md (not part of the toolkit).

Each prints wall, user and kernel (system) CPU seconds and the memory it added:

- ``adamw``: one AdamW step over random parameters of Qwen2.5-0.5B's shapes, torch's
  default multi-tensor (``foreach``), the per-parameter loop and the fused kernel; step 0
  allocates the moments, step 1 is every later step.
- ``loss``: :func:`opcd.objectives.losses.chunked_distill_loss` on 1,024 tokens of a 151,936-token
  head (forward and backward), the built-in objective (reused buffers) against the same
  objective as a token-loss callable (fresh tensors); ``--hold GB`` keeps that much memory
  allocated first, as a training step does (page faults cost more then on this VM).
- ``decode``: the machine probe's figures (:mod:`opcd.sampling.probe`), then seconds per decode step
  of :func:`opcd.sampling.rollout.decode` on the packaged Qwen2.5-Coder-0.5B (``--rows``, default 8;
  the prompt read excluded), in fp32 plain and with each packed kernel (:mod:`opcd.sampling.packing`;
  packing time printed apart), with a LoRA adapter (r=16, every linear layer) as its own
  products and merged into the packed weights, and from a bf16 copy; then the memory
  bandwidth of a plain sum over the weights' bytes (the bound a decode step is held to) and
  the rate at which the plain and packed products read the weights.

- ``context``: sampling 8 answers of 24 tokens from the packaged Qwen2.5-Coder-0.5B with the
  knowledge task's ~1,180-token handbook in the system message (the off-policy teacher's and
  in-context evaluation's prompts), then the teacher's hidden states of those answers: the
  shared context read in every row, read once per batch, and read from a prefix store
  (:func:`opcd.sampling.rollout.sample`'s ``share_prefix`` and ``prefix_store``); the samples
  must be the same text.

    python benchmarks/micro.py adamw
    python benchmarks/micro.py loss --hold 8
    python benchmarks/micro.py decode
    python benchmarks/micro.py context
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable

import torch


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _measure(label: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` once; print its wall/user/system seconds and its RSS high water above the start."""
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    base = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = os.times()
    fn()
    t1 = os.times()
    done.set()
    thread.join()
    print(f"{label:44s} wall {t1.elapsed - t0.elapsed:6.2f} s  user {t1.user - t0.user:6.2f} s  "
          f"system {t1.system - t0.system:6.2f} s  +{(peak[0] - base) / 2**30:.2f} GiB")


def _each_in_a_process(which: str, kinds: tuple[str, ...], extra: list[str]) -> None:
    """Run ``which`` once per kind, each in a fresh process (memory freed by one run would
    otherwise be reused by the next, without page faults)."""
    import subprocess

    for k in kinds:
        out = subprocess.run([sys.executable, __file__, which, "--kind", k, *extra], check=True,
                             capture_output=True, text=True).stdout
        print("\n".join(out.splitlines()[1:]))


def adamw(kind: str | None) -> None:
    if kind is None:
        _each_in_a_process("adamw", ("foreach", "for-loop", "fused"), [])
        return
    hidden, inter, kv = 896, 4864, 128
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (inter, hidden), (inter, hidden), (hidden, inter)]
    shapes = [(151936, hidden)] + layer * 24
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    kw = {"fused": True} if kind == "fused" else {"foreach": kind == "foreach"}
    opt = torch.optim.AdamW(params, lr=1e-6, **kw)
    for step in range(2):
        _measure(f"AdamW {kind}, step {step}", opt.step)


def loss(hold_gb: int, kind: str | None) -> None:
    if kind is None:
        _each_in_a_process("loss", ("built-in", "callable"), ["--hold", str(hold_gb)])
        return
    from opcd.objectives import losses

    held = [torch.ones(256 * 1024 * 1024) for _ in range(hold_gb)]  # 1 GiB each
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 1024, 896, 151936
    ht, wt = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.02
    weights = torch.full((n,), 1.0 / n)
    runs = {"built-in": ("built-in objective (reused buffers)", None),
            "callable": ("token-loss callable (fresh tensors)", losses._default_token_loss(k=256))}
    name, token_loss = runs[kind]
    hs = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(True)

    def run() -> None:
        value, _ = losses.chunked_distill_loss(hs, w, ht, wt, weights, k=256, token_loss=token_loss)  # type: ignore[arg-type]
        value.backward()

    _measure(f"loss, {name}, {hold_gb} GiB held", run)
    del held


def decode(rows: int = 8) -> None:
    import contextlib

    from peft import LoraConfig, get_peft_model

    from opcd.models.load import load_model
    from opcd.sampling import probe
    from opcd.sampling.packing import available_kernels, packed_linears
    from opcd.sampling.rollout import decode as decode_loop
    from opcd.sampling.rollout_backends import cast_copy

    model, _ = load_model("qwen2.5-coder-0.5b-instruct")
    model.eval()
    hidden = model.config.hidden_size
    print(probe.describe(probe.product_seconds(hidden, rows), hidden, rows))
    ids = torch.randint(0, 100000, (rows, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    steps = 48

    def per_step(m: torch.nn.Module) -> float:
        """Seconds per decode step, the prompt read excluded (a 1-token run subtracted)."""
        kw = dict(stop=[151645], ignore_eos=True, seeds=list(range(rows)))
        t = time.perf_counter()
        decode_loop(m, ids, mask, max_new_tokens=1, **kw)
        one = time.perf_counter() - t
        t = time.perf_counter()
        decode_loop(m, ids, mask, max_new_tokens=steps + 1, **kw)
        return (time.perf_counter() - t - one) / steps

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    lora.eval()
    runs: list[tuple[str, torch.nn.Module, str | None]] = [("float32", model, None)]
    runs += [(f"float32 packed {k}", model, k) for k in available_kernels()]
    runs += [("LoRA r16, adapter products", lora, None)]
    runs += [(f"LoRA r16 packed {k} (merged)", lora, k) for k in available_kernels()]
    runs += [("bfloat16 copy", cast_copy(model, torch.bfloat16), None)]
    weights = [mod.weight.detach() for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    gb = sum(w.numel() * 4 for w in weights) / 1e9
    for label, m, kernel in runs:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if kernel is not None:
                t = time.perf_counter()
                stack.enter_context(packed_linears(m, rows=rows, kernel=kernel))
                print(f"packing for {rows} rows ({kernel}): {time.perf_counter() - t:.2f} s")
            per = per_step(m)
        print(f"decode, {rows} rows, {label}: {per * 1e3:.0f} ms per step "
              f"(fp32 weights read at {gb / per:.1f} GB/s)")

    def rate(run: Callable[[], object]) -> float:
        run()
        t = time.perf_counter()
        run()
        return gb / (time.perf_counter() - t)

    bandwidth = rate(lambda: [w.sum() for w in weights])
    print(f"sum over the {gb:.2f} GB of fp32 linear weights: {bandwidth:.1f} GB/s, "
          f"i.e. {gb / bandwidth * 1e3:.0f} ms per step at that rate")
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    plain = rate(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights])
    print(f"{rows}-row products, plain weights: {plain:.1f} GB/s")
    for kernel in available_kernels():
        with torch.no_grad(), packed_linears(model, rows=rows, kernel=kernel):
            mods = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
            packed = rate(lambda mods=mods: [mod(xs[mod.in_features]) for mod in mods])
        print(f"{rows}-row products, packed {kernel}: {packed:.1f} GB/s")


def context() -> None:
    from opcd.config import TaskConfig
    from opcd.models.load import load_model
    from opcd.sampling import rollout
    from opcd.tasks import build_task
    from opcd.tasks.chat import encode_chat, teacher_messages
    from opcd.teachers.scoring import PrefixStore, cached_response_hidden, uncached_response_hidden

    task = build_task(TaskConfig(name="knowledge"))
    model, tok = load_model("qwen2.5-coder-0.5b-instruct", device="cpu", dtype=torch.float32)
    model.eval()
    prompts = [encode_chat(tok, teacher_messages(task, ex)) for ex in task.examples("train")[:8]]
    print(f"8 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{rollout.shared_prefix_len(prompts)} shared")
    store = PrefixStore()
    texts = []
    for label, shared in (("in every row", False), ("once per batch", True), ("from the store", True)):
        kw = {"share_prefix": False} if not shared else {"prefix_store": store}
        out: list[rollout.Rollout] = []
        _measure(f"sample, context {label}", lambda kw=kw, out=out: out.append(rollout.sample(
            model, tok, prompts, temperature=1.0, max_new_tokens=24, batch_size=8,
            seeds=list(range(8)), **kw)))
        answers = out[0].response_ids

        def score(shared: bool = shared, answers: list[list[int]] = answers) -> None:
            with torch.no_grad():
                if shared:
                    cached_response_hidden(model, prompts, answers, tok.pad_token_id, store=store)
                else:
                    uncached_response_hidden(model, prompts, answers, tok.pad_token_id)

        _measure(f"score, context {label}", score)
        texts.append(out[0].texts)
    print("same samples:", all(t == texts[0] for t in texts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("which", choices=["adamw", "loss", "decode", "context"])
    p.add_argument("--hold", type=int, default=0, help="loss: GiB to hold allocated first")
    p.add_argument("--rows", type=int, default=8, help="decode: rows decoded together")
    p.add_argument("--kind", default=None,
                   help="adamw: foreach, for-loop or fused; loss: built-in or callable "
                   "(default: each in its own process)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    {"adamw": lambda: adamw(args.kind), "loss": lambda: loss(args.hold, args.kind), "decode": lambda: decode(args.rows),
     "context": context}[args.which]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
