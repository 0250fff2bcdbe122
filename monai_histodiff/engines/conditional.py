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
"""Plumbing of stage ``finetune_conditional``: the pre-trained unconditional diffusion model made class-conditional
and fine-tuned at the site for classifier-free guidance (the second route of issue 21, beside the paper's classifier
guidance).

- :func:`conditional_from_pretrained`: a ``DiffusionModelUNet`` with a class embedding of ``num_classes + 1``
  entries (the last is the null class), every other weight from the pre-trained checkpoint and the embedding at zero,
  so that fine-tuning starts from the pre-trained model's exact outputs for every class.
- :func:`conditional_latent_cache`: the labeled training tiles' latents with their classes and the site's unlabeled
  tiles' latents with the null class, in one cache.
- :func:`labeled_share_weights`: sampling weights giving the labeled tiles a set share of the draws.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from monai_histodiff.engines.latent_cache import LatentCache
from monai_histodiff.engines.sharded_latent_cache import ShardedLatentCache
from monai_histodiff.handlers.checkpoint import load_checkpoint, verify_parent

__all__ = [
    "CONDITIONAL_STAGE",
    "conditional_from_pretrained",
    "conditional_latent_cache",
    "conditional_meta",
    "check_conditional",
    "labeled_share_weights",
]

#: the stage that writes class-conditional diffusion checkpoints
CONDITIONAL_STAGE = "finetune_conditional"


def conditional_from_pretrained(
    path: str | os.PathLike, num_classes: int, device: str | torch.device = "cpu", use_ema: bool = True
) -> DiffusionModelUNet:
    """The pre-trained unconditional diffusion UNet at ``path`` as a class-conditional one.

    MONAI's ``DiffusionModelUNet`` adds a learnt class embedding to its timestep embedding when built with
    ``num_class_embeds``; here it gets ``num_classes + 1`` entries (index ``num_classes`` is the null class), all
    zero, and every other weight is the checkpoint's (EMA weights when stored and ``use_ema``). At the start of
    fine-tuning the model therefore outputs exactly what the pre-trained one does, for every class.

    Args:
        path: a ``pretrain_diffusion`` checkpoint.
        num_classes: the site's number of classes.
        device: where to put the model.
        use_ema: start from the EMA weights when the checkpoint has them.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    ckpt = load_checkpoint(path, stage="pretrain_diffusion", reader=CONDITIONAL_STAGE)
    args = dict(ckpt["meta"]["config"]["diffusion_args"])
    if args.get("num_class_embeds"):
        raise ValueError(f"{path} is already class-conditional (num_class_embeds={args['num_class_embeds']})")
    state = ckpt["state"]["ema" if use_ema and "ema" in ckpt["state"] else "diffusion"]
    model = DiffusionModelUNet(**args, num_class_embeds=num_classes + 1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"class_embedding.weight"}:
        raise ValueError(f"{path} does not match the conditional UNet: missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}")
    torch.nn.init.zeros_(model.class_embedding.weight)
    return model.to(device)


def conditional_latent_cache(labeled: LatentCache | ShardedLatentCache,
                             unlabeled: LatentCache | ShardedLatentCache | None,
                             null_class: int) -> LatentCache | ShardedLatentCache:
    """One cache of the labeled tiles' latents (their classes) and the unlabeled tiles' (class ``null_class``).

    Two in-memory caches give an in-memory one; when either is sharded the result is a
    :class:`ShardedLatentCache` over both (labeled items first), which copies nothing.

    Raises:
        ValueError: when the labeled cache has no labels, a class is out of ``[0, null_class)``, or the two caches
            come from different autoencoders or latent shapes.
    """
    if labeled.labels is None:
        raise ValueError("the labeled latent cache has no classes")
    if labeled.labels.numel() and (labeled.labels.min() < 0 or labeled.labels.max() >= null_class):
        raise ValueError(f"labeled classes must be in [0, {null_class}), got "
                         f"{int(labeled.labels.min())}..{int(labeled.labels.max())}")
    if unlabeled is None or len(unlabeled) == 0:
        return labeled
    if unlabeled.latent_shape != labeled.latent_shape:
        raise ValueError(f"latent shapes differ: labeled {labeled.latent_shape}, unlabeled {unlabeled.latent_shape}")
    if None not in (labeled.autoencoder_sha256, unlabeled.autoencoder_sha256) and \
            labeled.autoencoder_sha256 != unlabeled.autoencoder_sha256:
        raise ValueError("the labeled and unlabeled latents come from different autoencoders")
    if not (isinstance(labeled, LatentCache) and isinstance(unlabeled, LatentCache)):
        return ShardedLatentCache.concatenate([labeled, unlabeled], constant_labels=[None, int(null_class)])
    labels = torch.cat([labeled.labels, torch.full((len(unlabeled),), int(null_class), dtype=torch.long)])
    return LatentCache(torch.cat([labeled.mu, unlabeled.mu]), torch.cat([labeled.sigma, unlabeled.sigma]), labels,
                       labeled.autoencoder_sha256, labeled.image_size)


def labeled_share_weights(num_labeled: int, num_unlabeled: int, share: float) -> list[float]:
    """Per-item sampling weights (labeled items first) so that a draw is a labeled item with probability ``share``.

    With no unlabeled items every labeled item weighs the same.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"labeled_share must be in (0, 1], got {share}")
    if num_labeled < 1:
        raise ValueError("no labeled tiles to fine-tune on")
    if num_unlabeled == 0 or share == 1.0:
        return [1.0 / num_labeled] * num_labeled + [0.0] * num_unlabeled
    return [share / num_labeled] * num_labeled + [(1.0 - share) / num_unlabeled] * num_unlabeled


def conditional_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The null class and class count of a diffusion checkpoint's ``meta`` (``{}`` for an unconditional model)."""
    n = (meta.get("config") or {}).get("diffusion_args", {}).get("num_class_embeds")
    return {} if not n else {"null_class": int(n) - 1, "num_classes": int(n) - 1}


def check_conditional(path: str | os.PathLike, diffusion_path: str | os.PathLike, classes: list[str]) -> dict[str, Any]:
    """Check that the class-conditional checkpoint ``path`` was fine-tuned from ``diffusion_path`` (whose scale
    factor and scheduler the generation stage reads, and on whose latents the latent classifier was trained) and on
    these classes, in this order; returns its :func:`conditional_meta`.

    Raises:
        ValueError: naming the file, when it is not a class-conditional checkpoint or its classes differ.
        CheckpointMismatchError: naming both files, when it was fine-tuned from another diffusion model.
    """
    ckpt = load_checkpoint(path, stage=CONDITIONAL_STAGE, reader="generate (use_conditional)")
    verify_parent(ckpt, "diffusion", diffusion_path)
    info = conditional_meta(ckpt["meta"])
    if not info:
        raise ValueError(f"{path} holds no class embedding: not a class-conditional model")
    if list(ckpt["meta"].get("classes") or []) != list(classes):
        raise ValueError(f"{path} was fine-tuned on classes {ckpt['meta'].get('classes')} but the split has "
                         f"{list(classes)}: rerun finetune_conditional on this split")
    return info
