"""Tasks of the HistoDiffusion MONAI Label sample app."""

from __future__ import annotations

from .infers import SynthesizeTilesInfer, TileClassifierInfer
from .trainers import TileClassifierTrain

__all__ = ["TileClassifierInfer", "SynthesizeTilesInfer", "TileClassifierTrain"]
