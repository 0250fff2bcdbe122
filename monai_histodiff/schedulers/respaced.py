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
"""
Respaced DDPM / DDIM schedulers: diffusion samplers that step between the timesteps they actually visit.

Why these exist. MONAI 1.6's schedulers are only self-consistent when the number of inference steps ``n`` equals
the number of training steps ``T``. ``set_timesteps(n)`` lays the visited timesteps out with ``linspace(T - 1, 0, n)``
rounded to integers, but ``DDIMScheduler.step`` moves from ``t`` to ``t - T // n`` (for ``T = 1000, n = 10`` the
chain visits 999, 888, ..., 111, 0 while each step lands on 899, 788, ..., 11, so the next network call sees a
latent whose noise level belongs to a different timestep), and ``DDPMScheduler.step`` always moves from ``t`` to
``t - 1`` with ``alpha_bar[t - 1]`` and ``beta[t]``, even after ``set_timesteps(n < T)``, so that a 50-step DDPM
chain removes only 50 of the 1000 training noise increments and returns mostly noise. The respaced schedulers below
keep MONAI's API and options but step from each visited timestep ``t`` to the next visited timestep ``s`` (the next
entry of ``self.timesteps``), with alpha-bars read from ``self.alphas_cumprod`` at exactly those timesteps. The
respaced DDPM posterior is rebuilt from the kept alpha-bars as in OpenAI guided-diffusion's ``respace.py``:
``beta'_t = 1 - alpha_bar_t / alpha_bar_s``. With ``n == T`` both reduce exactly to MONAI's parents.
"""

from __future__ import annotations

import torch

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType, DDPMVarianceType

__all__ = ["RespacedDDPMScheduler", "RespacedDDIMScheduler", "RespacedScheduler", "respace_scheduler"]


