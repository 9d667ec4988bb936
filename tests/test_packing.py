"""Packed decode weights (:mod:`opcd.sampling.packing`, oneDNN and MKL kernels): same products and
samples as the plain weights up to float rounding, row results independent of the other
rows, modules restored, and the ``auto`` policy driven by the machine's probe."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from opcd.sampling import packing, rollout

needs_mkl = pytest.mark.skipif(not packing.packing_available(),
                               reason="this torch build has no packed fp32 kernel")
each_kernel = pytest.mark.parametrize("kernel", [
    pytest.param(k, marks=pytest.mark.skipif(k not in packing.available_kernels(),
                                             reason=f"this torch build has no {k} kernel"))
    for k in packing.KERNELS])


def _figures(plain: float, onednn: float, mkl: float) -> dict[str, float]:
    return {"float32": plain, "float32/onednn": onednn, "float32/mkl": mkl,
            "bfloat16": 10 * plain}


@each_kernel
def test_packed_linear_equals_plain_and_rows_are_independent(kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g))
    x = torch.randn(8, 48, generator=g)
    want = lin(x)
    with torch.no_grad(), packing.packed_linears(lin, rows=8, kernel=kernel) as n:
        assert n == 1 and "forward" in lin.__dict__
        got = lin(x)
        three = lin(x[:3])  # fewer rows: padded up to the packed row count
        other = x.clone()
        other[3:] = torch.randn(5, 48, generator=g)
        again = lin(other)
        batched = lin(x.view(2, 4, 48))  # leading dims are flattened and restored
        big = lin(torch.cat([x, x]))  # more rows than packed: the plain weights
    assert "forward" not in lin.__dict__  # restored
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(three, got[:3]) and torch.equal(again[:3], got[:3])
    assert torch.equal(batched.view(8, 40), got)
    assert torch.equal(big, torch.cat([want, want]))


@needs_mkl
def test_forward_is_restored_after_an_error() -> None:
    lin = nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match="boom"), packing.packed_linears(lin, rows=2):
        raise RuntimeError("boom")
    assert "forward" not in lin.__dict__
    with pytest.raises(ValueError, match="rows must be at least 1"), packing.packed_linears(lin, 0):
        pass
    with pytest.raises(ValueError, match="unknown packed kernel 'fast'"), \
            packing.packed_linears(lin, 2, kernel="fast"):
        pass


def test_should_pack_policy(tiny, monkeypatch) -> None:
    model, _ = tiny
    if set(packing.available_kernels()) != set(packing.KERNELS):
        pytest.skip("needs both packed kernels in this torch build")
    monkeypatch.delenv("OPCD_PACKED_DECODE", raising=False)
    figures = _figures(plain=2.0, onednn=1.0, mkl=3.0)
    monkeypatch.setattr(packing.probe, "product_seconds", lambda hidden, rows: figures)
    short, long = packing.PACK_MIN_NEW_TOKENS["onednn"], packing.PACK_MIN_NEW_TOKENS["mkl"]
    assert packing.should_pack(model, short) == "onednn"  # the measured fastest
    assert packing.should_pack(model, short - 1) is None  # too short to pay for the packing
    figures.update(_figures(plain=2.0, onednn=3.0, mkl=1.0))
    assert packing.should_pack(model, long - 1) is None  # MKL packs slower: longer answers only
    assert packing.should_pack(model, long) == "mkl"
    figures.update(_figures(plain=1.0, onednn=0.95, mkl=3.0))  # too small a gain
    assert packing.should_pack(model, long) is None
    monkeypatch.setenv("OPCD_PACKED_DECODE", "1")  # asked for: the fastest packed kernel, any length
    assert packing.should_pack(model, 4) == "onednn"
    monkeypatch.setenv("OPCD_PACKED_DECODE", "mkl")
    assert packing.should_pack(model, 4) == "mkl"
    monkeypatch.setenv("OPCD_PACKED_DECODE", "0")
    assert packing.should_pack(model, long) is None
    monkeypatch.setenv("OPCD_PACKED_DECODE", "maybe")
    with pytest.warns(UserWarning, match="OPCD_PACKED_DECODE='maybe' is not auto, 1, 0, onednn or mkl"):
        assert packing.packed_decode_setting() == "auto"
    monkeypatch.setenv("OPCD_PACKED_DECODE", "auto")
    assert packing.should_pack(model.to(torch.bfloat16), long) is None  # fp32 weights only
    monkeypatch.setenv("OPCD_PACKED_DECODE", "1")  # asked for: it says why not
    with pytest.warns(UserWarning, match="OPCD_PACKED_DECODE=1, but .* plain weights"):
        assert packing.should_pack(model, long) is None


@each_kernel
def test_packed_sampling_matches_plain_sampling(tiny, monkeypatch, kernel: str) -> None:
    model, tok = tiny
    packed_counts: list[int] = []
    real = rollout.packed_linears

    def spy(model, rows, kernel=None):  # records how many modules sample() really packed
        with real(model, rows, kernel) as n:
            packed_counts.append(n)
            yield n

    monkeypatch.setattr(rollout, "packed_linears", contextlib.contextmanager(spy))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    seeds = [1, 2, 3]
    plain = rollout.sample(model, tok, prompts, n=2, max_new_tokens=10, batch_size=4,
                           seeds=seeds, pack=False)
    packed = rollout.sample(model, tok, prompts, n=2, max_new_tokens=10, batch_size=4,
                            seeds=seeds, pack=kernel)
    assert packed_counts == [sum(isinstance(m, nn.Linear) for m in model.modules())]
    assert packed.response_ids == plain.response_ids
    assert not any("forward" in m.__dict__ for m in model.modules())
    # rows sample alike whatever the batch they share (the packed row count is fixed)
    alone = rollout.sample(model, tok, prompts[:1], n=2, max_new_tokens=10, batch_size=4,
                           seeds=seeds[:1], pack=kernel)
    assert alone.response_ids == packed.response_ids[:2]


@needs_mkl
def test_linear_subclasses_with_their_own_forward_are_left_alone() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8))
    with torch.no_grad(), packing.packed_linears(model, rows=2) as n:
        assert n == 1 and "forward" not in model[1].__dict__


@needs_mkl
def test_an_evaluation_packs_once_for_all_its_batches(tiny, monkeypatch, tmp_path) -> None:
    from opcd.config import TaskConfig
    from opcd.eval.evaluate import evaluate
    from opcd.tasks import build_task

    model, tok = tiny
    installs: list[nn.Module] = []
    real_install = packing._install
    monkeypatch.setattr(packing, "_install",
                        lambda m, rows, kernel: (installs.append(m), real_install(m, rows, kernel)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "say {i}"}}\n' for i in range(10)))
    task = build_task(TaskConfig(name="system_prompt", context="Be brief.", prompts=str(prompts),
                                 behaviour="contains:a", eval_fraction=0.5))
    monkeypatch.setenv("OPCD_PACKED_DECODE", "1")
    packed = evaluate(model, tok, task, max_new_tokens=5, batch_size=2, seed=3)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert packed.n == 5 and len(installs) == n_linear  # 3 batches, one packing
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setenv("OPCD_PACKED_DECODE", "0")
    plain = evaluate(model, tok, task, max_new_tokens=5, batch_size=2, seed=3)
    assert len(installs) == n_linear
    assert [r["response"] for r in plain.records] == [r["response"] for r in packed.records]


@each_kernel
def test_a_lora_layer_is_packed_as_one_merged_matrix(tiny, kernel: str) -> None:
    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect to merge
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.eval()
    x = torch.randn(3, 1, model.config.hidden_size, generator=g)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        want, want_off = layer(x), layer.base_layer(x)
        with packing.packed_linears(model, rows=4, kernel=kernel) as n:
            loras = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "lora_A")]
            assert len(loras) == 2 * model.config.num_hidden_layers
            # the adapter's own parts are not packed again, the other linear layers are
            assert not any("forward" in p.__dict__ for m in loras for p in m.modules() if p is not m)
            n_plain = sum(isinstance(m, nn.Linear) for m in base.modules()) - 3 * len(loras)
            assert n == len(loras) + n_plain
            got = layer(x)
            with model.disable_adapter():  # the frozen teacher inside the block: the base only
                off = layer(x)
        assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4) and not torch.allclose(got, want_off)
    assert torch.equal(off, want_off)
    prompts, seeds = [[5, 6, 7, 8], [9, 10, 11]], [1, 2]
    plain = rollout.sample(model, tok, prompts, n=2, max_new_tokens=10, batch_size=4,
                           seeds=seeds, pack=False)
    packed = rollout.sample(model, tok, prompts, n=2, max_new_tokens=10, batch_size=4,
                            seeds=seeds, pack=kernel)
    assert packed.response_ids == plain.response_ids
