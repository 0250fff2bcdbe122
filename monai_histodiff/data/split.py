"""Seeded, stratified splits for the low-label setting (the paper fine-tunes on an even 5% of NCT-CRC-HE-100K).

The split is written once as a JSON datalist that every later stage reads, so it is reproducible and auditable:
the file records the seed, the fraction or per-class count, and the class names.

Besides ``training``, ``validation`` and ``test`` the file records ``pool``: the labeled tiles in none of them (what a
``test_per_class`` cap left out, or, with a separate test set, everything the labeled subset did not take). Only the
judge (:mod:`monai_histodiff.metrics.judge`) reads it; no training or selection stage does.

Items that carry a ``group`` (patient, slide, original image, or a set of byte-identical files) are drawn as whole
groups: every tile of a group lands on the same side of every split (labeled subset / rest, training / validation,
labeled / test), so near-copies of one original never sit on both sides. Counts are still counted in tiles; an item
without a group is a group of its own, so a dataset without groups is split exactly as before groups existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monai_histodiff.data.datalist import DUPLICATE_GROUP_PREFIX, SLIDE_GROUP_PREFIX, class_counts, write_datalist

__all__ = ["stratified_sample", "make_split", "write_split", "check_groups_disjoint", "check_outside_test", "group_key"]

SPLIT_PARTS = ("training", "validation", "test", "pool")


def group_key(item: dict) -> tuple[str, str]:
    """The unit an item is drawn with: its group, or the item alone when it has none."""
    group = item.get("group")
    return ("g", str(group)) if group not in (None, "") else ("i", str(item["image"]))


def _by_class(items: Sequence[dict], num_classes: int) -> list[list[list[dict]]]:
    """Per class, the groups (lists of items sorted by image), sorted by their first image: independent of input
    order. A group whose tiles carry different labels is an error naming it, except a slide's group
    (:data:`~monai_histodiff.data.datalist.SLIDE_GROUP_PREFIX`): a slide holds regions of several tissues, and is drawn
    whole with the class most of its tiles have (its other tiles ride along: per-class counts are then approximate)."""
    units: dict[tuple[str, str], list[dict]] = {}
    for it in sorted(items, key=lambda d: d["image"]):
        units.setdefault(group_key(it), []).append(it)
    per_class: list[list[list[dict]]] = [[] for _ in range(num_classes)]
    for (_, name), unit in units.items():
        labels = sorted({int(it["label"]) for it in unit})
        if len(labels) > 1 and name.startswith(SLIDE_GROUP_PREFIX):
            counts = [sum(1 for it in unit if int(it["label"]) == c) for c in labels]
            labels = [labels[counts.index(max(counts))]]
        if len(labels) > 1:
            names = sorted({str(it.get("class", it["label"])) for it in unit})
            examples = ", ".join(f"{it['image']} ({it.get('class', it['label'])})" for it in unit[:4])
            raise ValueError(f"group {name!r} mixes classes {names}: a group must hold one class ({examples})")
        per_class[labels[0]].append(unit)
    for units_of_class in per_class:
        units_of_class.sort(key=lambda u: u[0]["image"])
    return per_class


def _take(units: list[list[dict]], order: Sequence[int], k: int) -> list[bool]:
    """Which groups to take, visiting them in ``order``, so that their tiles add up to (or as near as possible to)
    ``k``: a group that would overshoot is passed over; a class left short takes the next group when that lands
    nearer to ``k`` (or when it would otherwise get nothing)."""
    taken = [False] * len(units)
    total = 0
    for i in order:
        if total == k:
            break
        if total + len(units[i]) <= k:
            taken[i] = True
            total += len(units[i])
    if total < k:
        nxt = next((i for i in order if not taken[i]), None)
        if nxt is not None and (total == 0 or total + len(units[nxt]) - k < k - total):
            taken[nxt] = True
    return taken


def stratified_sample(
    items: Sequence[dict],
    num_classes: int,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    min_per_class: int = 1,
) -> tuple[list[dict], list[dict]]:
    """Sample evenly from each class without replacement, by whole groups.

    Args:
        items: labeled items (``{"image", "label"}``, optionally ``"group"``: tiles of one group are chosen together).
        num_classes: number of classes.
        fraction: share of each class to take (e.g. 0.05 for the paper's 5%); exclusive with ``per_class``.
        per_class: number of items per class (a class with fewer items gives all it has). With groups the count is
            met as nearly as whole groups allow.
        seed: random seed; the same seed and items always give the same sample, whatever the input order.
        min_per_class: with ``fraction``, take at least this many from every non-empty class.

    Returns:
        ``(chosen, rest)``, each sorted by image within a class.

    Raises:
        ValueError: when a group holds tiles of more than one class (the error names it).
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
    for units in _by_class(items, num_classes):
        n = sum(len(u) for u in units)  # tiles, not groups
        if fraction is not None:
            k = min(n, max(min_per_class if n else 0, int(round(fraction * n))))
        else:
            k = min(n, int(per_class))  # type: ignore[arg-type]
        taken = _take(units, rng.permutation(len(units)).tolist(), k)
        chosen.extend(sorted((it for u, t in zip(units, taken) if t for it in u), key=lambda d: d["image"]))
        rest.extend(sorted((it for u, t in zip(units, taken) if not t for it in u), key=lambda d: d["image"]))
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
    at ``test_per_class`` per class. Every step draws whole groups (items' ``group``), and the result is checked with
    :func:`check_groups_disjoint`, so a group shared by ``items`` and ``test_items`` is an error too.

    ``pool`` records the tiles of ``items`` in none of training / validation / test (whole groups): the tiles the
    ``test_per_class`` cap left out, or, with ``test_items``, all tiles the labeled subset did not take (tiles of
    ``test_items`` left out by the cap are not recorded). Only the judge reads it.
    """
    k = len(classes)
    subset, remainder = stratified_sample(items, k, fraction=fraction, per_class=per_class, seed=seed)
    validation, training = (
        stratified_sample(subset, k, fraction=val_fraction, seed=seed + 1, min_per_class=0) if val_fraction > 0
        else ([], subset)
    )
    # never leave a class without training examples: give back a validation group where that happened
    for c in range(k):
        if not any(it["label"] == c for it in training):
            first = next((it for it in validation if it["label"] == c), None)
            if first is not None:
                moved = [it for it in validation if group_key(it) == group_key(first)]
                validation = [it for it in validation if group_key(it) != group_key(first)]
                training.extend(moved)
    if test_items is not None:
        test, pool = list(test_items), remainder
    else:
        test, pool = remainder, []
    if test_per_class is not None:
        test, left_out = stratified_sample(test, k, per_class=test_per_class, seed=seed + 2)
        if test_items is None:
            pool = left_out

    def strip(lst: Sequence[dict]) -> list[dict]:
        return [
            {"image": it["image"], "label": int(it["label"]), **({"group": it["group"]} if it.get("group") else {})}
            for it in lst
        ]

    split = {
        "classes": list(classes),
        "seed": seed,
        "fraction": fraction,
        "per_class": per_class,
        "val_fraction": val_fraction,
        "counts": {
            "training": class_counts(training, k),
            "validation": class_counts(validation, k),
            "test": class_counts(test, k),
            "pool": class_counts(pool, k),
        },
        "training": strip(training),
        "validation": strip(validation),
        "test": strip(test),
        "pool": strip(pool),  # labeled tiles in none of the above; only the judge reads it
    }
    check_groups_disjoint(split)
    return split


def check_groups_disjoint(split: Mapping[str, Any], parts: Sequence[str] = SPLIT_PARTS) -> int:
    """Check that no group has tiles in two parts of a split (training / validation / test / pool).

    Args:
        split: a split datalist (items may carry ``group``; items without one are not checked).
        parts: the lists to compare.

    Returns:
        the number of distinct groups seen.

    Raises:
        ValueError: naming the first group found in two parts, with one image from each.
    """
    seen: dict[str, tuple[str, str]] = {}
    for part in parts:
        for it in split.get(part) or []:
            group = it.get("group")
            if group in (None, ""):
                continue
            where = seen.setdefault(str(group), (part, str(it["image"])))
            if where[0] != part:
                hint = " (byte-identical files)" if str(group).startswith(DUPLICATE_GROUP_PREFIX) else ""
                raise ValueError(
                    f"group {group!r}{hint} is in both '{where[0]}' ({where[1]}) and '{part}' ({it['image']}): "
                    "tiles of one group must stay on one side of the split"
                )
    return len(seen)


def check_outside_test(items: Sequence[Mapping[str, Any]], split: Mapping[str, Any], what: str) -> int:
    """Refuse any item that is a test tile or a tile of a test group: the wall between the test set and ``what``.

    An item is matched to the split by its group (items that carry one) and by its file (resolved path), so a folder
    listed without groups (e.g. the labeled dataset handed over as unlabeled pre-training data) inherits the group its
    file has in the split: a near-copy of a test tile is caught, not only the test tile itself.

    Args:
        items: the data to check (``{"image", ["group"]}``), e.g. a pre-training listing or the judge's data.
        split: the split datalist whose ``test`` part must stay unseen.
        what: what ``items`` are, for the message ("pre-training", "the judge's data").

    Returns:
        the number of items checked.

    Raises:
        ValueError: naming the first test group (or test image) found in ``items``, with the test tile and the item.
    """
    def real(path: Any) -> str:
        return os.path.realpath(str(path))

    group_of = {real(it["image"]): group_key(it) for part in SPLIT_PARTS for it in split.get(part) or []}
    test_units = {group_key(it): str(it["image"]) for it in split.get("test") or []}
    test_files = {real(it["image"]): str(it["image"]) for it in split.get("test") or []}
    for it in items:
        unit = group_key(it) if it.get("group") not in (None, "") else group_of.get(real(it["image"]), group_key(it))
        hit = test_units.get(unit) or test_files.get(real(it["image"]))
        if hit is not None:
            kind, name = unit
            where = f"group {name!r}" if kind == "g" else f"image {name!r}"
            raise ValueError(f"{where} of the test set ({hit}) is also in {what} ({it['image']}): no tile of a test "
                             f"group may enter {what}; leave the test tiles out of it or draw another split")
    return len(items)


def write_split(split: dict[str, Any], path: str | os.PathLike) -> str:
    """Write the split datalist (paths relative to it) and return its path."""
    return str(write_datalist(split, path))
