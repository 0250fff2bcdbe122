"""
The optimisation steps the adversarial trainers share: the autoencoder's pre-training
(:class:`~monai_histodiff.engines.autoencoder.AutoencoderKLTrainer`), the decoder's fine-tuning
(:class:`~monai_histodiff.engines.decoder_finetune.DecoderFinetuneTrainer`) and the StyleGAN2 baseline
(:class:`~monai_histodiff.engines.stylegan2.StyleGAN2Trainer`): mixed precision, one optimizer step with its gradient
scaler, and the patch discriminator's terms. Each trainer keeps only its own losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from monai_histodiff.handlers.nan_guard import check_finite

__all__ = ["autocast", "grad_scaler", "optimizer_step", "patch_generator_term", "patch_discriminator_step"]


def autocast(device: str | torch.device, amp: bool, **amp_kwargs: Any) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type when ``amp``, else a no-op context (losses are then taken in float32)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, **amp_kwargs)


def grad_scaler(amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler for a second optimizer (the trainer's own is ``engine.scaler``); a no-op unless ``amp`` on
    CUDA (bf16 autocast on CPU needs no scaling)."""
    return torch.amp.GradScaler("cuda", enabled=amp and torch.cuda.is_available())


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None,
                   on_backward: Callable[[], None] | None = None) -> None:
    """Zero the gradients, back-propagate ``loss`` (scaled when ``scaler`` is an enabled ``GradScaler``), call
    ``on_backward`` (e.g. fire ignite's ``BACKWARD_COMPLETED``) and step ``optimizer``."""
    optimizer.zero_grad(set_to_none=True)
    scaled = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaled else loss).backward()
    if on_backward is not None:
        on_backward()
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _last(logits: Any) -> torch.Tensor:
    """MONAI's ``PatchDiscriminator`` returns every layer's output; the last one is the patch logits."""
    return logits[-1] if isinstance(logits, (list, tuple)) else logits


def patch_generator_term(discriminator: torch.nn.Module, adv_loss: Callable, fake: torch.Tensor,
                         amp_context: contextlib.AbstractContextManager) -> torch.Tensor:
    """The generator's adversarial term: the discriminator's patch logits on ``fake`` judged as real."""
    with amp_context:
        logits = _last(discriminator(fake.contiguous()))
    return adv_loss(logits.float(), target_is_real=True, for_discriminator=False)


def patch_discriminator_step(discriminator: torch.nn.Module, optimizer: torch.optim.Optimizer, adv_loss: Callable,
                             real: torch.Tensor, fake: torch.Tensor, weight: float,
                             amp_context: contextlib.AbstractContextManager, scaler: Any, stage: str,
                             iteration: int) -> float:
    """
    One step of the patch discriminator on ``real`` against the detached ``fake``: one forward over both (so that
    under DDP each backward follows one forward), loss ``0.5 * (fake as fake + real as real)``, weighted by
    ``weight``. A non-finite loss stops the run before the step (``FloatingPointError`` naming ``stage``).

    Returns:
        the unweighted discriminator loss.
    """
    with amp_context:
        logits_fake, logits_real = _last(discriminator(torch.cat([fake.detach(), real.detach()]).contiguous())).chunk(2)
    d_loss = 0.5 * (adv_loss(logits_fake.float(), target_is_real=False, for_discriminator=True)
                    + adv_loss(logits_real.float(), target_is_real=True, for_discriminator=True))
    value = check_finite({"adv_d": d_loss}, stage, iteration)["adv_d"]
    optimizer_step(weight * d_loss, optimizer, scaler)
    return value
