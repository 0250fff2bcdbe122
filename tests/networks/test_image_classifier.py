"""Tests of the auxiliary image classifier (LAE encoder + attention pooling) of HistoDiffusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_histodiff.networks import HistoImageClassifier

SMALL = {"channels": (16, 32), "num_res_blocks": 1, "norm_num_groups": 8, "num_heads": 4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("num_classes", [2, 9])
@pytest.mark.parametrize("image_size", [32, 64])
def test_output_shapes(num_classes, image_size):
    net = HistoImageClassifier(num_classes=num_classes, image_size=image_size, **SMALL).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert net(x).shape == (2, num_classes)
        assert net.features(x).shape == (2, 32)


def test_default_configuration_and_embed_dim():
    net = HistoImageClassifier(num_classes=3, image_size=32)  # channels (32, 64, 64): downsampling by 4
    assert net.pool.spatial_size == (8, 8)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    net = HistoImageClassifier(num_classes=3, image_size=32, embed_dim=48, **SMALL)
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 32, 32)).shape == (1, 48)


def test_paper_configuration():
    """256 x 256 RGB tiles, LAE encoder channels (128, 256, 512), 2 residual blocks per level, no level attention."""
    net = HistoImageClassifier(
        num_classes=9, image_size=256, channels=(128, 256, 512), num_res_blocks=2, attention_levels=(False,) * 3
    ).eval()
    assert net.pool.spatial_size == (64, 64)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 256, 256)).shape == (1, 9)


def test_other_input_size_uses_interpolated_positional_embedding():
    net = HistoImageClassifier(num_classes=4, image_size=32, **SMALL).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 4)
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_gradient_wrt_input():
    net = HistoImageClassifier(num_classes=3, image_size=32, attention_levels=(False, True), **SMALL)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(F.log_softmax(net(x), dim=1)[:, 1].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_image_size_must_be_divisible_by_downsampling():
    with pytest.raises(ValueError, match="image_size"):
        HistoImageClassifier(num_classes=2, image_size=30, channels=(16, 32, 32), norm_num_groups=8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (16, 30), "norm_num_groups": 8},
        {"channels": (16, 32), "norm_num_groups": 8, "attention_levels": (False,)},
        {"channels": (16, 32), "norm_num_groups": 8, "num_heads": 5},
        {"channels": (16, 32), "norm_num_groups": 8, "spatial_dims": 3},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        HistoImageClassifier(num_classes=2, image_size=32, **kwargs)


def _colour_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 32 px images: reddish vs bluish, with pixel noise."""
    y = torch.randint(0, 2, (n,), generator=generator)
    colour = torch.tensor([[0.8, 0.2, 0.3], [0.2, 0.3, 0.8]])[y]
    x = colour[:, :, None, None] + 0.3 * torch.randn(n, 3, 32, 32, generator=generator)
    return x, y


def test_learns_separable_toy_problem():
    net = HistoImageClassifier(num_classes=2, image_size=32, with_nonlocal_attn=False, **SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(40):
        x, y = _colour_batch(16, gen)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y = _colour_batch(64, gen)
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
