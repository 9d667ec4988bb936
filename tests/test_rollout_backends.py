"""Rollout backends: the HF backend is opcd.sampling.rollout.sample exactly; config and availability
errors; the vLLM backend's glue with a stand-in engine (CPU); the real vLLM engine (GPU only).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_model, build_tokenizer

from opcd.config import config_from_dict
from opcd.errors import ConfigError
from opcd.sampling import rollout, rollout_backends
from opcd.sampling.rollout_backends import (
    HFBackend,
    VllmBackend,
    build_backend,
    check_vllm_usable,
    merged_state_dict,
    response_from_output,
)
from opcd.tasks.base import derive_seed
from opcd.tasks.chat import encode_chat

HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = rollout_backends.vllm_installed()


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, list[list[int]]]:
    tok = build_tokenizer()
    model = build_tiny_model(len(tok))
    prompts = [encode_chat(tok, [{"role": "user", "content": text}])
               for text in ("Hello world", "What is the capital of Italy?", "rainbow")]
    return model, tok, prompts


def _same(a: rollout.Rollout, b: rollout.Rollout) -> None:
    assert a.prompt_index == b.prompt_index
    assert a.response_ids == b.response_ids
    assert a.texts == b.texts
    assert a.truncated == b.truncated


# --------------------------------------------------------------------------- HF backend
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hf_backend_is_rollout_sample_exactly(tiny: Any, temperature: float) -> None:
    model, tok, prompts = tiny
    kw = dict(n=2, temperature=temperature, top_p=0.9, max_new_tokens=7, seeds=[5, 6, 7])
    want = rollout.sample(model, tok, prompts, batch_size=4, **kw)
    got = HFBackend(model, tok, batch_size=4).sample(prompts, **kw)
    _same(got, want)
    assert len(got.response_ids) == 6 and got.prompt_index == [0, 0, 1, 1, 2, 2]


def test_hf_backend_follows_patches_of_rollout_sample(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks replace ``opcd.sampling.rollout.sample``; the backend must see the replacement."""
    model, tok, prompts = tiny
    fake = rollout.Rollout([0], [[1]], ["x"], [True])
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: fake)
    assert HFBackend(model, tok).sample(prompts) is fake


def test_trainer_samples_through_its_backend_and_syncs_after_each_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_trainer import tiny_config

    from opcd.training.trainer import Trainer

    trainer = Trainer(config_from_dict(tiny_config(tiny_model_dir, tmp_path)), progress=False)
    assert isinstance(trainer.backend, HFBackend) and trainer.backend.model is trainer.student
    calls: list[str] = []
    real_sample = trainer.backend.sample
    monkeypatch.setattr(trainer.backend, "sample",
                        lambda *a, **k: calls.append("sample") or real_sample(*a, **k))
    monkeypatch.setattr(trainer.backend, "sync_weights", lambda m: calls.append("sync"))
    trainer.train_step()
    trainer.train_step()
    assert calls == ["sample", "sync", "sample", "sync"]


