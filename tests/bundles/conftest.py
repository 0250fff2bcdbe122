"""Run bundles the way users do: ``python -m monai.bundle run --config_file "['bundles/common.json', ...]"`` from the
repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bundle(configs: list[str], timeout: int = 600, torchrun: int = 0, cwd: Path | None = None,
               **overrides) -> subprocess.CompletedProcess:
    """Run a bundle with the user's command form; overrides become ``--key value`` arguments. Raises on failure.

    ``configs`` lists the stage config and its overrides; the shared ``bundles/common.json`` is merged first, as the
    documented command does. ``cwd``: the working folder (default the repository; elsewhere the configs are named by
    absolute path)."""
    files = [str(c) for c in configs]
    files = files if files[0] == COMMON else [COMMON, *files]
    if cwd is not None:
        files = [str(REPO / f) for f in files]
    config_arg = json.dumps(files).replace('"', "'")
    launcher = [sys.executable, "-m", "monai.bundle"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "-m", "monai.bundle"]
    cmd = [*launcher, "run", "--config_file", config_arg]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]  # fire reads Python literals: True, 1e-3, [1, 2]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


COMMON = "bundles/common.json"
SMALL = ["bundles/small.json"]
FAST = {"num_workers": 0, "save_interval": 2, "grid_interval": 2}


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
               grid_inference_steps=2, num_grid_samples=2, **FAST)
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
