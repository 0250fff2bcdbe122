"""Tiny real MONAI networks shared by the unit tests (seeded, CPU, milliseconds per call)."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

__all__ = ["tiny_autoencoder", "tiny_unet"]


def tiny_autoencoder(seed: int | None = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with channels (8, 16), 3 latent channels, f = 2, in eval mode (seeded unless None)."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16), latent_channels=3,
                         num_res_blocks=1, norm_num_groups=8, attention_levels=(False, False)).eval()


def tiny_unet() -> DiffusionModelUNet:
    """A ``DiffusionModelUNet`` on 3-channel latents with channels (8, 16), no attention (unseeded)."""
    return DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
