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
Tests of classifier-guided latent diffusion sampling.

The correctness tests need no training: latents ``z_0`` follow a mixture of ``K`` isotropic Gaussians
``sum_k pi_k N(mu_k, sigma_0^2 I)``. Under the forward process ``z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps`` each
component stays Gaussian, ``N(sqrt(abar) mu_k, s_t^2 I)`` with ``s_t^2 = abar sigma_0^2 + 1 - abar``, so the noisy
class posterior ``p(k | z_t)`` (the "classifier") and the optimal noise prediction ``E[eps | z_t]`` (the "UNet") are
known in closed form. With the exact score, guidance scale 1 turns the unconditional model into the exact
class-conditional one: ``eps - sqrt(1 - abar) grad log p(y | z_t) = E[eps | z_t, y]``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai.inferers import LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer
from monai_histodiff.schedulers import RespacedDDIMScheduler, RespacedDDPMScheduler

LATENT_SHAPE = (2, 4, 4)
NUM_CLASSES = 3
SIGMA_0 = 0.3
NUM_SAMPLES = 300
# the realistic latent-diffusion schedule (LDM / HistoDiffusion): T = 1000, scaled linear betas
SCHEDULE = {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0155, "clip_sample": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture_means() -> torch.Tensor:
    """``[K, C, H, W]`` component means, ~N(0, 1) entries: pairwise distances ~8, i.e. ~27 sigma_0 apart."""
    return torch.randn(NUM_CLASSES, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))


