"""Tests of classifier-free guidance: the combination, the conditional model's calls, the training inferer, and
sampling a closed-form class-conditional model of a Gaussian mixture with the guided inferer's loop."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from monai_histodiff.inferers import (
    ClassConditionalDiffusionInferer,
    ClassifierGuidedLatentDiffusionInferer,
    class_conditional_output,
    classifier_free_guidance,
)
from tests.inferers.test_guided import (
    LATENT_SHAPE,
    NUM_CLASSES,
    NUM_SAMPLES,
    SCHEDULE,
    IdentityAutoencoder,
    MixtureClassifier,
    MixtureDenoiser,
    mixture_means,
    nearest_component,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class MixtureConditionalDenoiser(MixtureDenoiser):
    """Exact class-conditional noise ``E[eps | z_t, y]`` of the mixture (one Gaussian component), and the
    unconditional ``E[eps | z_t]`` for the null class ``NUM_CLASSES``. Counts its calls and their batch sizes."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        abar, var, diff, _ = self.parts(x, timesteps)
        component = ((1 - abar).sqrt() / var)[:, :, None] * diff  # [B, K, d]
        null = class_labels == NUM_CLASSES
        out = super().forward(x, timesteps).flatten(1)
        index = class_labels.clamp(max=NUM_CLASSES - 1)
        conditional = component[torch.arange(x.shape[0]), index]
        return torch.where(null[:, None], out, conditional).view_as(x)


def test_classifier_free_guidance_combines_the_two_outputs():
    cond, uncond = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), torch.tensor([7.0, 1.0]))


def test_conditional_output_calls_the_model_once_per_step_and_with_both_halves_above_one():
    scheduler = DDIMScheduler(1000, **SCHEDULE)
    model = MixtureConditionalDenoiser(scheduler.alphas_cumprod, mixture_means())
    z = torch.randn(4, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500, dtype=torch.long)
    labels = torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, NUM_CLASSES)
    uncond, cond = model(z, t, null), model(z, t, labels)
    model.batches.clear()
    torch.testing.assert_close(class_conditional_output(model, z, t, labels, NUM_CLASSES, 0.0), uncond)
    torch.testing.assert_close(class_conditional_output(model, z, t, labels, NUM_CLASSES, 1.0), cond)
    torch.testing.assert_close(class_conditional_output(model, z, t, labels, NUM_CLASSES, 2.5),
                               uncond + 2.5 * (cond - uncond))
    assert model.batches == [4, 4, 8]  # w in {0, 1}: one pass; otherwise one pass over both halves


@pytest.mark.parametrize("scheduler_type, num_steps", [(DDIMScheduler, 50), (DDPMScheduler, 50)])
def test_classifier_free_guidance_samples_the_requested_component(scheduler_type, num_steps):
    scheduler = scheduler_type(1000, **SCHEDULE)
    scheduler.set_timesteps(num_steps)
    means = mixture_means()
    model = MixtureConditionalDenoiser(scheduler.alphas_cumprod, means)
    noise = torch.randn(NUM_SAMPLES, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    inferer = ClassifierGuidedLatentDiffusionInferer(scheduler)

    def sample(w):
        return inferer.sample(noise, IdentityAutoencoder(), model, None, labels, guidance_scale=0.0, cfg_scale=w,
                              null_class=NUM_CLASSES, verbose=False, generator=torch.Generator().manual_seed(2))

    # w = 1: the exact conditional model, no classifier: every sample in its requested component
    assert (nearest_component(sample(1.0)) == labels).float().mean() >= 0.95
    # w = 0: the null class, i.e. the unconditional model: every component gets a fair share whatever was asked
    unconditional = nearest_component(sample(0.0))
    assert (torch.bincount(unconditional, minlength=NUM_CLASSES) / NUM_SAMPLES).min() >= 0.2
    assert (unconditional == labels).float().mean() < 0.6


def test_classifier_free_and_classifier_guidance_combine():
    """w = 0 (the null class) with classifier guidance g = 1 is the paper's classifier guidance of the unconditional
    model: it reaches the requested component too, through the classifier alone."""
    scheduler = DDIMScheduler(1000, **SCHEDULE)
    scheduler.set_timesteps(50)
    means = mixture_means()
    noise = torch.randn(NUM_SAMPLES, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    samples = ClassifierGuidedLatentDiffusionInferer(scheduler).sample(
        noise, IdentityAutoencoder(), MixtureConditionalDenoiser(scheduler.alphas_cumprod, means),
        MixtureClassifier(scheduler.alphas_cumprod, means), labels, guidance_scale=1.0, cfg_scale=0.0,
        null_class=NUM_CLASSES, verbose=False)
    assert (nearest_component(samples) == labels).float().mean() >= 0.95


def test_sample_refuses_cfg_without_a_null_class_and_guidance_without_a_classifier():
    scheduler = DDIMScheduler(1000, **SCHEDULE)
    scheduler.set_timesteps(5)
    inferer = ClassifierGuidedLatentDiffusionInferer(scheduler)
    noise, labels = torch.randn(2, *LATENT_SHAPE), torch.zeros(2, dtype=torch.long)
    model = MixtureConditionalDenoiser(scheduler.alphas_cumprod, mixture_means())
    with pytest.raises(ValueError, match="null_class"):
        inferer.sample(noise, IdentityAutoencoder(), model, None, labels, guidance_scale=0.0, cfg_scale=2.0)
    with pytest.raises(ValueError, match="classifier"):
        inferer.sample(noise, IdentityAutoencoder(), model, None, labels, guidance_scale=1.0, cfg_scale=2.0,
                       null_class=NUM_CLASSES)


def test_training_inferer_passes_the_classes_to_the_class_embedding():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8,
                              num_class_embeds=3).eval()
    with torch.no_grad():  # MONAI starts the residual branches' last convolutions at zero: random weights instead
        for param in unet.parameters():
            param.normal_(std=0.1)
    scheduler = DDPMScheduler(1000, **SCHEDULE)
    inferer = ClassConditionalDiffusionInferer(scheduler)
    z, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        a = inferer(z, unet, noise, t, class_labels=torch.tensor([0, 0]))
        b = inferer(z, unet, noise, t, class_labels=torch.tensor([1, 2]))
        direct = unet(scheduler.add_noise(z, noise, t), timesteps=t, class_labels=torch.tensor([1, 2]))
    torch.testing.assert_close(b, direct)
    assert not torch.allclose(a, b)  # the class changes the output