def test_cast_copy_keeps_ties_and_leaves_the_model_alone(tiny: Any) -> None:
    _, tok, _ = tiny
    model = build_tiny_model(len(tok), tie=True)  # tied input and output embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    half = rollout_backends.cast_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.parameters())
    assert not half.training
    assert half.get_output_embeddings().weight is half.get_input_embeddings().weight
    for (name, p), (_, q) in zip(model.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_hf_backend_in_another_dtype_samples_a_synced_copy(tiny: Any) -> None:
    model, tok, prompts = tiny
    student = copy.deepcopy(model)
    same = HFBackend(student, tok, dtype=torch.float32)  # the model's own dtype: no copy
    assert same.model is student
    backend = HFBackend(student, tok, batch_size=4, dtype=torch.float64)
    assert backend.model is not student
    kw = dict(n=2, temperature=0.0, max_new_tokens=6, seeds=[1, 2, 3])
    # float64 rounds nothing away: greedy samples equal the training model's
    _same(backend.sample(prompts, **kw), rollout.sample(student, tok, prompts, batch_size=4, **kw))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an "update"
    stale = [(q - p.double()).abs().max().item()
             for p, q in zip(student.parameters(), backend.model.parameters(), strict=True)]
    assert max(stale) > 0.01
    backend.sync_weights(student)
    for p, q in zip(student.parameters(), backend.model.parameters(), strict=True):
        assert torch.equal(q, p.detach().double())
    _same(backend.sample(prompts, **kw), rollout.sample(student, tok, prompts, batch_size=4, **kw))


def test_trainer_with_a_bf16_rollout_copy_syncs_it_after_each_update(
    tiny_model_dir: Path, tmp_path: Path,
) -> None:
    from test_trainer import tiny_config

    from opcd.training.trainer import Trainer

    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"dtype": "bfloat16"})
    trainer = Trainer(config_from_dict(cfg), progress=False)
    copy_model = trainer.backend.model
    assert copy_model is not trainer.student
    assert next(copy_model.parameters()).dtype == torch.bfloat16
    initial = [p.detach().clone() for p in trainer.student.parameters()]
    for _ in range(2):
        m = trainer.train_step()
        assert m["response_len"] > 0
    moved = max((p - p0).abs().max().item()
                for p, p0 in zip(trainer.student.parameters(), initial, strict=True))
    assert moved > 0  # lr 1e-2: the weights changed, and the copy followed them
    for p, q in zip(trainer.student.parameters(), copy_model.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16))
    assert next(trainer.student.parameters()).dtype == torch.float32


def test_ovd_samples_through_the_backend_copy_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    """OVD's sampler is OPCD's: with rollout.dtype its responses come from the synced copy."""
    from test_ovd import ovd_config

    from opcd.training.trainer import Trainer

    cfg = ovd_config(tiny_model_dir, tmp_path, score_mode="expected")
    cfg["rollout"]["dtype"] = "bfloat16"
    trainer = Trainer(config_from_dict(cfg), progress=False)
    copy_model = trainer.backend.model
    assert copy_model is not trainer.student and next(copy_model.parameters()).dtype == torch.bfloat16
    for _ in range(2):
        assert trainer.train_step()["response_len"] > 0
    for p, q in zip(trainer.student.parameters(), copy_model.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16))


