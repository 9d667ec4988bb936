"""Micro-benchmarks behind the changes recorded in results.md (not part of the toolkit).

Each prints wall, user and kernel (system) CPU seconds and the memory it added:

- ``adamw``: one AdamW step over random parameters of Qwen2.5-0.5B's shapes, torch's
  default multi-tensor (``foreach``), the per-parameter loop and the fused kernel; step 0
  allocates the moments, step 1 is every later step.
- ``loss``: :func:`opcd.losses.chunked_distill_loss` on 1,024 tokens of a 151,936-token
  head (forward and backward), the built-in objective (reused buffers) against the same
  objective as a token-loss callable (fresh tensors); ``--hold GB`` keeps that much memory
  allocated first, as a training step does (page faults cost more then on this VM).
- ``decode``: seconds per decode step of :func:`opcd.rollout.decode` on the packaged
  Qwen2.5-Coder-0.5B, 8 rows, with 1 and with all threads, in fp32 (plain and with
  MKL-packed weights, :mod:`opcd.packing`; packing time excluded, printed apart) and from a
  bf16 copy; then the memory bandwidth of a plain sum over the weights' bytes and the rate at
  which the plain and the packed 8-row products read the weights.

    python benchmarks/micro.py adamw
    python benchmarks/micro.py loss --hold 8
    python benchmarks/micro.py decode
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
    from opcd import losses

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


def decode() -> None:
    import contextlib

    from opcd.models.load import load_model
    from opcd.packing import packed_linears
    from opcd.rollout import decode as decode_loop
    from opcd.rollout_backends import cast_copy

    model, _ = load_model("qwen2.5-coder-0.5b-instruct")
    model.eval()
    ids = torch.randint(0, 100000, (8, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    steps = 64
    for label in ("float32", "float32 packed", "bfloat16"):
        m = cast_copy(model, torch.bfloat16) if label == "bfloat16" else model
        for threads in (1, torch.get_num_threads()):
            with contextlib.ExitStack() as stack:
                if label == "float32 packed":
                    t = time.perf_counter()
                    stack.enter_context(packed_linears(m, rows=8))
                    print(f"packing the fp32 weights for 8 rows: {time.perf_counter() - t:.2f} s")
                t = time.perf_counter()
                decode_loop(m, ids, mask, max_new_tokens=steps, stop=[151645], ignore_eos=True,
                            threads=threads, seeds=list(range(8)))
                per = (time.perf_counter() - t) / steps
            print(f"decode, 8 rows, {label}, {threads} thread(s): "
                  f"{per * 1e3:.0f} ms per step (prompt read included)")
    weights = [mod.weight.detach() for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    gb = sum(w.numel() * 4 for w in weights) / 1e9

    def rate(run: Callable[[], object]) -> float:
        run()
        t = time.perf_counter()
        run()
        return gb / (time.perf_counter() - t)

    print(f"sum over the {gb:.2f} GB of linear weights: {rate(lambda: [w.sum() for w in weights]):.1f} GB/s")
    xs = {w.shape[1]: torch.randn(8, w.shape[1]) for w in weights}
    plain = rate(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights])
    print(f"8-row products, plain weights: {plain:.1f} GB/s")
    with packed_linears(model, rows=8):
        mods = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
        packed = rate(lambda: [mod(xs[mod.in_features]) for mod in mods])
    print(f"8-row products, packed weights: {packed:.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("which", choices=["adamw", "loss", "decode"])
    p.add_argument("--hold", type=int, default=0, help="loss: GiB to hold allocated first")
    p.add_argument("--kind", default=None,
                   help="adamw: foreach, for-loop or fused; loss: built-in or callable "
                   "(default: each in its own process)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    {"adamw": lambda: adamw(args.kind), "loss": lambda: loss(args.hold, args.kind), "decode": decode}[args.which]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
