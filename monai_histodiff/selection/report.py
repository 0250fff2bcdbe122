"""Audit trail of a selection round: decisions CSV, summary JSON, distance histograms and kept/rejected bars.

These files let a reviewer check why each synthetic tile was kept or rejected, whether the distance thresholds
sit sensibly relative to the real tiles' own distances, and whether every class got its quota.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.config import NdarrayOrTensor, PathLike
from monai.utils import optional_import

Figure, _ = optional_import("matplotlib.figure", name="Figure")
FigureCanvasAgg, _ = optional_import("matplotlib.backends.backend_agg", name="FigureCanvasAgg")

__all__ = [
    "DECISION_COLUMNS",
    "write_decisions_csv",
    "write_selection_report",
    "plot_distance_histograms",
    "plot_decisions_by_class",
]

#: Column order of the decisions CSV (see ``SelectionResult.to_rows``).
DECISION_COLUMNS = (
    "file",
    "class",
    "nearest_class",
    "distance",
    "threshold",
    "confidence",
    "manifest_confidence",
    "kept",
    "reason",
)


def _ensure_parent(path: PathLike) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays and non-string dict keys to plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_decisions_csv(rows: Sequence[Mapping[str, Any]], path: PathLike) -> None:
    """Write one row per candidate tile with the columns of :data:`DECISION_COLUMNS` (extra keys are ignored).

    Args:
        rows: e.g. ``SelectionResult.to_rows(files, class_names)``.
        path: output CSV; parent folders are created.
    """
    _ensure_parent(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(DECISION_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_selection_report(summary: Mapping[Any, Any], path_json: PathLike) -> None:
    """Write a selection summary (e.g. ``SelectionResult.per_class_summary()`` plus run settings) as JSON.

    Args:
        summary: JSON-like mapping; numpy/torch values and integer keys are converted.
        path_json: output file; parent folders are created.
    """
    _ensure_parent(path_json)
    with open(path_json, "w", encoding="utf-8") as f:
        json.dump(_jsonable(summary), f, indent=2, sort_keys=False)
        f.write("\n")


def _per_class(values: Mapping[int, NdarrayOrTensor] | Sequence[NdarrayOrTensor], k: int) -> np.ndarray:
    v = values.get(k, ()) if isinstance(values, Mapping) else (values[k] if k < len(values) else ())
    v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    return v.reshape(-1).astype(np.float64)


def plot_distance_histograms(
    real_dists_per_class: Mapping[int, NdarrayOrTensor] | Sequence[NdarrayOrTensor],
    cand_dists_per_class: Mapping[int, NdarrayOrTensor] | Sequence[NdarrayOrTensor],
    thresholds: NdarrayOrTensor | Sequence[float],
    class_names: Sequence[str],
    path_png: PathLike,
    bins: int = 30,
) -> None:
    """Plot, per class, the real tiles' and the candidates' distances to the class centroid, with the threshold.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend is changed).

    Args:
        real_dists_per_class: per class index, distances of real tiles to their own centroid.
        cand_dists_per_class: per class index, distances of candidates to their own class centroid.
        thresholds: ``[K]`` thresholds, drawn as vertical dashed lines.
        class_names: ``K`` names, one subplot each.
        path_png: output PNG; parent folders are created.
        bins: number of histogram bins shared by both histograms of a class.

    Raises:
        OptionalImportError: when matplotlib is not installed.
    """
    thr = np.asarray(thresholds.detach().cpu() if isinstance(thresholds, torch.Tensor) else thresholds, np.float64)
    num = len(class_names)
    ncols = min(num, 3)
    nrows = int(np.ceil(num / max(ncols, 1)))
    fig = Figure(figsize=(4.0 * max(ncols, 1), 3.0 * max(nrows, 1)), layout="constrained")
    FigureCanvasAgg(fig)
    for k, name in enumerate(class_names):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        real, cand = _per_class(real_dists_per_class, k), _per_class(cand_dists_per_class, k)
        both = np.concatenate([real, cand, thr[k : k + 1]])
        edges = np.linspace(both.min(), both.max() + 1e-9, bins + 1) if both.size else bins
        if real.size:
            ax.hist(real, bins=edges, alpha=0.6, density=True, label=f"real (n={real.size})")
        if cand.size:
            ax.hist(cand, bins=edges, alpha=0.6, density=True, label=f"candidates (n={cand.size})")
        if k < thr.size:
            ax.axvline(float(thr[k]), color="k", linestyle="--", label=f"threshold {thr[k]:.3f}")
        ax.set_title(str(name))
        ax.set_xlabel("distance to class centroid")
        ax.legend(fontsize="small")
    _ensure_parent(path_png)
    fig.savefig(os.fspath(path_png), dpi=100, format="png")


#: Bar order and colours of :func:`plot_decisions_by_class` (kept first, then rejections from last to first filter).
_REASON_STYLE = (
    ("kept", "tab:green"),
    ("kept_random", "tab:olive"),
    ("balance_trimmed", "tab:purple"),
    ("over_quota", "tab:gray"),
    ("low_confidence", "tab:orange"),
    ("beyond_distance_threshold", "tab:red"),
    ("nearest_centroid_is_other_class", "tab:brown"),
)


def plot_decisions_by_class(
    reason_counts: Mapping[int, Mapping[str, int]] | Sequence[Mapping[str, int]],
    quotas: Sequence[int | None],
    class_names: Sequence[str],
    path_png: PathLike,
) -> None:
    """Plot, per class, one horizontal bar stacked by decision reason, with the class quota as a black tick.

    A class short of its quota shows a bar whose kept part ends before the tick; each class label gives its kept count
    and quota, and the legend counts each reason over all classes.

    Args:
        reason_counts: per class index, ``{reason: count}`` (e.g. ``SelectionResult.reason_counts()``).
        quotas: ``K`` quotas (``None`` when unlimited: no tick).
        class_names: ``K`` names, one bar each.
        path_png: output PNG; parent folders are created.

    Raises:
        OptionalImportError: when matplotlib is not installed.
    """
    num = len(class_names)
    fig = Figure(figsize=(10.0, 1.5 + 0.5 * max(num, 3)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    counts = [dict(reason_counts.get(k, {}) if isinstance(reason_counts, Mapping) else reason_counts[k])
              for k in range(num)]
    ys = np.arange(num)
    left = np.zeros(num)
    for reason, colour in _REASON_STYLE:
        widths = np.array([c.get(reason, 0) for c in counts], dtype=np.float64)
        if widths.sum() == 0:
            continue
        ax.barh(ys, widths, left=left, color=colour, label=f"{reason} ({int(widths.sum())})")
        left += widths
    labelled = False
    ticks = []
    for k, q in enumerate(quotas):
        kept = counts[k].get("kept", 0) + counts[k].get("kept_random", 0)
        ticks.append(f"{class_names[k]}\nkept {kept}" + ("" if q is None else f" / quota {q}"))
        if q is not None:
            ax.plot([q, q], [k - 0.45, k + 0.45], color="k", linewidth=2.5, label=None if labelled else "quota")
            labelled = True
    ax.set_yticks(ys, ticks)
    ax.invert_yaxis()
    ax.set_xlabel("synthetic candidates")
    ax.set_title("selection per class: kept / rejected by reason (tick = quota)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _ensure_parent(path_png)
    fig.savefig(os.fspath(path_png), dpi=100, format="png")
