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
"""A cache of the frozen autoencoder's posteriors, so that latent diffusion and latent classifier training do not
run the encoder on every step.

HistoDiffusion trains the diffusion model (stage 1) and the time-dependent latent classifier (stage 2) on latents
of a *frozen* latent autoencoder (LAE). MONAI's stock path (:class:`monai.inferers.LatentDiffusionInferer`) encodes
every batch again on every step. Since the encoder is frozen, the posterior ``q(z|x) = N(mu(x), sigma(x)^2)`` of
each tile is fixed: it is computed once here (:func:`encode_posteriors`), stored with the hash of the autoencoder
checkpoint that made it (:class:`LatentCache`), and training draws a fresh ``z = mu + sigma * eps`` per step
(:class:`~monai_histodiff.engines.prepare_batch.LatentDiffusionPrepareBatch`), which has exactly the distribution
of ``AutoencoderKL.encode_stage_2_inputs``.

Two storages, one entry point (:func:`get_or_create_latent_cache`): a path ending in ``.pt`` is a single-file
:class:`LatentCache` (loaded whole; the format of caches written before the sharded one), any other path a folder of
shards encoded by every rank of a run and read item by item
(:class:`~monai_histodiff.engines.sharded_latent_cache.ShardedLatentCache`, what the bundles use). Both give the same
:class:`CachedLatentDataset` items.
"""

from __future__ import annotations

import logging

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.utils import optional_import
from torch.utils.data import Dataset

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.validation import CorruptFileError
from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.handlers.checkpoint import UnsafeCheckpointError, file_sha256, safe_torch_load

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "LATENT_MU_KEY",
    "LATENT_SIGMA_KEY",
    "encode_posteriors",
    "LatentCache",
    "CachedLatentDataset",
    "get_or_create_latent_cache",
    "load_latent_cache",
]

logger = logging.getLogger(__name__)

LATENT_MU_KEY = "latent_mu"
LATENT_SIGMA_KEY = "latent_sigma"
_FORMAT_VERSION = 1
_CACHE_REMEDY = "delete it: the stage that reads it encodes the tiles again and rewrites it"


def _batch_size(batch: Mapping, image_key: str) -> int:
    return int(batch[image_key].shape[0])


