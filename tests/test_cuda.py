"""On a CUDA machine: the loop runs in bf16 on the GPU (skipped on CPU, with the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_training_steps_on_cuda_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_trainer import tiny_config, weights

    from opcd.models import load_model
    from opcd.training.loop import train

    model, _ = load_model(str(tiny_model_dir))
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 2})
    res = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    before, after = weights(tiny_model_dir), weights(res.final_model)
    assert any(not torch.equal(before[k].float(), after[k].float().cpu()) for k in before)


def test_lora_and_ovd_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_trainer import tiny_config

    from opcd.training.loop import train

    res = train(tiny_config(tiny_model_dir, tmp_path / "lora", lora={"enabled": True, "r": 4},
                            train={"steps": 1}), progress=False)
    assert res.steps == 1
    cfg = tiny_config(tiny_model_dir, tmp_path / "ovd", rollout={"n": 2}, train={"steps": 1})
    cfg["method"] = "ovd"
    assert train(cfg, progress=False).steps == 1