def test_a_dtype_slower_than_float32_is_named_with_the_fix(
    tiny: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _, _ = tiny
    figures = {"float32": 2e-3, "float32/onednn": 1e-3, "bfloat16": 4e-3, "float16": 3e-3}
    monkeypatch.setattr(rollout_backends.probe, "product_seconds", lambda hidden, rows: figures)
    note = rollout_backends.slow_dtype_note(model, torch.bfloat16)
    # against fp32 at its best kernel, not the plain product
    assert note is not None and "4.0x slower" in note and "rollout.dtype=auto" in note
    assert "3.0x slower" in (rollout_backends.slow_dtype_note(model, torch.float16) or "")
    figures["bfloat16/onednn"] = 0.5e-3
    assert rollout_backends.slow_dtype_note(model, torch.bfloat16) is None


def test_rollout_dtype_auto_picks_bf16_only_where_it_is_clearly_faster(
    tiny: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _, _ = tiny
    figures = {"float32": 2e-3, "float32/onednn": 1e-3, "bfloat16": 0.5e-3}
    monkeypatch.setattr(rollout_backends.probe, "product_seconds", lambda hidden, rows: figures)
    dtype, line = rollout_backends.choose_rollout_dtype(model, 8)
    assert dtype == torch.bfloat16 and "2.00x faster" in line and "float32/onednn 1.00 ms" in line
    figures["bfloat16"] = 0.8e-3  # 1.25x: not worth samples from rounded weights
    dtype, line = rollout_backends.choose_rollout_dtype(model, 8)
    assert dtype is None and "sampling in float32" in line
    dtype, line = rollout_backends.choose_rollout_dtype(copy.deepcopy(model).to(torch.bfloat16), 8)
    assert dtype is None and "training model itself" in line


def test_trainer_with_rollout_dtype_auto_follows_the_probe(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_trainer import tiny_config

    from opcd.training.trainer import Trainer

    figures = {"float32": 2e-3, "bfloat16": 1e-3}
    monkeypatch.setattr(rollout_backends.probe, "product_seconds", lambda hidden, rows: figures)
    auto = {"max_new_tokens": 6, "batch_size": 4, "dtype": "auto"}
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path, rollout=auto))
    trainer = Trainer(cfg, progress=False)
    assert next(trainer.backend.model.parameters()).dtype == torch.bfloat16
    figures["bfloat16"] = 4e-3
    trainer = Trainer(config_from_dict(tiny_config(tiny_model_dir, tmp_path / "b", rollout=auto)),
                      progress=False)
    assert trainer.backend.model is trainer.student


def test_the_probe_answers_for_a_real_cpu(tiny: Any) -> None:
    model, _, _ = tiny
    dtype, line = rollout_backends.choose_rollout_dtype(model, 4)
    assert dtype in (None, torch.bfloat16) and "float32" in line and "bfloat16" in line


# --------------------------------------------------------------------------- config
def _cfg(tmp_path: Path, **rollout_keys: Any) -> dict[str, Any]:
    return {"model": "unused", "run": {"dir": str(tmp_path / "run")}, "rollout": rollout_keys}


def test_default_backend_is_hf(tmp_path: Path) -> None:
    cfg = config_from_dict(_cfg(tmp_path))
    assert cfg.rollout.backend == "hf" and cfg.rollout.vllm_gpu_memory_utilization == 0.3


def test_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(tmp_path, backend="sglang"))
    assert "rollout.backend" in str(e.value) and "hf" in str(e.value) and "vllm" in str(e.value)
    with pytest.raises(ConfigError, match="not a rollout backend"):
        build_backend("sglang", torch.nn.Linear(1, 1), None)


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_vllm_memory_share_out_of_range(tmp_path: Path, value: float) -> None:
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization.*\(0, 1\]"):
        config_from_dict(_cfg(tmp_path, vllm_gpu_memory_utilization=value))


@pytest.mark.parametrize("method", ["offpolicy"])
def test_vllm_is_refused_for_other_methods(tmp_path: Path, method: str) -> None:
    cfg = _cfg(tmp_path, backend="vllm", n=2)
    cfg["method"] = method
    with pytest.raises(ConfigError, match=f"not supported for method={method}.*rollout.backend=hf"):
        config_from_dict(cfg)


@pytest.mark.parametrize(("keys", "method", "match"), [
    ({"dtype": "bfloat16", "backend": "vllm"}, "opcd", "applies to rollout.backend=hf"),
    ({"dtype": "bfloat16"}, "offpolicy", "not supported for method=offpolicy"),
    ({"dtype": "fp8"}, "opcd", "rollout.dtype"),
])
def test_rollout_dtype_config_errors(tmp_path: Path, keys: dict[str, Any], method: str, match: str) -> None:
    cfg = _cfg(tmp_path, **keys)
    cfg["method"] = method
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_vllm_is_refused_on_several_processes(tmp_path: Path) -> None:
    from opcd.runtime.distributed import Dist
    from opcd.training.trainer import check_distributed

    cfg = config_from_dict(_cfg(tmp_path, backend="vllm"))
    dist = Dist(rank=0, world=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="one process for now.*rollout.backend=hf"):
        check_distributed(cfg, dist)


@pytest.mark.skipif(HAS_CUDA and HAS_VLLM, reason="vllm and CUDA are both present here")
def test_vllm_without_vllm_or_cuda_is_a_config_error_naming_the_fix(
    tiny_model_dir: Path, tmp_path: Path,
) -> None:
    from test_trainer import tiny_config

    from opcd.training.loop import build_trainer

    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path, rollout={"backend": "vllm"}))
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg, progress=False)
    msg = str(e.value)
    assert "rollout.backend=hf" in msg
    assert ("CUDA" in msg) if HAS_VLLM else ("pip install vllm" in msg)


