"""Diffusion schedulers that complement MONAI's (see :mod:`monai.networks.schedulers`)."""

from __future__ import annotations

from .per_sample import (
    PerSampleNoiseDDIMScheduler,
    PerSampleNoiseDDPMScheduler,
    PerSampleNoiseMixin,
    per_sample_sampler,
)
from .respaced import RespacedDDIMScheduler, RespacedDDPMScheduler, RespacedScheduler, respace_scheduler

__all__ = [
    "PerSampleNoiseDDIMScheduler",
    "PerSampleNoiseDDPMScheduler",
    "PerSampleNoiseMixin",
    "RespacedDDIMScheduler",
    "RespacedDDPMScheduler",
    "RespacedScheduler",
    "per_sample_sampler",
    "respace_scheduler",
]
