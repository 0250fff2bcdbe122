"""Whole-test-set classification metrics for the augmented tissue classifier (HistoDiffusion Table 1).

Table 1 reports accuracy, F1, sensitivity and specificity. Here every number is computed once over the whole
evaluation set (never averaged over batches) from MONAI's confusion-matrix machinery
(:func:`monai.metrics.get_confusion_matrix` and :func:`monai.metrics.compute_confusion_matrix_metric`) applied to
one-hot tensors, so the per-class values are MONAI's.

Conventions for undefined values (MONAI returns NaN for 0/0):

* precision and F1 of a class with a 0/0 denominator (never predicted, or absent and never predicted) are 0;
* sensitivity of a class absent from ``y_true`` and specificity of a class that is every sample's label are
  undefined and reported as ``None``;
* macro averages are unweighted means over the classes present in ``y_true`` (support > 0); classes absent from
  ``y_true`` are listed under ``absent_classes`` and excluded, so a test split missing a class is not scored as if
  the classifier failed on it. Undefined values among present classes are skipped.
* ``weighted_*`` averages weight present classes by support. Note: weighted sensitivity always equals accuracy, which
  is what Table 1 of the paper shows, so the paper's "sensitivity" is most likely support-weighted; compare
  ``weighted_sensitivity`` / ``weighted_f1`` with the paper, and the ``macro_*`` values between our own runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.config import NdarrayOrTensor, PathLike
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
from monai.utils import optional_import

Figure, _ = optional_import("matplotlib.figure", name="Figure")
FigureCanvasAgg, _ = optional_import("matplotlib.backends.backend_agg", name="FigureCanvasAgg")

__all__ = ["classification_report", "plot_confusion_matrix", "write_report_json"]


def _to_index_tensor(y: NdarrayOrTensor, num_classes: int, name: str) -> torch.Tensor:
    """Class indices ``[N]`` from indices or one-hot/probabilities ``[N, K]`` (argmax)."""
    t = torch.as_tensor(y.detach().cpu() if isinstance(y, torch.Tensor) else np.asarray(y))
    if t.ndim == 2 and t.shape[1] == num_classes and num_classes > 1:
        t = t.argmax(dim=1)
    t = t.reshape(-1).long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}].")
    return t


def _nan_to(values: torch.Tensor, fill: float | None) -> list[float | None]:
    return [fill if math.isnan(v) else float(v) for v in values.tolist()]


def _mean(values: Sequence[float | None], weights: Sequence[float] | None = None) -> float | None:
    """(Weighted) mean of the defined values; None when none is defined."""
    w = [1.0] * len(values) if weights is None else [float(x) for x in weights]
    pairs = [(v, wi) for v, wi in zip(values, w) if v is not None]
    total = sum(wi for _, wi in pairs)
    return None if total == 0 else sum(v * wi for v, wi in pairs) / total


def classification_report(
    y_true: NdarrayOrTensor, y_pred: NdarrayOrTensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1 / sensitivity / specificity, a per-class table and the confusion matrix of a test set.

    See the module docstring for how undefined values and absent classes are handled.

    Args:
        y_true: ``[N]`` true class indices (or ``[N, K]`` one-hot).
        y_pred: ``[N]`` predicted class indices (or ``[N, K]`` one-hot / scores, argmax is taken).
        class_names: ``K`` class names; fixes the number of classes.

    Returns:
        A JSON-serialisable dict with ``num_samples``, ``accuracy``, ``macro_f1``, ``macro_sensitivity``,
        ``macro_specificity``, ``macro_precision``, ``weighted_f1``, ``weighted_sensitivity``, ``per_class``
        (``{name: {support, precision, sensitivity, specificity, f1}}``), ``confusion_matrix`` (``[K][K]`` nested
        lists, rows = true class, columns = predicted class), ``class_names`` and ``absent_classes``.

    Raises:
        ValueError: on empty input, a length mismatch or out-of-range labels.
    """
    names = [str(n) for n in class_names]
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}.")
    t = _to_index_tensor(y_true, k, "y_true")
    p = _to_index_tensor(y_pred, k, "y_pred")
    if t.numel() != p.numel():
        raise ValueError(f"y_true has {t.numel()} samples but y_pred has {p.numel()}.")
    if t.numel() == 0:
        raise ValueError("empty y_true / y_pred.")

    # the whole set as one "image" whose N samples are pixels: [1, K, N] one-hot -> tp/fp/tn/fn per class over all N
    t_oh = torch.nn.functional.one_hot(t, k).T.unsqueeze(0).float()
    p_oh = torch.nn.functional.one_hot(p, k).T.unsqueeze(0).float()
    # [K, 4] = tp, fp, tn, fn; counts are exact in float32, the ratios are taken in float64
    cm4 = get_confusion_matrix(p_oh, t_oh, include_background=True)[0].double()
    precision = _nan_to(compute_confusion_matrix_metric("precision", cm4), 0.0)
    f1 = _nan_to(compute_confusion_matrix_metric("f1 score", cm4), 0.0)
    sensitivity = _nan_to(compute_confusion_matrix_metric("sensitivity", cm4), None)
    specificity = _nan_to(compute_confusion_matrix_metric("specificity", cm4), None)
    # accuracy = micro-averaged sensitivity: sum(tp) / sum(p) = trace / N
    accuracy = float(compute_confusion_matrix_metric("sensitivity", cm4.sum(dim=0)))

    support = (cm4[:, 0] + cm4[:, 3]).long().tolist()
    confusion = (t_oh[0] @ p_oh[0].T).long()  # [K, K]: rows true, cols predicted
    present = [i for i in range(k) if support[i] > 0]
    sub = lambda values: [values[i] for i in present]  # noqa: E731
    weights = sub(support)

    return {
        "num_samples": int(t.numel()),
        "accuracy": accuracy,
        "macro_f1": _mean(sub(f1)),
        "macro_sensitivity": _mean(sub(sensitivity)),
        "macro_specificity": _mean(sub(specificity)),
        "macro_precision": _mean(sub(precision)),
        "weighted_f1": _mean(sub(f1), weights),
        "weighted_sensitivity": _mean(sub(sensitivity), weights),
        "per_class": {
            names[i]: {
                "support": int(support[i]),
                "precision": precision[i],
                "sensitivity": sensitivity[i],
                "specificity": specificity[i],
                "f1": f1[i],
            }
            for i in range(k)
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": names,
        "absent_classes": [names[i] for i in range(k) if support[i] == 0],
    }


def write_report_json(report: Mapping[str, Any], path: PathLike) -> None:
    """Write a report from :func:`classification_report` (or any JSON-like dict) to ``path``; folders are created."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")


def plot_confusion_matrix(
    cm: NdarrayOrTensor | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path_png: PathLike,
    normalize: bool = True,
) -> None:
    """Save a confusion-matrix heat map (rows true, columns predicted) with the count in every cell.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend is changed).

    Args:
        cm: ``[K, K]`` counts, e.g. ``report["confusion_matrix"]``.
        class_names: ``K`` names.
        path_png: output PNG; parent folders are created.
        normalize: colour by row-normalised rates (recall per true class); rows with no sample stay 0.
    """
    counts = np.asarray(cm.detach().cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"cm must be [{k}, {k}], got {counts.shape}.")
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    fig = Figure(figsize=(1.0 + 0.8 * k, 0.8 + 0.8 * k), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(float(shown.max()), 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), [str(n) for n in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(n) for n in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    half = 0.5 if normalize else 0.5 * max(float(shown.max()), 1.0)
    for i in range(k):
        for j in range(k):
            text = f"{int(counts[i, j])}" + (f"\n{shown[i, j]:.2f}" if normalize else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if shown[i, j] > half else "black")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    parent = os.path.dirname(os.fspath(path_png))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(os.fspath(path_png), dpi=100, format="png")
