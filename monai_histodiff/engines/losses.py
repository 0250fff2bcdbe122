"""Loss pieces shared by autoencoder pre-training and decoder fine-tuning (paper Eq. 4 and 5).

Reductions follow LDM (``LPIPSWithDiscriminator``, whose settings the paper's lambda_KL = 1e-6 comes from): the
reconstruction and the KL terms are each summed over the elements of a sample (pixels x channels, latent elements)
and averaged over the batch. Only then is lambda_KL = 1e-6 "a slight KL-penalty": against a per-pixel mean L1 the same
lambda would weigh the KL C*H*W times more (about 2e5 times at 256 px). Terms with one value per sample (perceptual,
adversarial, cross-entropy) enter the loss per pixel element, as LDM adds its per-sample perceptual loss to every
pixel's L1: ``per_element_weight(w, x) * term`` = ``w * C*H*W * term``, so their weights keep meaning "relative to
the per-pixel L1".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["reconstruction_loss", "kl_divergence", "per_element_weight", "build_perceptual_loss", "diffusion_loss"]


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pixel-wise L1 of Eq. 4 and 5: ``|x_hat - x|`` summed over the elements of each sample (C x H x W), averaged
    over the batch (LDM's ``nll_loss`` with ``logvar = 0``). The one reconstruction term of pre-training and
    fine-tuning."""
    return (recon.float() - x.float()).abs().flatten(1).sum(1).mean()


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent elements, averaged over the batch (the D_KL of Eq. 4; LDM's
    ``sum(posterior.kl()) / batch``)."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def per_element_weight(weight: float, x: torch.Tensor) -> float:
    """``weight * C*H*W`` of a batch ``x`` ``[B, C, H, W]``: the factor of a per-sample term (perceptual, adversarial,
    cross-entropy) that weighs it ``weight`` times per pixel element against :func:`reconstruction_loss`."""
    return float(weight) * x[0].numel()


def build_perceptual_loss(weight: float = 0.0, network_type: str = "resnet50", weights_path: str | None = None,
                          cache_dir: str | None = None) -> torch.nn.Module | None:
    """MONAI ``PerceptualLoss`` from local weights, or None when ``weight`` is 0 (the default).

    Nothing is downloaded at run time: ``resnet50`` needs ``perceptual_weights_path`` (a torchvision ResNet-50
    state dict on disk, and torchvision installed); ``radimagenet_resnet50`` needs ``perceptual_cache_dir`` holding
    MONAI's torch-hub cache of it.
    """
    if not weight:
        return None
    from monai.losses import PerceptualLoss

    if network_type == "resnet50":
        if not weights_path or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"perceptual_weight={weight} needs local network weights: set perceptual_weights_path to a "
                f"torchvision ResNet-50 state dict file (got {weights_path!r}); nothing is downloaded at run time"
            )
        return PerceptualLoss(spatial_dims=2, network_type="resnet50", pretrained=True, pretrained_path=weights_path)
    if network_type.startswith("radimagenet_"):
        if not cache_dir or not Path(cache_dir).is_dir():
            raise FileNotFoundError(
                f"perceptual_weight={weight} with {network_type} needs perceptual_cache_dir pointing at a torch-hub "
                f"cache that already holds the model (got {cache_dir!r}); nothing is downloaded at run time"
            )
        os.environ.setdefault("TORCH_HOME", str(cache_dir))
        return PerceptualLoss(spatial_dims=2, network_type=network_type, cache_dir=cache_dir)
    raise ValueError(f"perceptual_network {network_type!r} is not supported offline: use 'resnet50' with "
                     f"perceptual_weights_path, or 'radimagenet_resnet50' with perceptual_cache_dir")


def diffusion_loss(kind: str = "l2") -> torch.nn.Module:
    """Noise-prediction loss of Eq. 3: ``"l2"`` (mean squared error, the paper) or ``"l1"`` (the official code)."""
    if kind == "l2":
        return torch.nn.MSELoss()
    if kind == "l1":
        return torch.nn.L1Loss()
    raise ValueError(f"diffusion loss must be 'l2' or 'l1', got {kind!r}")