@torch.no_grad()
def encode_posteriors(
    autoencoder: nn.Module,
    dataloader: Iterable,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    image_key: str = "image",
) -> dict[str, Any]:
    """Run ``autoencoder.encode`` once over every batch of ``dataloader`` and collect the posterior of each tile.

    The autoencoder is put in eval mode for the pass (its previous mode is restored afterwards) and run without
    gradients; a DDP-wrapped model is unwrapped. The dataloader should not augment (the posterior of the plain tile
    is what is cached) and need not shuffle.

    Args:
        autoencoder: a first-stage model whose ``encode(x)`` returns ``(z_mu, z_sigma)``, e.g.
            :class:`monai.networks.nets.AutoencoderKL`.
        dataloader: yields dict batches holding ``image_key`` (``[B, 3, H, W]`` tiles in [-1, 1], as made by
            :func:`monai_histodiff.data.tile_transforms`) and optionally per-item keys such as ``"label"``.
        device: device to encode on.
        amp: encode under ``torch.autocast`` (results are stored as float32 either way).
        progress: show a tqdm progress bar (when tqdm is installed).
        image_key: key of the tiles in each batch.

    Returns:
        ``{"mu": Tensor[N, C, h, w], "sigma": Tensor[N, C, h, w]}`` (float32, CPU) plus, for every other key whose
        batch value holds one entry per item (a 0/1-d tensor such as ``"label"``, or a list of strings / numbers such
        as ``"class"``), that key with the collected values: a ``[N]`` tensor for tensors, a list otherwise.
    """
    model = unwrap_model(autoencoder)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    mus: list[torch.Tensor] = []
    sigmas: list[torch.Tensor] = []
    extras: dict[str, list] = {}
    dropped: set[str] = set()
    iterator = tqdm(dataloader, desc="encoding latents", leave=False) if (progress and has_tqdm) else dataloader
    try:
        for batch in iterator:
            if not isinstance(batch, Mapping):
                raise TypeError(f"encode_posteriors expects dict batches with key {image_key!r}, got {type(batch)}")
            images = torch.as_tensor(batch[image_key]).to(device)
            with torch.autocast(device.type, enabled=amp):
                z_mu, z_sigma = model.encode(images)
            mus.append(z_mu.detach().float().cpu())
            sigmas.append(z_sigma.detach().float().cpu())
            n = _batch_size(batch, image_key)
            for key, value in batch.items():
                if key == image_key or key in dropped:
                    continue
                if isinstance(value, torch.Tensor) and value.ndim <= 1 and value.numel() == n:
                    extras.setdefault(key, []).extend(value.reshape(-1).tolist())
                elif isinstance(value, (list, tuple)) and len(value) == n and all(
                    isinstance(v, (str, int, float, bool)) for v in value
                ):
                    extras.setdefault(key, []).extend(value)
                else:  # not one simple value per item (meta data, masks, ...): not collected
                    dropped.add(key)
                    extras.pop(key, None)
    finally:
        model.train(was_training)
    if not mus:
        raise ValueError("encode_posteriors: the dataloader yielded no batches")
    out: dict[str, Any] = {"mu": torch.cat(mus), "sigma": torch.cat(sigmas)}
    count = out["mu"].shape[0]
    for key, values in extras.items():
        if key in dropped or len(values) != count:
            continue
        out[key] = torch.as_tensor(values) if all(isinstance(v, (int, float, bool)) for v in values) else values
    return out


