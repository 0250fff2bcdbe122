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


# the pipeline fixtures: small checkpoints pre-trained and adapted by running the bundles as users do. Defined here
# only (not in tests/bundles/conftest.py too), so each is built once per session for every test that uses it.
from tests.bundles.conftest import FAST, SMALL, run_bundle  # noqa: E402


@pytest.fixture(scope="session")
def toy_unlabeled(tmp_path_factory) -> Path:
    """Two toy 'sources' of 64 px tiles standing in for unlabeled collections."""
    from monai_histodiff.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy_unlabeled")
    for i, name in enumerate(("source_a", "source_b")):
        make_toy_dataset(root / name, num_per_class=10, image_size=64, num_classes=4, seed=10 + i)
    return root


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, toy_unlabeled) -> Path:
    """Output folder holding a briefly pre-trained autoencoder and diffusion model at the small size."""
    out = tmp_path_factory.mktemp("pretrained")
    run_bundle(["bundles/pretrain_autoencoder.json", *SMALL], dataset_dir=str(toy_unlabeled), output_dir=str(out),
               max_epochs=1, epoch_length=30, batch_size=8, lr=2e-3, adv_start=25, **FAST)
    run_bundle(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(toy_unlabeled), output_dir=str(out),
               max_epochs=1, epoch_length=3, batch_size=4, lr=1e-3, warmup_steps=2, scale_factor_batches=3,
               grid_inference_steps=3, num_grid_samples=4, **FAST)
    return out


@pytest.fixture(scope="session")
def pretrained_real(tmp_path_factory, unlabeled_dir) -> Path:
    """An autoencoder briefly pre-trained on the real unlabeled H&E tiles (and a diffusion checkpoint on it, for the
    scale factor and noise schedule the adaptation stages read): latents that carry tissue structure."""
    out = tmp_path_factory.mktemp("pretrained_real")
    run_bundle(["bundles/pretrain_autoencoder.json", *SMALL], dataset_dir=str(unlabeled_dir), output_dir=str(out),
               max_epochs=1, epoch_length=60, batch_size=8, **FAST)
    run_bundle(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(unlabeled_dir), output_dir=str(out),
               max_epochs=1, epoch_length=2, batch_size=4, warmup_steps=2, scale_factor_batches=3,
               grid_inference_steps=2, num_grid_samples=2, use_latent_cache=False, **FAST)  # 2 steps: encode 8 tiles
    return out


@pytest.fixture(scope="session")
def toy_labeled_site(tmp_path_factory, pretrained) -> Path:
    """A site folder adapted to toy labeled tiles: split, auxiliary classifier, fine-tuned decoder, latent classifier."""
    import shutil

    from monai_histodiff.data.toy import make_toy_dataset

    site = tmp_path_factory.mktemp("site")
    data = site / "labeled"
    make_toy_dataset(data, num_per_class=16, image_size=64, num_classes=4, seed=5)
    for stage, name in (("pretrain_autoencoder", "autoencoder.pt"), ("pretrain_diffusion", "diffusion.pt")):
        (site / stage).mkdir()
        shutil.copy(pretrained / stage / name, site / stage / name)
    common = dict(dataset_dir=str(data), output_dir=str(site), label_per_class=8, val_fraction=0.25, lr=2e-3, **FAST)
    run_bundle(["bundles/train_aux_classifier.json", *SMALL], max_epochs=4, batch_size=8, **common)
    run_bundle(["bundles/finetune.json", *SMALL], max_epochs=1, batch_size=6, **common)
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], max_epochs=5, val_interval=5, batch_size=8,
               **common)
    return site



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