class _ClosedFormMixture(nn.Module):
    """Exact noisy-latent quantities of the Gaussian mixture at the scheduler's timesteps (uniform weights)."""

    def __init__(self, alphas_cumprod: torch.Tensor, means: torch.Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod
        self.means = means.flatten(1)  # [K, d]

    def parts(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        abar = self.alphas_cumprod[timesteps.long().cpu()].to(z).view(-1, 1)  # [B, 1]
        var = abar * SIGMA_0**2 + 1 - abar  # s_t^2
        diff = z.flatten(1)[:, None, :] - abar.sqrt()[:, :, None] * self.means[None].to(z)  # [B, K, d]
        d = diff.shape[-1]
        # log pi_k + log N(z_t; sqrt(abar) mu_k, s_t^2 I)
        logits = math.log(1 / NUM_CLASSES) - (diff**2).sum(-1) / (2 * var) - d / 2 * torch.log(2 * math.pi * var)
        return abar, var, diff, logits


class MixtureClassifier(_ClosedFormMixture):
    """Exact noisy classifier: logits whose softmax is ``p(k | z_t)``."""

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.parts(z, timesteps)[3]


class MixtureDenoiser(_ClosedFormMixture):
    """Exact epsilon predictor ``E[eps | z_t] = sum_k p(k | z_t) sqrt(1 - abar) / s_t^2 (z_t - sqrt(abar) mu_k)``."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar, var, diff, logits = self.parts(x, timesteps)
        eps_per_component = ((1 - abar).sqrt() / var)[:, :, None] * diff
        return (logits.softmax(-1)[:, :, None] * eps_per_component).sum(1).view_as(x)


class IdentityAutoencoder(nn.Module):
    """First stage that decodes a latent to itself."""

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return z


def predicted_std(scheduler: DDPMScheduler | DDIMScheduler) -> float:
    """
    Per-element std of the samples that the scheduler's discretized chain gives for ONE Gaussian ``N(mu, sigma_0^2)``
    with its exact epsilon and ``z_T ~ N(0, 1)``: each step is affine in ``w = z_t - sqrt(abar_t) mu``. It tends to
    sigma_0 as the number of steps grows; with few steps DDIM / DDPM ("fixed_small") shrink it, a property of the
    discretization, not of guidance.
    """
    var = 1.0
    visited = scheduler.timesteps.tolist()
    abar = scheduler.alphas_cumprod.tolist()  # computed independently of the scheduler's stepping API
    for t, s in zip(visited, visited[1:] + [-1]):
        a, a_prev = abar[t], (abar[s] if s >= 0 else 1.0)
        s2 = a * SIGMA_0**2 + 1 - a
        if isinstance(scheduler, DDIMScheduler):  # w_s = r w_t
            var *= (((a * a_prev) ** 0.5 * SIGMA_0**2 + ((1 - a) * (1 - a_prev)) ** 0.5) / s2) ** 2
        else:  # w_s = (c1 sqrt(abar) sigma_0^2 / s_t^2 + c2) w_t + sqrt(Sigma) noise
            beta = 1 - a / a_prev
            c1, c2 = a_prev**0.5 * beta / (1 - a), (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)
            posterior_var = (1 - a_prev) / (1 - a) * beta if s >= 0 else 0.0
            var = (c1 * a**0.5 * SIGMA_0**2 / s2 + c2) ** 2 * var + posterior_var
    return var**0.5


def sample_mixture(scheduler, guidance_scale, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided samples of the closed-form mixture model, labels cycling over the classes; returns (samples, labels)."""
    means = mixture_means()
    inferer = ClassifierGuidedLatentDiffusionInferer(scheduler)
    noise = torch.randn(NUM_SAMPLES, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    samples = inferer.sample(
        noise,
        IdentityAutoencoder(),
        MixtureDenoiser(scheduler.alphas_cumprod, means),
        MixtureClassifier(scheduler.alphas_cumprod, means),
        labels,
        guidance_scale=guidance_scale,
        verbose=False,
        generator=torch.Generator().manual_seed(2),
        **kwargs,
    )
    return samples, labels


def nearest_component(samples: torch.Tensor) -> torch.Tensor:
    return torch.cdist(samples.flatten(1), mixture_means().flatten(1)).argmin(1)


SAMPLERS = [(DDIMScheduler, 10), (DDIMScheduler, 50), (DDIMScheduler, 200), (DDPMScheduler, 50), (DDPMScheduler, 200)]


@pytest.mark.parametrize("scheduler_type, num_steps", SAMPLERS)
def test_guidance_samples_the_requested_mixture_component(scheduler_type, num_steps):
    scheduler = scheduler_type(1000, **SCHEDULE)
    scheduler.set_timesteps(num_steps)  # a plain MONAI scheduler: the inferer converts it to the respaced one

    # g = 1: the classifier and the denoiser are exact, so eps - sqrt(1 - abar) * grad log p(y | z_t) is exactly the
    # class-conditional noise (DDIM), and DDPM's mean shift Sigma * grad is its first-order equivalent; no larger
    # scale is needed.
    samples, labels = sample_mixture(scheduler, guidance_scale=1.0)
    assert (nearest_component(samples) == labels).float().mean() >= 0.95
    spread = ((samples - mixture_means()[labels]) ** 2).mean().sqrt().item()
    # the spread is that of the chosen component as this discretization reproduces it (within sampling error) ...
    assert spread == pytest.approx(predicted_std(scheduler), rel=0.05)
    # ... which, with enough steps, is the mixture's sigma_0
    if num_steps >= 200:
        assert spread == pytest.approx(SIGMA_0, rel=0.1)

    samples, _ = sample_mixture(scheduler, guidance_scale=0.0)
    shares = torch.bincount(nearest_component(samples), minlength=NUM_CLASSES) / NUM_SAMPLES
    assert shares.min() >= 0.2  # unguided: every component gets a fair share of the 1 / 3


def test_zero_guidance_reproduces_monai_latent_diffusion_sample():
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        spatial_dims=2,
        channels=(4, 4),
        latent_channels=3,
        num_res_blocks=1,
        norm_num_groups=4,
        attention_levels=(False, False),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    ).eval()
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
    ).eval()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def never_called(z, t):
        raise AssertionError("the classifier must not be evaluated when guidance_scale == 0")

    for scheduler_type in [DDIMScheduler, DDPMScheduler]:
        scheduler = scheduler_type(num_train_timesteps=50)  # MONAI is self-consistent only with n == T
        scheduler.set_timesteps(50)
        torch.manual_seed(3)  # MONAI's DDPM draws its noise from the global generator
        expected = LatentDiffusionInferer(scheduler, scale_factor=0.7).sample(noise, autoencoder, unet, verbose=False)
        torch.manual_seed(3)
        result = ClassifierGuidedLatentDiffusionInferer(scheduler, scale_factor=0.7).sample(
            noise, autoencoder, unet, never_called, torch.zeros(2, dtype=torch.long), guidance_scale=0.0, verbose=False
        )
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


class _RecordingClassifier(MixtureClassifier):
    """Closed-form classifier that records the timesteps and batch sizes it is called with."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[tuple[int, int]] = []

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        assert torch.is_grad_enabled() and z.requires_grad and z.dtype == torch.float32
        self.calls.append((int(timesteps[0]), z.shape[0]))
        return super().forward(z, timesteps)


class _NoGradDenoiser(MixtureDenoiser):
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()  # only the classifier term builds a graph
        return super().forward(x, timesteps)


def _guided(scheduler, classifier=None, num_samples=30, **kwargs) -> torch.Tensor:
    means = mixture_means()
    classifier = classifier or MixtureClassifier(scheduler.alphas_cumprod, means)
    noise = torch.randn(num_samples, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    return ClassifierGuidedLatentDiffusionInferer(scheduler).sample(
        noise,
        IdentityAutoencoder(),
        _NoGradDenoiser(scheduler.alphas_cumprod, means),
        classifier,
        torch.arange(num_samples) % NUM_CLASSES,
        verbose=False,
        generator=torch.Generator().manual_seed(2),
        **kwargs,
    )


@pytest.mark.parametrize("scheduler_type", [RespacedDDIMScheduler, RespacedDDPMScheduler])
def test_guidance_window(scheduler_type):
    scheduler = scheduler_type(1000, **SCHEDULE)
    scheduler.set_timesteps(20)
    unguided = _guided(scheduler, guidance_scale=0.0)
    guided = _guided(scheduler, guidance_scale=1.0)
    assert not torch.equal(guided, unguided)
    # a window outside the visited timesteps: every step is the unguided one
    assert torch.equal(_guided(scheduler, guidance_scale=1.0, guidance_window=(1000, 2000)), unguided)
    # a window holding all of them: full guidance
    assert torch.equal(_guided(scheduler, guidance_scale=1.0, guidance_window=(0, 999)), guided)
    # a partial window (bounds inclusive): the gradient is taken exactly at the visited timesteps inside it
    classifier = _RecordingClassifier(scheduler.alphas_cumprod, mixture_means())
    _guided(scheduler, classifier, guidance_scale=1.0, guidance_window=(0, int(scheduler.timesteps[10])))
    assert [t for t, _ in classifier.calls] == scheduler.timesteps[10:].tolist()


@pytest.mark.parametrize("scheduler_type", [RespacedDDIMScheduler, RespacedDDPMScheduler])
def test_guidance_interval_reuses_the_last_gradient(scheduler_type):
    """With guidance_interval k the classifier runs on guided steps 0, k, 2k, ... only (inside a window: counted from
    its first step); 1 is the paper's every-step guidance, bit for bit."""
    scheduler = scheduler_type(1000, **SCHEDULE)
    scheduler.set_timesteps(20)
    every = _guided(scheduler, guidance_scale=1.0)
    assert torch.equal(_guided(scheduler, guidance_scale=1.0, guidance_interval=1), every)
    classifier = _RecordingClassifier(scheduler.alphas_cumprod, mixture_means())
    every3 = _guided(scheduler, classifier, guidance_scale=1.0, guidance_interval=3)
    assert [t for t, _ in classifier.calls] == scheduler.timesteps[::3].tolist()
    assert not torch.equal(every3, every) and not torch.equal(every3, _guided(scheduler, guidance_scale=0.0))
    window = (0, int(scheduler.timesteps[10]))
    classifier = _RecordingClassifier(scheduler.alphas_cumprod, mixture_means())
    _guided(scheduler, classifier, guidance_scale=1.0, guidance_window=window, guidance_interval=4)
    assert [t for t, _ in classifier.calls] == scheduler.timesteps[10::4].tolist()
    with pytest.raises(ValueError, match="guidance_interval"):
        _guided(scheduler, guidance_scale=1.0, guidance_interval=0)


@pytest.mark.parametrize("scheduler_type", [RespacedDDIMScheduler, RespacedDDPMScheduler])
def test_classifier_micro_batches_give_the_same_samples(scheduler_type):
    scheduler = scheduler_type(1000, **SCHEDULE)
    scheduler.set_timesteps(20)
    classifier = _RecordingClassifier(scheduler.alphas_cumprod, mixture_means())
    micro_batched = _guided(scheduler, classifier, guidance_scale=2.0, classifier_batch_size=7)
    assert {size for _, size in classifier.calls} == {7, 2}  # 30 samples = 4 x 7 + 2
    torch.testing.assert_close(micro_batched, _guided(scheduler, guidance_scale=2.0), rtol=1e-5, atol=1e-5)


def test_plain_monai_scheduler_is_converted_to_its_respaced_equivalent():
    scheduler = DDIMScheduler(1000, **SCHEDULE)
    scheduler.set_timesteps(15)
    respaced = RespacedDDIMScheduler(1000, **SCHEDULE)
    respaced.set_timesteps(15)
    assert torch.equal(_guided(scheduler, guidance_scale=1.0), _guided(respaced, guidance_scale=1.0))


def test_amp_and_return_latents():
    scheduler = RespacedDDIMScheduler(1000, **SCHEDULE)
    scheduler.set_timesteps(10)
    images, latents = _guided(scheduler, guidance_scale=1.0, amp=True, return_latents=True)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, latents)  # identity first stage, scale factor 1
    torch.testing.assert_close(images, _guided(scheduler, guidance_scale=1.0), rtol=0.05, atol=0.05)


