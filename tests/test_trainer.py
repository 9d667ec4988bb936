"""The training loop end to end on a tiny random model: logging, modes, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opcd.config import config_from_dict
from opcd.errors import DataError, ModelError, RunFolderError
from opcd.training.loop import train
from opcd.training.trainer import Trainer, build_optimizer


def write_prompts(path: Path, n: int = 12) -> Path:
    topics = ["rain", "bread", "cats", "the moon", "trains", "music", "rivers", "tea",
              "glass", "snow", "bees", "maps", "clocks", "salt", "ships", "wind"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about {topics[i % len(topics)]}."}) + "\n")
    return path


def tiny_config(model_dir: Path, tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "task": {"name": "system_prompt", "context": "Always answer in French.",
                 "prompts": str(write_prompts(tmp_path / "prompts.jsonl")),
                 "behaviour": "contains:la", "eval_fraction": 0.25},
        # sampled with the training model itself: rollout.dtype=auto would time bf16 against
        # fp32 on this tiny model's 32-wide products, a choice that flips with the CPU's load
        "rollout": {"max_new_tokens": 6, "batch_size": 4, "dtype": "model"},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2},
        # a random model follows no context: no in-context reference, no lift check
        "eval": {"size": 3, "max_new_tokens": 4, "with_context": False},
        "run": {"dir": str(tmp_path / "run"), "plot": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_train_writes_run_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    res = train(tiny_config(tiny_model_dir, tmp_path, run={"plot": True, "save_every": 1}),
                progress=False)
    run = res.run_dir
    assert (run / "config.yaml").is_file() and (run / "plot.png").is_file()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "reverse_kl", "student_entropy", "student_topk_mass", "teacher_topk_mass",
                "response_len", "time_rollout", "time_teacher", "time_update", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert all(r["reverse_kl"] >= 0 for r in steps)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
    assert (run / "final" / "config.json").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    # the trained weights moved away from the initial ones
    before, after = weights(tiny_model_dir), weights(run / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_equals_uninterrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"train": {"steps": 4}, "run": {"save_every": 2}}
    a = train(tiny_config(tiny_model_dir, tmp_path / "a", **common), progress=False)
    b_cfg = tiny_config(tiny_model_dir, tmp_path / "b", **common)
    b_cfg["train"]["steps"] = 2
    train(b_cfg, progress=False)
    b_cfg["train"]["steps"] = 4
    b = train(b_cfg, resume=True, progress=False)
    wa, wb = weights(a.final_model), weights(b.final_model)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [r["loss"] for r in a.history]
    lb = [r["loss"] for r in b.history]
    assert la == lb and len(la) == 4  # every step logged once, same values


@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl", "jsd", "sampled_token"])
def test_objectives_run(tiny_model_dir: Path, tmp_path: Path, objective: str) -> None:
    res = train(tiny_config(tiny_model_dir, tmp_path, loss={"objective": objective, "top_k": 16},
                            train={"steps": 1}), progress=False)
    assert torch.isfinite(torch.tensor(res.history[0]["loss"]))


def test_frozen_teacher_does_not_move_live_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    from opcd.teachers.scoring import pack

    batch = pack([[5, 6, 7]], [[8, 9]], pad_id=0)
    for mode, should_change in (("frozen", False), ("live", True)):
        cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path / mode, teacher={"mode": mode}))
        tr = Trainer(cfg, progress=False)
        before = tr.teacher.response_logits(batch)
        tr.train_step()
        after = tr.teacher.response_logits(batch)
        assert (not torch.equal(before, after)) == should_change, mode


def test_lora_frozen_teacher_is_base_with_adapter_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    from opcd.teachers.scoring import pack, response_logits

    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path, lora={"enabled": True, "r": 4},
                                       train={"lr": 0.05}))
    tr = Trainer(cfg, progress=False)
    assert tr.teacher.separate_model is None  # no second copy of the weights
    batch = pack([[5, 6, 7]], [[8, 9]], pad_id=0)
    base = tr.teacher.response_logits(batch)
    tr.train_step()
    tr.train_step()
    assert torch.equal(base, tr.teacher.response_logits(batch))
    with torch.no_grad():
        assert not torch.allclose(base, response_logits(tr.student, batch))


def test_model_teacher(tiny_model_dir: Path, tiny_model_dir_other: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path,
                      teacher={"mode": "model", "model": str(tiny_model_dir_other)},
                      train={"steps": 1})
    res = train(cfg, progress=False)
    assert res.history[0]["reverse_kl"] > 0  # different weights -> a real divergence


@pytest.mark.parametrize("lora", [False, True])
def test_a_wider_teacher_of_the_same_vocabulary(tiny_model_dir: Path, tmp_path: Path, lora: bool) -> None:
    """Cross-size (the 1.5B teaching the 0.5B): hidden sizes differ, the vocabulary is shared."""
    from conftest import build_tiny_model, build_tokenizer

    wide = tmp_path / "wide"
    tok = build_tokenizer()
    build_tiny_model(len(tok), seed=4, hidden_size=48).save_pretrained(wide)
    tok.save_pretrained(wide)
    for chunked in (True, False):
        cfg = tiny_config(tiny_model_dir, tmp_path / f"c{chunked}",
                          teacher={"mode": "model", "model": str(wide)}, train={"steps": 1},
                          perf={"chunked_loss": chunked}, lora={"enabled": lora})
        res = train(cfg, progress=False)
        assert res.history[0]["reverse_kl"] > 0 and not res.history[0]["skipped"]


# ---------------------------------------------------------------------------- bad input
def test_run_folder_with_other_run_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 1})
    train(cfg, progress=False)
    with pytest.raises(RunFolderError, match="--resume"):
        train(cfg, progress=False)
    other = tiny_config(tiny_model_dir, tmp_path, train={"steps": 1, "lr": 0.5})
    with pytest.raises(RunFolderError, match="train.lr"):
        train(other, resume=True, progress=False)
    res = train(other, overwrite=True, progress=False)
    assert res.steps == 1


def test_resume_without_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="Nothing to resume"):
        train(tiny_config(tiny_model_dir, tmp_path), resume=True, progress=False)


def test_bad_datasets(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path)
    cfg["task"]["prompts"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        train(cfg, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg["task"]["prompts"] = str(empty)
    with pytest.raises(DataError, match="empty"):
        train(cfg, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    cfg["task"]["prompts"] = str(bad)
    with pytest.raises(DataError, match=r"line 2 has no non-empty string field \"prompt\""):
        train(cfg, progress=False)


def test_prompt_too_long(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"max_prompt_tokens": 20})
    with pytest.raises(DataError, match="rollout.max_prompt_tokens=20"):
        train(cfg, progress=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "t", rollout={"max_prompt_tokens": 20,
                                                              "truncate_prompts": True},
                      train={"steps": 1})
    assert train(cfg, progress=False).steps == 1


def test_unknown_model_lists_registry(tmp_path: Path) -> None:
    cfg = tiny_config(Path("qwen2.5-coder-0.5b-instrct"), tmp_path)
    with pytest.raises(ModelError, match="qwen2.5-coder-0.5b-instruct"):
        train(cfg, progress=False)


def test_teacher_tokenizer_mismatch(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import build_tiny_model, build_tokenizer

    other = tmp_path / "other"
    tok = build_tokenizer(vocab_size=300)
    build_tiny_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    cfg = tiny_config(tiny_model_dir, tmp_path, teacher={"mode": "model", "model": str(other)})
    with pytest.raises(ModelError, match="tokenizer"):
        train(cfg, progress=False)


def _adamw_pair() -> tuple[list[torch.nn.Parameter], ...]:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    return tuple([torch.nn.Parameter(t.clone()) for t in base] for _ in range(2))


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_adamw_takes_the_default_adamw_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    fused_p, plain_p = _adamw_pair()
    start = [p.detach().clone() for p in fused_p]
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path, train={"weight_decay": 0.1}))
    fused = build_optimizer(fused_p, cfg)
    plain = build_optimizer(plain_p, config_from_dict(
        tiny_config(tiny_model_dir, tmp_path, perf={"fused_optimizer": False}, train={"weight_decay": 0.1})))
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    _steps(fused, fused_p, 4, seed=1)
    _steps(plain, plain_p, 4, seed=1)
    for a, b, a0 in zip(fused_p, plain_p, start, strict=True):
        assert (a - a0).abs().max() > 1e-3  # the steps moved the weights
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_optimizer_state_resumes_across_fused_and_default(
    tiny_model_dir: Path, tmp_path: Path, saved_fused: bool
) -> None:
    """A checkpoint written by either AdamW resumes under the other; the run's choice stays."""
    from opcd.runtime import checkpoint as ckpt

    first_p, second_p = _adamw_pair()
    cfg_of = {f: config_from_dict(tiny_config(tiny_model_dir, tmp_path, perf={"fused_optimizer": f}))
              for f in (False, True)}
    first = build_optimizer(first_p, cfg_of[saved_fused])
    _steps(first, first_p, 3, seed=2)
    torch.save(first.state_dict(), tmp_path / ckpt.OPTIMIZER_FILE)
    with torch.no_grad():
        for a, b in zip(second_p, first_p, strict=True):
            a.copy_(b)
    second = build_optimizer(second_p, cfg_of[not saved_fused])
    ckpt.load_optimizer(tmp_path, second)
    assert bool(second.param_groups[0]["fused"]) is (not saved_fused)
    _steps(first, first_p, 2, seed=3)
    _steps(second, second_p, 2, seed=3)
    for a, b in zip(first_p, second_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
