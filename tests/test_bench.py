"""`opcd bench` on a tiny random model: the table and the results file are produced.

No timing assertions (the machine is shared); only that every phase is measured, the
fast and naive teacher log-probs agree, and the FLOP count is consistent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opcd.cli import main
from opcd.tools import bench


def test_bench_command_prints_table_and_appends_results(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr(bench.BenchSpec, "matmul_seconds", 0.05)
    out = tmp_path / "results.md"
    args = ["bench", "--model", str(tiny_model_dir), "--batch", "2", "--context", "30",
            "--prompt", "6", "--response", "4", "--micro-batch", "1", "--top-k", "8",
            "--phases", "teacher,step", "--in-process", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| phase | mode | seconds | response tok/s | peak RSS GiB | MFU | notes |" in printed
    for phase, mode in [("teacher", "naive"), ("teacher", "fast (cold)"), ("teacher", "fast (warm)"),
                        ("step", "fast"), ("step", "naive"), ("rollout", "fast"),
                        ("teacher (in step)", "fast"), ("update (in step)", "naive")]:
        assert f"| {phase} | {mode} |" in printed, (phase, mode)
    assert "teacher scoring (log-probs), naive / prefix reuse (warm)" in printed
    assert "whole step throughput fast / naive" in printed
    text = out.read_text()
    assert text.startswith("# opcd benchmark results")
    assert "Command: `opcd bench --model" in text and "--phases teacher,step" in text
    assert "| step | fast |" in text
    rows = [{"phase": "update", "mode": "fast", "seconds": 2.0, "tok_s": 4.0, "tokens": 8,
             "mfu": 0.5, "peak_rss": 2**30}]
    bench.write_results(out, bench.BenchSpec(model="m"), "opcd bench --model m", rows)
    text = out.read_text()  # a second run is appended, not overwritten
    assert text.count("Command: `opcd bench") == 2 and "| update | fast | 2.00 | 4.0 | 1.00 | 50% |" in text


def test_update_phase_on_a_synthetic_rollout(tiny_model_dir: Path) -> None:
    spec = bench.BenchSpec(model=str(tiny_model_dir), batch=2, context=20, prompt=5, response=6,
                           micro_batch=2, top_k=8, matmul_seconds=0.05)
    (row,) = bench._step_worker(spec, "fast", "update")
    assert row["phase"] == "update" and row["tokens"] == 12
    assert row["mfu"] > 0 and row["update_gflop"] > 0 and row["peak_rss"] > 0


def test_teacher_job_in_a_subprocess_reports_memory_and_equal_logprobs(tiny_model_dir: Path) -> None:
    spec = bench.BenchSpec(model=str(tiny_model_dir), batch=3, context=70, prompt=5, response=5,
                           micro_batch=2, phases=["teacher"], matmul_seconds=0.05)
    (job,) = bench._jobs(spec)
    json.dumps(job)  # jobs travel to the worker as JSON
    rows = bench._run_subprocess(job)
    assert [r["mode"] for r in rows if r["phase"] == "teacher"] == ["naive", "fast (cold)", "fast (warm)"]
    assert all(r["max_logp_diff"] < 1e-4 for r in rows)
    assert all(r["matmul_gflops"] > 0 and r["tokens"] == 15 for r in rows)
    assert {r["phase"] for r in rows} == {"teacher", "teacher forward"}


def test_update_flops_counts_trained_weights(tiny) -> None:
    model, _ = tiny
    full = bench.update_flops(model, [10, 20], [5, 7], trained_body=True, trained_head=True)
    lora = bench.update_flops(model, [10, 20], [5, 7], trained_body=False, trained_head=False)
    body = sum(m.in_features * m.out_features for m in model.get_decoder().modules()
               if hasattr(m, "in_features"))
    head = model.get_output_embeddings()
    hv = head.in_features * head.out_features
    cfg = model.config
    attn = sum(2 * cfg.num_hidden_layers * cfg.hidden_size * n * n for n in (15, 27))
    assert full == pytest.approx(6 * body * 42 + 3 * attn + 8 * hv * 12)
    assert lora == pytest.approx(4 * body * 42 + 3 * attn + 6 * hv * 12)


def test_bench_rejects_unknown_phase(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="phase"):
        bench.run(bench.BenchSpec(model=str(tiny_model_dir), phases=["warp"]), echo=False)
