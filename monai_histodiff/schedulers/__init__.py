"""Diffusion schedulers that complement MONAI's (see :mod:`monai.networks.schedulers`)."""

from __future__ import annotations

from .respaced import RespacedDDIMScheduler, RespacedDDPMScheduler, RespacedScheduler, respace_scheduler

__all__ = ["RespacedDDIMScheduler", "RespacedDDPMScheduler", "RespacedScheduler", "respace_scheduler"]
