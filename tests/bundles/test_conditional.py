"""The classifier-free guidance route as a user runs it: finetune_conditional, then generate with use_conditional."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from monai_histodiff.data import load_datalist
from monai_histodiff.handlers.checkpoint import load_checkpoint
from tests.bundles.conftest import SMALL, run_bundle


@pytest.fixture(scope="module")
def conditional_site(tmp_path_factory, toy_labeled_site, toy_unlabeled):
    site = tmp_path_factory.mktemp("conditional_site")
    for name in ("labeled", "split.json", "classes.json", "pretrain_autoencoder", "pretrain_diffusion", "finetune",
                 "train_latent_classifier"):
        src = toy_labeled_site / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, site / name)
    run_bundle(["bundles/finetune_conditional.json", *SMALL], output_dir=str(site), unlabeled_dir=str(toy_unlabeled),
               max_epochs=2, epoch_length=3, batch_size=4, warmup_steps=1, grid_inference_steps=2,
               num_grid_per_class=1, num_workers=0, save_interval=2)
    return site


def test_finetune_conditional_writes_a_checkpoint_tied_to_its_parents(conditional_site, toy_unlabeled):
    site = conditional_site
    ckpt = load_checkpoint(site / "finetune_conditional" / "diffusion_conditional.pt", stage="finetune_conditional")
    classes = load_datalist(site / "split.json")["classes"]
    meta = ckpt["meta"]
    assert meta["classes"] == classes and meta["null_class"] == len(classes)
    assert meta["config"]["diffusion_args"]["num_class_embeds"] == len(classes) + 1
    assert set(meta["parents"]) == {"autoencoder", "diffusion", "split"}
    split = load_datalist(site / "split.json")
    assert meta["config"]["labeled_tiles"] == len(split["training"]) and meta["config"]["unlabeled_tiles"] == 80
    assert meta["config"]["iterations"] == 6 and "ema" in ckpt["state"]
    # the class embedding moved away from its zero start; the pre-training's scale factor and schedule are kept
    assert ckpt["state"]["ema"]["class_embedding.weight"].abs().sum() > 0
    parent = load_checkpoint(site / "pretrain_diffusion" / "diffusion.pt")["meta"]
    assert meta["scale_factor"] == parent["scale_factor"] and meta["latent_shape"] == parent["latent_shape"]
    grids = sorted((site / "finetune_conditional" / "grids").glob("*.png"))
    assert grids, "no per-class sample grid written"


def test_generate_samples_the_conditional_model_with_classifier_free_guidance(conditional_site):
    site = conditional_site
    out = site / "generate_conditional"
    proc = run_bundle(["bundles/generate.json", *SMALL], output_dir=str(site), synthetic_dir=str(out),
                      use_conditional=True, cfg_scale=2.0, guidance_scale=0.0, counts=[2, 1, 1, 1],
                      num_inference_steps=3, batch_size=4, guidance_check_per_class=1)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 5
    assert rows[0]["cfg_scale"] == 2.0 and rows[0]["guidance_scale"] == 0.0
    assert set(rows[0]["checkpoint_hashes"]) == {"autoencoder", "decoder", "diffusion", "latent_classifier",
                                                 "conditional"}
    check = json.loads((out / "guidance_check.json").read_text())
    assert check["cfg_scale"] == 2.0 and check["unguided"]["cfg_scale"] == 0.0 and check["guided"]["cfg_scale"] == 2
    assert "guidance check" in proc.stdout


def test_generate_refuses_a_conditional_model_of_another_pretraining(conditional_site, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(conditional_site, site)
    path = site / "finetune_conditional" / "diffusion_conditional.pt"  # as if fine-tuned from another pre-training
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["parents"]["diffusion"]["sha256"] = "0" * 64
    torch.save(ckpt, path)
    with pytest.raises(AssertionError, match="diffusion_conditional.pt was built on diffusion"):
        run_bundle(["bundles/generate.json", *SMALL], output_dir=str(site), use_conditional=True, counts=[1, 1, 1, 1],
                   num_inference_steps=2, guidance_check_per_class=0)
