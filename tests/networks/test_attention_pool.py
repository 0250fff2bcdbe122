"""Tests of the CLIP-style attention pooling used by HistoDiffusion's classifiers."""

from __future__ import annotations

import pytest
import torch

from monai_histodiff.networks import AttentionPool2d


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("size,embed_dim,num_heads,output_dim", [(4, 32, 4, 2), (8, 64, 8, 9), ((4, 6), 16, 2, 5)])
def test_output_shapes(size, embed_dim, num_heads, output_dim):
    pool = AttentionPool2d(spatial_size=size, embed_dim=embed_dim, num_heads=num_heads, output_dim=output_dim)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, embed_dim, h, w)
    assert pool.positional_embedding.shape == (h * w + 1, embed_dim)
    assert pool(x).shape == (3, output_dim)
    assert pool.forward_features(x).shape == (3, embed_dim)


def test_output_dim_defaults_to_embed_dim():
    pool = AttentionPool2d(spatial_size=4, embed_dim=16, num_heads=2)
    assert pool(torch.randn(2, 16, 4, 4)).shape == (2, 16)


def test_forward_is_projection_of_features():
    pool = AttentionPool2d(spatial_size=4, embed_dim=16, num_heads=2, output_dim=3)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(pool(x), pool.c_proj(pool.forward_features(x)))


def test_positional_embedding_interpolation():
    pool = AttentionPool2d(spatial_size=8, embed_dim=16, num_heads=4, output_dim=3)
    assert pool.get_positional_embedding((8, 8)) is pool.positional_embedding
    for h, w in [(4, 4), (16, 16), (6, 10)]:
        pos = pool.get_positional_embedding((h, w))
        assert pos.shape == (h * w + 1, 16)
        torch.testing.assert_close(pos[0], pool.positional_embedding[0])  # mean-token entry kept
        assert pool(torch.randn(2, 16, h, w)).shape == (2, 3)
    # a constant grid stays constant under resampling
    with torch.no_grad():
        pool.positional_embedding[1:] = 0.5
    torch.testing.assert_close(pool.get_positional_embedding((13, 13))[1:], torch.full((169, 16), 0.5))
    assert pool.positional_embedding.shape == (65, 16)  # stored parameter untouched


def test_pooling_is_permutation_invariant_without_positional_embedding():
    pool = AttentionPool2d(spatial_size=4, embed_dim=16, num_heads=2, output_dim=3)
    with torch.no_grad():
        pool.positional_embedding.zero_()
    x = torch.randn(2, 16, 4, 4)
    perm = torch.randperm(16)
    x_perm = x.flatten(2)[:, :, perm].reshape_as(x)
    torch.testing.assert_close(pool(x), pool(x_perm), rtol=1e-5, atol=1e-5)


def test_gradient_wrt_input():
    pool = AttentionPool2d(spatial_size=4, embed_dim=16, num_heads=2, output_dim=3)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(pool(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"spatial_size": 4, "embed_dim": 10, "num_heads": 4}, {"spatial_size": 0, "embed_dim": 8, "num_heads": 2}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        AttentionPool2d(**kwargs)


def test_invalid_input_shape():
    pool = AttentionPool2d(spatial_size=4, embed_dim=16, num_heads=2)
    with pytest.raises(ValueError):
        pool(torch.randn(2, 8, 4, 4))
