"""The StyleGAN2 baseline's bundles at 16 px on two toy classes: settings checked first, resume, and a tiny training
that learns the two classes, whose tiles ``generate_stylegan2`` writes for ``select`` like HistoDiffusion's."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import tests.bundles.test_settings_cli as settings_cli_tests
import tests.test_bundle_settings as settings_tests
from monai_histodiff.data import load_datalist, tile_transforms
from monai_histodiff.data.manifest import read_generation_manifest
from monai_histodiff.handlers import file_sha256, load_checkpoint
from tests.bundles.conftest import FAST, SMALL, run_bundle

TRAIN = ["bundles/train_stylegan2.json", *SMALL]
GENERATE = ["bundles/generate_stylegan2.json", *SMALL]
SIZE = 16
#: the labeled split every stage of a site shares: all 16 toy tiles of each class for training
SPLIT = dict(image_size=SIZE, label_per_class=16, val_fraction=0.0)
#: networks small enough for a few seconds of training on one core
TINY = dict(channel_base=128, channel_max=32, z_dim=16, w_dim=16)


@pytest.fixture(scope="module")
def toy_two_classes(tmp_path_factory) -> Path:
    """Two visibly different toy classes at 16 px: near-white adipose, dark pink lymphocytes (16 tiles each)."""
    from monai_histodiff.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy_gan")
    make_toy_dataset(root, num_per_class=16, image_size=SIZE, num_classes=2, seed=0)
    return root


@pytest.mark.parametrize("stage", ["train_stylegan2", "generate_stylegan2"])
def test_every_numeric_setting_is_checked_first(stage):
    settings_tests.test_every_stage_checks_every_numeric_setting_first(stage)


def test_bad_override_is_refused_before_any_work(tmp_path):
    settings_cli_tests.test_bad_override_is_refused_before_any_work(
        tmp_path, "train_stylegan2", {"r1_gamma": "-1", "r1_interval": "0", "z_dim": "8.5"},
        ["--r1_gamma=-1: a real number >= 0", "--r1_interval=0: an integer >= 1", "--z_dim=8.5: an integer >= 1"])


def test_train_resume_continues_the_iteration_count(toy_two_classes, tmp_path):
    common = dict(dataset_dir=str(toy_two_classes), output_dir=str(tmp_path), batch_size=8, epoch_length=2,
                  sample_interval=1, **SPLIT, **TINY, **FAST)
    run_bundle(TRAIN, max_epochs=1, **common)
    stage = tmp_path / "train_stylegan2"
    first = load_checkpoint(stage / "last.pt")
    assert first["engine"]["iteration"] == 2
    run_bundle(TRAIN, max_epochs=2, resume=True, **common)
    resumed = load_checkpoint(stage / "last.pt")
    assert resumed["engine"]["iteration"] == 4 and resumed["engine"]["epoch"] == 2
    for net in ("generator", "discriminator", "ema"):
        before, after = first["state"][net], resumed["state"][net]
        assert any(not torch.equal(before[k], after[k]) for k in before), net

    final = load_checkpoint(stage / "stylegan2.pt")
    split = load_datalist(tmp_path / "split.json")
    meta = final["meta"]
    assert meta["stage"] == "train_stylegan2" and meta["classes"] == split["classes"]
    assert meta["config"]["generator_args"] == dict(image_size=SIZE, num_classes=2, mapping_layers=2, **TINY)
    assert meta["config"]["discriminator_args"]["channel_base"] == TINY["channel_base"]
    assert meta["ema"]["num_updates"] == 4
    assert meta["parents"]["split"]["sha256"] == file_sha256(tmp_path / "split.json")
    assert sorted(p.name for p in (stage / "grids").glob("*.png")) == [
        "samples_per_class_epoch0001.png", "samples_per_class_epoch0002.png"]
    assert list((stage / "logs").glob("events.out.tfevents.*"))


def _colours(paths: list[str]) -> torch.Tensor:
    """Mean RGB per tile ``[N, 3]`` in [-1, 1], of tiles read as every stage reads them."""
    load = tile_transforms(SIZE)
    return torch.stack([load({"image": p})["image"].mean(dim=(1, 2)) for p in paths])


def test_tiny_training_learns_two_toy_classes_and_select_reads_its_tiles(toy_two_classes, tmp_path):
    """160 iterations on near-white vs dark pink tiles, then a classifier trained on the real tiles only (nearest class
    mean colour) labels the generated tiles: it must find the requested class for at least 90% of each class's tiles
    (chance: 50%; an unconditional generator gets one class wrong, an untrained one makes grey for both). The
    generated folder then goes through bundles/select.json as HistoDiffusion's does."""
    site = dict(dataset_dir=str(toy_two_classes), output_dir=str(tmp_path), **SPLIT)
    run_bundle(TRAIN, batch_size=16, epoch_length=40, max_epochs=4, lr=2e-3, r1_gamma=0.1, r1_interval=4,
               channel_base=256, channel_max=64, z_dim=32, w_dim=32, sample_interval=4, num_workers=0,
               save_interval=1000, **site)
    run_bundle(GENERATE, counts=[32, 32], batch_size=32, **site)

    out = tmp_path / "generate_stylegan2"
    split = load_datalist(tmp_path / "split.json")
    classes = split["classes"]
    items = read_generation_manifest(out / "manifest.jsonl", classes)  # the reader bundles/select.json uses
    assert [sum(it["label"] == c for it in items) for c in range(2)] == [32, 32]
    centroids = torch.stack([_colours([it["image"] for it in split["training"] if it["label"] == c]).mean(0)
                             for c in range(2)])
    assert float((centroids[0] - centroids[1]).norm()) > 0.5, centroids  # the two classes are visibly different
    for c in range(2):
        colours = _colours([it["image"] for it in items if it["label"] == c])
        predicted = torch.cdist(colours, centroids).argmin(dim=1)
        accuracy = float((predicted == c).float().mean())
        assert accuracy >= 0.9, (classes[c], accuracy, colours.mean(0), centroids)

    # selection reads the folder exactly like HistoDiffusion's (only --synthetic_dir and --selection_dir change)
    run_bundle(["bundles/train_aux_classifier.json", *SMALL], max_epochs=1, batch_size=16, num_workers=0,
               save_interval=1000, **site)
    sel = tmp_path / "select_stylegan2"
    run_bundle(["bundles/select.json", *SMALL], output_dir=str(tmp_path), image_size=SIZE, synthetic_dir=str(out),
               selection_dir=str(sel), ratio=0.5)
    with open(sel / "decisions.csv", newline="") as f:
        decisions = list(csv.DictReader(f))
    assert sorted(d["file"] for d in decisions) == sorted(it["file"] for it in items)
    augmented = load_datalist(sel / "augmented_datalist.json")
    assert len(augmented["training"]) == len(split["training"]) + sum(d["kept"] == "True" for d in decisions)