def test_one_label_per_sample_is_required():
    scheduler = RespacedDDIMScheduler(1000, **SCHEDULE)
    inferer = ClassifierGuidedLatentDiffusionInferer(scheduler)
    with pytest.raises(ValueError, match="one label per sample"):
        inferer.sample(torch.randn(4, 2, 4, 4), IdentityAutoencoder(), nn.Identity(), nn.Identity(), torch.zeros(3))


def test_trace_records_the_guidance_term_against_the_model_term():
    """With ``trace``, every step's model term and guidance term sizes are recorded; g = 0 records a zero term."""
    import torch
    from monai.networks.schedulers import DDIMScheduler

    from monai_histodiff.inferers.guided import ClassifierGuidedLatentDiffusionInferer

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(4)
    inferer = ClassifierGuidedLatentDiffusionInferer(sched, scale_factor=1.0)

    class Decoder(torch.nn.Module):
        def decode_stage_2_outputs(self, z):
            return z

    def model(x, timesteps):
        return 0.5 * x

    def classifier(z, t):
        return torch.stack([z.mean((1, 2, 3)), -z.mean((1, 2, 3))], 1)

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for g in (0.0, 2.0):
        trace = []
        inferer.sample(noise, Decoder(), model, classifier, torch.tensor([0, 1]), guidance_scale=g, verbose=False,
                       trace=trace)
        assert [s["t"] for s in trace] == sched.timesteps.tolist() and all(s["model_norm"] > 0 for s in trace)
        assert all((s["guidance_norm"] > 0) == (g > 0) for s in trace)
