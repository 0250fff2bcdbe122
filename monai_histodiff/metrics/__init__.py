"""Evaluation metrics: whole-set classification report (Table 1) and Frechet distance of synthetic tiles."""

from __future__ import annotations

from .classification import classification_report, plot_confusion_matrix, write_report_json
from .evaluate import evaluate_classifier, predict, synthetic_frechet_distance
from .frechet import FrechetDistanceReport, frechet_distance, frechet_distance_report, is_inception_extractor

__all__ = [
    "FrechetDistanceReport",
    "classification_report",
    "evaluate_classifier",
    "predict",
    "synthetic_frechet_distance",
    "frechet_distance",
    "frechet_distance_report",
    "is_inception_extractor",
    "plot_confusion_matrix",
    "write_report_json",
]
