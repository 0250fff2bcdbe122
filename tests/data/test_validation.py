from __future__ import annotations

import json

import pytest

from monai_histodiff.data.datalist import list_images
from monai_histodiff.data.validation import BadFilesError, check_image, scan_images


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
