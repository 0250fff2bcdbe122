"""Evaluation metrics: whole-set classification report (Table 1), Frechet distance of synthetic tiles, and the judge
(an independent classifier that measures generated tiles)."""

from __future__ import annotations

from .classification import classification_report, plot_confusion_matrix, write_report_json
from .evaluate import evaluate_classifier, predict, synthetic_frechet_distance
from .frechet import FrechetDistanceReport, frechet_distance, frechet_distance_report, is_inception_extractor
from .judge import conditional_accuracy, judge_datalist, judge_generated, judge_reconstructions, paired_agreement
from .latent_check import check_unconditional_latents, latent_channel_statistics, pooled_latent_features

__all__ = [
    "FrechetDistanceReport",
    "check_unconditional_latents",
    "latent_channel_statistics",
    "pooled_latent_features",
    "judge_reconstructions",
    "classification_report",
    "conditional_accuracy",
    "evaluate_classifier",
    "predict",
    "synthetic_frechet_distance",
    "frechet_distance",
    "frechet_distance_report",
    "is_inception_extractor",
    "judge_datalist",
    "judge_generated",
    "paired_agreement",
    "plot_confusion_matrix",
    "write_report_json",
]
