"""``make demo``: the pipeline end to end on the default data, then the Table 1 protocol with one seed.

With no data given, the demo writes seeded synthetic toy tiles (and says so): a labeled set and, standing in for the
site's own unlabeled slides, an archive of unlabeled tiles of the same kind, on which it pre-trains. With
``$HISTODIFF_DATA`` (or ``--dataset_dir``) pointing at a class-folder tree of real tiles, or with
``--download kather2016`` (fetched on request, checksum checked), it runs on real tissue and pre-trains on the site's
own tiles outside the test groups. Every stage prints its command and keeps a log; the demo ends with the results
table, the wall time of each stage and the picture to open first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_histodiff.data.prepare import prepare_labeled_split
from monai_histodiff.data.toy import TOY_NOTICE, make_toy_dataset

__all__ = ["DEMO_BUDGETS", "run_demo", "prepare_demo_data", "stage_times", "format_stage_times"]

DEMO_IMAGE_SIZE = 64
#: the toy classes of the demo: ones the CPU-size generator draws recognisably in its budget. Measured 2026-12-07:
#: with STR_TOY no requested STR tile was selectable in three runs (each nearer another class's centroid); with MUC_TOY
#: 21 of 162 were and ADI_TOY fell to 9 (both near-empty tiles, white and lavender, mistaken for each other)
DEMO_TOY_CLASSES = ("ADI_TOY", "LYM_TOY", "TUM_TOY")
DEMO_CLASSES = len(DEMO_TOY_CLASSES)
#: share of toy tiles drawn on another class's background, so that the baseline is not already perfect
DEMO_CONFUSION = 0.2
#: toy structures drawn at 32 px and enlarged to 64: the CPU-size autoencoder (16x16 latents) keeps coarse structure
DEMO_ZOOM = 2
DEMO_LABELED_PER_CLASS = 12
#: toy tiles per class in the unlabeled archive the demo pre-trains on (the site's slides, labels unknown)
DEMO_ARCHIVE_PER_CLASS = 60
#: real data: test tiles per class (the rest of the labeled set is the judge's pool)
DEMO_TEST_PER_CLASS = 500
#: the demo's training budgets per stage (on top of ``bundles/small.json``), chosen to fit 15 minutes on 2 cores
DEMO_BUDGETS: dict[str, dict[str, Any]] = {
    "pretrain_autoencoder": {"max_epochs": 16, "epoch_length": 20, "batch_size": 16, "lr": 2e-3, "adv_start": 260,
                             "adv_weight": 0.05},
    "pretrain_diffusion": {"max_epochs": 150, "epoch_length": 20, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20,
                           "sample_interval": 25, "grid_inference_steps": 25},
}
#: the guidance scale of the demo's pool (classifier guidance steers visibly from g = 4 at the CPU size, results.md)
DEMO_GUIDANCE_SCALE = 4.0


def prepare_demo_data(output_dir: str | os.PathLike, dataset_dir: str | None = None,
                      unlabeled_dir: str | None = None) -> dict[str, Any]:
    """Write (or locate) the demo's data and its split; return the paths and whether the data are the toy tiles.

    Toy data: ``<output_dir>/data/labeled`` (the labeled set) and ``<output_dir>/data/unlabeled/site_archive`` (the
    unlabeled tiles pre-training reads; they share no file with the labeled set). Real data: ``dataset_dir``, and
    pre-training on ``unlabeled_dir`` when given, else on the site's own tiles outside the test groups.
    """
    out = Path(output_dir)
    dataset_dir = dataset_dir or os.environ.get("HISTODIFF_DATA") or None
    unlabeled_dir = unlabeled_dir or os.environ.get("HISTODIFF_UNLABELED") or None
    toy = dataset_dir is None
    if toy:
        dataset_dir = str(out / "data" / "labeled")
        make_toy_dataset(dataset_dir, num_per_class=60, image_size=DEMO_IMAGE_SIZE, seed=0, confusion=DEMO_CONFUSION,
                         zoom=DEMO_ZOOM, classes=DEMO_TOY_CLASSES)
        if unlabeled_dir is None:  # the site's unlabeled archive: tiles of the same kind, another seed, no labels used
            unlabeled_dir = str(out / "data" / "unlabeled")
            make_toy_dataset(Path(unlabeled_dir) / "site_archive", DEMO_ARCHIVE_PER_CLASS, DEMO_IMAGE_SIZE, seed=101,
                             confusion=DEMO_CONFUSION, zoom=DEMO_ZOOM, classes=DEMO_TOY_CLASSES)
        print(f"[data] default data written under {out / 'data'}")
        print(f"[data] {TOY_NOTICE}")
    else:
        print(f"[data] labeled data: {dataset_dir}")
    runs = out / "runs"  # the run folder every stage reads: split.json, classes.json, pretraining.json
    split = prepare_labeled_split(dataset_dir, runs / "split.json",
                                  per_class=DEMO_LABELED_PER_CLASS if toy else None, fraction=None if toy else 0.05,
                                  val_fraction=0.25, seed=0, test_per_class=None if toy else DEMO_TEST_PER_CLASS)
    print(f"[split] wrote {runs / 'split.json'} and {runs / 'classes.json'}: classes {split['classes']}")
    for part in ("training", "validation", "test"):
        print(f"[split]   {part:10s} {len(split[part]):5d} tiles, per class {split['counts'][part]}")
    where = unlabeled_dir or "the site's own tiles outside the test groups (labels dropped)"
    print(f"[pre-training] {where}")
    return {"dataset_dir": str(dataset_dir), "unlabeled_dir": unlabeled_dir, "split": str(runs / "split.json"),
            "toy": toy}


def download_demo_data(name: str, root: str | os.PathLike) -> str:
    """Fetch public dataset ``name`` (:data:`~monai_histodiff.data.download.DATASETS`) into ``root`` unless it is
    already there, checksum checked; return its class-folder tree."""
    from monai_histodiff.data.download import DATASETS, dataset_folder, download_dataset

    folder = dataset_folder(name, root)
    if not folder.is_dir():
        print(f"[data] downloading {name}: {DATASETS[name]['description']} into {root}")
        download_dataset(name, root)
    return str(folder)


def _commands(run_dir: str | os.PathLike) -> list[str]:
    path = Path(run_dir) / "commands.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def stage_times(run_dir: str | os.PathLike, skip: int = 0) -> list[tuple[str, int, float]]:
    """``(stage, runs, seconds)`` per stage from the run folder's ``commands.jsonl`` (after its first ``skip`` lines:
    the records of earlier runs in the same folder), in order of first run."""
    totals: dict[str, list[float]] = {}
    for line in _commands(run_dir)[skip:]:
        record = json.loads(line)
        totals.setdefault(record["stage"], []).append(float(record["seconds"]))
    return [(stage, len(s), sum(s)) for stage, s in totals.items()]


def format_stage_times(times: list[tuple[str, int, float]], elapsed: float) -> str:
    """The per-stage wall-time table the demo prints at the end."""
    lines = [f"  {'stage':28s} {'runs':>4s} {'seconds':>8s}"]
    lines += [f"  {stage:28s} {n:4d} {seconds:8.0f}" for stage, n, seconds in times]
    staged = sum(t[2] for t in times)
    lines.append(f"  {'(data, tables, pictures)':28s} {'':4s} {max(elapsed - staged, 0.0):8.0f}")
    lines.append(f"  {'total':28s} {'':4s} {elapsed:8.0f}   ({elapsed / 60:.1f} min)")
    return "\n".join(lines)


def run_demo(output_dir: str | os.PathLike = "demo_output", dataset_dir: str | None = None,
             unlabeled_dir: str | None = None, download: str | None = None,
             data_root: str | os.PathLike = "data", budgets: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """Every stage end to end at the small size, then the Table 1 protocol with one seed; prints the results.

    Args:
        output_dir: the demo's folder (data, runs).
        dataset_dir: a class-folder tree of real tiles (default: ``$HISTODIFF_DATA``, else the toy tiles).
        unlabeled_dir: pre-training tiles (default: ``$HISTODIFF_UNLABELED``; the toy archive; real data: the
            site's own tiles outside the test groups).
        download: a dataset of :data:`~monai_histodiff.data.download.DATASETS` to fetch into ``data_root`` and run
            on (e.g. ``"kather2016"``); only when asked.
        budgets: per-stage overrides on top of :data:`DEMO_BUDGETS`.
    """
    from monai_histodiff.apps.experiment import ExperimentConfig, run_experiment

    start = time.time()
    if download:
        dataset_dir = download_demo_data(download, data_root)
    paths = prepare_demo_data(output_dir, dataset_dir, unlabeled_dir)
    toy = paths["toy"]
    runs = Path(output_dir) / "runs"
    stage_overrides = {stage: dict(v) for stage, v in DEMO_BUDGETS.items()}
    for stage, v in (budgets or {}).items():
        stage_overrides.setdefault(stage, {}).update(v)
    cfg = ExperimentConfig(output_dir=runs.as_posix(), dataset_dir=paths["dataset_dir"], small=True,
                           label_per_class=DEMO_LABELED_PER_CLASS if toy else None,
                           label_fraction=None if toy else 0.05, test_per_class=None if toy else DEMO_TEST_PER_CLASS,
                           val_fraction=0.25, seeds=(0,), ratios=(0.5, 1.0, 2.0, 3.0), random_ratio=0.5,
                           generation_steps=50, guidance_scale=DEMO_GUIDANCE_SCALE, judge=not toy,
                           unlabeled_dir=paths["unlabeled_dir"],
                           pretraining="sources" if paths["unlabeled_dir"] else "site",
                           stage_overrides=stage_overrides)
    earlier = len(_commands(runs))  # a rerun in the same folder: time only this run's stages
    run_experiment(cfg)
    elapsed = time.time() - start
    print("\n" + "=" * 100)
    if toy:
        print(TOY_NOTICE)
    print(f"HistoDiffusion demo finished in {elapsed / 60:.1f} min. Results (test split, every number measured in this "
          f"run):")
    print((runs / "results.md").read_text())
    print("Wall time per stage (seconds, this run):")
    print(format_stage_times(stage_times(runs, skip=earlier), elapsed))
    print("\nOpen first:")
    print(f"  {runs / 'real_vs_synthetic.png'}\n    per class, top to bottom: real training tiles, generated tiles "
          f"requested for the class, the tiles selection kept for the largest selective row, and those it rejected")
    print("Then:")
    for label, path in [
        ("results table", runs / "results.md"), ("results per seed", runs / "results.csv"),
        ("accuracy vs ratio plot", runs / "accuracy_vs_ratio.png"),
        ("guidance check (g = 0 vs the pool's g)", runs / "generate" / "guidance_check.json"),
        ("sample grids per class", runs / "generate" / "grids"),
        ("selection report (selective 300%)", runs / "rows" / "selective_300" / "select" / "selection_report.json"),
        ("selection distance histograms", runs / "rows" / "selective_300" / "select" / "distance_histograms.png"),
        ("latent classifier accuracy per noise level", runs / "train_latent_classifier" / "timestep_accuracy.png"),
        ("TensorBoard logs", f"tensorboard --logdir {runs}"),
        ("checkpoints", runs / "pretrain_autoencoder" / "autoencoder.pt"),
        ("", runs / "pretrain_diffusion" / "diffusion.pt"),
        ("", runs / "finetune" / "decoder_ft.pt"),
        ("", runs / "train_latent_classifier" / "latent_classifier.pt"),
        ("stage logs", runs / "logs"),
    ]:
        print(f"  {label:45s} {path}")
    return 0
