"""The bad-file scan's record: verdicts kept by (path, size, mtime_ns), so a rerun over unchanged tiles decodes none of
them, a changed file is decoded again, and processes sharing the record decode each tile once. Tiny PNG tiles."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import monai_histodiff.data.validation as validation
from monai_histodiff.data.prepare import prepare_unlabeled
from monai_histodiff.data.validation import SCAN_RECORD_NAME, ScanRecord, scan_images


def _tile(path: Path, size: int = 8, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def tiles(tmp_path) -> list[dict]:
    """30 good 8x8 tiles, one truncated PNG and one text file named .png."""
    items = [{"image": _tile(tmp_path / "tiles" / f"t{i:02d}.png", seed=i)} for i in range(30)]
    data = (tmp_path / "tiles" / "t00.png").read_bytes()
    (tmp_path / "tiles" / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "tiles" / "text.png").write_text("not an image\n")
    return items + [{"image": str(tmp_path / "tiles" / "cut.png")}, {"image": str(tmp_path / "tiles" / "text.png")}]


@pytest.fixture()
def decodes(monkeypatch) -> list[str]:
    """Every path the scan decodes (the decode function counted where the pool calls it)."""
    calls: list[str] = []
    real = validation._decode_verdict

    def counted(path, *args):
        calls.append(os.path.basename(path))
        return real(path, *args)

    monkeypatch.setattr(validation, "_decode_verdict", counted)
    return calls


def _names(entries) -> list[str]:
    return sorted(os.path.basename(e["image"]) for e in entries)


def test_second_scan_decodes_nothing_and_a_changed_file_is_decoded_again(tiles, decodes, tmp_path):
    record = tmp_path / "listing" / SCAN_RECORD_NAME
    good, bad = scan_images(tiles, record=record, num_workers=2, progress=True)
    assert len(decodes) == 32 and len(good) == 30 and _names(bad) == ["cut.png", "text.png"]
    first = {b["image"]: b["reason"] for b in bad}
    decodes.clear()
    again_good, again_bad = scan_images(tiles, record=record, num_workers=2)
    assert decodes == [], "unchanged files are not decoded again"
    assert again_good == good and {b["image"]: b["reason"] for b in again_bad} == first
    # min_size is applied to the recorded sizes: still no decoding
    small_good, small_bad = scan_images(tiles, record=record, min_size=16)
    assert decodes == [] and small_good == [] and all(b["reason"].startswith("too small: 8x8") for b in small_bad[:30])
    # a rewritten tile (new size or mtime) and the repaired truncated one are decoded again, alone
    _tile(Path(tiles[3]["image"]), size=9, seed=99)
    _tile(Path(tiles[30]["image"]), seed=5)
    good, bad = scan_images(tiles, record=record, num_workers=2)
    assert sorted(decodes) == ["cut.png", "t03.png"] and len(good) == 31 and _names(bad) == ["text.png"]
    # same size, new modification time: decoded again too
    decodes.clear()
    st = os.stat(tiles[5]["image"])
    os.utime(tiles[5]["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scan_images(tiles, record=record)
    assert decodes == ["t05.png"]
    with ScanRecord(record) as book:
        assert len(book) == 32


def test_processes_sharing_a_record_decode_each_tile_once(tiles, decodes, tmp_path):
    """Two scans at once over one record (the ranks of a run listing the same tiles): the first holds the record's
    lock and decodes, the second waits and finds every verdict."""
    record = tmp_path / SCAN_RECORD_NAME
    results = []
    threads = [threading.Thread(target=lambda: results.append(scan_images(tiles, record=record, num_workers=2)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0][0] == results[1][0]
    assert sorted(decodes) == sorted(os.path.basename(t["image"]) for t in tiles), "each tile decoded once"


def test_process_pool_gives_the_thread_pool_verdicts(tiles, tmp_path):
    by_threads = scan_images(tiles, num_workers=2)
    by_processes = scan_images(tiles, num_workers=2, executor="process", record=tmp_path / "r.sqlite")
    assert by_processes == by_threads
    with pytest.raises(ValueError, match="executor"):
        scan_images(tiles, executor="fibers")


def test_unreadable_record_is_replaced_with_a_warning(tiles, decodes, tmp_path):
    record = tmp_path / SCAN_RECORD_NAME
    record.write_bytes(b"this is no SQLite database, just bytes " * 100)
    with pytest.warns(UserWarning, match=rf"scan record {record} is unreadable"):
        good, _ = scan_images(tiles, record=record)
    assert len(good) == 30 and len(decodes) == 32
    with sqlite3.connect(record) as conn:
        assert conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 32


def test_prepare_unlabeled_keeps_the_record_beside_the_listing(tmp_path, decodes):
    for source in ("a", "b"):
        for i in range(4):
            _tile(tmp_path / "sources" / source / f"{source}{i}.png", seed=i)
    listing = tmp_path / "run" / "unlabeled.json"
    first = prepare_unlabeled(str(tmp_path / "sources"), listing)
    assert len(first["unlabeled"]) == 8 and len(decodes) == 8
    assert (listing.parent / SCAN_RECORD_NAME).is_file()
    decodes.clear()
    again = prepare_unlabeled(str(tmp_path / "sources"), listing)
    assert decodes == [] and again["unlabeled"] == first["unlabeled"]
    prepare_unlabeled(str(tmp_path / "sources"), tmp_path / "other" / "unlabeled.json", scan_record=None)
    assert len(decodes) == 8 and not (tmp_path / "other" / SCAN_RECORD_NAME).exists()
