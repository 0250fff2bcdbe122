# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""``prepare_batch`` callables for MONAI's ``SupervisedTrainer`` that train on autoencoder latents.

- :class:`LatentDiffusionPrepareBatch`: stage 1, the unconditional latent diffusion model, with MONAI's
  :class:`~monai.inferers.DiffusionInferer` (the latents are made here, so the inferer need not encode).
- :class:`ClassConditionalPrepareBatch`: the same with the class as a condition (stage ``finetune_conditional``,
  the classifier-free guidance route), with :class:`~monai_histodiff.inferers.ClassConditionalDiffusionInferer`.
- :class:`NoisyLatentClassificationPrepareBatch`: stage 2, the time-dependent latent classifier
  ``phi(z_t, t)`` trained with cross-entropy on noisy latents (HistoDiffusion Eq. 6).

Both read either cached posteriors (``"latent_mu"`` / ``"latent_sigma"`` batches of
:class:`~monai_histodiff.engines.latent_cache.CachedLatentDataset`, one reparameterised sample per step) or images
(``"image"``, encoded by ``autoencoder.encode_stage_2_inputs`` under ``no_grad``, MONAI's stock behaviour). The two
give latents of the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.nn as nn
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from monai.networks.schedulers import Scheduler

from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.engines.latent_cache import LATENT_MU_KEY, LATENT_SIGMA_KEY

__all__ = [
    "ScaleFactor",
    "resolve_scale_factor",
    "sample_latents",
    "scaled_latents",
    "LatentDiffusionPrepareBatch",
    "ClassConditionalPrepareBatch",
    "NoisyLatentClassificationPrepareBatch",
]

#: a latent scale factor: a number, a zero-argument callable returning one, or an object with a ``.value``.
ScaleFactor = Union[float, int, torch.Tensor, Callable[[], float], Any]


def resolve_scale_factor(scale_factor: ScaleFactor) -> float:
    """Return the current value of a scale factor given as a number, a zero-arg callable or an object with ``.value``.

    The late-bound forms let a bundle config compute the factor at run time (e.g. with
    :func:`~monai_histodiff.engines.scale_factor.compute_scale_factor` in a handler) after the prepare-batch object is
    built; the value is read on every call.
    """
    if isinstance(scale_factor, (int, float)):
        return float(scale_factor)
    if isinstance(scale_factor, torch.Tensor):
        return float(scale_factor.item())
    if hasattr(scale_factor, "value"):
        return float(scale_factor.value)
    if callable(scale_factor):
        return float(scale_factor())
    raise TypeError(f"scale_factor must be a number, a callable or have a .value, got {type(scale_factor)}")


def sample_latents(
    batchdata: Mapping[str, Any],
    autoencoder: nn.Module | None = None,
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    image_key: str = "image",
    **kwargs: Any,
) -> torch.Tensor:
    """Draw one latent ``z ~ q(z|x)`` per item of a batch, unscaled, on ``device``.

    With ``"latent_mu"`` and ``"latent_sigma"`` in the batch (cached path) ``z = mu + sigma * eps``, a fresh
    ``eps ~ N(0, I)`` per call; otherwise ``z = autoencoder.encode_stage_2_inputs(batch[image_key])`` under
    ``no_grad`` (the same sampling, done by the encoder). The autoencoder should be frozen and in eval mode.

    Args:
        batchdata: dict batch holding either the cached posterior or the images.
        autoencoder: first-stage model (needed for image batches only); DDP wrappers are unwrapped.
        device: device of the returned latents.
        non_blocking: passed to ``Tensor.to``.
        image_key: key of the images.
        kwargs: further arguments of ``Tensor.to``.
    """
    if not isinstance(batchdata, Mapping):
        raise TypeError(f"expected a dict batch with {LATENT_MU_KEY!r}/{LATENT_SIGMA_KEY!r} or {image_key!r}")
    if LATENT_MU_KEY in batchdata and LATENT_SIGMA_KEY in batchdata:
        mu = torch.as_tensor(batchdata[LATENT_MU_KEY]).to(device=device, non_blocking=non_blocking, **kwargs)
        sigma = torch.as_tensor(batchdata[LATENT_SIGMA_KEY]).to(device=device, non_blocking=non_blocking, **kwargs)
        return mu.float() + sigma.float() * torch.randn_like(sigma, dtype=torch.float32)
    if image_key in batchdata:
        if autoencoder is None:
            raise ValueError(f"the batch holds images ({image_key!r}) but no autoencoder was given to encode them")
        images = torch.as_tensor(batchdata[image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        with torch.no_grad():
            z = unwrap_model(autoencoder).encode_stage_2_inputs(images)
        return z.float()
    raise KeyError(
        f"batch has neither {LATENT_MU_KEY!r}/{LATENT_SIGMA_KEY!r} (cached latents) nor {image_key!r} (images); "
        f"keys: {sorted(map(str, batchdata.keys()))}"
    )


def scaled_latents(
    batchdata: Mapping[str, Any],
    autoencoder: nn.Module | None,
    scale_factor: ScaleFactor,
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    image_key: str = "image",
    **kwargs: Any,
) -> torch.Tensor:
    """``scale_factor * z`` with ``z ~ q(z|x)`` from :func:`sample_latents`: the z_0 both training stages start from."""
    z = sample_latents(batchdata, autoencoder, device, non_blocking, image_key, **kwargs)
    return z * resolve_scale_factor(scale_factor)


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """
    ``prepare_batch`` for training a latent diffusion model with MONAI's ``SupervisedTrainer`` and
    :class:`~monai.inferers.DiffusionInferer` (not ``LatentDiffusionInferer``: the latents are made here).

    Returns what :class:`~monai.engines.utils.DiffusionPrepareBatch` returns, ``(inputs, target, (), kwargs)`` with
    ``kwargs = {"noise": eps, "timesteps": t[, "condition": c]}`` and ``target = eps``, where
    ``inputs = scale_factor * z`` and ``z`` is one sample of the posterior per item and step (see
    :func:`sample_latents`), so the noise is latent-shaped. Timesteps are uniform over ``0 .. T-1``. With a
    ``scheduler`` whose ``prediction_type`` is ``"v_prediction"`` the target is the velocity
    ``sqrt(abar_t) eps - sqrt(1 - abar_t) z_0`` (as MONAI's ``VPredictionPrepareBatch``), with ``"sample"`` it is
    ``z_0``: the network learns what the scheduler will read its output as.

    Example::

        trainer = SupervisedTrainer(
            device=device, max_epochs=n, train_data_loader=DataLoader(cache.dataset(), batch_size=8, shuffle=True),
            network=unet, optimizer=opt, loss_function=torch.nn.MSELoss(),
            inferer=DiffusionInferer(scheduler),
            prepare_batch=LatentDiffusionPrepareBatch(scheduler.num_train_timesteps, scale_factor=sf),
        )

    Args:
        num_train_timesteps: number of diffusion training timesteps ``T``.
        scale_factor: latent scale (``1 / std`` of the latents, see
            :func:`~monai_histodiff.engines.scale_factor.compute_scale_factor`): a number, a zero-arg callable or an
            object with ``.value``, read on every call.
        autoencoder: first-stage model, needed only when batches hold images rather than cached posteriors.
        image_key: key of the images in image batches.
        condition_name: optional batch key passed to the inferer as ``condition`` (as in ``DiffusionPrepareBatch``).
        scheduler: the training noise scheduler; its ``prediction_type`` sets the target (None: ``epsilon``).
    """

    def __init__(
        self,
        num_train_timesteps: int,
        scale_factor: ScaleFactor = 1.0,
        autoencoder: nn.Module | None = None,
        image_key: str = "image",
        condition_name: str | None = None,
        scheduler: Any = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.scale_factor = scale_factor
        self.autoencoder = autoencoder
        self.image_key = image_key
        self.scheduler = scheduler
        kind = getattr(scheduler, "prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {kind!r}")
        self.prediction_type = kind

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output for ``z_t = add_noise(images, noise, timesteps)``."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return images if self.prediction_type == "sample" else noise

    def get_latents(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None, non_blocking: bool, **kwargs: Any
    ) -> torch.Tensor:
        """Scaled latents ``scale_factor * z`` of the batch."""
        return scaled_latents(batchdata, self.autoencoder, self.scale_factor, device, non_blocking, self.image_key,
                              **kwargs)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        latents = self.get_latents(batchdata, device, non_blocking, **kwargs)
        inner: dict[str, Any] = {"image": latents}
        if self.condition_name is not None:
            inner[self.condition_name] = batchdata[self.condition_name]
        return super().__call__(inner, device, non_blocking, **kwargs)


class ClassConditionalPrepareBatch(LatentDiffusionPrepareBatch):
    """
    ``prepare_batch`` for fine-tuning a class-conditional latent diffusion model for classifier-free guidance
    (Ho & Salimans 2022), with :class:`~monai_histodiff.inferers.ClassConditionalDiffusionInferer`.

    As :class:`LatentDiffusionPrepareBatch`, plus ``kwargs["class_labels"]``: each item's class from ``label_key``,
    where items without a class (the site's unlabeled tiles) carry ``null_class``, and each labeled item's class is
    replaced by ``null_class`` with probability ``p_uncond`` (the unconditional model is learnt beside the
    conditional one, which classifier-free guidance needs).

    Args:
        num_train_timesteps, scale_factor, autoencoder, image_key, scheduler: as :class:`LatentDiffusionPrepareBatch`.
        null_class: the "no class" index (the number of classes).
        p_uncond: probability of dropping a labeled item's class.
        label_key: key of the class indices in the batch (``null_class`` for unlabeled items).
    """

    def __init__(
        self,
        num_train_timesteps: int,
        null_class: int,
        p_uncond: float = 0.1,
        scale_factor: ScaleFactor = 1.0,
        autoencoder: nn.Module | None = None,
        image_key: str = "image",
        scheduler: Any = None,
        label_key: str = "label",
    ) -> None:
        super().__init__(num_train_timesteps, scale_factor=scale_factor, autoencoder=autoencoder, image_key=image_key,
                         scheduler=scheduler)
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.null_class = int(null_class)
        self.p_uncond = float(p_uncond)
        self.label_key = label_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if self.label_key not in batchdata:
            raise KeyError(f"batch has no classes under {self.label_key!r}; keys: {sorted(map(str, batchdata))}")
        inputs, target, args, kw = super().__call__(batchdata, device, non_blocking, **kwargs)
        labels = torch.as_tensor(batchdata[self.label_key]).reshape(-1).long().to(device=inputs.device)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ValueError(f"class indices must be in [0, {self.null_class}] (null class {self.null_class}), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
        kw["class_labels"] = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return inputs, target, args, kw


class NoisyLatentClassificationPrepareBatch(PrepareBatch):
    """
    ``prepare_batch`` for training the time-dependent latent classifier ``phi(z_t, t)`` of HistoDiffusion (Eq. 6)
    with MONAI's ``SupervisedTrainer`` (default ``SimpleInferer``) and a cross-entropy loss.

    Per step: ``z_0 = scale_factor * z`` (posterior sample, see :func:`sample_latents`), ``t ~ U{0, ..., T-1}``
    (or ``fixed_timesteps``), ``eps ~ N(0, I)`` and ``z_t = scheduler.add_noise(z_0, eps, t)``. It returns
    ``(z_t, labels, (t,), {})``; ``SupervisedTrainer`` then calls ``inferer(z_t, network, t)``, which
    ``SimpleInferer`` turns into ``network(z_t, t)``, and ``loss_function(logits, labels)``.

    Args:
        scheduler: the diffusion model's noise scheduler (its ``add_noise`` defines ``q(z_t | z_0)``).
        scale_factor: the diffusion model's latent scale (number, zero-arg callable or object with ``.value``).
        autoencoder: first-stage model, needed only when batches hold images.
        num_train_timesteps: ``T``; default ``scheduler.num_train_timesteps``.
        label_key: key of the class indices.
        image_key: key of the images in image batches.
        fixed_timesteps: when set, every item uses this timestep (an evaluator measuring accuracy at one noise level).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        scale_factor: ScaleFactor = 1.0,
        autoencoder: nn.Module | None = None,
        num_train_timesteps: int | None = None,
        label_key: str = "label",
        image_key: str = "image",
        fixed_timesteps: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.scale_factor = scale_factor
        self.autoencoder = autoencoder
        self.num_train_timesteps = int(
            num_train_timesteps if num_train_timesteps is not None else scheduler.num_train_timesteps
        )
        if fixed_timesteps is not None and not 0 <= fixed_timesteps < self.num_train_timesteps:
            raise ValueError(f"fixed_timesteps must be in [0, {self.num_train_timesteps}), got {fixed_timesteps}")
        self.label_key = label_key
        self.image_key = image_key
        self.fixed_timesteps = fixed_timesteps

    def get_timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        """One timestep per item: ``fixed_timesteps`` if set, else uniform over ``0 .. T-1``."""
        n = latents.shape[0]
        if self.fixed_timesteps is not None:
            return torch.full((n,), self.fixed_timesteps, dtype=torch.long, device=latents.device)
        return torch.randint(0, self.num_train_timesteps, (n,), device=latents.device).long()

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        z0 = scaled_latents(batchdata, self.autoencoder, self.scale_factor, device, non_blocking, self.image_key,
                            **kwargs)
        timesteps = self.get_timesteps(z0)
        noise = torch.randn_like(z0)
        z_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        if self.label_key not in batchdata:
            raise KeyError(f"batch has no labels under {self.label_key!r}; keys: {sorted(map(str, batchdata))}")
        labels = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if labels.ndim > 1 and labels.numel() == z0.shape[0]:
            labels = labels.reshape(-1)
        return z_t, labels.long(), (timesteps,), {}
