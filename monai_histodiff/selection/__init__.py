"""Centroid-based selective augmentation (Xue et al. 2021, as used by HistoDiffusion): pure selection math."""

from __future__ import annotations

from .centroids import class_centroids, distances_to_centroids, real_distance_thresholds
from .features import extract_features, extract_features_and_probs, l2_normalize
from .report import (
    DECISION_COLUMNS,
    plot_decisions_by_class,
    plot_distance_histograms,
    write_decisions_csv,
    write_selection_report,
)
from .rules import (
    BALANCE_MODES,
    REASONS,
    SelectionResult,
    balance_to_quota_fraction,
    quotas_from_ratio,
    select_candidates,
)

__all__ = [
    "BALANCE_MODES",
    "DECISION_COLUMNS",
    "REASONS",
    "SelectionResult",
    "balance_to_quota_fraction",
    "class_centroids",
    "distances_to_centroids",
    "extract_features",
    "extract_features_and_probs",
    "l2_normalize",
    "plot_decisions_by_class",
    "plot_distance_histograms",
    "quotas_from_ratio",
    "real_distance_thresholds",
    "select_candidates",
    "write_decisions_csv",
    "write_selection_report",
]
