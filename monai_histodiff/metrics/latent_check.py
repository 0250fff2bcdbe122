"""How far the unconditional diffusion model's samples are from the latents it was trained on.

At the end of pre-training a model that samples latents with the data's per-channel mean and spread, and whose
samples sit as near the data as a second draw of the data does, is ready to be guided; one whose samples are
over-dispersed (a spread of 2-3 against the scaled data's 1.0) decodes to saturated blotches whatever the guidance
asks for. :func:`check_unconditional_latents` measures both in a fixed feature space, the frozen autoencoder's latent
space average-pooled to a few cells, so the numbers of two pre-training runs with the same autoencoder compare.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from monai_histodiff.metrics.frechet import frechet_distance

__all__ = ["latent_channel_statistics", "pooled_latent_features", "check_unconditional_latents"]


def latent_channel_statistics(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of ``[N, C, h, w]`` latents (over tiles and positions)."""
    x = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
    return {"mean": x.mean(1).tolist(), "std": x.std(1).tolist()}


def pooled_latent_features(latents: torch.Tensor, cells: int = 2) -> torch.Tensor:
    """``[N, C * cells * cells]`` features: each latent average-pooled to ``cells x cells`` (a fixed feature space)."""
    return F.adaptive_avg_pool2d(latents.detach().float(), cells).flatten(1)


def check_unconditional_latents(sampled: torch.Tensor, data: torch.Tensor, max_std_ratio: float = 1.5,
                                max_mean_shift: float = 0.5, cells: int = 2, seed: int = 0) -> dict[str, Any]:
    """Compare unconditional samples with training latents (both in the diffusion model's scaled space).

    Args:
        sampled: ``[N, C, h, w]`` latents the model sampled from noise.
        data: ``[M, C, h, w]`` training latents (``scale_factor * z``), ``M >= 2 N`` for the reference distance.
        max_std_ratio: warn when a channel's sampled spread is over this times the data's (or under its inverse).
        max_mean_shift: warn when a channel's sampled mean is further than this from the data's, in data std units.
        cells: pooling of :func:`pooled_latent_features`.
        seed: seed of the reference draw.

    Returns:
        ``{"sampled", "data"}`` (per-channel mean and std), ``"std_ratio"`` per channel, ``"mean_shift"`` per
        channel (in data std units), ``"fd_pooled"`` (Frechet distance of pooled samples to as many data latents),
        ``"fd_pooled_reference"`` (the same between two disjoint draws of the data: what a perfect model would get),
        ``"warnings"`` (sentences; empty when the model is close) and ``"ok"``.
    """
    n = sampled.shape[0]
    if data.shape[0] < 2 * n:
        raise ValueError(f"need at least {2 * n} data latents for {n} samples and the reference, got {data.shape[0]}")
    if sampled.shape[1:] != data.shape[1:]:
        raise ValueError(f"sampled latents {tuple(sampled.shape[1:])} and data {tuple(data.shape[1:])} differ in shape")
    s, d = latent_channel_statistics(sampled), latent_channel_statistics(data)
    ratio = [a / max(b, 1e-12) for a, b in zip(s["std"], d["std"])]
    shift = [(a - b) / max(sd, 1e-12) for a, b, sd in zip(s["mean"], d["mean"], d["std"])]
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    first, second = data[order[:n]], data[order[n:2 * n]]
    fd = frechet_distance(pooled_latent_features(first, cells), pooled_latent_features(sampled, cells))
    reference = frechet_distance(pooled_latent_features(first, cells), pooled_latent_features(second, cells))
    warnings = []
    for c, (r, m) in enumerate(zip(ratio, shift)):
        if not 1.0 / max_std_ratio <= r <= max_std_ratio:
            warnings.append(f"channel {c}: sampled spread {s['std'][c]:.2f} vs data {d['std'][c]:.2f} "
                            f"({r:.2f}x; allowed {1 / max_std_ratio:.2f}-{max_std_ratio:.2f}x)")
        if abs(m) > max_mean_shift:
            warnings.append(f"channel {c}: sampled mean {s['mean'][c]:+.2f} vs data {d['mean'][c]:+.2f} "
                            f"({m:+.2f} data std)")
    return {"num_sampled": n, "sampled": s, "data": d, "std_ratio": ratio, "mean_shift": shift, "fd_pooled": fd,
            "fd_pooled_reference": reference, "cells": cells, "warnings": warnings, "ok": not warnings}
