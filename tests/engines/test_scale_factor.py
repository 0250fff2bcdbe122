"""Tests of the latent scale factor: one global 1/std over several batches."""

from __future__ import annotations

import pytest
import torch

from monai_histodiff.engines import CachedLatentDataset, LatentCache, RunningMoments, compute_scale_factor
from tests.tiny import tiny_autoencoder


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(3)
    # a batch of flat tiles, then batches of noisy ones: the first batch is not representative of the rest
    flat = {"image": torch.linspace(-0.9, 0.9, 4)[:, None, None, None].expand(4, 3, 16, 16).contiguous()}
    return [flat] + [{"image": torch.rand(4, 3, 16, 16) * 2 - 1} for _ in range(3)]


def test_running_moments_matches_torch_std():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * (i + 1) + 5 * i for i, n in enumerate((7, 1, 300, 40))]
    m = RunningMoments()
    for c in chunks:
        m.update(c)
    assert m.count == 348
    assert m.std == pytest.approx(float(torch.cat(chunks).double().std()), rel=1e-10)
    assert m.mean == pytest.approx(float(torch.cat(chunks).double().mean()), rel=1e-10)


def test_scale_factor_is_global_std_over_batches(batches):
    ae = tiny_autoencoder()
    with torch.no_grad():  # a confident posterior (sigma ~ 0.02), so the latents follow the data
        ae.quant_conv_log_sigma.conv.weight.zero_()
        ae.quant_conv_log_sigma.conv.bias.fill_(-8.0)
    ae.train()
    torch.manual_seed(7)
    sf = compute_scale_factor(torch.nn.DataParallel(ae), batches, num_batches=3)
    assert ae.training, "the autoencoder's mode is restored"
    torch.manual_seed(7)
    with torch.no_grad():
        ae.eval()
        z = torch.cat([ae.encode_stage_2_inputs(b["image"]) for b in batches[:3]])
    assert sf == pytest.approx(1.0 / float(z.std()), rel=1e-5)
    one = compute_scale_factor(ae, batches, num_batches=1)
    assert abs(one / sf - 1) > 0.05, "a one-batch estimate differs in general"
    every = compute_scale_factor(ae, batches, num_batches=None)
    assert every != pytest.approx(sf, rel=1e-3)


def test_scale_factor_from_cache_and_cached_batches():
    torch.manual_seed(0)
    mu = torch.randn(20, 3, 4, 4) * 3
    sigma = torch.rand(20, 3, 4, 4) * 0.5
    cache = LatentCache(mu, sigma)
    torch.manual_seed(1)
    sf = compute_scale_factor(cache)
    torch.manual_seed(1)
    assert sf == pytest.approx(1.0 / float((mu + sigma * torch.randn_like(sigma)).std()), rel=1e-5)
    ds = CachedLatentDataset(cache)
    cached_batches = [{k: torch.stack([ds[i][k] for i in range(j, j + 5)]) for k in ds[0]} for j in (0, 5, 10, 15)]
    torch.manual_seed(2)
    sf_batches = compute_scale_factor(None, cached_batches, num_batches=None)
    torch.manual_seed(2)
    z = torch.cat([b["latent_mu"] + b["latent_sigma"] * torch.randn_like(b["latent_sigma"]) for b in cached_batches])
    assert sf_batches == pytest.approx(1.0 / float(z.std()), rel=1e-5)


def test_scale_factor_errors():
    with pytest.raises(ValueError, match="dataloader"):
        compute_scale_factor(tiny_autoencoder())
    with pytest.raises(ValueError, match="std"):
        compute_scale_factor(LatentCache(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)))
