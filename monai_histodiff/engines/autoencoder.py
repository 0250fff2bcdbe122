"""Ignite engine for KL-autoencoder pre-training (paper Eq. 4): L1 + lambda_KL * KL + perceptual + patch adversarial,
with LDM's reductions (see :mod:`monai_histodiff.engines.losses`).

The generator (MONAI ``AutoencoderKL``) and the discriminator (MONAI ``PatchDiscriminator``) are optimised in the
same iteration; the adversarial terms start after ``adv_start`` iterations, as in the LDM recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.losses import PatchAdversarialLoss
from monai.utils import min_version, optional_import

from monai_histodiff.engines.losses import kl_divergence, per_element_weight, reconstruction_loss
from monai_histodiff.engines.steps import (
    autocast,
    grad_scaler,
    optimizer_step,
    patch_discriminator_step,
    patch_generator_term,
)
from monai_histodiff.handlers.nan_guard import check_finite

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["AutoencoderKLTrainer"]


class AutoencoderKLTrainer(Trainer):
    """Train an ``AutoencoderKL`` with L_LAE = L_rec(x_hat, x) + lambda_KL * D_KL(q(z) || N(0, I)) (paper Eq. 4).

    As in LDM, L1 and KL are summed over the elements of a sample and averaged over the batch (``reconstruction_loss``
    and ``kl_divergence`` of :mod:`monai_histodiff.engines.losses`),
    which is what makes lambda_KL = 1e-6 a slight penalty. The perceptual and adversarial terms (one value per sample
    or batch) are added per pixel element, ``loss = rec + kl_weight * kl + n * (perceptual_weight * perceptual +
    adv_weight * adv_g)`` with ``n = C*H*W``: their weights are relative to the per-pixel L1 (LDM adds its
    perceptual loss to every pixel the same way; LDM weighs the adversarial term adaptively instead, here the weight
    is fixed). The discriminator is updated in the same iteration with the least-squares patch GAN loss. The output
    carries the unweighted terms ``rec`` and ``kl`` (per-sample sums), ``perceptual``, ``adv_g``, ``adv_d`` (means).

    Args:
        device: device of the run.
        max_epochs: epochs to train.
        train_data_loader: batches of ``{"image": [B, 3, H, W]}`` in [-1, 1].
        autoencoder: MONAI ``AutoencoderKL`` (possibly DDP-wrapped).
        g_optimizer: optimizer of the autoencoder.
        discriminator: MONAI ``PatchDiscriminator`` or None (no adversarial term).
        d_optimizer: optimizer of the discriminator.
        kl_weight: lambda_KL (paper: 1e-6), against the per-sample sum of the L1.
        perceptual_loss: a loss module ``(recon, x) -> scalar`` or None.
        perceptual_weight: its weight per pixel element, relative to the per-pixel L1 (LDM: 1.0).
        adv_weight: weight of the generator's adversarial term per pixel element, relative to the per-pixel L1 (it
            also scales the discriminator's loss).
        adv_start: iteration from which the adversarial terms are used.
        epoch_length: iterations per epoch (default: the loader's length).
        train_handlers: ignite handlers (stats, checkpoints, grids...).
        amp: mixed precision on CUDA (autocast + GradScaler).
        prepare_batch: MONAI prepare-batch callable.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        autoencoder: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        kl_weight: float = 1e-6,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        adv_weight: float = 0.01,
        adv_start: int = 0,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = default_prepare_batch,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
        )
        if discriminator is not None and d_optimizer is None:
            raise ValueError("a discriminator needs d_optimizer")
        self.autoencoder = autoencoder
        self.g_optimizer = g_optimizer
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.kl_weight = kl_weight
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.adv_weight = adv_weight
        self.adv_start = adv_start
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.d_scaler = grad_scaler(self.amp)

    def _autocast(self):
        return autocast(self.state.device, self.amp)

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        x, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        self.autoencoder.train()
        use_adv = self.discriminator is not None and engine.state.iteration > self.adv_start
        with self._autocast():
            recon, z_mu, z_sigma = self.autoencoder(x)
        recon = recon.float()
        terms = {"rec": reconstruction_loss(recon, x), "kl": kl_divergence(z_mu.float(), z_sigma.float())}
        loss = terms["rec"] + self.kl_weight * terms["kl"]
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            terms["perceptual"] = self.perceptual_loss(recon, x)
            loss = loss + per_element_weight(self.perceptual_weight, x) * terms["perceptual"]
        if use_adv:
            self.discriminator.train()
            terms["adv_g"] = patch_generator_term(self.discriminator, self.adv_loss, recon, self._autocast())
            loss = loss + per_element_weight(self.adv_weight, x) * terms["adv_g"]
        values = check_finite({"loss": loss, **terms}, "pretrain_autoencoder", engine.state.iteration)
        optimizer_step(loss, self.g_optimizer, engine.scaler)

        if use_adv:
            values["adv_d"] = patch_discriminator_step(
                self.discriminator, self.d_optimizer, self.adv_loss, real=x, fake=recon, weight=self.adv_weight,
                amp_context=self._autocast(), scaler=self.d_scaler, stage="pretrain_autoencoder",
                iteration=engine.state.iteration)

        out: dict[str, Any] = {"image": x.detach(), "recon": recon.detach(), **values}
        out["lr"] = self.g_optimizer.param_groups[0]["lr"]
        return out
