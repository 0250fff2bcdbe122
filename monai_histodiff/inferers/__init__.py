"""Inferers that complement MONAI's (see :mod:`monai.inferers`)."""

from __future__ import annotations

from .class_conditional import ClassConditionalDiffusionInferer, class_conditional_output, classifier_free_guidance
from .guided import ClassifierGuidedLatentDiffusionInferer

__all__ = [
    "ClassifierGuidedLatentDiffusionInferer",
    "ClassConditionalDiffusionInferer",
    "class_conditional_output",
    "classifier_free_guidance",
]
