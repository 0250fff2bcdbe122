"""Tests of the time-dependent latent classifier phi(z_t, t) that guides HistoDiffusion's sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_histodiff.networks import TimeConditionedLatentClassifier

SMALL = {"channels": (32, 32), "num_res_blocks": 1, "norm_num_groups": 8, "num_heads": 4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _perturb_zero_initialised(net: torch.nn.Module) -> None:
    """Give MONAI's zero-initialised residual convolutions random weights, as training would."""
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.05)


@pytest.mark.parametrize("num_classes", [2, 9])
@pytest.mark.parametrize("latent_size", [32, 64])
def test_output_shapes(num_classes, latent_size):
    net = TimeConditionedLatentClassifier(num_classes=num_classes, latent_size=latent_size, **SMALL).eval()
    z = torch.randn(2, 3, latent_size, latent_size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        assert net(z, t).shape == (2, num_classes)
        assert net.features(z, t).shape == (2, 32)


def test_paper_configuration():
    """64 x 64 x 3 latents, LAE encoder channels (128, 256, 512), 2 residual blocks per level, no level attention."""
    net = TimeConditionedLatentClassifier(
        num_classes=9, latent_size=64, channels=(128, 256, 512), num_res_blocks=2, attention_levels=(False,) * 3
    ).eval()
    assert net.pool.spatial_size == (16, 16)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64), torch.tensor([10, 900])).shape == (2, 9)


def test_default_configuration_with_attention():
    net = TimeConditionedLatentClassifier(num_classes=3, latent_size=16, attention_levels=(False, True)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3)


def test_timestep_broadcasting():
    net = TimeConditionedLatentClassifier(num_classes=3, latent_size=16, **SMALL).eval()
    _perturb_zero_initialised(net)
    z = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = net(z, torch.tensor([7, 7, 7]))
        for t in (torch.tensor(7), torch.tensor([7]), 7):
            torch.testing.assert_close(net(z, t), ref)
        with pytest.raises(ValueError):
            net(z, torch.tensor([1, 2]))


def test_timestep_changes_output():
    net = TimeConditionedLatentClassifier(num_classes=3, latent_size=16, **SMALL).eval()
    _perturb_zero_initialised(net)
    z = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out_0, out_999 = net(z, torch.tensor(0)), net(z, torch.tensor(999))
        feat_0, feat_999 = net.features(z, 0), net.features(z, 999)
    assert (out_0 - out_999).abs().max() > 1e-4
    assert (feat_0 - feat_999).abs().max() > 1e-4


def test_gradient_wrt_input_for_guidance():
    """The guided inferer takes grad of log p(y | z_t) w.r.t. z_t."""
    net = TimeConditionedLatentClassifier(num_classes=4, latent_size=16, attention_levels=(False, True), **SMALL)
    z = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = torch.tensor([0, 3])
    log_probs = F.log_softmax(net(z, torch.tensor([500, 500])), dim=-1)
    (grad,) = torch.autograd.grad(log_probs[torch.arange(2), y].sum(), z)
    assert grad.shape == z.shape and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_other_input_size_uses_interpolated_positional_embedding():
    net = TimeConditionedLatentClassifier(num_classes=2, latent_size=16, **SMALL).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32), torch.tensor(3)).shape == (2, 2)


def test_latent_size_must_be_divisible_by_downsampling():
    with pytest.raises(ValueError, match="latent_size"):
        TimeConditionedLatentClassifier(num_classes=2, latent_size=30, channels=(32, 32, 32), norm_num_groups=8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (32, 30)},
        {"channels": (32, 32), "attention_levels": (True,)},
        {"channels": (32, 32), "num_heads": 5},
        {"channels": (32, 32), "num_train_timesteps": 0},
        {"channels": (32, 32), "spatial_dims": 3},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        TimeConditionedLatentClassifier(num_classes=2, latent_size=16, norm_num_groups=8, **kwargs)


def test_invalid_input_shape():
    net = TimeConditionedLatentClassifier(num_classes=2, latent_size=16, **SMALL)
    with pytest.raises(ValueError):
        net(torch.randn(2, 4, 16, 16), torch.tensor([0, 0]))


def _latent_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of clean 3 x 16 x 16 latents with means -0.5 and +0.5 (unit noise)."""
    y = torch.randint(0, 2, (n,), generator=generator)
    z = (y.float() - 0.5)[:, None, None, None] + torch.randn(n, 3, 16, 16, generator=generator)
    return z, y


def test_learns_separable_toy_problem():
    net = TimeConditionedLatentClassifier(num_classes=2, latent_size=16, with_nonlocal_attn=False, **SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    t0 = torch.tensor(0)
    net.train()
    for _ in range(60):
        z, y = _latent_batch(16, gen)
        loss = F.cross_entropy(net(z, t0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    z, y = _latent_batch(128, gen)
    with torch.no_grad():
        logits_0 = net(z, t0)
        logits_999 = net(z, torch.tensor(999))
    acc = (logits_0.argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
    # once trained, the (initially zero) residual branches make the output depend on the timestep
    assert (logits_0 - logits_999).abs().max() > 1e-4
