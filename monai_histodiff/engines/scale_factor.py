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
"""The latent scale factor of a latent diffusion model: ``1 / std`` of the autoencoder's latents.

Latent diffusion (Rombach et al. 2022, which HistoDiffusion builds on) rescales the latents to unit variance before
diffusion. MONAI's tutorials estimate the std from a single batch; here it is one global std over every value of
several batches (or of a whole :class:`~monai_histodiff.engines.latent_cache.LatentCache` or
:class:`~monai_histodiff.engines.sharded_latent_cache.ShardedLatentCache`), which is a much less noisy estimate, so a
rerun of the stage gives (nearly) the same factor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from monai_histodiff.engines.distributed import get_rank, get_world_size, unwrap_model
from monai_histodiff.engines.latent_cache import LatentCache
from monai_histodiff.engines.prepare_batch import sample_latents
from monai_histodiff.engines.sharded_latent_cache import ShardedLatentCache

__all__ = ["RunningMoments", "compute_scale_factor"]


class RunningMoments:
    """Count, mean and sum of squared deviations of a stream of values (Chan et al. parallel update, float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add every element of ``values``."""
        v = values.detach().double().reshape(-1)
        if v.numel() == 0:
            return
        self.merge(v.numel(), float(v.mean()), float(((v - v.mean()) ** 2).sum()))

    def merge(self, count: int, mean: float, m2: float) -> None:
        """Add a block of ``count`` values with the given mean and sum of squared deviations."""
        total = self.count + count
        if total == 0:
            return
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    @property
    def std(self) -> float:
        """Unbiased standard deviation (as ``torch.std``) of all values seen."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else float("nan")


def _all_reduce_moments(moments: RunningMoments, device: torch.device) -> RunningMoments:
    """Combine the moments of every rank when running distributed (each rank saw different batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return moments
    local = torch.tensor([moments.count, moments.mean, moments.m2], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    out = RunningMoments()
    for g in gathered:
        out.merge(int(g[0].item()), float(g[1].item()), float(g[2].item()))
    return out


@torch.no_grad()
def compute_scale_factor(
    autoencoder: nn.Module | LatentCache | ShardedLatentCache | None,
    dataloader: Iterable | None = None,
    num_batches: int | None = 50,
    device: str | torch.device = "cpu",
    amp: bool = False,
    image_key: str = "image",
) -> float:
    """Return ``1 / std`` of the latents, pooling every value of ``num_batches`` batches into one global std.

    Latents are posterior samples ``z ~ q(z|x)``, as the diffusion model sees them: from
    ``autoencoder.encode_stage_2_inputs`` for image batches, or ``mu + sigma * eps`` for batches of cached posteriors
    (``"latent_mu"`` / ``"latent_sigma"``). In a distributed run the statistics of all ranks are combined.

    Args:
        autoencoder: the frozen first-stage model (put in eval mode for the pass, its mode restored after), or a
            :class:`LatentCache`, whose whole content is then used (``dataloader`` and ``num_batches`` ignored), or a
            :class:`ShardedLatentCache`, whose whole content is used too, each rank of a distributed run reading its
            contiguous share of the items (the statistics are combined).
            May be ``None`` when ``dataloader`` yields cached posteriors.
        dataloader: batches of images (``image_key``) or cached posteriors.
        num_batches: number of batches to use from the start of ``dataloader``; ``None`` for all of it. Use a
            shuffling loader (or a whole epoch) so the batches are representative.
        device: device to encode on.
        amp: encode under ``torch.autocast`` (statistics are accumulated in float64 either way).
        image_key: key of the images in image batches.

    Raises:
        ValueError: no values were seen, or the latents have zero (or undefined) spread.
    """
    device = torch.device(device)
    moments = RunningMoments()
    if isinstance(autoencoder, LatentCache):
        cache = autoencoder
        for start in range(0, len(cache), 1024):
            mu, sigma = cache.mu[start : start + 1024], cache.sigma[start : start + 1024]
            moments.update(mu + sigma * torch.randn_like(sigma))
    elif isinstance(autoencoder, ShardedLatentCache):
        cache, rank, world = autoencoder, get_rank(), get_world_size()
        start, stop = len(cache) * rank // world, len(cache) * (rank + 1) // world
        for mu, sigma in cache.iter_posteriors(1024, start, stop):
            moments.update(mu + sigma * torch.randn_like(sigma))
    else:
        if dataloader is None:
            raise ValueError("compute_scale_factor needs a dataloader unless given a LatentCache")
        model = unwrap_model(autoencoder) if autoencoder is not None else None
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            batches = dataloader if num_batches is None else itertools.islice(dataloader, num_batches)
            for batch in batches:
                with torch.autocast(device.type, enabled=amp):
                    z = sample_latents(batch, model, device, image_key=image_key)
                moments.update(z.float())
        finally:
            if model is not None:
                model.train(was_training)
    moments = _all_reduce_moments(moments, device)
    std = moments.std
    if moments.count < 2 or not math.isfinite(std) or std <= 0:
        raise ValueError(f"cannot compute a scale factor: latent std is {std} over {moments.count} values")
    return 1.0 / std