class _VisitedTimestepsMixin:
    """
    Timestep bookkeeping shared by the respaced schedulers: which timestep follows ``t`` in ``self.timesteps``, and
    the alpha-bar of a visited timestep. A previous timestep of ``-1`` means "past the end of the chain", the clean
    sample, whose alpha-bar is given by ``final_alpha_bar``.
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: str
    clip_sample: bool
    clip_sample_values: list[float]

    def noise_like(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The Gaussian noise of a stochastic step, shaped like ``like`` (the same draw as MONAI's parents make).

        The one place noise is drawn: a subclass can draw it differently (per sample, for tile-wise determinism).
        """
        return torch.randn(like.shape, dtype=like.dtype, generator=generator, device=like.device)

    def final_alpha_bar(self) -> torch.Tensor:
        """Alpha-bar after the last visited timestep (the clean sample)."""
        raise NotImplementedError

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """
        The timestep visited right after ``timestep`` when sampling, i.e. the next entry of ``self.timesteps``.

        Args:
            timestep: a timestep contained in ``self.timesteps``.

        Returns:
            the next visited timestep, or ``-1`` when ``timestep`` is the last one (the step then produces the clean
            sample).

        Raises:
            ValueError: if ``timestep`` is not visited, or ``self.timesteps`` is not strictly decreasing.
        """
        visited = [int(t) for t in self.timesteps.tolist()]
        if any(a <= b for a, b in zip(visited, visited[1:])):
            raise ValueError(f"`timesteps` must be strictly decreasing to be stepped through, got {visited}.")
        t = int(timestep)
        if t not in visited:
            raise ValueError(f"timestep {t} is not one of the visited timesteps {visited}; call `set_timesteps` first.")
        i = visited.index(t)
        return visited[i + 1] if i + 1 < len(visited) else -1

    def alpha_bar(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """
        Cumulative product of alphas at ``timestep``, read from ``self.alphas_cumprod``; ``final_alpha_bar()`` for -1.

        Args:
            timestep: a training timestep in ``[0, T)``, or ``-1`` for the clean sample.
        """
        t = int(timestep)
        return self.final_alpha_bar() if t < 0 else self.alphas_cumprod[t]

    def _clip(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        if self.clip_sample:
            return torch.clamp(pred_original_sample, self.clip_sample_values[0], self.clip_sample_values[1])
        return pred_original_sample

    def predict_original_and_epsilon(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Convert the network output into the predicted clean sample ``x_0`` and noise ``epsilon`` (neither clipped),
        whatever the ``prediction_type`` is, with ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) epsilon``.

        Args:
            model_output: network output at ``timestep`` (its variance channels, if any, already split off).
            timestep: current timestep.
            sample: current noisy sample ``x_t``.
        """
        alpha_prod_t = self.alpha_bar(timestep)
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == DDPMPredictionType.EPSILON:
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif self.prediction_type == DDPMPredictionType.SAMPLE:
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        elif self.prediction_type == DDPMPredictionType.V_PREDICTION:
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}.")
        return pred_original_sample, pred_epsilon

    def predict_epsilon(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """The noise ``epsilon`` implied by the network output, whatever the ``prediction_type`` is."""
        return self.predict_original_and_epsilon(model_output, timestep, sample)[1]

    def _copy_schedule_from(self, scheduler: Scheduler) -> None:
        """Take over the noise schedule and the visited timesteps of ``scheduler`` (no copies of its options)."""
        self.betas = scheduler.betas.clone()
        self.alphas = scheduler.alphas.clone()
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()
        self.num_train_timesteps = scheduler.num_train_timesteps
        self.num_inference_steps = scheduler.num_inference_steps
        self.timesteps = scheduler.timesteps.clone()


class RespacedDDPMScheduler(_VisitedTimestepsMixin, DDPMScheduler):
    """
    DDPM scheduler (Ho et al. 2020) that samples along any subsequence of the training timesteps.

    MONAI's ``DDPMScheduler.step`` always moves from ``t`` to ``t - 1`` (``alpha_bar[t - 1]``, ``beta[t]``), even
    after ``set_timesteps(n)`` with ``n < T``, so a shortened chain is wrong. This subclass steps from each visited
    timestep ``t`` to the next visited ``s`` (``self.timesteps`` after ``set_timesteps``) and rebuilds the
    posterior ``q(x_s | x_t, x_0)`` from the kept alpha-bars, as OpenAI guided-diffusion's respacing does::

        beta'_t = 1 - abar_t / abar_s                      (abar_s = 1 after the last visited timestep)
        mean    = sqrt(abar_s) beta'_t / (1 - abar_t) x_0 + sqrt(1 - beta'_t) (1 - abar_s) / (1 - abar_t) x_t
        var     = (1 - abar_s) / (1 - abar_t) beta'_t     ("fixed_small"; "fixed_large" uses beta'_t)

    With ``n == T`` (``s = t - 1``) ``beta'_t`` is read from ``self.betas`` and every result equals MONAI's parent
    bit for bit. ``variance_type``, ``clip_sample`` and all ``prediction_type`` values behave as in the parent
    ("learned" and "learned_range" interpret the predicted variance the way MONAI does, i.e. linearly, not as a log
    variance as in guided-diffusion). The parent's private ``_get_mean`` / ``_get_variance`` are left unchanged: they
    serve MONAI's ``get_likelihood``, which walks the full chain with ``t - 1``.

    Args:
        same as :py:class:`monai.networks.schedulers.DDPMScheduler`.
    """

    def final_alpha_bar(self) -> torch.Tensor:
        return self.one

    def respaced_beta(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """
        Noise variance of the respaced step ``t -> s``: ``1 - abar_t / abar_s`` (``self.betas[t]`` when ``s = t - 1``,
        which is the same number without the round-off of the division).
        """
        t, s = int(timestep), self.previous_timestep(timestep)
        if s == t - 1:
            return self.betas[t]
        return 1 - self.alpha_bar(t) / self.alpha_bar(s)

    def posterior_mean_variance(
        self,
        pred_original_sample: torch.Tensor,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        predicted_variance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Mean and variance of the respaced posterior ``q(x_s | x_t, x_0)`` (formula (7) of Ho et al. with ``beta'_t``),
        the variance chosen by ``variance_type``.

        Args:
            pred_original_sample: (predicted) clean sample ``x_0``.
            sample: current noisy sample ``x_t``.
            timestep: current timestep ``t``; ``s`` is the next visited timestep.
            predicted_variance: variance output of the network for the "learned" variance types.

        Returns:
            the posterior mean (shape of ``sample``) and its variance (a scalar tensor, or the shape of
            ``predicted_variance``).
        """
        s = self.previous_timestep(timestep)
        alpha_prod_t = self.alpha_bar(timestep)
        alpha_prod_t_prev = self.alpha_bar(s)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        beta_t = self.respaced_beta(timestep)
        alpha_t = 1.0 - beta_t

        pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * beta_t) / beta_prod_t
        current_sample_coeff = alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        mean = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        variance: torch.Tensor = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t
        if self.variance_type == DDPMVarianceType.FIXED_SMALL:
            variance = torch.clamp(variance, min=1e-20)
        elif self.variance_type == DDPMVarianceType.FIXED_LARGE:
            variance = beta_t
        elif self.variance_type == DDPMVarianceType.LEARNED and predicted_variance is not None:
            variance = predicted_variance
        elif self.variance_type == DDPMVarianceType.LEARNED_RANGE and predicted_variance is not None:
            frac = (predicted_variance + 1) / 2
            variance = frac * beta_t + (1 - frac) * variance
        return mean, variance

    def p_mean_variance(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Mean and variance of the reverse step ``p(x_s | x_t)`` from the raw network output: split off learned
        variance channels, predict (and clip) ``x_0``, then take the posterior.

        Args:
            model_output: direct output of the diffusion network at ``timestep``.
            timestep: current timestep ``t``.
            sample: current noisy sample ``x_t``.

        Returns:
            ``(mean, variance, pred_original_sample)``.
        """
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ["learned", "learned_range"]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        pred_original_sample = self._clip(self.predict_original_and_epsilon(model_output, timestep, sample)[0])
        mean, variance = self.posterior_mean_variance(pred_original_sample, sample, timestep, predicted_variance)
        return mean, variance, pred_original_sample

    def sample_posterior(
        self,
        mean: torch.Tensor,
        variance: torch.Tensor,
        timestep: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Draw ``x_s = mean + sqrt(variance) * noise``; no noise on the last step (the one producing the clean sample).

        Args:
            mean: mean of the reverse step.
            variance: its variance.
            timestep: current timestep ``t``.
            generator: random number generator for the noise.
        """
        if self.previous_timestep(timestep) < 0:
            return mean
        return mean + variance**0.5 * self.noise_like(mean, generator)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One reverse step from the visited timestep ``t`` to the next visited timestep.

        Args:
            model_output: direct output of the diffusion network.
            timestep: current timestep, an entry of ``self.timesteps``.
            sample: current noisy sample ``x_t``.
            generator: random number generator.

        Returns:
            ``(prev_sample, pred_original_sample)`` like MONAI's ``DDPMScheduler.step``.
        """
        mean, variance, pred_original_sample = self.p_mean_variance(model_output, timestep, sample)
        return self.sample_posterior(mean, variance, timestep, generator), pred_original_sample

    @classmethod
    def from_scheduler(cls, scheduler: DDPMScheduler) -> RespacedDDPMScheduler:
        """
        Respaced copy of a MONAI ``DDPMScheduler``: same betas, options and current ``timesteps``.

        Args:
            scheduler: the scheduler to copy, after ``set_timesteps`` if a shortened chain is wanted.
        """
        respaced = cls(
            num_train_timesteps=scheduler.num_train_timesteps,
            variance_type=scheduler.variance_type,
            clip_sample=scheduler.clip_sample,
            prediction_type=scheduler.prediction_type,
            clip_sample_min=scheduler.clip_sample_values[0],
            clip_sample_max=scheduler.clip_sample_values[1],
        )
        respaced._copy_schedule_from(scheduler)
        return respaced


class RespacedDDIMScheduler(_VisitedTimestepsMixin, DDIMScheduler):
    """
    DDIM scheduler (Song et al. 2021) whose steps go from each visited timestep to the next visited one.

    MONAI's ``DDIMScheduler.step`` moves from ``t`` to ``t - T // n`` while ``set_timesteps(n)`` visits
    ``round(linspace(T - 1, 0, n))``; unless ``n`` divides ``T - 1`` nicely the chain lands on noise levels the next
    network call does not expect. Here ``alpha_bar_t`` is taken at the timestep being sampled and ``alpha_bar_prev``
    at the next entry of ``self.timesteps`` (``final_alpha_cumprod`` after the last one), so any number of steps is
    consistent and the chain ends at the clean sample. With ``n == T`` results equal the parent's bit for bit.

    Args:
        same as :py:class:`monai.networks.schedulers.DDIMScheduler`.
    """

    def final_alpha_bar(self) -> torch.Tensor:
        return self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        alpha_prod_t = self.alpha_bar(timestep)
        alpha_prod_t_prev = self.alpha_bar(prev_timestep)
        variance: torch.Tensor = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
        return variance

    def _update(
        self,
        pred_original_sample: torch.Tensor,
        pred_epsilon: torch.Tensor,
        timestep: int | torch.Tensor,
        eta: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """
        DDIM update, formula (12) of Song et al.: ``x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps + sigma z``.
        """
        prev_timestep = self.previous_timestep(timestep)
        alpha_prod_t_prev = self.alpha_bar(prev_timestep)
        variance = self._get_variance(int(timestep), prev_timestep)
        std_dev_t = eta * variance**0.5

        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            prev_sample = prev_sample + variance**0.5 * eta * self.noise_like(pred_epsilon, generator)
        return prev_sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One DDIM step from the visited timestep ``t`` to the next visited timestep.

        Args:
            model_output: direct output of the diffusion network.
            timestep: current timestep, an entry of ``self.timesteps``.
            sample: current noisy sample ``x_t``.
            eta: weight of the stochastic part (0: deterministic DDIM, 1: DDPM-like).
            generator: random number generator.

        Returns:
            ``(prev_sample, pred_original_sample)`` like MONAI's ``DDIMScheduler.step``.
        """
        pred_original_sample, pred_epsilon = self.predict_original_and_epsilon(model_output, timestep, sample)
        pred_original_sample = self._clip(pred_original_sample)
        return self._update(pred_original_sample, pred_epsilon, timestep, eta, generator), pred_original_sample

    def step_with_epsilon(
        self,
        pred_epsilon: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One DDIM step driven by a noise estimate, whatever ``prediction_type`` the network has (used for guided
        sampling, where the noise estimate is modified before stepping).

        Args:
            pred_epsilon: noise estimate ``epsilon(x_t)``.
            timestep: current timestep, an entry of ``self.timesteps``.
            sample: current noisy sample ``x_t``.
            eta: weight of the stochastic part.
            generator: random number generator.

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        alpha_prod_t = self.alpha_bar(timestep)
        pred_original_sample = (sample - (1 - alpha_prod_t) ** 0.5 * pred_epsilon) / alpha_prod_t**0.5
        pred_original_sample = self._clip(pred_original_sample)
        return self._update(pred_original_sample, pred_epsilon, timestep, eta, generator), pred_original_sample

    def next_timestep(self, timestep: int | torch.Tensor) -> int:
        """
        The visited timestep right before ``timestep`` in ``self.timesteps`` (the noisier one), for DDIM inversion.

        Raises:
            ValueError: if ``timestep`` is the first (noisiest) visited timestep or is not visited.
        """
        self.previous_timestep(timestep)  # validates ``timestep`` and ``self.timesteps``
        visited = [int(t) for t in self.timesteps.tolist()]
        i = visited.index(int(timestep))
        if i == 0:
            raise ValueError(f"timestep {int(timestep)} is the noisiest visited timestep; there is none after it.")
        return visited[i - 1]

    def reversed_step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Deterministic DDIM inversion step from the visited timestep ``t`` to the next noisier visited timestep (MONAI
        goes to ``t + T // n``, which is not visited unless ``n == T``).

        Args:
            model_output: direct output of the diffusion network at ``timestep``.
            timestep: current timestep, an entry of ``self.timesteps`` other than the first.
            sample: current sample ``x_t``.

        Returns:
            ``(next_sample, pred_original_sample)`` like MONAI's ``DDIMScheduler.reversed_step``.
        """
        alpha_prod_t_next = self.alpha_bar(self.next_timestep(timestep))
        pred_original_sample, pred_epsilon = self.predict_original_and_epsilon(model_output, timestep, sample)
        pred_original_sample = self._clip(pred_original_sample)
        pred_sample_direction = (1 - alpha_prod_t_next) ** (0.5) * pred_epsilon
        next_sample = alpha_prod_t_next ** (0.5) * pred_original_sample + pred_sample_direction
        return next_sample, pred_original_sample

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler) -> RespacedDDIMScheduler:
        """
        Respaced copy of a MONAI ``DDIMScheduler``: same betas, options, final alpha-bar and current ``timesteps``.

        Args:
            scheduler: the scheduler to copy, after ``set_timesteps`` if a shortened chain is wanted.
        """
        respaced = cls(
            num_train_timesteps=scheduler.num_train_timesteps,
            clip_sample=scheduler.clip_sample,
            steps_offset=scheduler.steps_offset,
            prediction_type=scheduler.prediction_type,
            clip_sample_min=scheduler.clip_sample_values[0],
            clip_sample_max=scheduler.clip_sample_values[1],
        )
        respaced._copy_schedule_from(scheduler)
        respaced.final_alpha_cumprod = scheduler.final_alpha_cumprod.clone()
        respaced.init_noise_sigma = scheduler.init_noise_sigma
        return respaced


RespacedScheduler = RespacedDDPMScheduler | RespacedDDIMScheduler


def respace_scheduler(scheduler: Scheduler) -> RespacedDDPMScheduler | RespacedDDIMScheduler:
    """
    The respaced equivalent of a MONAI DDPM or DDIM scheduler: same betas and options, and the same ``timesteps``
    it has now (so call ``set_timesteps`` on it first). Respaced schedulers are returned unchanged.

    Args:
        scheduler: a ``DDPMScheduler``, ``DDIMScheduler`` or one of their respaced subclasses.

    Raises:
        TypeError: for other schedulers (e.g. PNDM, RFlow), which have no respaced equivalent here.
    """
    if isinstance(scheduler, (RespacedDDPMScheduler, RespacedDDIMScheduler)):
        return scheduler
    if isinstance(scheduler, DDIMScheduler):
        return RespacedDDIMScheduler.from_scheduler(scheduler)
    if isinstance(scheduler, DDPMScheduler):
        return RespacedDDPMScheduler.from_scheduler(scheduler)
    raise TypeError(f"no respaced equivalent for {type(scheduler).__name__}; use a DDPMScheduler or DDIMScheduler.")
