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
"""Classifier-guided sampling of a latent diffusion model (HistoDiffusion, Ye et al. MICCAI 2023, Eq. 7-8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from monai.data import decollate_batch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import Scheduler
from monai.utils import optional_import

from monai_histodiff.inferers.class_conditional import class_conditional_output
from monai_histodiff.schedulers.respaced import RespacedDDIMScheduler, respace_scheduler

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["ClassifierGuidedLatentDiffusionInferer"]


class ClassifierGuidedLatentDiffusionInferer(LatentDiffusionInferer):
    """
    Latent diffusion inferer that samples class-conditional latents from an unconditional diffusion model with the
    gradient of a noisy-latent classifier ``p_phi(y | z_t)`` (classifier guidance, Dhariwal & Nichol 2021), as
    HistoDiffusion does, then decodes them with the first-stage model.

    MONAI's ``LatentDiffusionInferer.sample`` runs entirely under ``no_grad`` and has no hook to change a step, so
    guidance needs its own loop. Stepping is done by the respaced schedulers of :mod:`monai_histodiff.schedulers`,
    which are correct for any number of inference steps; a plain MONAI ``DDPMScheduler`` / ``DDIMScheduler`` is
    converted with :func:`~monai_histodiff.schedulers.respace_scheduler` (same betas, options and the ``timesteps``
    it has after ``set_timesteps``). With ``n == T`` steps and ``guidance_scale=0`` the result equals MONAI's own
    ``LatentDiffusionInferer.sample``.

    A class-conditional diffusion model (stage ``finetune_conditional``) is sampled with classifier-free guidance
    (``cfg_scale``, ``null_class``), alone (``guidance_scale=0``, no classifier needed) or with classifier guidance.

    Training (``__call__``) is inherited unchanged from ``LatentDiffusionInferer``.

    Args:
        scheduler: default scheduler (DDPM or DDIM, plain or respaced) used when ``sample`` gets none.
        scale_factor: the latents are ``scale_factor * encoder output``; samples are divided by it before decoding.
        ldm_latent_shape: spatial shape of the diffusion model's latents, if it differs from the autoencoder's.
        autoencoder_latent_shape: spatial shape of the autoencoder's latents (latents are center-cropped to it
            before decoding).
    """

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        autoencoder_model: torch.nn.Module,
        diffusion_model: Callable[..., torch.Tensor],
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        labels: torch.Tensor,
        scheduler: Scheduler | None = None,
        guidance_scale: float = 1.0,
        guidance_window: tuple[int, int] | None = None,
        classifier_batch_size: int | None = None,
        eta: float = 0.0,
        guidance_interval: int = 1,
        verbose: bool = True,
        generator: torch.Generator | None = None,
        return_latents: bool = False,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        trace: list[dict[str, float]] | None = None,
        cfg_scale: float | None = None,
        null_class: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Sample latents of the requested classes and decode them.

        Each step evaluates the diffusion model at the visited timestep ``t`` (under ``no_grad``, optionally with
        AMP) and, where guidance is on, the float32 gradient ``grad = d/dz_t log p_phi(y | z_t)``; then

        - DDPM (paper Eq. 7-8): ``mu_hat = mu + g * Sigma * grad``, ``z_s = mu_hat + sqrt(Sigma) * noise`` (no noise
          on the last step);
        - DDIM: ``eps_hat = eps - sqrt(1 - abar_t) * g * grad``, then the DDIM update with ``eps_hat`` from ``abar_t``
          to ``abar_s``, ``s`` being the next visited timestep.

        Args:
            input_noise: ``z_T``, random noise of the shape of the diffusion model's latents, ``[B, C, *spatial]``.
            autoencoder_model: first-stage model exposing ``decode_stage_2_outputs`` (e.g. MONAI ``AutoencoderKL``).
            diffusion_model: ``diffusion_model(x, timesteps=...) -> output`` of the scheduler's ``prediction_type``.
            classifier: noisy-latent classifier, ``classifier(z_t, timesteps) -> logits [B, num_classes]``, with
                ``timesteps`` a LongTensor ``[B]``; may be None when ``guidance_scale`` is 0.
            labels: target class of each sample, LongTensor ``[B]``.
            scheduler: DDPM or DDIM scheduler, after ``set_timesteps``; ``self.scheduler`` when None.
            guidance_scale: ``g``; 0 gives unguided sampling (the classifier is then never called).
            guidance_window: ``(t_min, t_max)``: guide only the steps whose timestep ``t`` satisfies
                ``t_min <= t <= t_max``; all steps when None.
            classifier_batch_size: compute the guidance gradient in micro-batches of this size (bounds the memory of
                the classifier's graph); one batch when None.
            guidance_interval: compute the gradient on every ``guidance_interval``-th guided step only (the first of
                them included) and reuse the last one on the steps between; 1 (the paper's): every guided step.
            eta: DDIM stochasticity (0: deterministic DDIM); ignored by DDPM.
            verbose: show a tqdm progress bar.
            generator: random number generator for the sampling noise (DDPM, or DDIM with ``eta > 0``).
            return_latents: also return the final latents (before ``1 / scale_factor`` and decoding).
            amp: run the diffusion model under ``torch.autocast`` on the input's device type; the guidance gradient
                and the scheduler arithmetic stay float32.
            amp_dtype: autocast dtype; the device type's default when None.
            trace: a list to which each step appends ``{"t", "model_norm", "guidance_norm"}``: the RMS of the term the
                model contributes (DDIM: its noise estimate; DDPM: the posterior mean) and of the guidance term added
                to it (``sqrt(1 - abar_t) g grad``, resp. ``g Sigma grad``; 0 on unguided steps), to see where and how
                strongly guidance acts.
            cfg_scale: for a class-conditional diffusion model (``diffusion_model(x, timesteps=..., class_labels=...)``,
                e.g. fine-tuned by stage ``finetune_conditional``): the classifier-free guidance scale ``w`` applied
                to its output for ``labels`` (:func:`~monai_histodiff.inferers.class_conditional_output`) before
                the classifier guidance above, if any; None: the model is unconditional.
            null_class: the conditional model's "no class" index (needed with ``cfg_scale``).

        Returns:
            the decoded images, or ``(images, latents)`` when ``return_latents``.
        """
        if labels.shape[0] != input_noise.shape[0]:
            raise ValueError(f"need one label per sample, got {labels.shape[0]} for {input_noise.shape[0]} samples.")
        if classifier_batch_size is not None and classifier_batch_size < 1:
            raise ValueError(f"`classifier_batch_size` must be positive, got {classifier_batch_size}.")
        if isinstance(guidance_interval, bool) or not isinstance(guidance_interval, int) or guidance_interval < 1:
            raise ValueError(f"`guidance_interval` must be an integer >= 1, got {guidance_interval!r}.")
        if classifier is None and guidance_scale != 0:
            raise ValueError("classifier guidance (`guidance_scale` != 0) needs the noisy-latent `classifier`.")
        if cfg_scale is not None and null_class is None:
            raise ValueError("classifier-free guidance (`cfg_scale`) needs the model's `null_class`.")
        sampler = respace_scheduler(scheduler if scheduler is not None else self.scheduler)
        labels = labels.to(device=input_noise.device, dtype=torch.long)

        latent = input_noise.float()
        timesteps = sampler.timesteps
        progress = tqdm(timesteps, total=len(timesteps)) if verbose and has_tqdm else timesteps
        last_grad, guided_steps = None, 0
        for t in progress:
            t_batch = torch.full((latent.shape[0],), int(t), device=latent.device, dtype=torch.long)
            with torch.autocast(device_type=latent.device.type, dtype=amp_dtype, enabled=amp):
                if cfg_scale is None:
                    model_output = diffusion_model(latent, timesteps=t_batch)
                else:
                    model_output = class_conditional_output(diffusion_model, latent, t_batch, labels, null_class,
                                                            cfg_scale)
            model_output = model_output.float()

            grad = None
            if guidance_scale != 0 and self._in_window(int(t), guidance_window):
                if guided_steps % guidance_interval == 0:
                    last_grad = self.classifier_gradient(classifier, latent, t_batch, labels, classifier_batch_size)
                grad, guided_steps = last_grad, guided_steps + 1

            if isinstance(sampler, RespacedDDIMScheduler):
                eps = sampler.predict_epsilon(model_output, t, latent)
                term = None if grad is None else (1 - sampler.alpha_bar(t)) ** 0.5 * guidance_scale * grad
                self._trace(trace, t, eps, term)
                if term is not None:
                    eps = eps - term
                latent, _ = sampler.step_with_epsilon(eps, t, latent, eta=eta, generator=generator)
            else:
                mean, variance, _ = sampler.p_mean_variance(model_output, t, latent)
                term = None if grad is None else guidance_scale * variance * grad
                self._trace(trace, t, mean, term)
                if term is not None:
                    mean = mean + term  # Eq. 7
                latent = sampler.sample_posterior(mean, variance, t, generator=generator)  # Eq. 8

        latent = latent.to(input_noise.dtype)
        if self.autoencoder_latent_shape is not None:
            latent = torch.stack([self.autoencoder_resizer(i) for i in decollate_batch(latent)], 0)
        image: torch.Tensor = autoencoder_model.decode_stage_2_outputs(latent / self.scale_factor)
        return (image, latent) if return_latents else image

    @staticmethod
    def _trace(trace: list[dict[str, float]] | None, t: Any, model_term: torch.Tensor,
               guidance_term: torch.Tensor | None) -> None:
        if trace is not None:
            trace.append({"t": int(t), "model_norm": float(model_term.float().pow(2).mean().sqrt()),
                          "guidance_norm": 0.0 if guidance_term is None else float(
                              guidance_term.float().pow(2).mean().sqrt())})

    @staticmethod
    def _in_window(timestep: int, window: tuple[int, int] | None) -> bool:
        return window is None or window[0] <= timestep <= window[1]

    @staticmethod
    def classifier_gradient(
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latent: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """
        ``grad_{z_t} log p_phi(y | z_t)`` for each sample, in float32, optionally in micro-batches.

        The log-probabilities of the target classes are summed before differentiating; as samples do not interact
        in the classifier (eval mode), each sample's gradient is that of its own log-probability.

        Args:
            classifier: ``classifier(z_t, timesteps) -> logits``.
            latent: noisy latents ``z_t``, ``[B, C, *spatial]``.
            timesteps: ``[B]`` timesteps of ``latent``.
            labels: ``[B]`` target classes.
            batch_size: micro-batch size; all of ``latent`` at once when None.
        """
        size = batch_size or latent.shape[0]
        grads = []
        for z_chunk, t_chunk, y_chunk in zip(latent.split(size), timesteps.split(size), labels.split(size)):
            with torch.enable_grad(), torch.autocast(device_type=latent.device.type, enabled=False):
                z_t = z_chunk.detach().float().requires_grad_(True)
                log_probs = F.log_softmax(classifier(z_t, t_chunk).float(), dim=-1)
                selected = log_probs.gather(1, y_chunk[:, None]).sum()
                grads.append(torch.autograd.grad(selected, z_t)[0])
        return torch.cat(grads)
