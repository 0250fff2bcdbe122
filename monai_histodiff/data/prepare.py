"""Prepare the datalist files every stage reads: the labeled split and the unlabeled multi-source list.

Both scan their inputs first (see :mod:`monai_histodiff.data.validation`), so a bad tile is reported up front and
never reaches a training loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.data.datalist import read_labeled_list, save_class_map, scan_class_folders, write_datalist
from monai_histodiff.data.split import make_split
from monai_histodiff.data.unlabeled import unlabeled_datalist
from monai_histodiff.data.validation import scan_images

__all__ = ["load_labeled", "prepare_labeled_split", "prepare_unlabeled", "ensure_split"]


def load_labeled(source: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Labeled items from a class-folder tree, a CSV (``image``, ``label``) or a JSON datalist."""
    source = Path(source)
    if source.is_dir():
        return scan_class_folders(source, class_names)
    if source.suffix.lower() in (".csv", ".json"):
        return read_labeled_list(source, class_names)
    raise FileNotFoundError(f"labeled data not found or not a folder/CSV/JSON: {source}")


def prepare_labeled_split(
    dataset: str | os.PathLike,
    output: str | os.PathLike,
    fraction: float | None = None,
    per_class: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_dataset: str | os.PathLike | None = None,
    test_per_class: int | None = None,
    class_names: Sequence[str] | None = None,
    bad_files: str = "skip",
) -> dict[str, Any]:
    """Scan a labeled dataset, draw the stratified low-label split, and write it with the class map beside it.

    Writes ``output`` (the split datalist), ``classes.json`` and, when bad files were found, ``bad_files.json`` in the
    same folder. Returns the split with an extra ``bad_files`` entry.
    """
    out_dir = Path(output).parent
    items, classes = load_labeled(dataset, class_names)
    items, bad = scan_images(items, policy=bad_files, report_dir=out_dir)
    test_items = None
    if test_dataset is not None:
        test_items, test_classes = load_labeled(test_dataset, classes)
        test_items, bad_test = scan_images(test_items, policy=bad_files, report_dir=out_dir)
        bad += bad_test
    split = make_split(
        items, classes, fraction=fraction, per_class=per_class, val_fraction=val_fraction, seed=seed,
        test_items=test_items, test_per_class=test_per_class,
    )
    split["source"] = {"dataset": str(dataset), "test_dataset": str(test_dataset) if test_dataset else None}
    split["bad_files"] = bad
    write_datalist(split, output)
    save_class_map(classes, out_dir)
    return split


def prepare_unlabeled(
    sources: Mapping[str, str] | Sequence[str] | str,
    output: str | os.PathLike,
    weights: Mapping[str, float] | Sequence[float] | str | None = "equal",
    bad_files: str = "skip",
) -> dict[str, Any]:
    """Scan M unlabeled sources and write the pre-training datalist (``unlabeled`` list with sample weights)."""
    data = unlabeled_datalist(sources, weights)
    good, bad = scan_images(data["unlabeled"], policy=bad_files, report_dir=Path(output).parent)
    data["unlabeled"] = good
    for b in bad:  # keep per-source counts true to what will be read
        for name, info in data["sources"].items():
            if os.path.abspath(b["image"]).startswith(os.path.abspath(info["folder"]) + os.sep):
                info["count"] -= 1
    data["bad_files"] = bad
    write_datalist(data, output)
    return data


def ensure_split(
    split_file: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    fraction: float | None = None,
    per_class: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_dir: str | os.PathLike | None = None,
    bad_files: str = "skip",
) -> dict[str, Any]:
    """Load the split datalist, drawing it first from ``dataset_dir`` when the file does not exist yet.

    Every labeled stage calls this, so the first one run at a site writes the split and all later stages (and
    reruns) read the very same file. Image paths come back absolute.
    """
    from monai_histodiff.data.datalist import load_datalist

    split_file = Path(split_file)
    if not split_file.is_file():
        if dataset_dir is None:
            raise FileNotFoundError(f"split file {split_file} does not exist and no dataset_dir was given to draw it")
        if per_class is not None:  # a per-class count, when given, wins over the (default) fraction
            fraction = None
        elif fraction is None:
            fraction = 0.05
        prepare_labeled_split(dataset_dir, split_file, fraction=fraction, per_class=per_class,
                              val_fraction=val_fraction, seed=seed, test_dataset=test_dir, bad_files=bad_files)
    split = load_datalist(split_file)
    for key in ("classes", "training"):
        if not split.get(key):
            raise ValueError(f"split file {split_file} has no '{key}'")
    return split
