"""
Respaced DDPM / DDIM schedulers that draw each sample's noise from its own generator, so that a generated tile does
not depend on the other tiles of its batch (the per-tile determinism of ``bundles/generate.json``).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler

from monai_histodiff.schedulers.respaced import RespacedDDIMScheduler, RespacedDDPMScheduler, respace_scheduler

__all__ = ["PerSampleNoiseMixin", "PerSampleNoiseDDPMScheduler", "PerSampleNoiseDDIMScheduler", "per_sample_sampler"]


class PerSampleNoiseMixin:
    """
    Draws the stochastic sampling noise of each sample from its own generator (``sample_generators[b]`` for sample
    ``b``, on CPU, then moved to the sample's device), so that a tile's noise does not depend on the other tiles of
    its batch. With one sample the noise equals what the base scheduler draws from that generator. Only the
    schedulers' ``noise_like`` hook changes; their update formulas are used as they are.
    """

    sample_generators: list[torch.Generator] | None = None

    def noise_like(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gens = self.sample_generators
        if gens is None:
            return super().noise_like(like, generator)  # type: ignore[misc]
        if len(gens) != like.shape[0]:
            raise ValueError(f"need one generator per sample ({like.shape[0]}), got {len(gens)}.")
        noise = torch.stack([torch.randn(tuple(like.shape[1:]), dtype=like.dtype, generator=g) for g in gens])
        return noise.to(like.device)


class PerSampleNoiseDDPMScheduler(PerSampleNoiseMixin, RespacedDDPMScheduler):
    """Respaced DDPM whose posterior noise comes from per-sample generators (when set)."""


class PerSampleNoiseDDIMScheduler(PerSampleNoiseMixin, RespacedDDIMScheduler):
    """Respaced DDIM whose ``eta > 0`` noise comes from per-sample generators (when set)."""


def per_sample_sampler(scheduler: Scheduler) -> PerSampleNoiseDDPMScheduler | PerSampleNoiseDDIMScheduler:
    """Respaced copy of ``scheduler`` (after ``set_timesteps``) that can draw its noise per sample."""
    base = respace_scheduler(scheduler)
    if isinstance(base, RespacedDDIMScheduler):
        return PerSampleNoiseDDIMScheduler.from_scheduler(base)  # type: ignore[return-value]
    return PerSampleNoiseDDPMScheduler.from_scheduler(base)  # type: ignore[return-value]
