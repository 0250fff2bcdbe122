"""``make demo``: the pipeline end to end on the default data.

With no data given, the demo writes seeded synthetic toy tiles (and says so); with ``$HISTODIFF_DATA`` (or
``--dataset_dir``) pointing at a class-folder tree of real tiles it runs on that instead. Each stage prints what it
wrote.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from monai_histodiff.data.prepare import prepare_labeled_split, prepare_unlabeled
from monai_histodiff.data.toy import TOY_NOTICE, make_toy_dataset
from monai_histodiff.data.unlabeled import format_source_counts

__all__ = ["run_demo", "prepare_demo_data"]

DEMO_IMAGE_SIZE = 64
DEMO_CLASSES = 4


def prepare_demo_data(
    output_dir: str | os.PathLike, dataset_dir: str | None = None, unlabeled_dir: str | None = None
) -> dict[str, str]:
    """Write (or locate) the demo's data and its datalists; return the paths."""
    out = Path(output_dir)
    dataset_dir = dataset_dir or os.environ.get("HISTODIFF_DATA") or None
    unlabeled_dir = unlabeled_dir or os.environ.get("HISTODIFF_UNLABELED") or None
    toy = dataset_dir is None
    if toy:
        dataset_dir = str(out / "data" / "labeled")
        make_toy_dataset(dataset_dir, num_per_class=60, image_size=DEMO_IMAGE_SIZE, num_classes=DEMO_CLASSES, seed=0)
        if unlabeled_dir is None:  # two toy "sources" with other seeds stand in for the multi-source collection
            unlabeled_dir = str(out / "data" / "unlabeled")
            for i, name in enumerate(("toy_source_a", "toy_source_b")):
                make_toy_dataset(Path(unlabeled_dir) / name, 40, DEMO_IMAGE_SIZE, DEMO_CLASSES, seed=101 + i)
        print(f"[data] default data written under {out / 'data'}")
        print(f"[data] {TOY_NOTICE}")
    else:
        print(f"[data] labeled data: {dataset_dir}")
    datalists = out / "datalists"
    split = prepare_labeled_split(dataset_dir, datalists / "split.json", per_class=24 if toy else None,
                                  fraction=None if toy else 0.05, val_fraction=0.25, seed=0)
    print(f"[split] wrote {datalists / 'split.json'} and {datalists / 'classes.json'}: classes {split['classes']}")
    for part in ("training", "validation", "test"):
        print(f"[split]   {part:10s} {len(split[part]):5d} tiles, per class {split['counts'][part]}")
    if unlabeled_dir is None:
        print("[unlabeled] no $HISTODIFF_UNLABELED: pre-training uses the labeled tiles without their labels")
        unlabeled_dir = dataset_dir
    data = prepare_unlabeled(unlabeled_dir, datalists / "unlabeled.json", weights="equal")
    print(f"[unlabeled] wrote {datalists / 'unlabeled.json'}")
    print(format_source_counts(data))
    return {
        "dataset_dir": str(dataset_dir),
        "split": str(datalists / "split.json"),
        "unlabeled": str(datalists / "unlabeled.json"),
    }


def run_demo(output_dir: str | os.PathLike = "demo_output", dataset_dir: str | None = None,
             unlabeled_dir: str | None = None) -> int:
    """Run every stage that exists so far on the demo data and print where its outputs are."""
    start = time.time()
    paths = prepare_demo_data(output_dir, dataset_dir, unlabeled_dir)
    print(f"[demo] done in {time.time() - start:.1f} s; datalists: {paths['split']}, {paths['unlabeled']}")
    return 0
