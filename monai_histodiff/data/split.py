"""Seeded, stratified splits for the low-label setting (the paper fine-tunes on an even 5% of NCT-CRC-HE-100K).

The split is written once as a JSON datalist that every later stage reads, so it is reproducible and auditable:
the file records the seed, the fraction or per-class count, and the class names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from monai_histodiff.data.datalist import class_counts, write_datalist

__all__ = ["stratified_sample", "make_split", "write_split"]


def _by_class(items: Sequence[dict], num_classes: int) -> list[list[dict]]:
    groups: list[list[dict]] = [[] for _ in range(num_classes)]
    for it in sorted(items, key=lambda d: d["image"]):
        groups[int(it["label"])].append(it)
    return groups


def stratified_sample(
    items: Sequence[dict],
    num_classes: int,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    min_per_class: int = 1,
) -> tuple[list[dict], list[dict]]:
    """Sample evenly from each class without replacement.

    Args:
        items: labeled items (``{"image", "label"}``).
        num_classes: number of classes.
        fraction: share of each class to take (e.g. 0.05 for the paper's 5%); exclusive with ``per_class``.
        per_class: number of items per class (a class with fewer items gives all it has).
        seed: random seed; the same seed and items always give the same sample, whatever the input order.
        min_per_class: with ``fraction``, take at least this many from every non-empty class.

    Returns:
        ``(chosen, rest)``.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen: list[dict] = []
    rest: list[dict] = []
    for group in _by_class(items, num_classes):
        n = len(group)
        if fraction is not None:
            k = min(n, max(min_per_class if n else 0, int(round(fraction * n))))
        else:
            k = min(n, int(per_class))  # type: ignore[arg-type]
        order = rng.permutation(n)
        chosen.extend(group[i] for i in sorted(order[:k]))
        rest.extend(group[i] for i in sorted(order[k:]))
    return chosen, rest


def make_split(
    items: Sequence[dict],
    classes: Sequence[str],
    fraction: float | None = None,
    per_class: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_items: Sequence[dict] | None = None,
    test_per_class: int | None = None,
) -> dict[str, Any]:
    """Build the training / validation / test datalist of the low-label setting.

    The labeled subset is a stratified sample of ``items``; the validation split is carved from that subset (never
    from the test set), so model selection sees only the small labeled set a site has. The test set is
    ``test_items`` when given (the official CRC-VAL-HE-7K), else the items the subset did not take, optionally capped
    at ``test_per_class`` per class.
    """
    k = len(classes)
    subset, remainder = stratified_sample(items, k, fraction=fraction, per_class=per_class, seed=seed)
    validation, training = (
        stratified_sample(subset, k, fraction=val_fraction, seed=seed + 1, min_per_class=0) if val_fraction > 0 else ([], subset)
    )
    # never leave a class without training examples: give back a validation item where that happened
    for c in range(k):
        if not any(it["label"] == c for it in training):
            moved = [it for it in validation if it["label"] == c][:1]
            for it in moved:
                validation.remove(it)
                training.append(it)
    if test_items is not None:
        test = list(test_items)
    else:
        test = remainder
    if test_per_class is not None:
        test, _ = stratified_sample(test, k, per_class=test_per_class, seed=seed + 2)
    strip = lambda lst: [{"image": it["image"], "label": int(it["label"])} for it in lst]  # noqa: E731
    return {
        "classes": list(classes),
        "seed": seed,
        "fraction": fraction,
        "per_class": per_class,
        "val_fraction": val_fraction,
        "counts": {
            "training": class_counts(training, k),
            "validation": class_counts(validation, k),
            "test": class_counts(test, k),
        },
        "training": strip(training),
        "validation": strip(validation),
        "test": strip(test),
    }


def write_split(split: dict[str, Any], path: str | os.PathLike) -> str:
    """Write the split datalist (paths relative to it) and return its path."""
    return str(write_datalist(split, path))
