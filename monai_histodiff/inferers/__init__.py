"""Inferers that complement MONAI's (see :mod:`monai.inferers`)."""

from __future__ import annotations

from .guided import ClassifierGuidedLatentDiffusionInferer

__all__ = ["ClassifierGuidedLatentDiffusionInferer"]
