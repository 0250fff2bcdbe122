"""Class centroids and per-class distance thresholds from real labeled features.

Selective augmentation (Xue et al., HistoGAN, MedIA 2021, followed by HistoDiffusion) keeps a synthetic tile only if
its feature lies close enough to the centroid of its target class. The centroids and the distance thresholds are
computed here from REAL labeled tiles only. The official HistoGAN/HistoDiffAug code updates the centroids with
synthetic tiles selected in earlier rounds; we deliberately do not, so that the reference distribution cannot drift
towards the generator's output.
"""

from __future__ import annotations

import numpy as np
import torch

from monai.config import NdarrayOrTensor

__all__ = ["class_centroids", "distances_to_centroids", "real_distance_thresholds"]


def _as_features(features: NdarrayOrTensor, name: str = "features") -> torch.Tensor:
    t = torch.as_tensor(features).float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}.")
    return t


def _as_labels(labels: NdarrayOrTensor, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    t = torch.as_tensor(labels).reshape(-1).long()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries but there are {n} feature rows.")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}].")
    return t


def class_centroids(features: NdarrayOrTensor, labels: NdarrayOrTensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class over real labeled tiles.

    Only real tiles must be passed: unlike the official code, synthetic tiles kept in earlier rounds are not mixed
    into the centroids (see the module docstring). The centroid is the plain mean of the (L2-normalised) features and
    is not renormalised, as in HistoGAN.

    Args:
        features: ``[N, D]`` features of real labeled tiles, normally L2-normalised (see ``extract_features``).
        labels: ``[N]`` integer class indices in ``[0, num_classes)``.
        num_classes: number of classes ``K``.

    Returns:
        ``[K, D]`` float32 centroids.

    Raises:
        ValueError: on shape mismatches, out-of-range labels, or a class with no real tile (the class is named).
    """
    feats = _as_features(features)
    labs = _as_labels(labels, feats.shape[0], num_classes)
    counts = torch.bincount(labs, minlength=num_classes)
    missing = [k for k in range(num_classes) if counts[k] == 0]
    if missing:
        raise ValueError(f"no real labeled tiles for class index(es) {missing}; cannot compute their centroid.")
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, labs, feats)
    return sums / counts.unsqueeze(1).to(feats.dtype)


def distances_to_centroids(features: NdarrayOrTensor, centroids: NdarrayOrTensor) -> torch.Tensor:
    """Euclidean distance of each feature to each class centroid.

    Args:
        features: ``[N, D]`` (normalised) features.
        centroids: ``[K, D]`` centroids from :func:`class_centroids`.

    Returns:
        ``[N, K]`` float32 distances (computed exactly, without the matmul shortcut of ``torch.cdist``).
    """
    feats = _as_features(features)
    cents = _as_features(centroids, "centroids")
    if feats.shape[1] != cents.shape[1]:
        raise ValueError(f"feature dim {feats.shape[1]} != centroid dim {cents.shape[1]}.")
    return torch.cdist(feats, cents, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def real_distance_thresholds(
    real_features: NdarrayOrTensor, real_labels: NdarrayOrTensor, centroids: NdarrayOrTensor, percentile: float
) -> torch.Tensor:
    """Per-class distance threshold: a percentile of the real tiles' distances to their own class centroid.

    A synthetic tile of class ``k`` is then kept only if it is no farther from centroid ``k`` than ``percentile``
    percent of the real tiles of class ``k`` are.

    Args:
        real_features: ``[N, D]`` features of real labeled tiles.
        real_labels: ``[N]`` class indices.
        centroids: ``[K, D]`` centroids.
        percentile: in ``[0, 100]``; linear interpolation between order statistics (``numpy.percentile`` default).

    Returns:
        ``[K]`` float32 thresholds.

    Raises:
        ValueError: for a percentile outside ``[0, 100]`` or a class with no real tile (the class is named).
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    cents = _as_features(centroids, "centroids")
    num_classes = cents.shape[0]
    feats = _as_features(real_features, "real_features")
    labs = _as_labels(real_labels, feats.shape[0], num_classes, "real_labels")
    own = distances_to_centroids(feats, cents).gather(1, labs.unsqueeze(1)).squeeze(1)
    thresholds = torch.empty(num_classes, dtype=torch.float32)
    for k in range(num_classes):
        d = own[labs == k]
        if d.numel() == 0:
            raise ValueError(f"no real labeled tiles for class index {k}; cannot compute its distance threshold.")
        thresholds[k] = float(np.percentile(d.double().numpy(), float(percentile)))
    return thresholds
