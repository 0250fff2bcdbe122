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
"""A class-conditional latent diffusion model and classifier-free guidance (Ho & Salimans 2022).

The second route to class-conditional tiles beside HistoDiffusion's classifier guidance: the pre-trained
unconditional model is fine-tuned at the site with the class as a condition (MONAI ``DiffusionModelUNet``'s class
embedding, one extra *null* class for "no class", which the site's unlabeled tiles and a share of the labeled ones
carry), then sampled with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import DiffusionInferer

__all__ = ["classifier_free_guidance", "class_conditional_output", "ClassConditionalDiffusionInferer"]


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``out = out(z_t, null) + w (out(z_t, y) - out(z_t, null))``.

    ``w = 0`` is the unconditional model, ``w = 1`` the conditional one, ``w > 1`` pushes further towards the class
    (MONAI's ``cfg`` convention). The model outputs may be noise or velocity estimates: both are linear in each other
    at a given ``z_t``, so the combination means the same for either.
    """
    return unconditional + scale * (conditional - unconditional)


def class_conditional_output(
    diffusion_model: Callable[..., torch.Tensor],
    latent: torch.Tensor,
    timesteps: torch.Tensor,
    labels: torch.Tensor,
    null_class: int,
    cfg_scale: float,
) -> torch.Tensor:
    """The class-conditional model's output at ``z_t`` for ``labels`` under classifier-free guidance ``cfg_scale``.

    One forward pass when ``cfg_scale`` is 0 (null class only) or 1 (the labels only), else one pass over the
    conditional and unconditional halves together, combined by :func:`classifier_free_guidance`.

    Args:
        diffusion_model: ``diffusion_model(x, timesteps=..., class_labels=...)``, e.g. MONAI ``DiffusionModelUNet``
            built with ``num_class_embeds``.
        latent: ``z_t``, ``[B, C, *spatial]``.
        timesteps: ``[B]``.
        labels: requested classes, ``[B]``.
        null_class: the class index meaning "no class".
        cfg_scale: ``w``.
    """
    null = torch.full_like(labels, int(null_class))
    if cfg_scale == 0:
        return diffusion_model(latent, timesteps=timesteps, class_labels=null)
    if cfg_scale == 1:
        return diffusion_model(latent, timesteps=timesteps, class_labels=labels)
    both = diffusion_model(torch.cat([latent, latent]), timesteps=torch.cat([timesteps, timesteps]),
                           class_labels=torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return classifier_free_guidance(conditional, unconditional, cfg_scale)


class ClassConditionalDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` for training a class-conditional ``DiffusionModelUNet``: MONAI's passes a
    ``condition`` as cross-attention context only, this one passes ``class_labels`` to the class embedding.

    Used with :class:`~monai_histodiff.engines.prepare_batch.ClassConditionalPrepareBatch`, whose keyword arguments
    (``noise``, ``timesteps``, ``class_labels``) MONAI's ``SupervisedTrainer`` hands to ``__call__``.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: Callable[..., torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's output at ``z_t = add_noise(inputs, noise, timesteps)`` for ``class_labels``."""
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return diffusion_model(x=noisy, timesteps=timesteps, class_labels=class_labels)
