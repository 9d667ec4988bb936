"""The fast paths on a CUDA device: exactness in fp32, sanity in bf16, and a few timings.

Not part of the test suite (CI has no GPU). Run on a machine with CUDA::

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--out results.json]

1. prefix reuse vs full rows (tiny random Llama, fp32, TF32 off): max |log-prob difference|;
2. the same in bf16 (reported, not asserted: bf16 rounding differs between layouts);
3. chunked loss vs unchunked (fp32 and bf16 weights): value and gradient differences;
4. the sampling loop vs ``model.generate`` (greedy, fp32): same tokens;
5. a Qwen2.5-0.5B-shaped random model in bf16: teacher scoring naive vs prefix reuse
   (context 2048, 8 responses of 256, prompt 64) and peak GPU memory of the loss,
   unchunked vs chunked, on 8 x 256 tokens with the 151,936-token vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _tiny(dtype: torch.dtype, vocab: int = 320):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def _rows(g: torch.Generator, ctx: int, n: int = 6):
    c = torch.randint(3, 300, (ctx,), generator=g).tolist()
    prompts = [c + torch.randint(3, 300, (1 + 5 * i % 11,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 300, ((7 * i) % 13 + 1,), generator=g).tolist() for i in range(n)]
    return prompts, responses


def check_prefix(dtype: torch.dtype) -> float:
    from opcd.teachers.scoring import PrefixStore, cached_response_hidden, pack, response_logits

    model = _tiny(dtype)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for ctx in (0, 63, 200):
            prompts, responses = _rows(g, ctx)
            for side in ("left", "right"):
                ref = response_logits(model, pack(prompts, responses, 0, side, device="cuda"))
                got = cached_response_hidden(model, prompts, responses, 0, store=PrefixStore(64),
                                             batch_size=4, min_shared=1)
                for b, (h, r) in enumerate(zip(got, responses, strict=True)):
                    a = torch.log_softmax(head(h).float(), -1)
                    w = torch.log_softmax(ref[b, : len(r)], -1)
                    worst = max(worst, float((a - w).abs().max()))
    return worst


def check_loss(dtype: torch.dtype) -> dict[str, float]:
    from opcd.objectives import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 300, 64, 1000
    hs = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_(True)
    ht = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    w = (0.1 * torch.randn(v, h, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    wt = (0.1 * torch.randn(v, h, device="cuda", generator=g)).to(dtype)
    weights = torch.full((n,), 1.0 / n, device="cuda")
    tl = losses.distill_token_loss((hs @ w.T).float(), (ht @ wt.T).float(), k=32)
    ref = (tl.loss * weights).sum()
    gh, gw = torch.autograd.grad(ref, [hs, w])
    loss, _ = losses.chunked_distill_loss(hs, w, ht, wt, weights, k=32, chunk_size=64)
    ch, cw = torch.autograd.grad(loss, [hs, w])
    return {"loss": abs(float(loss) - float(ref)),
            "grad_hidden": float((ch.float() - gh.float()).abs().max()),
            "grad_weight": float((cw.float() - gw.float()).abs().max())}


def check_decode() -> bool:
    from opcd.sampling.rollout import decode

    model = _tiny(torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (4, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=[2])
        loop = decode(model, ids, mask, max_new_tokens=12, temperature=0, stop=[2])
    want = [row[9:] for row in gen.tolist()]
    want = [r[: r.index(2) + 1] if 2 in r else r for r in want]
    return loop == want


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def _teacher_timing(model, batch: int, context: int, micro: int) -> dict[str, float]:
    """Teacher hidden states: naive (micro-batches of full rows) vs prefix reuse; best of 3."""
    from opcd.teachers.scoring import PrefixStore, cached_response_hidden, pack, response_hidden

    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 150000, (context + 12,), generator=g).tolist()
    prompts = [ctx + torch.randint(100, 150000, (80,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(100, 150000, (256,), generator=g).tolist() for _ in range(batch)]
    store = PrefixStore()

    def naive() -> None:
        for s in range(0, batch, micro):
            response_hidden(model, pack(prompts[s:s + micro], responses[s:s + micro], 0, device="cuda"))

    def fast() -> None:
        cached_response_hidden(model, prompts, responses, 0, store=store, batch_size=micro)

    def cold() -> None:
        cached_response_hidden(model, prompts, responses, 0, store=PrefixStore(), batch_size=micro)

    naive()
    fast()  # warm-up (kernels); the store now holds the prefix
    key = f"b{batch}_c{context}"
    return {f"{key}_teacher_naive_s": min(_timed(naive) for _ in range(3)),
            f"{key}_teacher_fast_warm_s": min(_timed(fast) for _ in range(3)),
            f"{key}_teacher_fast_cold_s": min(_timed(cold) for _ in range(3))}


def timing_qwen_shaped() -> dict[str, float]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opcd.objectives import losses

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    out: dict[str, float] = {}

    for batch, context, micro in ((8, 2048, 4), (64, 2048, 8), (16, 8192, 4)):
        out.update(_teacher_timing(model, batch, context, micro))
    # loss memory: 8 x 256 tokens, full vocabulary, bf16 head
    head = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    n = 8 * 256
    hs = torch.randn(n, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ht = torch.randn(n, 896, device="cuda", dtype=torch.bfloat16)
    weights = torch.full((n,), 1.0 / n, device="cuda")
    for name in ("unchunked", "chunked"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "unchunked":
            tl = losses.distill_token_loss((hs @ head.T).float(), (ht @ head.detach().T).float())
            loss = (tl.loss * weights).sum()
        else:
            loss, tl = losses.chunked_distill_loss(hs, head, ht, head.detach(), weights, chunk_size=256)
        loss.backward()
        torch.cuda.synchronize()
        out[f"loss_{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        hs.grad = None
        head.grad = None
        del loss, tl
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    res["prefix_fp32_max_logp_diff"] = check_prefix(torch.float32)
    res["prefix_bf16_max_logp_diff"] = check_prefix(torch.bfloat16)
    res["loss_fp32"] = check_loss(torch.float32)
    res["loss_bf16"] = check_loss(torch.bfloat16)
    res["decode_equals_generate"] = check_decode()
    res["qwen_shaped_bf16"] = timing_qwen_shaped()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    ok = res["prefix_fp32_max_logp_diff"] < 1e-4 and res["decode_equals_generate"] and \
        res["loss_fp32"]["grad_hidden"] < 1e-5  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
