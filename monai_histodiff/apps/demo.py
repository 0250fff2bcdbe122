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
#: share of toy tiles drawn on another class's background, so that the baseline is not already perfect
DEMO_CONFUSION = 0.6
DEMO_LABELED_PER_CLASS = 12
#: real data: test tiles per class (the rest of the labeled set is the judge's pool)
DEMO_TEST_PER_CLASS = 500


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
        make_toy_dataset(dataset_dir, num_per_class=60, image_size=DEMO_IMAGE_SIZE, num_classes=DEMO_CLASSES, seed=0,
                         confusion=DEMO_CONFUSION)
        if unlabeled_dir is None:  # two toy "sources" with other seeds stand in for the multi-source collection
            unlabeled_dir = str(out / "data" / "unlabeled")
            for i, name in enumerate(("toy_source_a", "toy_source_b")):
                make_toy_dataset(Path(unlabeled_dir) / name, 40, DEMO_IMAGE_SIZE, DEMO_CLASSES, seed=101 + i)
        print(f"[data] default data written under {out / 'data'}")
        print(f"[data] {TOY_NOTICE}")
    else:
        print(f"[data] labeled data: {dataset_dir}")
    datalists = out / "runs"  # the run folder every stage reads: split.json, classes.json, unlabeled.json
    split = prepare_labeled_split(dataset_dir, datalists / "split.json",
                                  per_class=DEMO_LABELED_PER_CLASS if toy else None, fraction=None if toy else 0.05,
                                  val_fraction=0.25, seed=0, test_per_class=None if toy else DEMO_TEST_PER_CLASS)
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
    """Every stage end to end at the small size, then the Table 1 protocol with one seed; prints the results."""
    from monai_histodiff.apps.experiment import ExperimentConfig, run_experiment
    from monai_histodiff.apps.pipeline import run_stage

    start = time.time()
    toy = dataset_dir is None and not os.environ.get("HISTODIFF_DATA")
    paths = prepare_demo_data(output_dir, dataset_dir, unlabeled_dir)
    runs = Path(output_dir) / "runs"
    logs = runs / "logs"
    common = {"output_dir": runs.as_posix()}
    datalist = f"$monai_histodiff.data.load_datalist('{Path(paths['unlabeled']).as_posix()}')['unlabeled']"
    if not (runs / "pretrain_autoencoder" / "autoencoder.pt").is_file():
        run_stage("pretrain_autoencoder", logs, datalist=datalist, max_epochs=16, batch_size=16, lr=2e-3,
                  adv_start=260, adv_weight=0.05, **common)
    if not (runs / "pretrain_diffusion" / "diffusion.pt").is_file():
        run_stage("pretrain_diffusion", logs, datalist=datalist, max_epochs=100, batch_size=16, lr=2e-3,
                  warmup_steps=20, sample_interval=25, grid_inference_steps=25, **common)
    cfg = ExperimentConfig(output_dir=runs.as_posix(), dataset_dir=paths["dataset_dir"], small=True,
                           label_per_class=DEMO_LABELED_PER_CLASS if toy else None,
                           label_fraction=None if toy else 0.05, test_per_class=None if toy else DEMO_TEST_PER_CLASS,
                           val_fraction=0.25, seeds=(0,), ratios=(0.5, 1.0, 2.0, 3.0), random_ratio=0.5,
                           generation_steps=50, judge=not toy)
    run_experiment(cfg)
    minutes = (time.time() - start) / 60
    print("\n" + "=" * 100)
    if toy:
        print(TOY_NOTICE)
    print(f"HistoDiffusion demo finished in {minutes:.1f} min. Results (test split, every number measured in this run):")
    print((runs / "results.md").read_text())
    print("Outputs:")
    for label, path in [
        ("results table", runs / "results.md"), ("results per seed", runs / "results.csv"),
        ("accuracy vs ratio plot", runs / "accuracy_vs_ratio.png"),
        ("sample grids per class", runs / "generate" / "grids"),
        ("selection report (selective 100%)", runs / "rows" / "selective_100" / "select" / "selection_report.json"),
        ("selection distance histograms", runs / "rows" / "selective_100" / "select" / "distance_histograms.png"),
        ("latent classifier accuracy per noise level", runs / "train_latent_classifier" / "timestep_accuracy.png"),
        ("TensorBoard logs", f"tensorboard --logdir {runs}"),
        ("checkpoints", runs / "pretrain_autoencoder" / "autoencoder.pt"),
        ("", runs / "pretrain_diffusion" / "diffusion.pt"),
        ("", runs / "finetune" / "decoder_ft.pt"),
        ("", runs / "train_latent_classifier" / "latent_classifier.pt"),
        ("stage logs", logs),
    ]:
        print(f"  {label:45s} {path}")
    return 0
