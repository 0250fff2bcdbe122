"""The Table 1 runner on a tiny configuration (1 seed, 2 rows) and the test-set firewall of downstream training."""

from __future__ import annotations

import csv
import json
import shutil

from monai_histodiff.data import load_datalist
from monai_histodiff.experiment import ExperimentConfig, experiment_rows, run_experiment, summarise
from tests.bundles.conftest import SMALL, run_bundle


def test_rows_follow_table_1():
    names = [r.name for r in experiment_rows([0.5, 1.0, 2.0, 3.0], 0.5)]
    assert names == ["Baseline (real only)", "+ random 50%", "+ selective 50%", "+ selective 100%",
                     "+ selective 200%", "+ selective 300%"]


def test_summary_mean_and_std():
    rows = [{"row": "a", "mode": "baseline", "ratio": 0.0, "fd": None, "accuracy": a, "macro_f1": 1.0,
             "macro_sensitivity": 1.0, "macro_specificity": 1.0} for a in (0.5, 0.7)]
    s = summarise(rows)[0]
    assert s["accuracy"][0] == 0.6 and abs(s["accuracy"][1] - 0.1414) < 1e-3 and s["fd"] is None


def test_tiny_experiment_writes_all_outputs(toy_labeled_site, tmp_path):
    run_dir = tmp_path / "exp"
    shutil.copytree(toy_labeled_site, run_dir, ignore=shutil.ignore_patterns("generate", "select*", "rows"))
    cfg = ExperimentConfig(output_dir=str(run_dir), dataset_dir=str(run_dir / "labeled"), seeds=(0,), ratios=(0.5,),
                           random_ratio=None, downstream_epochs=2, generation_steps=5, lr=1e-3)
    results = run_experiment(cfg)
    assert [r["row"] for r in results] == ["Baseline (real only)", "+ selective 50%"]
    with open(run_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    md = (run_dir / "results.md").read_text()
    assert "| Baseline (real only) | / |" in md and "+ selective 50%" in md and "Accuracy" in md
    assert (run_dir / "accuracy_vs_ratio.png").stat().st_size > 0
    metrics = json.loads((run_dir / "rows" / "selective_50" / "seed0" / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["evaluated_on"]["part"] == "test"
    # FD is named after the extractor, the baseline classifier trained on real tiles (not Inception, so not 'FID')
    assert metrics["frechet"]["metric_name"].startswith("FD (") and not metrics["frechet"]["is_fid"]


def test_downstream_training_never_reads_the_test_set(toy_labeled_site, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(toy_labeled_site, site, ignore=shutil.ignore_patterns("generate", "select*", "rows"))
    split = load_datalist(site / "split.json")
    test_files = [it["image"] for it in split["test"]]
    assert test_files and not set(test_files) & {it["image"] for it in split["training"] + split["validation"]}
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for i, f in enumerate(test_files):  # training must succeed without the test tiles on disk
        shutil.move(f, hidden / f"{i}.png")
    run_bundle(["bundles/train_downstream.json", *SMALL], output_dir=str(site), max_epochs=1, batch_size=8)
    for i, f in enumerate(test_files):
        shutil.move(hidden / f"{i}.png", f)
    run_bundle(["bundles/evaluate.json", *SMALL], output_dir=str(site))
    metrics = json.loads((site / "evaluate" / "metrics.json").read_text())
    assert metrics["evaluated_on"]["count"] == len(test_files) and (site / "evaluate" / "confusion_matrix.png").is_file()
