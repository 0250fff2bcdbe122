"""Sample grids during diffusion training: unconditional during pre-training (what the pre-trained model generates,
unguided), one row per class during the class-conditional fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler

from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.engines.prepare_batch import resolve_scale_factor

__all__ = ["evaluating", "UnconditionalSampler", "ClassConditionalSampler", "ReconstructionComparison",
           "optimize_for_inference"]


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block, back in the mode it was in afterwards (a sample grid in the middle of
    training must not leave the network in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class UnconditionalSampler:
    """Callable drawing ``num_samples`` decoded tiles with DDIM from the current (or EMA) diffusion weights.

    Uses MONAI's own ``LatentDiffusionInferer.sample`` with a DDIM scheduler of the training betas at
    ``num_inference_steps``; the seed is fixed so successive grids show the same noise decoded by a better model.
    """

    def __init__(self, autoencoder: torch.nn.Module, diffusion_model: torch.nn.Module | Callable[[], torch.nn.Module],
                 scheduler_args: dict, scale_factor: float | Callable, latent_shape: Sequence[int],
                 num_samples: int = 16, num_inference_steps: int = 50, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.autoencoder = autoencoder
        self.diffusion_model = diffusion_model
        args = dict(scheduler_args)
        args.pop("variance_type", None)
        self.scheduler = DDIMScheduler(**args)
        self.scheduler.set_timesteps(num_inference_steps)
        self.scale_factor = scale_factor
        self.latent_shape = tuple(latent_shape)
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.seed = seed

    def model(self) -> torch.nn.Module:
        """The network to sample, unwrapped: ``diffusion_model`` itself or, given as a callable, what it returns
        (the EMA model of the moment)."""
        model = self.diffusion_model if isinstance(self.diffusion_model, torch.nn.Module) else self.diffusion_model()
        return unwrap_model(model)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        model = self.model()
        with evaluating(model):
            inferer = LatentDiffusionInferer(self.scheduler, scale_factor=resolve_scale_factor(self.scale_factor))
            noise = torch.randn((self.num_samples, *self.latent_shape),
                                generator=torch.Generator().manual_seed(self.seed))
            images = inferer.sample(noise.to(self.device), unwrap_model(self.autoencoder), model, verbose=False)
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def latents(self, num_samples: int | None = None, seed: int | None = None) -> torch.Tensor:
        """``num_samples`` latents sampled from noise, undecoded, in the diffusion model's scaled space (what the
        model learnt: ``scale_factor * z``), for comparing with the training latents."""
        model = self.model()
        with evaluating(model):
            generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
            noise = torch.randn((num_samples or self.num_samples, *self.latent_shape), generator=generator)
            latents = DiffusionInferer(self.scheduler).sample(noise.to(self.device), model, verbose=False)
        return latents.float().cpu()


class ClassConditionalSampler(UnconditionalSampler):
    """Callable drawing ``num_per_class`` tiles of each class from the current (or EMA) class-conditional diffusion
    model with classifier-free guidance ``cfg_scale`` (DDIM, fixed noise; the same noise for every class, so a grid's
    columns show what the class changes). Returns ``[num_classes * num_per_class, 3, H, W]`` in class order.

    Args:
        num_classes: the site's classes (the model's null class is ``num_classes``).
        num_per_class: tiles per class.
        cfg_scale: classifier-free guidance scale ``w``.
        others: as :class:`UnconditionalSampler`.
    """

    def __init__(self, autoencoder: torch.nn.Module, diffusion_model: torch.nn.Module | Callable[[], torch.nn.Module],
                 scheduler_args: dict, scale_factor: float | Callable, latent_shape: Sequence[int], num_classes: int,
                 num_per_class: int = 4, cfg_scale: float = 1.0, num_inference_steps: int = 50,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__(autoencoder, diffusion_model, scheduler_args, scale_factor, latent_shape,
                         num_samples=num_classes * num_per_class, num_inference_steps=num_inference_steps,
                         device=device, seed=seed)
        self.num_classes = int(num_classes)
        self.num_per_class = int(num_per_class)
        self.cfg_scale = float(cfg_scale)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        from monai_histodiff.inferers.guided import ClassifierGuidedLatentDiffusionInferer

        model = self.model()
        inferer = ClassifierGuidedLatentDiffusionInferer(self.scheduler,
                                                         scale_factor=resolve_scale_factor(self.scale_factor))
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_per_class, *self.latent_shape), generator=generator)
        noise = noise.repeat(self.num_classes, *([1] * len(self.latent_shape)))
        labels = torch.arange(self.num_classes).repeat_interleave(self.num_per_class)
        with evaluating(model):
            images = inferer.sample(noise.to(self.device), unwrap_model(self.autoencoder), model, classifier=None,
                                    labels=labels.to(self.device), guidance_scale=0.0, verbose=False,
                                    cfg_scale=self.cfg_scale, null_class=self.num_classes)
        return images.float().clamp(-1, 1)


class ReconstructionComparison:
    """Callable returning the rows ``x``, ``D(E(x))`` (pre-trained decoder) and ``D'(E(x))`` (fine-tuned decoder) for
    a fixed set of tiles, so a sample-grid handler shows what fine-tuning changed."""

    def __init__(self, pretrained_autoencoder: torch.nn.Module, autoencoder: torch.nn.Module, images: torch.Tensor,
                 device: str | torch.device = "cpu") -> None:
        self.pretrained = pretrained_autoencoder
        self.autoencoder = autoencoder
        self.images = images[:8]
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self) -> list[torch.Tensor]:
        x = self.images.to(self.device)
        ae = unwrap_model(self.autoencoder)
        with evaluating(ae):
            z = ae.encode(x)[0]  # posterior mean, as the fine-tuning sees it
            rows = [x, self.pretrained.decode(z), ae.decode(z)]
        return [r.float().clamp(-1, 1) for r in rows]


def optimize_for_inference(module: torch.nn.Module, compile: bool = False, channels_last: bool = False,
                           compile_kwargs: dict | None = None) -> torch.nn.Module:
    """Eval mode, optionally channels-last memory layout and ``torch.compile``: the sampling speed options of
    ``bundles/generate.json`` (``compile``, ``channels_last``), off by default. Compilation happens on the first
    call (the generator's first batch)."""
    module = module.eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile:
        module = torch.compile(module, **(compile_kwargs or {}))
    return module