def test_vllm_checks_name_each_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_backends, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"not installed.*pip install vllm.*rollout.backend=hf"):
        check_vllm_usable()
    monkeypatch.setattr(rollout_backends, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"CUDA GPU only.*rollout.backend=hf"):
        check_vllm_usable()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"trains on cpu.*rollout.backend=hf"):
        check_vllm_usable(torch.device("cpu"))
    check_vllm_usable(torch.device("cuda"))


# --------------------------------------------------------------------------- weight sync
def test_merged_state_dict_of_a_lora_model_is_merge_and_unload(tiny: Any) -> None:
    from peft import LoraConfig, get_peft_model

    model, _, _ = tiny
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter do something
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    merged = merged_state_dict(peft)
    assert all(torch.equal(v, peft.state_dict()[k]) for k, v in before.items())  # untouched
    want = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert set(merged) == set(want) == set(model.state_dict())
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-6)
    changed = [k for k in want if not torch.equal(want[k], model.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    plain = merged_state_dict(model)
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- vLLM glue (CPU)
def test_response_from_output_keeps_the_eos_like_the_hf_backend() -> None:
    stop = [2, 7]
    assert response_from_output([5, 6, 2], "stop", None, stop) == ([5, 6, 2], True)
    assert response_from_output([5, 6], "stop", None, stop) == ([5, 6, 2], True)  # EOS left out
    assert response_from_output([5, 6], "stop", 7, stop) == ([5, 6, 7], True)  # stop id left out
    assert response_from_output([5, 6, 9], "length", None, stop) == ([5, 6, 9], False)
    assert response_from_output([5, 7, 9], "length", None, stop) == ([5, 7], True)


class _FakeParams:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class _FakeLLM:
    """Stands in for ``vllm.LLM``: returns scripted completions, records what it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.requests: list[Any] = []
        self.params: list[Any] = []
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.resets = 0

    def generate(self, requests: list[Any], params: list[Any], use_tqdm: bool = True) -> list[Any]:
        assert use_tqdm is False and len(requests) == len(params)
        self.requests, self.params = requests, params
        outs = []
        for k, _ in enumerate(requests):
            if k % 3 == 0:
                comp = types.SimpleNamespace(token_ids=[40, 41, 2], finish_reason="stop", stop_reason=None)
            elif k % 3 == 1:
                comp = types.SimpleNamespace(token_ids=[42], finish_reason="stop", stop_reason=None)
            else:
                comp = types.SimpleNamespace(token_ids=[43, 44, 45], finish_reason="length", stop_reason=None)
            outs.append(types.SimpleNamespace(outputs=[comp]))
        return outs

    def apply_model(self, func: Any) -> list[Any]:
        class _Target:
            def load_weights(inner, weights: Any) -> None:  # noqa: N805
                self.loaded = list(weights)
        return [func(_Target())]

    def reset_prefix_cache(self) -> None:
        self.resets += 1


def test_vllm_backend_glue_with_a_stand_in_engine(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, prompts = tiny
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=_FakeParams))
    engine = _FakeLLM(model)
    backend = VllmBackend(model, tok, engine=engine)
    roll = backend.sample(prompts[:2], n=2, temperature=0.7, top_p=0.9, max_new_tokens=3, seeds=[11, 12])
    assert [r["prompt_token_ids"] for r in engine.requests] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert [p.seed for p in engine.params] == [derive_seed("row", s, j) for s in (11, 12) for j in (0, 1)]
    p = engine.params[0]
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop_token_ids) == (1, 0.7, 0.9, 3, [2])
    assert roll.prompt_index == [0, 0, 1, 1]
    assert roll.response_ids == [[40, 41, 2], [42, 2], [43, 44, 45], [40, 41, 2]]
    assert roll.truncated == [False, False, True, False]
    assert roll.texts == [tok.decode(r, skip_special_tokens=True) for r in roll.response_ids]
    greedy = backend.sample(prompts[:1], temperature=0.0, max_new_tokens=3)
    assert engine.params[0].temperature == 0.0 and engine.params[0].seed is None
    assert len(greedy.response_ids) == 1
    backend.sync_weights(model)
    assert engine.resets == 1
    loaded = dict(engine.loaded)
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_vllm_backend_v0_engine_fallback(tiny: Any) -> None:
    model, tok, _ = tiny
    got: list[Any] = []
    inner = types.SimpleNamespace(load_weights=lambda w: got.extend(w))
    runner = types.SimpleNamespace(model=inner)
    engine = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
        driver_worker=types.SimpleNamespace(model_runner=runner))))
    VllmBackend(model, tok, engine=engine).sync_weights(model)
    assert {k for k, _ in got} == set(model.state_dict())


# --------------------------------------------------------------------------- vLLM on a GPU
def _gpu_skip_reason() -> str | None:
    if not HAS_CUDA:
        return "the vLLM backend needs a CUDA GPU; this machine has none"
    if not HAS_VLLM:
        return "the vLLM backend needs the vllm package (pip install 'opcd[vllm]'), not installed here"
    return None


def _save_tiny_for_vllm(path: Path) -> Path:
    """A tiny random Llama whose head size (64) vLLM's attention kernels support."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
def test_vllm_backend_samples_and_follows_synced_weights(tmp_path: Path) -> None:
    from opcd.models import load_model

    folder = _save_tiny_for_vllm(tmp_path / "tiny")
    model, tok = load_model(str(folder))
    assert model.device.type == "cuda"
    prompts = [encode_chat(tok, [{"role": "user", "content": t}]) for t in ("Hello world", "rainbow")]
    backend = VllmBackend(model, tok, model_path=str(folder), gpu_memory_utilization=0.2,
                          max_model_len=256, seed=0)
    try:
        roll = backend.sample(prompts, n=3, temperature=1.0, max_new_tokens=8, seeds=[1, 2])
        assert roll.prompt_index == [0, 0, 0, 1, 1, 1]
        assert all(0 < len(r) <= 8 for r in roll.response_ids)
        assert roll.texts == [tok.decode(r, skip_special_tokens=True) for r in roll.response_ids]
        again = backend.sample(prompts, n=3, temperature=1.0, max_new_tokens=8, seeds=[1, 2])
        assert again.response_ids == roll.response_ids  # seeded rows repeat
        before = backend.sample(prompts, temperature=0.0, max_new_tokens=8).response_ids

        # Make greedy decoding pick only tokens t or u: the final norm keeps one hidden
        # dimension and the head maps it to +t / -u.
        t, u = 100, 101
        with torch.no_grad():
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[t, 0] = 10.0
            model.lm_head.weight[u, 0] = -10.0
        stale = backend.sample(prompts, temperature=0.0, max_new_tokens=8).response_ids
        assert stale == before  # not synced yet: the engine still has the old weights
        backend.sync_weights(model)
        after = backend.sample(prompts, temperature=0.0, max_new_tokens=8).response_ids
        assert after != before
        assert all(len(r) == 8 and set(r) <= {t, u} for r in after)
        hf = HFBackend(model, tok).sample(prompts, temperature=0.0, max_new_tokens=8).response_ids
        assert all(set(r) <= {t, u} for r in hf)
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
@pytest.mark.parametrize("method", ["opcd", "ovd"])
def test_training_steps_with_the_vllm_backend(tmp_path: Path, method: str) -> None:
    from test_trainer import tiny_config

    from opcd.training.loop import train

    folder = _save_tiny_for_vllm(tmp_path / "tiny")
    cfg = tiny_config(folder, tmp_path, rollout={"backend": "vllm", "vllm_gpu_memory_utilization": 0.2},
                      train={"steps": 2})
    if method == "ovd":
        cfg.update(method="ovd", ovd={"score_mode": "expected"})
        cfg["rollout"]["n"] = 2
    res = train(cfg, progress=False)
    assert res.steps == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
