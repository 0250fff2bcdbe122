from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from monai_histodiff.data.datalist import list_images, scan_class_folders
from monai_histodiff.data.toy import TOY_NOTICE, make_toy_dataset


def _digest(folder):
    return [hashlib.md5(open(f, "rb").read()).hexdigest() for f in list_images(folder)]


def test_toy_tiles_deterministic_and_labelled(tmp_path):
    make_toy_dataset(tmp_path / "a", num_per_class=5, image_size=32, num_classes=3, seed=7)
    make_toy_dataset(tmp_path / "b", num_per_class=5, image_size=32, num_classes=3, seed=7)
    make_toy_dataset(tmp_path / "c", num_per_class=5, image_size=32, num_classes=3, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    items, classes = scan_class_folders(tmp_path / "a")
    assert len(classes) == 3 and len(items) == 15
    assert "SYNTHETIC TOY TILES" in (tmp_path / "a" / "README.txt").read_text() and "SYNTHETIC" in TOY_NOTICE


def test_toy_classes_differ_in_colour(tmp_path):
    make_toy_dataset(tmp_path, num_per_class=10, image_size=32, num_classes=4, seed=0)
    items, classes = scan_class_folders(tmp_path)
    means = np.array([[np.asarray(Image.open(it["image"]), float).mean((0, 1)) for it in items if it["label"] == c]
                      for c in range(4)])  # [class, tile, rgb]
    centroid = means.mean(1)
    # nearest-centroid on mean colour separates the classes: they carry real class structure
    pred = np.argmin(((means[:, :, None, :] - centroid[None, None]) ** 2).sum(-1), -1)
    assert (pred == np.arange(4)[:, None]).mean() > 0.9


def _nearest_colour_centroid_accuracy(root) -> float:
    items, _ = scan_class_folders(root)
    means = np.array([[np.asarray(Image.open(it["image"]), float).mean((0, 1)) for it in items if it["label"] == c]
                      for c in range(4)])
    pred = np.argmin(((means[:, :, None, :] - means.mean(1)[None, None]) ** 2).sum(-1), -1)
    return float((pred == np.arange(4)[:, None]).mean())


def test_confusion_draws_tiles_on_other_classes_backgrounds(tmp_path):
    make_toy_dataset(tmp_path / "plain", num_per_class=12, image_size=32, num_classes=4, seed=0)
    make_toy_dataset(tmp_path / "mixed", num_per_class=12, image_size=32, num_classes=4, seed=0, confusion=0.6)
    make_toy_dataset(tmp_path / "again", num_per_class=12, image_size=32, num_classes=4, seed=0, confusion=0.6)
    assert _digest(tmp_path / "mixed") == _digest(tmp_path / "again") != _digest(tmp_path / "plain")
    # the mean colour no longer gives the class away: the demo's baseline has something left to learn
    assert _nearest_colour_centroid_accuracy(tmp_path / "mixed") < _nearest_colour_centroid_accuracy(tmp_path / "plain")
    with pytest.raises(ValueError, match="confusion"):
        make_toy_dataset(tmp_path / "bad", num_per_class=1, confusion=1.5)


def test_zoom_draws_the_same_structures_larger(tmp_path):
    def edges(folder):  # mean absolute difference between neighbouring pixels: smaller when structures are larger
        tiles = [np.asarray(Image.open(p), float) for p in sorted(folder.rglob("*.png"))]
        return float(np.mean([np.abs(np.diff(t, axis=0)).mean() + np.abs(np.diff(t, axis=1)).mean() for t in tiles]))

    make_toy_dataset(tmp_path / "x1", num_per_class=6, image_size=64, num_classes=4, seed=3)
    make_toy_dataset(tmp_path / "x2", num_per_class=6, image_size=64, num_classes=4, seed=3, zoom=2)
    make_toy_dataset(tmp_path / "again", num_per_class=6, image_size=64, num_classes=4, seed=3, zoom=2)
    assert _digest(tmp_path / "x2") == _digest(tmp_path / "again") != _digest(tmp_path / "x1")
    assert {Image.open(p).size for p in (tmp_path / "x2").rglob("*.png")} == {(64, 64)}
    assert edges(tmp_path / "x2") < 0.7 * edges(tmp_path / "x1")
    with pytest.raises(ValueError, match="zoom"):
        make_toy_dataset(tmp_path / "bad", num_per_class=1, image_size=64, zoom=3)


def test_classes_by_name_keep_each_class_s_tiles(tmp_path):
    make_toy_dataset(tmp_path / "first", num_per_class=3, image_size=32, num_classes=4, seed=1)
    make_toy_dataset(tmp_path / "named", num_per_class=3, image_size=32, seed=1, classes=("ADI_TOY", "MUC_TOY"))
    assert sorted(p.name for p in (tmp_path / "named").iterdir() if p.is_dir()) == ["ADI_TOY", "MUC_TOY"]
    assert _digest(tmp_path / "named" / "ADI_TOY") == _digest(tmp_path / "first" / "ADI_TOY")
    with pytest.raises(ValueError, match="classes"):
        make_toy_dataset(tmp_path / "bad", num_per_class=1, classes=("ADI_TOY", "NOPE"))
