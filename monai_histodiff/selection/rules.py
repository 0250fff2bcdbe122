"""Keep/reject decisions for synthetic tiles: the selective rule and the random baseline.

Selective augmentation (Xue et al., HistoGAN, MedIA 2021; used by HistoDiffusion, Table 1 "selective") keeps a
synthetic tile generated for class ``k`` only if, in the feature space of a trained classifier,

1. the nearest class centroid is centroid ``k``,
2. its distance to centroid ``k`` is at most the class threshold (see ``real_distance_thresholds``), and
3. optionally, the classifier's confidence for class ``k`` is at least ``min_confidence``.

Per-class quotas (the augmentation ratio of Table 1 times the real class count, see :func:`quotas_from_ratio`) are
then filled from the eligible tiles closest to their centroid first. The "random" baseline of Table 1 fills the same
quotas by a seeded random choice among all candidates, without any filtering.

When some class cannot fill its quota, keeping every other class at its full quota would silently change the class
balance of the augmented training set. :func:`balance_to_quota_fraction` is the rule that prevents it: every class
keeps the same fraction of its quota, the smallest class fill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from monai.config import NdarrayOrTensor

from monai_histodiff.selection.centroids import distances_to_centroids

__all__ = ["BALANCE_MODES", "REASONS", "SelectionResult", "balance_to_quota_fraction", "quotas_from_ratio",
           "select_candidates"]

#: Every value ``SelectionResult.reason`` can take.
REASONS = (
    "kept",
    "nearest_centroid_is_other_class",
    "beyond_distance_threshold",
    "low_confidence",
    "over_quota",
    "balance_trimmed",
    "kept_random",
)

#: Every value the ``balance`` argument of :func:`select_candidates` can take.
BALANCE_MODES = ("proportional", "none")

_UNLIMITED = np.iinfo(np.int64).max


def _to_numpy(x: NdarrayOrTensor, dtype: Any = None) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.astype(dtype) if dtype is not None else arr


def _quota_array(quotas: Mapping[int, int] | Sequence[int] | NdarrayOrTensor | None, num_classes: int) -> np.ndarray:
    """Per-class quota as an int array; ``None`` means unlimited, a class missing from a dict gets quota 0."""
    if quotas is None:
        return np.full(num_classes, np.iinfo(np.int64).max, dtype=np.int64)
    if isinstance(quotas, Mapping):
        bad = [k for k in quotas if not 0 <= int(k) < num_classes]
        if bad:
            raise ValueError(f"quota given for unknown class index(es) {bad}; there are {num_classes} classes.")
        out = np.zeros(num_classes, dtype=np.int64)
        for k, q in quotas.items():
            out[int(k)] = int(q)
    else:
        out = _to_numpy(quotas).reshape(-1).astype(np.int64)
        if out.shape[0] != num_classes:
            raise ValueError(f"quotas has {out.shape[0]} entries but there are {num_classes} classes.")
    if (out < 0).any():
        raise ValueError(f"quotas must be non-negative, got {out.tolist()}.")
    return out


def quotas_from_ratio(real_counts: Mapping[int, int] | Sequence[int], ratio: float) -> dict[int, int]:
    """Per-class number of synthetic tiles to add for an augmentation ratio (Table 1: 50%, 100%, 200%, 300%).

    Args:
        real_counts: number of real training tiles per class, as ``{class: count}`` or a sequence indexed by class.
        ratio: synthetic / real ratio, e.g. ``0.5`` for "50%".

    Returns:
        ``{class: round(ratio * count)}`` (Python's round, i.e. half to even).
    """
    if ratio < 0:
        raise ValueError(f"ratio must be non-negative, got {ratio}.")
    items = real_counts.items() if isinstance(real_counts, Mapping) else enumerate(real_counts)
    return {int(k): int(round(float(ratio) * int(c))) for k, c in items}


def balance_to_quota_fraction(kept_per_class: Sequence[int], quotas: Sequence[int]) -> list[int]:
    """Trim per-class kept counts so every class keeps the same fraction of its quota: the smallest class fill.

    With ``f = min_k kept_k / quota_k`` (over classes with a positive, finite quota), class ``k`` keeps
    ``floor(f * quota_k)`` tiles (computed in exact fractions), so the kept set has the class proportions of the
    quotas, i.e. of the real training set when the quotas come from :func:`quotas_from_ratio`. The class that sets
    ``f`` is never trimmed, and no count grows. Classes with quota 0 keep 0.

    Args:
        kept_per_class: ``[K]`` tiles that passed the rule and fit the quota, per class (each at most its quota).
        quotas: ``[K]`` per-class quotas; a value of int64 max means unlimited (such a class is left as it is).

    Returns:
        ``[K]`` balanced kept counts.

    Raises:
        ValueError: on a length mismatch, a negative count or a kept count above its quota.

    Example:
        ``balance_to_quota_fraction([10, 3, 0], [10, 6, 0])`` is ``[5, 3, 0]`` (every class at 50%).
    """
    kept = [int(n) for n in kept_per_class]
    quota = [int(q) for q in quotas]
    if len(kept) != len(quota):
        raise ValueError(f"kept_per_class has {len(kept)} entries but quotas has {len(quota)}.")
    if any(n < 0 for n in kept) or any(q < 0 for q in quota):
        raise ValueError(f"counts must be non-negative, got kept {kept} and quotas {quota}.")
    over = [k for k, (n, q) in enumerate(zip(kept, quota)) if n > q]
    if over:
        raise ValueError(f"kept exceeds the quota for class index(es) {over}: kept {kept}, quotas {quota}.")
    limited = [k for k, q in enumerate(quota) if 0 < q < _UNLIMITED]
    if not limited:
        return kept
    fill = min(Fraction(kept[k], quota[k]) for k in limited)
    return [min(n, int(fill * q)) if k in limited else n for k, (n, q) in enumerate(zip(kept, quota))]


@dataclass
class SelectionResult:
    """Per-candidate outcome of :func:`select_candidates`, for the selection handler and its decisions CSV.

    Attributes:
        labels: ``[M]`` target class each candidate was generated for.
        nearest_class: ``[M]`` index of the nearest centroid.
        distance: ``[M]`` distance to the centroid of the candidate's own class.
        threshold: ``[M]`` distance threshold of the candidate's own class.
        confidence: ``[M]`` classifier confidence for the own class (NaN when not given).
        eligible: ``[M]`` passed the filters (always True in random mode).
        kept: ``[M]`` finally added to the training set.
        reason: ``[M]`` one of :data:`REASONS`.
        quotas: ``[K]`` quota per class (int64 max when unlimited).
        mode: ``"selective"`` or ``"random"``.
        balance: ``"proportional"`` or ``"none"``, see :func:`balance_to_quota_fraction`.
        selected: ``[K]`` per class, tiles that fit the quota before balancing (``kept`` + ``balance_trimmed``).
    """

    labels: np.ndarray
    nearest_class: np.ndarray
    distance: np.ndarray
    threshold: np.ndarray
    confidence: np.ndarray
    eligible: np.ndarray
    kept: np.ndarray
    reason: np.ndarray
    quotas: np.ndarray
    mode: str = "selective"
    balance: str = "none"
    selected: np.ndarray | None = None
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_classes = int(self.quotas.shape[0])
        if self.selected is None:
            self.selected = np.array([int(self.kept[self.labels == k].sum()) for k in range(self.num_classes)])

    @property
    def kept_indices(self) -> np.ndarray:
        """Indices of the kept candidates, in input order."""
        return np.flatnonzero(self.kept)

    def per_class_summary(self) -> dict[int, dict[str, Any]]:
        """Counts per class: candidates, eligible, quota (None if unlimited), selected (fitting the quota before
        balancing), trimmed (by balancing), kept, shortfall (quota - kept) and fill (kept / quota; None if unlimited,
        1.0 for quota 0)."""
        summary: dict[int, dict[str, Any]] = {}
        for k in range(self.num_classes):
            mask = self.labels == k
            quota = int(self.quotas[k])
            kept = int(self.kept[mask].sum())
            selected = int(self.selected[k])
            summary[k] = {
                "candidates": int(mask.sum()),
                "eligible": int(self.eligible[mask].sum()),
                "quota": None if quota == _UNLIMITED else quota,
                "selected": selected,
                "trimmed": selected - kept,
                "kept": kept,
                "shortfall": 0 if quota == _UNLIMITED else max(quota - kept, 0),
                "fill": None if quota == _UNLIMITED else (kept / quota if quota else 1.0),
            }
        return summary

    def reason_counts(self) -> dict[int, dict[str, int]]:
        """Per class, how many candidates got each reason of :data:`REASONS` (all reasons listed, zeros included)."""
        return {k: {r: int(((self.labels == k) & (self.reason == r)).sum()) for r in REASONS}
                for k in range(self.num_classes)}

    def to_rows(
        self,
        files: Sequence[str],
        class_names: Sequence[str] | None = None,
        manifest_confidences: Sequence[float] | NdarrayOrTensor | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per candidate for the decisions CSV (see ``report.DECISION_COLUMNS``).

        Args:
            files: path of each candidate tile, in candidate order.
            class_names: name per class index; defaults to the index as a string.
            manifest_confidences: optional ``[M]`` confidence recorded by the generation stage (the generating
                classifier's), written as ``manifest_confidence``; it is only recorded, never filtered on.

        Returns:
            Rows with keys file, class, nearest_class, distance, threshold, confidence (the one of
            :attr:`confidence`, the one filtered on), manifest_confidence, kept, reason; a confidence is "" when
            absent.
        """
        if len(files) != len(self.labels):
            raise ValueError(f"got {len(files)} files for {len(self.labels)} candidates.")
        if manifest_confidences is None:
            manifest = np.full(len(files), np.nan)
        else:
            manifest = _to_numpy(manifest_confidences).reshape(-1).astype(np.float64)
            if manifest.shape[0] != len(files):
                raise ValueError(f"got {manifest.shape[0]} manifest confidences for {len(files)} candidates.")
        names = list(class_names) if class_names is not None else [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes.")
        rows = []
        for i, f in enumerate(files):
            conf, man = float(self.confidence[i]), float(manifest[i])
            rows.append(
                {
                    "file": str(f),
                    "class": names[int(self.labels[i])],
                    "nearest_class": names[int(self.nearest_class[i])],
                    "distance": float(self.distance[i]),
                    "threshold": float(self.threshold[i]),
                    "confidence": "" if np.isnan(conf) else conf,
                    "manifest_confidence": "" if np.isnan(man) else man,
                    "kept": bool(self.kept[i]),
                    "reason": str(self.reason[i]),
                }
            )
        return rows


def select_candidates(
    candidate_features: NdarrayOrTensor,
    candidate_labels: NdarrayOrTensor,
    centroids: NdarrayOrTensor,
    thresholds: NdarrayOrTensor,
    confidences: NdarrayOrTensor | None = None,
    min_confidence: float | None = None,
    quotas: Mapping[int, int] | Sequence[int] | NdarrayOrTensor | None = None,
    mode: str = "selective",
    seed: int = 0,
    balance: str = "none",
) -> SelectionResult:
    """Decide which synthetic tiles to add to the training set.

    Reasons are assigned in this order: ``nearest_centroid_is_other_class``, ``beyond_distance_threshold``,
    ``low_confidence``; tiles passing all three are eligible and fill their class quota closest-first (ties by input
    order), the rest get ``over_quota``. In ``random`` mode nothing is filtered: each class quota is filled by a
    seeded random choice among all candidates of that class (``kept_random``), the rest get ``over_quota``.
    With ``balance="proportional"`` and quotas, the per-class counts that fit the quota are then trimmed by
    :func:`balance_to_quota_fraction` (in both modes); the trimmed tiles (the farthest ones in selective mode, the
    last drawn in random mode) get ``balance_trimmed``.

    Args:
        candidate_features: ``[M, D]`` features of the synthetic tiles (same extractor and normalisation as the
            centroids).
        candidate_labels: ``[M]`` class each tile was generated for.
        centroids: ``[K, D]`` real-tile class centroids.
        thresholds: ``[K]`` per-class distance thresholds.
        confidences: optional ``[M]`` classifier probability of the own class; recorded, and filtered on when
            ``min_confidence`` is set.
        min_confidence: optional minimum confidence (selective mode only).
        quotas: per-class maximum number kept, as ``{class: n}`` (missing classes get 0) or a ``[K]`` sequence;
            ``None`` keeps every eligible tile.
        mode: ``"selective"`` or ``"random"``.
        seed: seed of the random choice in ``random`` mode.
        balance: ``"none"`` keeps what fits each class quota; ``"proportional"`` keeps every class at the same
            fraction of its quota (see :func:`balance_to_quota_fraction`). No effect without quotas.

    Returns:
        A :class:`SelectionResult`.

    Raises:
        ValueError: on an unknown mode or balance, inconsistent shapes, out-of-range labels, or ``min_confidence``
            without ``confidences``.
    """
    if mode not in ("selective", "random"):
        raise ValueError(f"mode must be 'selective' or 'random', got {mode!r}.")
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}.")
    dists = _to_numpy(distances_to_centroids(candidate_features, centroids), np.float64)
    m, k_classes = dists.shape
    labels = _to_numpy(candidate_labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != m:
        raise ValueError(f"candidate_labels has {labels.shape[0]} entries for {m} candidates.")
    if m and (labels.min() < 0 or labels.max() >= k_classes):
        raise ValueError(f"candidate_labels must lie in [0, {k_classes}), got [{labels.min()}, {labels.max()}].")
    thr = _to_numpy(thresholds).reshape(-1).astype(np.float64)
    if thr.shape[0] != k_classes:
        raise ValueError(f"thresholds has {thr.shape[0]} entries for {k_classes} classes.")
    if confidences is None:
        if min_confidence is not None:
            raise ValueError("min_confidence is set but no confidences were given.")
        conf = np.full(m, np.nan)
    else:
        conf = _to_numpy(confidences).reshape(-1).astype(np.float64)
        if conf.shape[0] != m:
            raise ValueError(f"confidences has {conf.shape[0]} entries for {m} candidates.")
    quota = _quota_array(quotas, k_classes)

    idx = np.arange(m)
    nearest = dists.argmin(axis=1) if m else np.zeros(0, dtype=np.int64)
    own_dist = dists[idx, labels] if m else np.zeros(0)
    own_thr = thr[labels] if m else np.zeros(0)
    reason = np.full(m, "over_quota", dtype=object)
    kept = np.zeros(m, dtype=bool)

    if mode == "selective":
        # the nearest centroid must be the own one; a tie with another class counts as own
        other_nearer = own_dist > dists.min(axis=1) if m else np.zeros(0, dtype=bool)
        nearest = np.where(other_nearer, nearest, labels)
        beyond = ~other_nearer & (own_dist > own_thr)
        low = np.zeros(m, dtype=bool)
        if min_confidence is not None:
            low = ~other_nearer & ~beyond & ~(conf >= float(min_confidence))
        reason[other_nearer] = "nearest_centroid_is_other_class"
        reason[beyond] = "beyond_distance_threshold"
        reason[low] = "low_confidence"
        eligible = ~(other_nearer | beyond | low)
        # per class, the tiles that fit the quota in priority order (closest first)
        chosen = []
        for k in range(k_classes):
            cand = idx[eligible & (labels == k)]
            chosen.append(cand[np.argsort(own_dist[cand], kind="stable")][: quota[k]])
    else:
        eligible = np.ones(m, dtype=bool)
        rng = np.random.default_rng(seed)
        chosen = []
        for k in range(k_classes):  # priority order = draw order
            cand = idx[labels == k]
            n = int(min(quota[k], cand.shape[0]))
            chosen.append(rng.choice(cand, size=n, replace=False) if n else cand[:0])
    selected = np.array([c.shape[0] for c in chosen], dtype=np.int64)
    targets = balance_to_quota_fraction(selected, quota) if balance == "proportional" else selected.tolist()
    for k in range(k_classes):
        kept[chosen[k][: targets[k]]] = True
        reason[chosen[k][targets[k]:]] = "balance_trimmed"
    reason[kept] = "kept" if mode == "selective" else "kept_random"

    return SelectionResult(
        labels=labels,
        nearest_class=nearest.astype(np.int64),
        distance=own_dist,
        threshold=own_thr,
        confidence=conf,
        eligible=eligible,
        kept=kept,
        reason=reason,
        quotas=quota,
        mode=mode,
        balance=balance,
        selected=selected,
    )