class LatentCache:
    """Posteriors ``(mu, sigma)`` of a set of tiles under a frozen autoencoder, with their labels if any.

    The file written by :meth:`save` records the SHA-256 of the autoencoder checkpoint the posteriors came from;
    :meth:`load` refuses a cache made with another autoencoder, since its latents would silently be wrong.

    Args:
        mu: posterior means ``[N, C, h, w]``.
        sigma: posterior standard deviations ``[N, C, h, w]``.
        labels: class indices ``[N]`` (``None`` for unlabeled data).
        autoencoder_sha256: hex SHA-256 of the autoencoder checkpoint file
            (see :func:`monai_histodiff.handlers.file_sha256`).
        image_size: tile size the posteriors were computed at (recorded for checking and reporting).
        extras: other per-item values, e.g. ``{"class": [...]}``.
    """

    def __init__(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        labels: torch.Tensor | None = None,
        autoencoder_sha256: str | None = None,
        image_size: int | tuple[int, ...] | None = None,
        extras: dict[str, list] | None = None,
    ) -> None:
        if mu.shape != sigma.shape:
            raise ValueError(f"mu and sigma must have the same shape, got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        if labels is not None and labels.shape[0] != mu.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {mu.shape[0]} latents")
        self.mu = mu.detach().float().cpu().contiguous()
        self.sigma = sigma.detach().float().cpu().contiguous()
        self.labels = None if labels is None else torch.as_tensor(labels).long().cpu()
        self.autoencoder_sha256 = autoencoder_sha256
        self.image_size = image_size
        self.extras = dict(extras or {})

    @classmethod
    def from_posteriors(
        cls,
        posteriors: Mapping[str, Any],
        autoencoder_sha256: str | None = None,
        image_size: int | tuple[int, ...] | None = None,
        label_key: str = "label",
    ) -> LatentCache:
        """Build a cache from the output of :func:`encode_posteriors`."""
        labels = posteriors.get(label_key)
        extras = {k: v for k, v in posteriors.items() if k not in ("mu", "sigma", label_key)}
        extras = {k: (v.tolist() if isinstance(v, torch.Tensor) else list(v)) for k, v in extras.items()}
        return cls(posteriors["mu"], posteriors["sigma"], labels, autoencoder_sha256, image_size, extras)

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape ``(C, h, w)`` of one latent."""
        return tuple(self.mu.shape[1:])

    def posterior_signal_to_noise(self) -> float:
        """Spread of the posterior means across tiles over the mean posterior standard deviation.

        A latent ``z ~ q(z|x)`` is ``mu + sigma * eps``: when this ratio is near or below 1 the sampled latents are
        mostly posterior noise (an autoencoder whose KL term was too strong), and neither a latent classifier nor a
        diffusion model trained on them can learn what tells the tiles apart.
        """
        return float(self.mu.std() / self.sigma.mean().clamp_min(1e-12))

    def sample_latents(self, num: int, scale_factor: float, seed: int = 0) -> torch.Tensor:
        """``num`` latents ``scale_factor * (mu + sigma * eps)`` of distinct tiles drawn at random (all tiles when the
        cache holds fewer): the distribution the diffusion model was trained on."""
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:num]
        eps = torch.randn(self.mu[index].shape, generator=generator)
        return float(scale_factor) * (self.mu[index] + self.sigma[index] * eps)

    def warn_if_noisy(self, name: str, threshold: float = 2.0) -> float:
        """Log a warning naming ``name`` when :meth:`posterior_signal_to_noise` is below ``threshold``; return it."""
        snr = self.posterior_signal_to_noise()
        if snr < threshold:
            logger.warning(
                "%s: the autoencoder's posteriors are mostly noise (std of the means %.3f vs mean sigma %.3f, ratio "
                "%.2f < %.1f): latents sampled from them hardly depend on the tile. Check the autoencoder's KL weight "
                "and training length.", name, float(self.mu.std()), float(self.sigma.mean()), snr, threshold)
        return snr

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` whole (:func:`~monai_histodiff.data.atomic.atomic_write`)."""
        state = {
            "format_version": _FORMAT_VERSION,
            "mu": self.mu,
            "sigma": self.sigma,
            "labels": self.labels,
            "autoencoder_sha256": self.autoencoder_sha256,
            "image_size": list(self.image_size) if isinstance(self.image_size, tuple) else self.image_size,
            "count": len(self),
            "extras": self.extras,
        }
        return atomic_write(path, lambda p: torch.save(state, p))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_autoencoder_sha256: str | None = None,
             autoencoder_path: str | os.PathLike | None = None) -> LatentCache:
        """Read a cache written by :meth:`save`.

        Args:
            path: the cache file.
            expected_autoencoder_sha256: when given, the hash of the autoencoder checkpoint in use; a cache made with
                another autoencoder (or with no recorded hash) raises ``ValueError`` naming the cache and
                ``autoencoder_path``.
            autoencoder_path: the autoencoder checkpoint in use, named in that error.

        Raises:
            UnsafeCheckpointError: the file would need full unpickling to load (read with ``weights_only=True``).
            CorruptFileError: the file is truncated or corrupt (a ``ValueError``: :func:`get_or_create_latent_cache`
                rebuilds such a cache with a warning).
        """
        path = Path(path)
        reader, remedy = "LatentCache.load (latent cache)", _CACHE_REMEDY
        state = safe_torch_load(path, reader, remedy=remedy)
        if not isinstance(state, dict) or "mu" not in state or "sigma" not in state:
            raise CorruptFileError(path, reader, remedy, "not a latent cache: no 'mu' / 'sigma' entries")
        stored = state.get("autoencoder_sha256")
        if expected_autoencoder_sha256 is not None and stored != expected_autoencoder_sha256:
            in_use = f"the autoencoder in use{f', {autoencoder_path},' if autoencoder_path else ''}"
            raise ValueError(
                f"latent cache {path} was made with autoencoder hash {stored} but {in_use} has hash "
                f"{expected_autoencoder_sha256}: delete the cache or point to the right autoencoder"
            )
        if state.get("count", state["mu"].shape[0]) != state["mu"].shape[0]:
            raise ValueError(f"latent cache {path} is inconsistent: count {state['count']} != {state['mu'].shape[0]}")
        image_size = state.get("image_size")
        return cls(
            state["mu"],
            state["sigma"],
            state.get("labels"),
            stored,
            tuple(image_size) if isinstance(image_size, list) else image_size,
            state.get("extras"),
        )

    def dataset(self, augment: bool = False) -> CachedLatentDataset:
        """A :class:`CachedLatentDataset` over this cache."""
        return CachedLatentDataset(self, augment=augment)


