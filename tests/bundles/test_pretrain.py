"""Stage 1 bundles end to end at the small size: real unlabeled tiles and generated data, checkpoints, resume,
scale factor, hash pairing, and the 2-process DDP run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_histodiff.engines import ShardedLatentCache, load_autoencoder, load_diffusion
from monai_histodiff.handlers import CheckpointMismatchError, ema_initial_weight, file_sha256, load_checkpoint
from tests.bundles.conftest import FAST, SMALL, run_bundle


def test_autoencoder_on_real_unlabeled_tiles_then_resume(unlabeled_dir, tmp_path):
    common = dict(dataset_dir=str(unlabeled_dir), output_dir=str(tmp_path), epoch_length=2, batch_size=2, lr=1e-4,
                  adv_start=1, **FAST)
    run_bundle(["bundles/pretrain_autoencoder.json", *SMALL], max_epochs=1, **common)
    stage = tmp_path / "pretrain_autoencoder"
    ckpt = load_checkpoint(stage / "autoencoder.pt", stage="pretrain_autoencoder")
    assert set(ckpt["state"]) == {"autoencoder", "discriminator", "optimizer", "d_optimizer"}
    assert ckpt["engine"]["iteration"] == 2 and ckpt["engine"]["epoch"] == 1
    meta = ckpt["meta"]
    assert meta["config"]["autoencoder_args"]["channels"] == [32, 64, 64] and meta["config"]["image_size"] == 64
    assert len(meta["sources"]) >= 10 and sum(meta["sources"].values()) > 300 and {"monai", "torch", "monai_histodiff"} <= set(meta["versions"])
    assert (stage / "grids" / "input_vs_reconstruction_latest.png").stat().st_size > 0
    assert list((stage / "logs").glob("events.out.tfevents.*"))
    before = load_checkpoint(stage / "last.pt")["state"]["autoencoder"]
    # resume with one flag: the iteration count continues from 2 instead of restarting
    run_bundle(["bundles/pretrain_autoencoder.json", *SMALL], max_epochs=2, resume=True, **common)
    resumed = load_checkpoint(stage / "last.pt")
    assert resumed["engine"]["iteration"] == 4 and resumed["engine"]["epoch"] == 2
    assert any(not torch.equal(before[k], resumed["state"]["autoencoder"][k]) for k in before)
    model = load_autoencoder(stage / "autoencoder.pt")
    assert model(torch.zeros(1, 3, 64, 64))[0].shape == (1, 3, 64, 64)


def test_diffusion_checkpoint_scale_factor_and_pairing(pretrained, tmp_path):
    ae_path = pretrained / "pretrain_autoencoder" / "autoencoder.pt"
    diff_path = pretrained / "pretrain_diffusion" / "diffusion.pt"
    ckpt = load_checkpoint(diff_path, stage="pretrain_diffusion")
    meta = ckpt["meta"]
    assert meta["parents"]["autoencoder"]["sha256"] == file_sha256(ae_path)
    assert meta["config"]["scheduler_args"]["schedule"] == "scaled_linear_beta"
    assert meta["latent_shape"] == [3, 16, 16] and {"diffusion", "ema", "optimizer", "lr_scheduler"} <= set(ckpt["state"])
    # the EMA's convergence record: one update per iteration, with the warm-up the initialisation is all but gone
    n = ckpt["engine"]["iteration"]
    assert meta["ema"] == {"num_updates": n, "momentum": 1e-4, "warmup": True,
                           "initial_weight": ema_initial_weight(n, 1e-4)}
    assert n >= 2 and meta["ema"]["initial_weight"] < 0.02
    # scale factor = 1 / std of the latents the diffusion model trains on (posterior samples), over all batches
    (cache_dir,) = (pretrained / "pretrain_diffusion").glob("latent_cache_*")  # a folder of shards named after its data
    cache = ShardedLatentCache.open(cache_dir, file_sha256(ae_path), check="sha256").in_memory()
    mu, sigma = cache.mu.double(), cache.sigma.double()
    std = float(torch.sqrt(((mu**2) + sigma**2).mean() - mu.mean() ** 2))
    assert meta["scale_factor"] == pytest.approx(1.0 / std, rel=0.05)
    unet, loaded_meta = load_diffusion(diff_path, autoencoder_path=ae_path)
    assert loaded_meta["scale_factor"] == meta["scale_factor"]
    # pairing with another autoencoder is a clear error naming both files
    other = tmp_path / "other_autoencoder.pt"
    state = load_checkpoint(ae_path)
    state["state"]["autoencoder"] = {k: v + 1e-3 if v.is_floating_point() else v
                                     for k, v in state["state"]["autoencoder"].items()}
    torch.save(state, other)
    with pytest.raises(CheckpointMismatchError) as e:
        load_diffusion(diff_path, autoencoder_path=other)
    assert str(diff_path) in str(e.value) and str(other) in str(e.value)
    assert (pretrained / "pretrain_diffusion" / "grids" / "unconditional_samples_epoch0001.png").is_file()
    # the end-of-training check of the unconditional samples against the training latents
    check = json.loads((pretrained / "pretrain_diffusion" / "sample_check.json").read_text())
    assert check["iteration"] == n and check["num_sampled"] >= 2 and len(check["std_ratio"]) == 3
    assert check["data"]["std"] == pytest.approx([1.0] * 3, abs=0.5)  # scaled latents: spread about 1
    assert check["ok"] == (not check["warnings"]) and check["fd_pooled_reference"] >= 0


def test_diffusion_on_real_unlabeled_tiles_without_cache(pretrained, unlabeled_dir, tmp_path):
    (tmp_path / "pretrain_autoencoder").mkdir()
    (tmp_path / "pretrain_autoencoder" / "autoencoder.pt").write_bytes(
        (pretrained / "pretrain_autoencoder" / "autoencoder.pt").read_bytes())
    run_bundle(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(unlabeled_dir), output_dir=str(tmp_path),
               max_epochs=1, epoch_length=2, batch_size=2, use_latent_cache=False, use_ema=False,
               scale_factor_batches=2, grid_inference_steps=2, num_grid_samples=2, **FAST)
    ckpt = load_checkpoint(tmp_path / "pretrain_diffusion" / "diffusion.pt")
    assert "ema" not in ckpt["state"] and not list((tmp_path / "pretrain_diffusion").glob("latent_cache*"))
    assert np.isfinite(ckpt["meta"]["scale_factor"]) and ckpt["meta"]["config"]["use_latent_cache"] is False


def test_torchrun_two_gloo_processes_identical_weights(pretrained, toy_unlabeled, tmp_path):
    (tmp_path / "pretrain_autoencoder").mkdir()
    (tmp_path / "pretrain_autoencoder" / "autoencoder.pt").write_bytes(
        (pretrained / "pretrain_autoencoder" / "autoencoder.pt").read_bytes())
    dump = tmp_path / "dump_weights.json"
    dump.write_text(json.dumps({"finalize": [
        "$torch.save({k: v.detach().cpu() for k, v in monai_histodiff.engines.unwrap_model(@network).state_dict()"
        ".items()}, @output_dir + '/rank' + str(monai_histodiff.engines.get_rank()) + '.pt')",
        "$monai_histodiff.engines.cleanup_distributed()"]}))
    cwd = tmp_path / "working_folder"
    cwd.mkdir()
    run_bundle(["bundles/pretrain_diffusion.json", *SMALL, "bundles/multi_gpu.json", str(dump)], torchrun=2, cwd=cwd,
               dataset_dir=str(toy_unlabeled), output_dir=str(tmp_path), max_epochs=1, epoch_length=3, batch_size=2,
               scale_factor_batches=2, grid_inference_steps=2, num_grid_samples=2, **FAST)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    start = load_checkpoint(tmp_path / "pretrain_diffusion" / "diffusion.pt")["state"]["diffusion"]
    assert all(torch.equal(start[k], r0[k]) for k in r0)  # rank 0 wrote the checkpoint of the synchronised weights
    assert not list(cwd.iterdir())  # no rank writes in the working folder (e.g. a TensorBoard writer's default ./runs)


def test_pretraining_on_a_folder_of_slides(wsi_dir, tmp_path):
    """Stage 1 end to end on whole-slide images: the .svs is listed, its tissue tiles are streamed from the slide at
    the configured resolution, each slide a source; the truncated slide beside it is reported and skipped."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(wsi_dir / "CMU-1-Small-Region.svs")
    (slides / "truncated.svs").write_bytes((wsi_dir / "CMU-1-Small-Region.svs").read_bytes()[:4096])
    settings = {"mpp": 1.0, "tile_size": 64, "min_tissue": 0.5, "tissue_threshold": "otsu", "backend": "tiffslide",
                "mpp_override": None}
    run_bundle(["bundles/pretrain_autoencoder.json", *SMALL], dataset_dir=str(slides), output_dir=str(tmp_path),
               slides=settings, max_epochs=1, epoch_length=2, batch_size=4, **FAST)
    stage = tmp_path / "pretrain_autoencoder"
    listing = json.loads((stage / "unlabeled.json").read_text())
    assert listing["unlabeled"] and all("location" in it for it in listing["unlabeled"])
    assert {it["source"] for it in listing["unlabeled"]} == {"CMU-1-Small-Region"}
    assert [b["image"].endswith("truncated.svs") for b in json.loads((stage / "bad_files.json").read_text())] == [True]
    assert (stage / "slide_masks" / "CMU-1-Small-Region_tissue.png").is_file()
    ckpt = load_checkpoint(stage / "autoencoder.pt")
    assert ckpt["engine"]["iteration"] == 2
    run_bundle(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(slides), output_dir=str(tmp_path),
               slides=settings, max_epochs=1, epoch_length=2, batch_size=4, warmup_steps=1, scale_factor_batches=2,
               grid_inference_steps=2, num_grid_samples=2, **FAST)
    meta = load_checkpoint(tmp_path / "pretrain_diffusion" / "diffusion.pt")["meta"]
    assert np.isfinite(meta["scale_factor"])
