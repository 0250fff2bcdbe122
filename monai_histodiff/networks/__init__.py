"""Networks of HistoDiffusion: the CLIP-style attention pooling and the two classifiers built on the LAE encoder; the
class-conditional StyleGAN2 of the paper's GAN comparison."""

from __future__ import annotations

from .attention_pool import AttentionPool2d
from .image_classifier import HistoImageClassifier
from .latent_classifier import TimeConditionedLatentClassifier
from .stylegan2 import ConditionalStyleGAN2Discriminator, ConditionalStyleGAN2Generator
from .tile_classifier import SMALL_RESNET, VIT_B16, TileClassifier

__all__ = [
    "AttentionPool2d",
    "HistoImageClassifier",
    "TimeConditionedLatentClassifier",
    "ConditionalStyleGAN2Generator",
    "ConditionalStyleGAN2Discriminator",
    "TileClassifier",
    "VIT_B16",
    "SMALL_RESNET",
]