class CachedLatentDataset(Dataset):
    """Dataset over a :class:`LatentCache` yielding ``{"latent_mu", "latent_sigma"[, "label"]}`` per item.

    Batches of it are what :class:`~monai_histodiff.engines.prepare_batch.LatentDiffusionPrepareBatch`,
    :class:`~monai_histodiff.engines.prepare_batch.NoisyLatentClassificationPrepareBatch` and
    :func:`~monai_histodiff.engines.scale_factor.compute_scale_factor` read in place of image batches.

    Args:
        cache: the cache: a :class:`LatentCache` (or anything with ``mu``, ``sigma`` and ``labels`` attributes), or a
            :class:`~monai_histodiff.engines.sharded_latent_cache.ShardedLatentCache` (anything with
            ``read_item(index) -> (mu, sigma, label or None)`` and a length), read item by item.
        augment: apply one random element of the dihedral group (random horizontal flip followed by a random
            rotation by a multiple of 90 degrees) to ``mu`` and ``sigma`` together. This approximates encoding the
            flipped / rotated tile: the encoder is convolutional but not exactly equivariant (padding, strided
            downsampling), so the latent of a transformed tile is close to, not equal to, the transformed latent.
            Off by default.
    """

    def __init__(self, cache: LatentCache, augment: bool = False) -> None:
        self.cache = cache
        self.augment = augment

    def __len__(self) -> int:
        if hasattr(self.cache, "read_item"):
            return len(self.cache)
        return int(self.cache.mu.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if hasattr(self.cache, "read_item"):
            mu, sigma, label = self.cache.read_item(index)
        else:
            mu, sigma = self.cache.mu[index], self.cache.sigma[index]
            label = None if self.cache.labels is None else int(self.cache.labels[index])
        if self.augment:
            if torch.rand(()) < 0.5:
                mu, sigma = mu.flip(-1), sigma.flip(-1)
            k = int(torch.randint(0, 4, ()))
            if k:
                mu, sigma = torch.rot90(mu, k, (-2, -1)), torch.rot90(sigma, k, (-2, -1))
        item: dict[str, Any] = {LATENT_MU_KEY: mu.contiguous(), LATENT_SIGMA_KEY: sigma.contiguous()}
        if label is not None:
            item["label"] = label
        return item


def get_or_create_latent_cache(
    path: str | os.PathLike,
    autoencoder: nn.Module,
    dataloader: Iterable,
    device: str | torch.device = "cpu",
    autoencoder_sha256: str | None = None,
    amp: bool = False,
    image_size: int | tuple[int, ...] | None = None,
    progress: bool = True,
    autoencoder_ckpt: str | os.PathLike | None = None,
    datalist_digest: str | None = None,
    shard_size: int | None = None,
    dtype: str = "float32",
) -> LatentCache | Any:
    """Load the cache at ``path`` when it exists and was made with this autoencoder, else encode and save it.

    ``path`` ending in ``.pt``: a single-file :class:`LatentCache`, loaded whole. A cache whose recorded hash differs
    from ``autoencoder_sha256`` is rebuilt (and overwritten) with a warning naming the cache and the autoencoder
    checkpoint, never used; one that would need full unpickling to load raises
    :class:`~monai_histodiff.handlers.UnsafeCheckpointError`. In a multi-process run call this on one rank and let the
    others wait on a barrier, then load.

    Any other ``path``: a folder of shards read item by item
    (:func:`~monai_histodiff.engines.sharded_latent_cache.get_or_create_sharded_latent_cache`): call it on every
    rank, which encode the shards between them; an interrupted encode resumes from its finished shards; a cache made
    with another autoencoder is rebuilt with a warning naming the folder and the autoencoder checkpoint; a corrupt
    shard is an error naming it. Returns a
    :class:`~monai_histodiff.engines.sharded_latent_cache.ShardedLatentCache`.

    Args:
        path: cache file (``.pt``) or folder.
        autoencoder: the frozen first-stage model.
        dataloader: non-augmenting loader over the tiles (see :func:`encode_posteriors`; for a folder, a DataLoader
            whose dataset, batch size, workers and collate function are used shard by shard).
        device: device to encode on.
        autoencoder_sha256: hash of the autoencoder checkpoint (see :func:`monai_histodiff.handlers.file_sha256`);
            computed from ``autoencoder_ckpt`` when not given; ``None`` for both trusts any cache.
        amp: encode under autocast.
        image_size: tile size, recorded in the cache.
        progress: show a progress bar while encoding.
        autoencoder_ckpt: the autoencoder checkpoint file, named in messages.
        datalist_digest: folder only: digest of the listed tiles, recorded and checked (default: from the dataset).
        shard_size: folder only: items per shard (default
            :data:`~monai_histodiff.engines.sharded_latent_cache.DEFAULT_SHARD_SIZE`).
        dtype: folder only: ``"float32"`` (default) or ``"float16"`` storage (measure before using float16).
    """
    path = Path(path)
    if autoencoder_sha256 is None and autoencoder_ckpt is not None:
        autoencoder_sha256 = file_sha256(autoencoder_ckpt)
    if path.suffix != ".pt":
        from monai_histodiff.engines.sharded_latent_cache import (
            DEFAULT_SHARD_SIZE,
            get_or_create_sharded_latent_cache,
        )

        return get_or_create_sharded_latent_cache(
            path, autoencoder, dataloader, device, autoencoder_sha256=autoencoder_sha256, amp=amp,
            image_size=image_size, progress=progress, autoencoder_ckpt=autoencoder_ckpt,
            datalist_digest=datalist_digest, shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
            dtype=dtype)
    if dtype != "float32":
        raise ValueError(f"a single-file latent cache ({path}) is stored as float32; dtype={dtype!r} needs a folder")
    if path.is_file():
        try:
            return LatentCache.load(path, expected_autoencoder_sha256=autoencoder_sha256,
                                    autoencoder_path=autoencoder_ckpt)
        except UnsafeCheckpointError:  # code in a cache file is a fault to report, not a stale cache to replace
            raise
        except ValueError as e:  # made with another autoencoder (or unreadable): rebuild
            warnings.warn(f"rebuilding the latent cache: {e}", stacklevel=2)
    posteriors = encode_posteriors(autoencoder, dataloader, device=device, amp=amp, progress=progress)
    cache = LatentCache.from_posteriors(posteriors, autoencoder_sha256=autoencoder_sha256, image_size=image_size)
    cache.save(path)
    return cache


def load_latent_cache(path: str | os.PathLike, expected_autoencoder_sha256: str | None = None,
                      autoencoder_path: str | os.PathLike | None = None) -> LatentCache | Any:
    """Read a cache that a stage wrote: a single ``.pt`` file (:meth:`LatentCache.load`) or a folder of shards
    (:meth:`~monai_histodiff.engines.sharded_latent_cache.ShardedLatentCache.open`)."""
    if Path(path).suffix == ".pt":
        return LatentCache.load(path, expected_autoencoder_sha256, autoencoder_path)
    from monai_histodiff.engines.sharded_latent_cache import ShardedLatentCache

    return ShardedLatentCache.open(path, expected_autoencoder_sha256, autoencoder_path)
