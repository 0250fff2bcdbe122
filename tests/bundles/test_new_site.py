"""A new site: the pre-trained checkpoints plus a second labeled dataset (Kather 2016: 8 classes, 150 px tiles, other
class names) run adaptation, generation, selection, downstream training and evaluation with command-line overrides
only."""

from __future__ import annotations

import json
import shutil

import pytest

from monai_histodiff.handlers import CheckpointMismatchError, file_sha256, load_checkpoint
from tests.bundles.conftest import FAST, SMALL, run_bundle


def test_second_dataset_by_overrides_only(pretrained, kather2016_dir, tmp_path):
    site = tmp_path / "site_runs"
    ckpts = tmp_path / "downloaded"  # checkpoints received from the pre-training site, kept where the site wants
    ckpts.mkdir()
    shutil.copy(pretrained / "pretrain_autoencoder" / "autoencoder.pt", ckpts / "autoencoder.pt")
    shutil.copy(pretrained / "pretrain_diffusion" / "diffusion.pt", ckpts / "diffusion.pt")
    o = dict(output_dir=str(site), dataset_dir=str(kather2016_dir), autoencoder_ckpt=str(ckpts / "autoencoder.pt"),
             diffusion_ckpt=str(ckpts / "diffusion.pt"), label_per_class=4, val_fraction=0.25, lr=2e-3, **FAST)
    run_bundle(["bundles/train_aux_classifier.json", *SMALL], max_epochs=2, batch_size=8, **o)
    run_bundle(["bundles/finetune.json", *SMALL], max_epochs=1, batch_size=4, **o)
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], max_epochs=2, batch_size=8, **o)
    run_bundle(["bundles/generate.json", *SMALL], ratio=1.0, num_inference_steps=4, batch_size=8, **o)
    run_bundle(["bundles/select.json", *SMALL], ratio=0.5, mode="random", **o)
    run_bundle(["bundles/train_downstream.json", *SMALL], datalist_file=str(site / "select" / "augmented_datalist.json"),
               max_epochs=1, batch_size=8, **o)
    run_bundle(["bundles/evaluate.json", *SMALL], **o)

    split = json.loads((site / "split.json").read_text())
    assert split["classes"] == ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA",
                                "07_ADIPOSE", "08_EMPTY"]
    manifest = [json.loads(x) for x in (site / "generate" / "manifest.jsonl").read_text().splitlines()]
    assert {r["class"] for r in manifest} == set(split["classes"]) and len(manifest) == 8 * 3
    metrics = json.loads((site / "evaluate" / "metrics.json").read_text())
    assert len(metrics["confusion_matrix"]) == 8 and metrics["evaluated_on"]["count"] == len(split["test"])
    down = load_checkpoint(site / "train_downstream" / "classifier.pt")
    assert down["meta"]["classes"] == split["classes"] and down["meta"]["config"]["network_args"]["num_classes"] == 8
    # the received checkpoints were never modified, and everything built on them records their hashes
    assert file_sha256(ckpts / "autoencoder.pt") == file_sha256(pretrained / "pretrain_autoencoder" / "autoencoder.pt")
    lat = load_checkpoint(site / "train_latent_classifier" / "latent_classifier.pt")
    assert lat["meta"]["parents"]["diffusion"]["sha256"] == file_sha256(ckpts / "diffusion.pt")
    # a mismatched pair is a clear error naming both files
    other = tmp_path / "other_diffusion.pt"
    d = load_checkpoint(ckpts / "diffusion.pt")
    d["meta"]["scale_factor"] *= 1.01
    import torch

    torch.save(d, other)
    from monai_histodiff.engines import load_latent_classifier

    with pytest.raises(CheckpointMismatchError, match="latent_classifier.pt.*other_diffusion.pt"):
        load_latent_classifier(site / "train_latent_classifier" / "latent_classifier.pt", diffusion_path=other)
