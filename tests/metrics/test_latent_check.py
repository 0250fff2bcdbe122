"""The end-of-pre-training check: over-dispersed or shifted samples are named, samples like the data pass."""

from __future__ import annotations

import json

import pytest
import torch

from monai_histodiff.handlers import UnconditionalSampleCheck
from monai_histodiff.metrics import check_unconditional_latents, latent_channel_statistics


def _data(n: int, seed: int = 0) -> torch.Tensor:
    """Latents with structure the pooled features see: per-tile channel offsets plus spatial noise, spread ~1."""
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(n, 3, 1, 1, generator=g) + 0.6 * torch.randn(n, 3, 8, 8, generator=g)


def test_statistics_per_channel():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 1] = torch.arange(4.0).view(4, 1, 1)
    stats = latent_channel_statistics(x)
    assert stats["mean"] == pytest.approx([0.0, 1.5]) and stats["std"][0] == 0.0
    assert stats["std"][1] == pytest.approx(torch.arange(4.0).repeat_interleave(9).std().item())


def test_samples_like_the_data_pass_and_over_dispersed_ones_are_named():
    data = _data(256)
    good = check_unconditional_latents(_data(64, seed=1), data)
    assert good["ok"] and not good["warnings"] and all(0.8 < r < 1.25 for r in good["std_ratio"])
    bad = check_unconditional_latents(2.5 * _data(64, seed=1), data)  # the over-dispersed model: std ~2.5
    assert not bad["ok"] and len(bad["warnings"]) == 3 and "channel 0: sampled spread" in bad["warnings"][0]
    assert bad["fd_pooled"] > 5 * good["fd_pooled"] and good["fd_pooled"] < 5 * good["fd_pooled_reference"] + 0.1
    shifted = _data(64, seed=1)
    shifted[:, 2] += 1.0
    named = check_unconditional_latents(shifted, data)["warnings"]
    assert named == [w for w in named if w.startswith("channel 2: sampled mean")] and named
    with pytest.raises(ValueError, match="at least 128"):
        check_unconditional_latents(_data(64), _data(100))


class _Sampler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def latents(self, num: int) -> torch.Tensor:
        return self.scale * _data(num, seed=7)


class _State:
    iteration = 12


class _Engine:
    state = _State()


def test_handler_writes_the_check_and_warns(tmp_path, caplog):
    out = tmp_path / "sample_check.json"
    handler = UnconditionalSampleCheck(_Sampler(3.0), lambda n: _data(n), out, num_samples=32)
    with caplog.at_level("WARNING"):
        result = handler(_Engine())
    assert json.loads(out.read_text())["warnings"] == result["warnings"] and result["iteration"] == 12
    assert "far from its training latents" in caplog.text and str(out) in caplog.text
    # a data set too small for the reference: fewer samples; none at all: skipped, nothing written
    small = UnconditionalSampleCheck(_Sampler(1.0), lambda n: _data(min(n, 10)), tmp_path / "small.json", 32)
    assert small(_Engine())["num_sampled"] == 5
    assert UnconditionalSampleCheck(_Sampler(1.0), None, tmp_path / "none.json")(_Engine()) is None
    assert not (tmp_path / "none.json").exists()
