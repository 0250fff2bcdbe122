"""Networks of HistoDiffusion: the CLIP-style attention pooling and the two classifiers built on the LAE encoder."""

from __future__ import annotations

from .attention_pool import AttentionPool2d
from .image_classifier import HistoImageClassifier
from .latent_classifier import TimeConditionedLatentClassifier
from .tile_classifier import SMALL_RESNET, VIT_B16, TileClassifier

__all__ = [
    "AttentionPool2d",
    "HistoImageClassifier",
    "TimeConditionedLatentClassifier",
    "TileClassifier",
    "VIT_B16",
    "SMALL_RESNET",
]
