"""The time-dependent latent classifier learns on real H&E tiles, and the runner refuses one at chance.

A latent classifier at chance makes guidance steer nowhere, and every synthetic row of Table 1 then measures noise.
This runs the stage as users do, on real lung tiles of two classes (benign lung and adenocarcinoma, groups kept on
one side), and requires its accuracy in the lowest noise bucket (t < 100) to be clearly above chance.
"""

from __future__ import annotations

import csv
import json

import pytest

from monai_histodiff.apps.experiment import ExperimentError, check_latent_classifier
from tests.bundles.conftest import FAST, SMALL, run_bundle

CLASSES = ("lung_aca", "lung_n")


@pytest.fixture(scope="module")
def lung_two_class_csv(lc25000_groups, lc25000_dir, tmp_path_factory):
    """A CSV datalist (image,label,group) of the first 64 groups of two lung classes."""
    rows, per_class = [], {c: set() for c in CLASSES}
    for r in sorted(lc25000_groups, key=lambda r: r["group"]):
        if r["label"] in CLASSES and (r["group"] in per_class[r["label"]] or len(per_class[r["label"]]) < 64):
            per_class[r["label"]].add(r["group"])
            rows.append({"image": str(lc25000_dir / r["image"]), "label": r["label"], "group": r["group"]})
    path = tmp_path_factory.mktemp("lung2") / "lung_two_class.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_latent_classifier_learns_on_real_tiles(pretrained_real, lung_two_class_csv, tmp_path):
    import shutil

    site = tmp_path / "site"
    for stage, name in (("pretrain_autoencoder", "autoencoder.pt"), ("pretrain_diffusion", "diffusion.pt")):
        (site / stage).mkdir(parents=True)
        shutil.copy(pretrained_real / stage / name, site / stage / name)
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], dataset_dir=str(lung_two_class_csv),
               output_dir=str(site), label_per_class=40, val_fraction=0.4, max_epochs=20, val_interval=20,
               **FAST)
    split = json.loads((site / "split.json").read_text())
    train_groups = {it["group"] for it in split["training"]}
    assert train_groups and not train_groups & {it["group"] for it in split["validation"] + split["test"]}
    # 400 steps (small.json: 20 per epoch) of 48 training tiles; about 0.7 is expected at t < 100, chance is 0.5
    report = check_latent_classifier(site / "train_latent_classifier", num_classes=2, margin=0.12)
    assert report["lowest_bucket_accuracy"] >= 0.62, report["buckets"]


def test_runner_refuses_a_latent_classifier_at_chance(tmp_path):
    buckets = [{"t_min": 100 * b, "t_max": 100 * (b + 1), "accuracy": 0.52} for b in range(10)]
    (tmp_path / "timestep_accuracy.json").write_text(json.dumps({"buckets": buckets}))
    with pytest.raises(ExperimentError, match="chance is 0.500"):
        check_latent_classifier(tmp_path, num_classes=2, margin=0.1)
    buckets[0]["accuracy"] = 0.8
    (tmp_path / "timestep_accuracy.json").write_text(json.dumps({"buckets": buckets}))
    assert check_latent_classifier(tmp_path, num_classes=2)["lowest_bucket_accuracy"] == 0.8
