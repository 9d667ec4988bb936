"""The machine probe (:mod:`opcd.sampling.probe`): measured once per machine and shape, kept on disk,
measured again for another machine or a damaged file; and the sampler's CDF inversion."""

from __future__ import annotations

import json

import pytest
import torch

from opcd.sampling import probe
from opcd.sampling.rollout import invert_cdf


@pytest.fixture
def probe_file(tmp_path, monkeypatch):
    path = tmp_path / "probe.json"
    monkeypatch.setattr(probe, "_probe_path", lambda: path)
    monkeypatch.setattr(probe, "_MEMO", {})
    return path


def test_product_seconds_are_measured_once_and_kept(probe_file, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []

    def fake_measure(hidden: int, rows: int) -> dict[str, float]:
        calls.append((hidden, rows))
        return {"float32": 2e-3, "float32/onednn": 1e-3}

    monkeypatch.setattr(probe, "measure", fake_measure)
    first = probe.product_seconds(64, 8)
    assert first == {"float32": 2e-3, "float32/onednn": 1e-3} and calls == [(64, 8)]
    assert probe.product_seconds(64, 8) == first and len(calls) == 1  # this process: memory
    monkeypatch.setattr(probe, "_MEMO", {})
    assert probe.product_seconds(64, 8) == first and len(calls) == 1  # a new process: the file
    stored = json.loads(probe_file.read_text())
    assert list(stored) == [f"{probe.machine_key()}|v{probe.PROBE_VERSION}|hidden:64|rows:8"]
    probe.product_seconds(64, 4)  # another shape
    assert calls[-1] == (64, 4)
    monkeypatch.setattr(probe, "_MEMO", {})
    monkeypatch.setattr(probe, "machine_key", lambda: "another CPU")
    probe.product_seconds(64, 8)  # another machine sharing the cache folder
    assert calls[-1] == (64, 8) and len(calls) == 3
    assert len(json.loads(probe_file.read_text())) == 3


def test_a_damaged_probe_file_is_measured_again(probe_file, monkeypatch) -> None:
    probe_file.write_text("{not json")
    monkeypatch.setattr(probe, "measure", lambda hidden, rows: {"float32": 1e-3})
    assert probe.product_seconds(32, 2) == {"float32": 1e-3}
    assert json.loads(probe_file.read_text())  # rewritten whole


def test_measure_times_every_available_way() -> None:
    figures = probe.measure(hidden=32, rows=4)
    assert {"float32", "bfloat16"} <= set(figures)
    if probe.onednn_available():
        assert "float32/onednn" in figures
    assert all(0 < s < 5 for s in figures.values())
    assert "float32" in probe.describe(figures, 32, 4)


def _full_cdf_pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp(max=probs.shape[-1] - 1)


@pytest.mark.parametrize("vocab", [7, 1024, 1500, 5000])
def test_blockwise_cdf_inversion_equals_the_full_cumulative_sum(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    for trial in range(40):
        logits = torch.randn(6, vocab, generator=g) * (1 + trial % 8)
        if trial % 2:  # many impossible tokens (top-p, forbidden EOS)
            logits[:, torch.rand(vocab, generator=g) < 0.8] = -torch.inf
            logits[:, 0] = 0.0
        probs = logits.softmax(-1)
        u = torch.rand(6, generator=g, dtype=torch.float64)
        picked = invert_cdf(probs, u)
        assert torch.equal(picked, _full_cdf_pick(probs, u))
        assert bool((probs[torch.arange(6), picked] > 0).all())
    edge = torch.zeros(2, vocab)
    edge[:, -1] = 1.0  # all mass on the last token, u close to 1
    assert invert_cdf(edge, torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64)).tolist() == [vocab - 1] * 2
