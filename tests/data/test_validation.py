from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_histodiff.data.datalist import list_images, scan_class_folders
from monai_histodiff.data.validation import BadFilesError, check_class_images, check_image, scan_images


def test_check_image_reasons(corrupt_dir):
    assert check_image(corrupt_dir / "good_rgb.png") is None
    assert check_image(corrupt_dir / "rgba.png") is None
    assert check_image(corrupt_dir / "gray.png") is None
    assert check_image(corrupt_dir / "gray16.png") is None
    assert check_image(corrupt_dir / "zero.png") == "zero-byte file"
    assert check_image(corrupt_dir / "text.png").startswith("not an image")
    assert check_image(corrupt_dir / "truncated.png").startswith("unreadable or truncated")
    assert check_image(corrupt_dir / "missing.png") == "missing"


def test_scan_skip_writes_report(corrupt_dir, tmp_path_factory):
    items = [{"image": f, "label": 0} for f in list_images(corrupt_dir)]
    report = tmp_path_factory.mktemp("report")
    good, bad = scan_images(items, policy="skip", report_dir=report)
    assert sorted(p["image"].rsplit("/", 1)[1] for p in good) == ["good_rgb.png", "gray.png", "gray16.png", "rgba.png"]
    written = json.loads((report / "bad_files.json").read_text())
    assert {b["image"].rsplit("/", 1)[1] for b in written} == {"zero.png", "text.png", "truncated.png"}
    assert all(b["reason"] for b in written)


def test_scan_error_names_every_file(corrupt_dir):
    items = [{"image": f} for f in list_images(corrupt_dir)]
    with pytest.raises(BadFilesError) as e:
        scan_images(items, policy="error")
    for name in ("zero.png", "text.png", "truncated.png"):
        assert name in str(e.value)


def test_real_tiles_all_readable(nct_crc_dir):
    items = [{"image": f} for f in list_images(nct_crc_dir)]
    good, bad = scan_images(items)
    assert len(items) == 62 and bad == []


def _write(path, h: int, w: int, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_decompression_bomb_is_reported_not_raised(tmp_path, monkeypatch):
    """Above PIL's limit PIL warns (up to twice it) or raises; both end in bad_files.json with the reason."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    items = [{"image": _write(tmp_path / "tiles" / name, h, w)}
             for name, h, w in (("ok.png", 30, 30), ("warned.png", 40, 40), ("raised.png", 64, 64))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        good, bad = scan_images(items, policy="skip", report_dir=tmp_path / "report", num_workers=1)
    assert [Path(g["image"]).name for g in good] == ["ok.png"]
    written = json.loads((tmp_path / "report" / "bad_files.json").read_text())
    assert [Path(b["image"]).name for b in written] == ["warned.png", "raised.png"]
    for b in written:
        assert b["reason"].startswith("larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS = 1000)")
    assert "40x40 = 1600 pixels" in written[0]["reason"]


def test_tile_far_smaller_than_image_size_is_reported_with_the_rule(tmp_path):
    image_size = 64
    items = [{"image": _write(tmp_path / "big.png", 64, 64)}, {"image": _write(tmp_path / "edge.png", 16, 40)},
             {"image": _write(tmp_path / "tiny.png", 15, 64)}]
    good, bad = scan_images(items, policy="skip", report_dir=tmp_path, min_size=image_size // 4)
    assert [Path(g["image"]).name for g in good] == ["big.png", "edge.png"]
    assert bad == [{"image": items[2]["image"],
                    "reason": "too small: 64x15, shorter side under min_size=16 (resizing it up to the training size "
                              "would invent the tissue)"}]
    assert scan_images(items)[1] == []  # without the rule every tile is kept


def test_dataset_a_guided_model_cannot_learn_from_is_refused(tmp_path):
    root = tmp_path / "site"
    _write(root / "TUM" / "a.png", 8, 8)
    (root / "STR").mkdir()
    (root / "STR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    items, classes = scan_class_folders(root)
    good, bad = scan_images(items, policy="skip")
    assert classes == ["STR", "TUM"] and len(bad) == 1
    with pytest.raises(ValueError, match=rf"class 'STR' has no readable image in {root / 'STR'} \(1 unreadable file"):
        check_class_images(good, classes, root, bad)
    with pytest.raises(ValueError, match=rf"{root} holds a single class \(\['TUM'\]\)"):
        check_class_images(good, ["TUM"], root)
    csv_list = tmp_path / "labels.csv"
    with pytest.raises(ValueError, match=rf"class 'STR' has no readable image in {csv_list}"):
        check_class_images([{"image": "a.png", "label": 1}], classes, csv_list)
    check_class_images([*good, {"image": "b.png", "label": 0}], classes, root)  # both classes present: accepted
