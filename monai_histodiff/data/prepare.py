"""Prepare the datalist files every stage reads: the labeled split and the unlabeled multi-source list.

Both scan their inputs first (see :mod:`monai_histodiff.data.validation`), so a bad tile is reported up front and
never reaches a training loop. The scan decodes in a pool of threads with a progress bar and keeps its verdicts in
``scan_record.sqlite`` beside the listing (or the record given), so a rerun over unchanged tiles decodes none again.
The labeled split also reads the tiles' groups (a groups file, or byte-identical files found by hashing) so that no
group is split across training, validation and test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.data.datalist import (
    IMAGE_EXTENSIONS,
    find_groups_file,
    group_duplicate_files,
    load_datalist,
    read_labeled_list,
    save_class_map,
    scan_class_folders,
    write_datalist,
)
from monai_histodiff.data.split import check_groups_disjoint, make_split
from monai_histodiff.data.unlabeled import unlabeled_datalist
from monai_histodiff.data.validation import SCAN_RECORD_NAME, BadFilesError, check_class_images, scan_images

__all__ = ["load_labeled", "prepare_labeled_split", "prepare_unlabeled", "ensure_split"]


def _scan_options(listing: str | os.PathLike, scan_record: str | os.PathLike | None,
                  scan_workers: int | None) -> dict[str, Any]:
    """``scan_images`` keywords: the record (``"auto"``: ``scan_record.sqlite`` beside ``listing``; None: none), the
    workers (default: as many threads as ``ThreadPoolExecutor`` would start) and a progress bar."""
    record = Path(listing).parent / SCAN_RECORD_NAME if scan_record == "auto" else scan_record
    workers = scan_workers if scan_workers is not None else min(32, (os.cpu_count() or 1) + 4)
    return {"record": record, "num_workers": workers, "progress": True}


def load_labeled(
    source: str | os.PathLike, class_names: Sequence[str] | None = None, groups_file: str | os.PathLike | None = None
) -> tuple[list[dict], list[str]]:
    """Labeled items from a class-folder tree, a CSV (``image``, ``label``[, ``group``]) or a JSON datalist.

    ``groups_file`` sets the items' groups (see :func:`~monai_histodiff.data.datalist.attach_groups`); a class-folder
    tree without one uses ``groups.csv`` at its root when present.
    """
    source = Path(source)
    if source.is_dir():
        return scan_class_folders(source, class_names, groups_file=groups_file)
    if source.suffix.lower() in (".csv", ".json"):
        return read_labeled_list(source, class_names, groups_file=groups_file)
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
    groups_file: str | os.PathLike | None = None,
    scan_record: str | os.PathLike | None = "auto",
    scan_workers: int | None = None,
) -> dict[str, Any]:
    """Scan a labeled dataset, draw the stratified low-label split by groups, and write it with the class map beside it.

    Groups (patient / slide / original image id) come from ``groups_file`` (CSV ``image,group`` or
    ``image,label,group``; image paths relative to it or to the dataset root), else from ``groups.csv`` at the root of
    a class-folder tree, else from a ``group`` column of a CSV datalist. Tiles without a group are hashed, and
    byte-identical files are grouped (with a warning). No group is ever split across training, validation and test.

    ``test_per_class`` caps the test set per class; the labeled tiles in none of training / validation / test are
    recorded as ``pool`` (whole groups; only the judge reads it, see :mod:`monai_histodiff.metrics.judge`).

    The scan's verdicts are kept in ``scan_record`` (``"auto"``: ``scan_record.sqlite`` beside ``output``; None: no
    record), decoded by ``scan_workers`` threads (default: CPUs + 4, at most 32).

    Writes ``output`` (the split datalist, each item with its ``group`` when it has one), ``classes.json`` and, when
    bad files were found, ``bad_files.json`` in the same folder. Returns the split with extra ``bad_files``,
    ``groups_file`` (the file used, or None) and ``duplicate_sets`` (number of sets of identical files) entries.
    """
    out_dir = Path(output).parent
    if Path(dataset).is_dir():
        groups_file = find_groups_file(dataset, groups_file)
    items, classes = load_labeled(dataset, class_names, groups_file=groups_file)
    scan = _scan_options(output, scan_record, scan_workers)
    items, bad = scan_images(items, policy=bad_files, report_dir=out_dir, **scan)
    check_class_images(items, classes, dataset, bad)
    test_items = None
    if test_dataset is not None:
        test_items, _ = load_labeled(test_dataset, classes)
        test_items, bad_test = scan_images(test_items, policy=bad_files, report_dir=out_dir, **scan)
        bad += bad_test
    duplicates = group_duplicate_files([*items, *(test_items or [])])  # hashes only the tiles without a group
    split = make_split(
        items, classes, fraction=fraction, per_class=per_class, val_fraction=val_fraction, seed=seed,
        test_items=test_items, test_per_class=test_per_class,
    )
    split["source"] = {"dataset": str(dataset), "test_dataset": str(test_dataset) if test_dataset else None}
    split["groups_file"] = str(groups_file) if groups_file is not None else None
    split["duplicate_sets"] = len(duplicates)
    split["bad_files"] = bad
    write_datalist(split, output)
    save_class_map(classes, out_dir)
    return split


def prepare_unlabeled(
    sources: Mapping[str, str] | Sequence[str] | str,
    output: str | os.PathLike,
    weights: Mapping[str, float] | Sequence[float] | str | None = "equal",
    bad_files: str = "skip",
    slides: Mapping[str, Any] | None = None,
    scan_record: str | os.PathLike | None = "auto",
    scan_workers: int | None = None,
) -> dict[str, Any]:
    """Scan M unlabeled sources and write the pre-training datalist (``unlabeled`` list with sample weights).

    Whole-slide images among the sources' files (:func:`~monai_histodiff.data.slides.is_slide`: SVS, NDPI, tiled
    TIFF, ...) are not read as tiles: each slide becomes its own source and group of tissue tiles planned by
    :func:`~monai_histodiff.data.slides.slide_datalist` with the ``slides`` settings (``mpp``, ``tile_size``,
    ``min_tissue``, ``tissue_threshold``, ``backend``, ``mpp_override``), streamed from the slide during training;
    the tissue masks go to ``<output folder>/slide_masks/``. A slide that cannot be used is reported in
    ``bad_files.json`` with its reason, like a bad tile, and the run goes on with the others.

    The tiles are scanned by ``scan_workers`` threads (default: CPUs + 4, at most 32) with a progress bar; the
    verdicts are kept in ``scan_record`` (``"auto"``: ``scan_record.sqlite`` beside ``output``; None: no record), so a
    rerun over unchanged tiles decodes none of them again.
    """
    from monai_histodiff.data.slides import SLIDE_EXTENSIONS, is_slide, slide_datalist

    data = unlabeled_datalist(sources, weights, extensions=(*IMAGE_EXTENSIONS, *SLIDE_EXTENSIONS))
    slide_files = [it["image"] for it in data["unlabeled"] if is_slide(it["image"])]
    if slide_files:
        is_planned = set(slide_files)
        data["unlabeled"] = [it for it in data["unlabeled"] if it["image"] not in is_planned]
        for name, info in data["sources"].items():
            info["count"] -= sum(1 for f in slide_files if f.startswith(os.path.abspath(info["folder"]) + os.sep))
            if info["weight"] is not None and info["count"]:  # the source's share now spread over its tiles alone
                for it in data["unlabeled"]:
                    if it["source"] == name:
                        it["sample_weight"] = info["weight"] / info["count"]
        planned = slide_datalist(slide_files, mask_dir=Path(output).parent / "slide_masks",
                                 weights="equal" if weights == "equal" else "size", **dict(slides or {}))
        data["unlabeled"] += planned["unlabeled"]
        data["sources"].update({f"slide:{k}": v for k, v in planned["sources"].items()})
        data["slides"] = planned["settings"]
    tiles = [it for it in data["unlabeled"] if "location" not in it]
    if bad_files not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {bad_files!r}")
    good, bad = scan_images(tiles, policy="skip", report_dir=None, **_scan_options(output, scan_record, scan_workers))
    bad += planned["bad_slides"] if slide_files else []
    data["unlabeled"] = good + [it for it in data["unlabeled"] if "location" in it]
    for b in bad:  # keep per-source counts true to what will be read
        for name, info in data["sources"].items():
            if not name.startswith("slide:") and os.path.abspath(b["image"]).startswith(
                    os.path.abspath(info["folder"]) + os.sep):
                info["count"] -= 1
    if bad:
        report = Path(output).parent / "bad_files.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(bad, indent=1), encoding="utf-8")
        if bad_files == "error":
            listing = "\n".join(f"  {b['image']}: {b['reason']}" for b in bad)
            raise BadFilesError(f"{len(bad)} of {len(tiles) + len(slide_files)} files cannot be read as images or "
                                f"slides (listed in {report}):\n{listing}")
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
    groups_file: str | os.PathLike | None = None,
    test_per_class: int | None = None,
    scan_record: str | os.PathLike | None = "auto",
) -> dict[str, Any]:
    """Load the split datalist, drawing it first from ``dataset_dir`` when the file does not exist yet.

    Every labeled stage calls this, so the first one run at a site writes the split and all later stages (and
    reruns) read the very same file. Image paths come back absolute. ``groups_file`` names each tile's group (see
    :func:`prepare_labeled_split`; default: ``groups.csv`` at the root of ``dataset_dir`` when present).
    ``test_per_class`` caps the test set per class; the labeled tiles it leaves out are recorded as the split's
    ``pool``, which only the judge reads. ``scan_record`` keeps the bad-file scan's verdicts (see
    :func:`prepare_labeled_split`). The loaded split is checked with
    :func:`~monai_histodiff.data.split.check_groups_disjoint` (pool included).
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        if dataset_dir is None:
            raise FileNotFoundError(f"split file {split_file} does not exist and no dataset_dir was given to draw it")
        if per_class is not None:  # a per-class count, when given, wins over the (default) fraction
            fraction = None
        elif fraction is None:
            fraction = 0.05
        prepare_labeled_split(dataset_dir, split_file, fraction=fraction, per_class=per_class,
                              val_fraction=val_fraction, seed=seed, test_dataset=test_dir, bad_files=bad_files,
                              groups_file=groups_file, test_per_class=test_per_class, scan_record=scan_record)
    split = load_datalist(split_file)
    for key in ("classes", "training"):
        if not split.get(key):
            raise ValueError(f"split file {split_file} has no '{key}'")
    try:
        check_groups_disjoint(split)
    except ValueError as e:
        raise ValueError(f"split file {split_file}: {e}") from e
    return split
