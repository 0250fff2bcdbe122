"""Tests of the class-conditional StyleGAN2 (networks, losses, DiffAugment), the GAN comparison system."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_histodiff.networks.stylegan2 import (
    ConditionalStyleGAN2Discriminator,
    ConditionalStyleGAN2Generator,
    MinibatchStdDev,
    ModulatedConv2d,
    NoiseInjection,
    diff_augment,
    discriminator_nonsaturating_loss,
    generator_nonsaturating_loss,
    r1_penalty,
)

Z_DIM = 16
TINY_G = {"z_dim": Z_DIM, "w_dim": 16, "channel_base": 128, "channel_max": 16, "mapping_layers": 2}
TINY_D = {"channel_base": 128, "channel_max": 16}


@pytest.fixture(autouse=True)
def _seed(one_thread) -> None:
    torch.manual_seed(0)


def _generator(
    image_size: int = 16, num_classes: int = 3, noise_strength: float = 0.5
) -> ConditionalStyleGAN2Generator:
    """A tiny generator whose noise inputs have a non-zero strength (they start at 0, as in StyleGAN2-ADA)."""
    net = ConditionalStyleGAN2Generator(image_size=image_size, num_classes=num_classes, **TINY_G)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NoiseInjection):
                m.strength.fill_(noise_strength)
    return net.eval()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("image_size", [16, 32])
def test_generator_output_shape_per_class(image_size):
    net = _generator(image_size=image_size)
    assert net.num_ws == 2 * int(math.log2(image_size)) - 2
    with torch.no_grad():
        for c in range(3):
            out = net(torch.randn(2, Z_DIM), torch.full((2,), c), generator=_seeded(c))
            assert out.shape == (2, 3, image_size, image_size)
            assert torch.isfinite(out).all()
            assert out.std() > 0


def test_generator_tile_determinism():
    net = _generator()
    z, labels = torch.randn(3, Z_DIM), torch.tensor([0, 1, 2])
    with torch.no_grad():
        a = net(z, labels, generator=_seeded(1))
        b = net(z, labels, generator=_seeded(1))
        c = net(z, labels, generator=_seeded(2))
        assert torch.equal(a, b)
        assert (a - c).abs().amax() > 1e-3  # the noise reaches the output, so the seed matters
        # one generator per tile: tile 1 is the same alone or inside a batch
        batch = net(z, labels, generator=[_seeded(10), _seeded(11), _seeded(12)])
        alone = net(z[1:2], labels[1:2], generator=[_seeded(11)])
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
        # explicit modes: 'const' and 'none' are deterministic without a generator
        torch.testing.assert_close(net(z, labels, noise_mode="const"), net(z, labels, noise_mode="const"))
        torch.testing.assert_close(net(z, labels, noise_mode="none"), net(z, labels, noise_mode="none"))
        assert (net(z, labels, noise_mode="const") - net(z, labels, noise_mode="none")).abs().amax() > 1e-3


def test_labels_reach_output():
    net = _generator()
    z = torch.randn(1, Z_DIM).expand(3, -1)
    with torch.no_grad():
        out = net(z, torch.tensor([0, 1, 2]), noise_mode="const")
    for i in range(3):
        for j in range(i + 1, 3):
            assert (out[i] - out[j]).abs().amax() > 1e-3


def test_truncation_psi_zero_gives_class_average():
    net = _generator()
    w_avg = net.mapping.estimate_w_avg(num_samples=32, generator=_seeded(0))
    assert w_avg.shape == (3, 16) and (w_avg[0] - w_avg[1]).abs().amax() > 1e-4
    z = torch.randn(2, Z_DIM)
    with torch.no_grad():
        full = net(z, torch.tensor([1, 1]), noise_mode="const")
        same_class = net(z, torch.tensor([1, 1]), truncation_psi=0.0, noise_mode="const")
        other_class = net(z[:1], torch.tensor([2]), truncation_psi=0.0, noise_mode="const")
        w = net.mapping(z, torch.tensor([1, 1]), truncation_psi=0.0)
    assert (full[0] - full[1]).abs().amax() > 1e-3  # without truncation z matters
    torch.testing.assert_close(same_class[0], same_class[1])
    torch.testing.assert_close(w, w_avg[1].expand(2, -1))
    assert (same_class[0] - other_class[0]).abs().amax() > 1e-3  # the class survives psi = 0


def test_w_avg_ema_updates_only_batch_classes():
    net = _generator()
    before = net.mapping.w_avg.clone()
    with torch.no_grad():
        net(torch.randn(2, Z_DIM), torch.tensor([0, 2]), update_emas=True)
        net(torch.randn(2, Z_DIM), torch.tensor([0, 2]))  # no update without update_emas
    after = net.mapping.w_avg
    assert torch.equal(after[1], before[1])
    assert (after[0] - before[0]).abs().amax() > 0 and (after[2] - before[2]).abs().amax() > 0


def test_demodulation_keeps_output_scale():
    x, w = torch.randn(2, 8, 16, 16), torch.randn(2, 16)
    stds = {}
    for demodulate in (True, False):
        conv = ModulatedConv2d(8, 8, 3, w_dim=16, demodulate=demodulate)
        with torch.no_grad():
            stds[demodulate] = (conv(x, w).std().item(), conv(x, 100.0 * w).std().item())
    small, large = stds[True]
    assert 0.2 < small < 5.0 and 0.2 < large < 5.0 and 1 / 3 < large / small < 3
    small, large = stds[False]
    assert large / small > 20
    up = ModulatedConv2d(8, 4, 3, w_dim=16, up=True)
    assert up(x, w).shape == (2, 4, 32, 32)


def test_discriminator_logits_and_projection():
    net = ConditionalStyleGAN2Discriminator(image_size=16, num_classes=3, **TINY_D).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        logits = net(x, torch.tensor([0, 1]))
        same = net(x, torch.tensor([2, 2]))
        odd_batch = net(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    assert logits.shape == (2,) and odd_batch.shape == (3,)
    assert torch.isfinite(logits).all()
    assert abs(logits[0] - logits[1]) > 1e-4  # the projection term depends on the label
    torch.testing.assert_close(same[0], same[1])
    assert ConditionalStyleGAN2Discriminator(image_size=32, num_classes=2, **TINY_D)(
        torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    ).shape == (4,)


def test_minibatch_stddev():
    layer = MinibatchStdDev(group_size=2)
    x = torch.randn(4, 6, 4, 4)
    out = layer(x)
    assert out.shape == (4, 7, 4, 4)
    torch.testing.assert_close(out[:, :6], x)
    same = layer(x[:1].expand(4, -1, -1, -1))
    assert same[:, 6].abs().amax() < 1e-3  # identical samples: no spread
    # groups are samples (0, 2) and (1, 3)
    expected = ((x[[0, 1]] - x[[2, 3]]) / 2).square().add(1e-8).sqrt().mean(dim=[1, 2, 3])
    torch.testing.assert_close(out[:, 6, 0, 0], expected.repeat(2))


def test_r1_penalty():
    images = torch.randn(2, 3, 16, 16, requires_grad=True)

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0]) + 0.0 * x.mean(dim=[1, 2, 3])

    assert r1_penalty(Constant()(images), images).item() == 0.0
    assert r1_penalty(Constant().bias.expand(2) * 2.0, images).item() == 0.0  # logits not connected to the images

    net = ConditionalStyleGAN2Discriminator(image_size=16, num_classes=2, **TINY_D)
    logits = net(diff_augment(images, generator=_seeded(0)), torch.tensor([0, 1]))
    penalty = r1_penalty(logits, images)
    assert penalty.item() > 0
    penalty.backward()  # create_graph: the penalty trains the discriminator
    assert net.from_rgb.weight.grad is not None and net.from_rgb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="real_images"):
        r1_penalty(logits.detach(), images.detach())


def test_nonsaturating_losses_match_softplus():
    fake = torch.tensor([0.0, 2.0, -1.0])
    expected_g = (math.log(2.0) + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 3
    assert generator_nonsaturating_loss(fake).item() == pytest.approx(expected_g, rel=1e-6)
    real, fake = torch.tensor([1.0, -3.0]), torch.tensor([0.5])
    expected_d = math.log1p(math.exp(0.5)) + (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2
    assert discriminator_nonsaturating_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)


def test_diff_augment_shape_and_determinism():
    x = torch.randn(4, 3, 16, 16)
    for policy in ("color", "translation", "cutout", "color,translation,cutout"):
        a = diff_augment(x, policy, generator=_seeded(3))
        assert a.shape == x.shape
        assert torch.equal(a, diff_augment(x, policy, generator=_seeded(3)))
        assert not torch.equal(a, diff_augment(x, policy, generator=_seeded(4)))
    assert torch.equal(diff_augment(x, ""), x)
    cut = diff_augment(x, "cutout", generator=_seeded(0))
    assert ((cut == 0) & (x != 0)).any()
    with pytest.raises(ValueError, match="policy"):
        diff_augment(x, "color,flip")
    xg = x.clone().requires_grad_(True)
    diff_augment(xg, generator=_seeded(0)).square().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]`` inside the image, 0 outside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = x[
        ..., max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


def test_diff_augment_translation_moves_content():
    x = torch.rand(8, 3, 16, 16) + 0.1  # no zeros in the content
    out = diff_augment(x, "translation", generator=_seeded(5))
    moved = 0
    for b in range(8):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out[b], _shift(x[b], dy, dx))]
        assert len(shifts) == 1  # each sample is x shifted by at most 1/8 of the size, zero-filled
        moved += shifts[0] != (0, 0)
    assert moved >= 4


def test_argument_validation():
    with pytest.raises(ValueError, match="image_size"):
        ConditionalStyleGAN2Generator(image_size=12, num_classes=2, **TINY_G)
    with pytest.raises(ValueError, match="image_size"):
        ConditionalStyleGAN2Discriminator(image_size=4, num_classes=2, **TINY_D)
    with pytest.raises(ValueError, match="num_classes"):
        ConditionalStyleGAN2Generator(image_size=16, num_classes=0, **TINY_G)
    with pytest.raises(ValueError, match="channel_base"):
        ConditionalStyleGAN2Discriminator(image_size=16, num_classes=2, channel_base=8)
    net = _generator()
    with pytest.raises(ValueError, match="noise_mode"):
        net(torch.randn(2, Z_DIM), torch.tensor([0, 1]), noise_mode="fixed")
    with pytest.raises(ValueError, match="labels"):
        net(torch.randn(2, Z_DIM), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        net(torch.randn(2, Z_DIM), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="z must"):
        net(torch.randn(2, Z_DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="generator"):
        net(torch.randn(2, Z_DIM), torch.tensor([0, 1]), generator=[_seeded(0)])


def test_optimisation_smoke_step():
    gen = ConditionalStyleGAN2Generator(image_size=16, num_classes=2, **TINY_G)
    disc = ConditionalStyleGAN2Discriminator(image_size=16, num_classes=2, **TINY_D)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.0, 0.99))
    rng = _seeded(0)
    reals, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1])

    # discriminator step: logistic loss + R1 on the (augmented) reals
    d_before = [p.detach().clone() for p in disc.parameters()]
    with torch.no_grad():
        fakes = gen(torch.randn(4, Z_DIM), labels, generator=rng)
    real = reals.detach().requires_grad_(True)
    real_logits = disc(diff_augment(real, generator=rng), labels)
    fake_logits = disc(diff_augment(fakes, generator=rng), labels)
    loss_d = discriminator_nonsaturating_loss(real_logits, fake_logits) + 0.5 * r1_penalty(real_logits, real)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    assert torch.isfinite(loss_d)
    assert all(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))

    # generator step: non-saturating loss through DiffAugment, with the w_avg EMA update
    g_before = [p.detach().clone() for p in gen.parameters()]
    fakes = gen(torch.randn(4, Z_DIM), labels, generator=rng, update_emas=True)
    loss_g = generator_nonsaturating_loss(disc(diff_augment(fakes, generator=rng), labels))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    assert torch.isfinite(loss_g)
    assert all(not torch.equal(a, b) for a, b in zip(g_before, gen.parameters()))
    assert gen.mapping.w_avg.abs().sum() > 0
