"""Decoder-only conditional fine-tuning of the latent autoencoder (HistoDiffusion, Ye et al. MICCAI 2023, Eq. 5)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.losses import PatchAdversarialLoss
from monai.utils import IgniteInfo, min_version, optional_import

from monai_histodiff.engines.losses import per_element_weight, reconstruction_loss
from monai_histodiff.engines.steps import (
    autocast,
    grad_scaler,
    optimizer_step,
    patch_discriminator_step,
    patch_generator_term,
)
from monai_histodiff.handlers.nan_guard import check_finite

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["DECODER_MODULES", "DecoderFinetuneTrainer", "DecoderView", "decoder_parameters", "freeze_encoder"]

DECODER_MODULES: tuple[str, ...] = ("post_quant_conv", "decoder")
"""Children of :class:`monai.networks.nets.AutoencoderKL` that form the decoder :math:`\\mathcal{D}`; every other child
(``encoder``, ``quant_conv_mu``, ``quant_conv_log_sigma``) belongs to the encoder :math:`\\mathcal{E}`."""


def _check_autoencoder(autoencoder: nn.Module) -> None:
    missing = [n for n in (*DECODER_MODULES, "encoder") if not isinstance(getattr(autoencoder, n, None), nn.Module)]
    missing += [n for n in ("encode", "sampling", "decode") if not callable(getattr(autoencoder, n, None))]
    if missing:
        raise TypeError(
            "autoencoder must be a monai.networks.nets.AutoencoderKL-like module with encode()/sampling()/decode() and "
            f"the children 'encoder', 'post_quant_conv' and 'decoder'; missing: {missing}."
        )


def _encoder_side_modules(autoencoder: nn.Module) -> list[nn.Module]:
    return [m for name, m in autoencoder.named_children() if name not in DECODER_MODULES]


def decoder_parameters(autoencoder: nn.Module) -> list[nn.Parameter]:
    """
    The parameters that decoder fine-tuning trains: those of ``post_quant_conv`` and ``decoder``.

    Build the fine-tuning optimizer on them, e.g. ``torch.optim.Adam(decoder_parameters(ae), lr=1e-4)``.

    Args:
        autoencoder: a :class:`monai.networks.nets.AutoencoderKL`.

    Returns:
        the decoder-side parameters that require a gradient, in module order.
    """
    _check_autoencoder(autoencoder)
    return [p for name in DECODER_MODULES for p in getattr(autoencoder, name).parameters() if p.requires_grad]


def freeze_encoder(autoencoder: nn.Module) -> nn.Module:
    """
    Freeze the encoder :math:`\\mathcal{E}` of an AutoencoderKL so that the latent space stays unchanged (Sec. 2.2).

    Every child except ``post_quant_conv`` and ``decoder`` (i.e. ``encoder``, ``quant_conv_mu`` and
    ``quant_conv_log_sigma``) is put in eval mode and its parameters stop requiring gradients. The decoder side is left
    as it is.

    Args:
        autoencoder: a :class:`monai.networks.nets.AutoencoderKL`, modified in place.

    Returns:
        ``autoencoder``.
    """
    _check_autoencoder(autoencoder)
    for module in _encoder_side_modules(autoencoder):
        module.eval()
        module.requires_grad_(False)
    return autoencoder


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class DecoderFinetuneTrainer(Trainer):
    """
    Ignite trainer for HistoDiffusion's "Conditional Small-scale Fine-tuning" (Sec. 2.2): only the decoder of the
    pre-trained latent autoencoder is trained, on the small labeled set, with

    .. math::
        L_{\\mathcal{D}} = \\mathcal{L}_{rec}(\\hat{x}, x) + \\lambda_{CE} \\mathcal{L}_{CE}(\\varphi(\\hat{x}), y),
        \\qquad \\hat{x} = \\mathcal{D}(\\mathcal{E}(x))   \\quad (5)

    where :math:`\\varphi` is the frozen auxiliary image classifier (e.g.
    :class:`monai_histodiff.networks.HistoImageClassifier`) and :math:`\\mathcal{L}_{rec}` is the pre-training
    reconstruction loss (Eq. 4 without the KL term): pixel-wise L1, plus optionally a weighted perceptual loss and a
    weighted patch-adversarial generator loss (MONAI's :class:`~monai.losses.PatchAdversarialLoss`), the discriminator
    being updated after the decoder at each iteration once adversarial training has started.

    Reductions are those of pre-training (:mod:`monai_histodiff.engines.losses`, one home): the L1 is
    :func:`~monai_histodiff.engines.losses.reconstruction_loss` (summed over the C*H*W elements of a sample, averaged
    over the batch), and every term with one value per sample (perceptual, adversarial, cross-entropy) is added per
    pixel element, i.e. multiplied by ``n = C*H*W``. So :math:`\\lambda_{CE}` weighs a sample's cross-entropy
    against its per-pixel L1: with the paper's :math:`\\lambda_{CE} = 1` a CE of 2.2 (9 classes, chance) counts as
    much as a mean absolute error of 2.2 per pixel. Had the CE been added once to the element-summed L1 instead, it
    would be ``1 / n`` of that (1/196,608 at 256 px) and fine-tuning would ignore the classifier.

    The encoder side (``encoder``, ``quant_conv_mu``, ``quant_conv_log_sigma``) and the classifier are frozen at
    construction (eval mode, ``requires_grad=False``) and kept in eval mode at every iteration: the trainer never
    calls ``train()`` on them, only on ``post_quant_conv``, ``decoder`` and the discriminator. The encoder runs under
    ``no_grad`` and the decoder sees the posterior mean :math:`z_\\mu` (or a posterior sample if
    ``sample_posterior``), so the latent space the diffusion model was trained on is unchanged. Gradients of the CE
    term flow through the frozen classifier into the decoder only.

    Each iteration's ``engine.state.output`` is a dict with ``"image"`` (x), ``"label"`` (y), ``"recon"``
    (:math:`\\mathcal{D}'(\\mathcal{E}(x))`, detached) and the floats ``"loss"`` (:math:`L_{\\mathcal{D}}`),
    ``"rec"`` (the L1 term, summed per sample), ``"ce"`` (unweighted, mean over the batch), ``"lr"`` (learning rate of
    the first parameter group), plus
    ``"perceptual"`` (unweighted) when a perceptual loss is used and ``"adv_g"`` / ``"adv_d"`` (unweighted generator /
    discriminator losses, 0.0 before ``adv_start``) when a discriminator is used; the keys match those of
    :class:`monai_histodiff.engines.autoencoder.AutoencoderKLTrainer`, and
    ``loss = rec + n * (perceptual_weight * perceptual + adv_weight * adv_g + ce_weight * ce)``. A non-finite loss term
    raises :class:`FloatingPointError` naming the term, the iteration and the epoch, before the optimizer step (or, for
    ``adv_d``, the discriminator step) it would corrupt.

    Args:
        device: device to run on.
        max_epochs: number of epochs.
        train_data_loader: loader of labeled batches; with the default ``prepare_batch``, dicts with ``"image"``
            ``[B, C, H, W]`` and ``"label"`` (class indices ``[B]`` or ``[B, 1]``, or class probabilities ``[B, K]``).
        autoencoder: the pre-trained :class:`monai.networks.nets.AutoencoderKL`; its encoder side is frozen here.
        classifier: the auxiliary image classifier :math:`\\varphi` (images -> logits), trained beforehand on the
            labeled set; frozen here.
        optimizer: optimizer of the decoder, built by the caller on :func:`decoder_parameters` (it may hold only
            decoder-side parameters).
        ce_weight: :math:`\\lambda_{CE}`, per pixel element (see above).
        perceptual_loss: optional perceptual loss module ``(recon, image) -> loss``, e.g. MONAI's
            :class:`~monai.losses.PerceptualLoss`; used when ``perceptual_weight > 0``.
        perceptual_weight: weight of the perceptual loss in :math:`\\mathcal{L}_{rec}`, per pixel element.
        discriminator: optional patch discriminator, e.g. MONAI's
            :class:`~monai.networks.nets.PatchDiscriminator` (a list/tuple output uses its last element as logits);
            used when ``adv_weight > 0``.
        d_optimizer: optimizer of the discriminator; required with ``discriminator``.
        adv_weight: weight of the adversarial terms (generator term in :math:`\\mathcal{L}_{rec}`, per pixel element,
            and the discriminator loss, as in MONAI's AutoencoderKL tutorial).
        adv_start: number of iterations without adversarial training: the adversarial terms are used from iteration
            ``adv_start + 1`` on.
        adv_criterion: criterion of the :class:`~monai.losses.PatchAdversarialLoss` (``"least_squares"``, ``"hinge"``
            or ``"bce"``).
        sample_posterior: decode a posterior sample :math:`z_\\mu + \\sigma \\epsilon` instead of the mean.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: passed to ``prepare_batch``.
        train_handlers: handlers with an ``attach`` method (e.g. ``StatsHandler``, ``CheckpointSaver``).
        amp: whether to use ``torch.autocast`` and gradient scaling (CUDA).
        prepare_batch: returns ``(image, label)`` from a batch, see :func:`monai.engines.utils.default_prepare_batch`.
        decollate: whether to decollate the output after each iteration (see :class:`monai.engines.Workflow`).
        to_kwargs: other arguments of ``prepare_batch``'s ``Tensor.to`` call.
        amp_kwargs: arguments of ``torch.autocast``.

    Raises:
        TypeError: when ``autoencoder`` is not AutoencoderKL-like.
        ValueError: when the optimizer holds a non-decoder parameter, a weight is negative or the adversarial
            arguments are inconsistent.

    Example::

        optimizer = torch.optim.Adam(decoder_parameters(autoencoder), lr=1e-4)
        trainer = DecoderFinetuneTrainer(
            device=device, max_epochs=10, train_data_loader=loader, autoencoder=autoencoder,
            classifier=image_classifier, optimizer=optimizer, ce_weight=1.0,
        )
        trainer.run()
    """

    def __init__(
        self,
        *,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        autoencoder: nn.Module,
        classifier: nn.Module,
        optimizer: Optimizer,
        ce_weight: float = 1.0,
        perceptual_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        perceptual_weight: float = 0.0,
        discriminator: nn.Module | None = None,
        d_optimizer: Optimizer | None = None,
        adv_weight: float = 0.0,
        adv_start: int = 0,
        adv_criterion: str = "least_squares",
        sample_posterior: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        decollate: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        _check_autoencoder(autoencoder)
        for name, value in (("ce_weight", ce_weight), ("perceptual_weight", perceptual_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value}.")
        if not math.isfinite(adv_weight) or adv_weight < 0:
            raise ValueError(f"adv_weight must be a finite non-negative number, got {adv_weight}.")
        if adv_start < 0:
            raise ValueError(f"adv_start must be >= 0, got {adv_start}.")
        if (discriminator is None) != (d_optimizer is None):
            raise ValueError("discriminator and d_optimizer must be given together.")
        if perceptual_loss is not None and perceptual_weight == 0:
            warnings.warn("perceptual_loss is given with perceptual_weight=0: the perceptual term is not used.")
        if discriminator is not None and adv_weight == 0:
            warnings.warn("discriminator is given with adv_weight=0: the adversarial terms are not used.")

        freeze_encoder(autoencoder)
        _freeze(classifier)
        trainable = {id(p) for p in decoder_parameters(autoencoder)}
        foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in trainable)
        if foreign:
            raise ValueError(
                f"optimizer holds {foreign} parameter(s) outside the decoder (post_quant_conv, decoder) or frozen; "
                "build it on decoder_parameters(autoencoder) so that the encoder and the latent space stay unchanged."
            )

        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            amp=amp,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.autoencoder = autoencoder
        self.classifier = classifier
        self.optimizer = optimizer
        self.ce_weight = float(ce_weight)
        self.perceptual_loss = perceptual_loss if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.discriminator = discriminator if adv_weight > 0 else None
        self.d_optimizer = d_optimizer if adv_weight > 0 else None
        self.adv_weight = float(adv_weight)
        self.adv_start = int(adv_start)
        self.adv_loss = PatchAdversarialLoss(criterion=adv_criterion)
        self.sample_posterior = sample_posterior
        self.d_scaler: Any = None

    def run(self) -> None:  # type: ignore[override]
        """Run the fine-tuning; like :meth:`monai.engines.Trainer.run`, with a second gradient scaler for the
        discriminator when ``amp``."""
        self.d_scaler = grad_scaler(self.amp) if self.discriminator is not None else None
        super().run()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.state.device, self.amp, **self.amp_kwargs)

    def _set_modes(self) -> None:
        """Decoder side (and discriminator) in train mode; encoder side and classifier stay in eval mode."""
        for name in DECODER_MODULES:
            getattr(self.autoencoder, name).train()
        for module in _encoder_side_modules(self.autoencoder):
            if module.training:
                module.eval()
        if self.classifier.training:
            self.classifier.eval()
        if self.discriminator is not None:
            self.discriminator.train()

    def _iteration(self, engine: DecoderFinetuneTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore
        """
        One fine-tuning iteration: encode (frozen, no grad), decode, Eq. 5 loss, decoder step, then the
        discriminator step when adversarial training is on.

        Args:
            engine: this trainer.
            batchdata: the batch from the data loader.

        Returns:
            the output dict described in the class docstring.

        Raises:
            ValueError: when ``batchdata`` is None or has no labels.
            FloatingPointError: when a loss term is not finite.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or batch[1] is None:
            raise ValueError("DecoderFinetuneTrainer needs labels: the CE term of Eq. 5 is computed against them.")
        images, labels = batch[0], batch[1]
        use_adv = engine.discriminator is not None and engine.state.iteration > engine.adv_start
        engine._set_modes()
        engine.state.output = {"image": images, "label": labels}

        # x_hat = D(E(x)); the encoder is frozen and run without gradient so the latent space is unchanged
        with torch.no_grad(), engine._autocast():
            z_mu, z_sigma = engine.autoencoder.encode(images)
            z = engine.autoencoder.sampling(z_mu, z_sigma) if engine.sample_posterior else z_mu
        with engine._autocast():
            recon = engine.autoencoder.decode(z)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            logits = engine.classifier(recon)

        # L_rec(x_hat, x): L1 (+ w_p * perceptual) (+ w_adv * adversarial generator term), as in pre-training (Eq. 4);
        # the per-sample terms count once per pixel element (n = C*H*W), like the element-summed L1
        terms: dict[str, torch.Tensor] = {"rec": reconstruction_loss(recon, images)}
        loss_rec = terms["rec"]
        if engine.perceptual_loss is not None:
            terms["perceptual"] = engine.perceptual_loss(recon.float(), images.float()).mean()
            loss_rec = loss_rec + per_element_weight(engine.perceptual_weight, images) * terms["perceptual"]
        if engine.discriminator is not None:
            if use_adv:
                terms["adv_g"] = patch_generator_term(engine.discriminator, engine.adv_loss, recon.float(),
                                                      engine._autocast())
                loss_rec = loss_rec + per_element_weight(engine.adv_weight, images) * terms["adv_g"]
            else:
                terms["adv_g"] = recon.new_zeros(())
        # L_CE(phi(x_hat), y) through the frozen auxiliary classifier
        loss_ce = terms["ce"] = F.cross_entropy(logits.float(), _class_targets(labels, logits))
        # Eq. 5: L_D = L_rec + lambda_CE * L_CE, the CE per pixel element like the other per-sample terms
        loss = loss_rec + per_element_weight(engine.ce_weight, images) * loss_ce
        values = check_finite(terms, "finetune", engine.state.iteration, engine.state.epoch)
        values["loss"] = float(loss.detach().item())
        engine.state.output["recon"] = recon.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        optimizer_step(loss, engine.optimizer, engine.scaler,
                       on_backward=lambda: engine.fire_event(IterationEvents.BACKWARD_COMPLETED))

        if engine.discriminator is not None:
            values["adv_d"] = patch_discriminator_step(
                engine.discriminator, engine.d_optimizer, engine.adv_loss, real=images.float(), fake=recon.float(),
                weight=engine.adv_weight, amp_context=engine._autocast(), scaler=engine.d_scaler, stage="finetune",
                iteration=engine.state.iteration) if use_adv else 0.0

        engine.state.output.update(values)
        engine.state.output["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _class_targets(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets: class indices ``[B]`` (from ``[B]`` or ``[B, 1]``) or class probabilities ``[B, K]``."""
    if labels.shape == logits.shape and labels.is_floating_point() and logits.shape[1] > 1:
        return labels.float()
    if labels.numel() != logits.shape[0]:
        raise ValueError(
            f"labels must be class indices of shape [B] or [B, 1] or probabilities [B, K] with B={logits.shape[0]}, "
            f"K={logits.shape[1]}; got shape {tuple(labels.shape)}."
        )
    return labels.reshape(-1).long()


class DecoderView:
    """The decoder side of an ``AutoencoderKL`` as a checkpointable object: ``state_dict()`` holds only the
    ``post_quant_conv.*`` and ``decoder.*`` entries, so the fine-tuned D' is saved as its own small checkpoint and the
    pre-trained autoencoder file is never modified. ``load_state_dict`` puts those entries back (used on resume)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        self.autoencoder = autoencoder.module if hasattr(autoencoder, "module") else autoencoder

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.autoencoder.state_dict().items() if k.split(".", 1)[0] in DECODER_MODULES}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = [k for k in state if k.split(".", 1)[0] not in DECODER_MODULES]
        if unexpected:
            raise KeyError(f"not decoder weights: {unexpected[:3]}")
        self.autoencoder.load_state_dict(state, strict=False)
