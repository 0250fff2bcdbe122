"""Shared test fixtures: the real H&E tiles in ../shared/data/histology (skip when absent) and generated data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HISTOLOGY = Path(os.environ.get("HISTODIFF_TEST_DATA", REPO.parent / "shared" / "data" / "histology"))


def _real(sub: str) -> Path:
    path = HISTOLOGY / sub
    if not path.is_dir():
        pytest.skip(f"real H&E tiles not found at {path} (set HISTODIFF_TEST_DATA to the shared histology folder)")
    return path


WSI = Path(os.environ.get("HISTODIFF_TEST_WSI", REPO.parent / "shared" / "data" / "wsi"))


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    """The three small real H&E slides of ../shared/data/wsi (skip when absent)."""
    if not (WSI / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real whole-slide images not found at {WSI} (set HISTODIFF_TEST_WSI to the shared wsi folder)")
    return WSI


@pytest.fixture()
def one_thread():
    """Tiny networks: one intra-op thread is faster and avoids OpenMP spin-waits on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nct_crc_dir() -> Path:
    """62 real NCT-CRC-HE tiles in 9 class folders."""
    return _real("nct_crc")


@pytest.fixture(scope="session")
def unlabeled_dir() -> Path:
    """Real unlabeled H&E tiles from several sources (one folder per source)."""
    return _real("unlabeled")


@pytest.fixture(scope="session")
def kather2016_dir() -> Path:
    """Kather 2016 tiles: a second labeled dataset with 8 classes."""
    return _real("kather2016")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """Seeded toy tiles: 4 classes x 12 tiles at 32 px."""
    from monai_histodiff.data.toy import make_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, num_per_class=12, image_size=32, num_classes=4, seed=0)
    return out


@pytest.fixture()
def corrupt_dir(tmp_path) -> Path:
    """A folder of good and bad files: zero-byte, truncated PNG, text named .png, RGBA, grayscale, 16-bit."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "good_rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 20), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "gray16.png")
    (tmp_path / "zero.png").write_bytes(b"")
    full = (tmp_path / "good_rgb.png").read_bytes()
    big = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "tmp_big.png")
    data = (tmp_path / "tmp_big.png").read_bytes()
    (tmp_path / "tmp_big.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    assert full
    return tmp_path


# the pipeline fixtures (pre-trained and adapted small checkpoints) serve top-level tests such as test_experiment.py
from tests.bundles.conftest import pretrained, toy_labeled_site, toy_unlabeled  # noqa: E402,F401


@pytest.fixture(scope="session")
def lc25000_dir() -> Path:
    """9,000 real LC25000 lung tiles in 3 class folders, with ``groups.csv`` (image,label,group) at the root."""
    path = _real("lc25000_lung")
    if not (path / "groups.csv").is_file():
        pytest.skip(f"{path / 'groups.csv'} not found: the lung tiles come with their groups file")
    return path


@pytest.fixture(scope="session")
def lc25000_groups(lc25000_dir) -> list[dict[str, str]]:
    """The rows of the lung tiles' ``groups.csv`` (image paths relative to the dataset root)."""
    with open(lc25000_dir / "groups.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
