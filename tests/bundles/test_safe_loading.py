"""Checkpoints from another site are data, not code: every file a stage reads is loaded with ``weights_only=True``,
and a file whose unpickling would run code is refused, naming the file and the reader, before anything in it runs.

Each crafted file holds an object whose ``__reduce__`` writes a marker file when unpickled; the marker must never
appear (``test_crafted_payload_is_live`` shows that full unpickling would create it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from monai_histodiff.__main__ import main
from monai_histodiff.engines import (
    LatentCache,
    load_autoencoder,
    load_diffusion,
    load_image_classifier,
    load_latent_classifier,
    load_tile_classifier,
)
from monai_histodiff.handlers import (
    BestMetricCheckpoint,
    UnsafeCheckpointError,
    checkpoint_meta,
    convert_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.bundles.conftest import SMALL, run_bundle
from tests.tiny import tiny_autoencoder


class _WritesMarker:
    """Unpickles as ``exec(...)`` writing ``marker``: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from the checkpoint ran')",)


def _crafted_checkpoint(path: Path, stage: str) -> Path:
    """A file shaped like a checkpoint of ``stage`` whose meta holds the payload; returns the marker path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = path.parent / f"MARKER_{path.stem}"
    torch.save({"state": {}, "meta": {"stage": stage, "note": _WritesMarker(marker)},
                "engine": {"iteration": 1, "epoch_length": 1, "max_epochs": 1}}, path)
    return marker


def _crafted_cache(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = path.parent / f"MARKER_{path.stem}"
    torch.save({"format_version": 1, "mu": torch.zeros(2, 3, 4, 4), "sigma": torch.ones(2, 3, 4, 4), "count": 2,
                "labels": None, "autoencoder_sha256": None, "image_size": 8, "extras": {"x": _WritesMarker(marker)}},
               path)
    return marker


def _refused_run(configs: list[str], **overrides) -> str:
    """Run a bundle that must fail; the captured output."""
    with pytest.raises(AssertionError, match="bundle run failed") as e:
        run_bundle(configs, timeout=300, **overrides)
    return str(e.value)


def _tiny_autoencoder_checkpoint(path: Path) -> Path:
    ae = tiny_autoencoder()
    args = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16), latent_channels=3, num_res_blocks=1,
                norm_num_groups=8, attention_levels=(False, False))
    return save_checkpoint(path, {"autoencoder": ae}, checkpoint_meta("pretrain_autoencoder",
                                                                      config={"autoencoder_args": args}))


def test_crafted_payload_is_live(tmp_path):
    """The payload does run under full unpickling (so 'no marker' below means refused, not harmless)."""
    marker = _crafted_checkpoint(tmp_path / "x.pt", "pretrain_autoencoder")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.is_file()


# --- through the bundle command line --------------------------------------------------------------------------


def test_bundle_refuses_crafted_autoencoder(toy_unlabeled, tmp_path):
    ae = tmp_path / "runs" / "pretrain_autoencoder" / "autoencoder.pt"
    marker = _crafted_checkpoint(ae, "pretrain_autoencoder")
    out = _refused_run(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(toy_unlabeled),
                       output_dir=str(tmp_path / "runs"), num_workers=0)
    assert "UnsafeCheckpointError" in out and f"refused to load {ae}" in out
    assert "expecting the output of stage 'pretrain_autoencoder'" in out and "convert-checkpoint" in out
    assert not marker.exists()


def test_bundle_refuses_crafted_latent_cache(pretrained, toy_unlabeled, tmp_path):
    """The stage's cache folder (copied from a real run, so it matches the listing and the autoencoder) with one shard
    replaced by an object array whose unpickling writes the marker: refused naming the shard, never unpickled."""
    import json

    import numpy as np

    from monai_histodiff.data import items_digest, prepare_unlabeled

    runs = tmp_path / "runs"
    (runs / "pretrain_autoencoder").mkdir(parents=True)
    shutil.copy(pretrained / "pretrain_autoencoder" / "autoencoder.pt", runs / "pretrain_autoencoder")
    items = prepare_unlabeled(str(toy_unlabeled), str(tmp_path / "unlabeled.json"))["unlabeled"]
    name = f"latent_cache_{items_digest(items)}"  # the folder the stage reads
    cache = runs / "pretrain_diffusion" / name
    shutil.copytree(pretrained / "pretrain_diffusion" / name, cache)
    shard = cache / "shard_00000.mu.npy"
    marker = cache / "MARKER_shard"
    np.save(shard, np.array([_WritesMarker(marker)], dtype=object), allow_pickle=True)
    index = json.loads((cache / "index.json").read_text())
    index["shards"][0]["files"]["mu"]["bytes"] = shard.stat().st_size  # passes the size check, meets the header check
    (cache / "index.json").write_text(json.dumps(index))
    out = _refused_run(["bundles/pretrain_diffusion.json", *SMALL], dataset_dir=str(toy_unlabeled),
                       output_dir=str(runs), num_workers=0, max_epochs=1, epoch_length=1, batch_size=4)
    assert "UnsafeCheckpointError" in out and f"refused to load {shard}" in out and "latent cache" in out
    assert not marker.exists()
    assert shard.is_file()  # reported, not silently rebuilt over


def test_bundle_refuses_crafted_last_checkpoint_on_resume(toy_unlabeled, tmp_path):
    last = tmp_path / "runs" / "pretrain_autoencoder" / "last.pt"
    marker = _crafted_checkpoint(last, "pretrain_autoencoder")
    out = _refused_run(["bundles/pretrain_autoencoder.json", *SMALL], dataset_dir=str(toy_unlabeled),
                       output_dir=str(tmp_path / "runs"), resume=True, num_workers=0, max_epochs=1, epoch_length=1,
                       batch_size=2)
    assert "UnsafeCheckpointError" in out and f"refused to load {last}" in out and "resume=True" in out
    assert not marker.exists()


@pytest.mark.parametrize("checkpoint, stage, bundle", [
    ("pretrain_diffusion/diffusion.pt", "pretrain_diffusion", "generate"),
    ("finetune/decoder_ft.pt", "finetune", "generate"),
    ("train_latent_classifier/latent_classifier.pt", "train_latent_classifier", "generate"),
    ("train_aux_classifier/aux_classifier.pt", "train_aux_classifier", "finetune"),
    ("train_downstream/classifier.pt", "train_downstream", "evaluate"),
])
def test_bundles_refuse_each_crafted_model_checkpoint(toy_labeled_site, tmp_path, checkpoint, stage, bundle):
    """Each kind of model file a stage reads (diffusion, fine-tuned decoder, both classifiers, the downstream
    classifier), given to the stage that reads it through ``python -m monai.bundle run``: refused, payload never run,
    and the stage's own output folder not written."""
    site = tmp_path / "site"
    shutil.copytree(toy_labeled_site, site)
    marker = _crafted_checkpoint(site / checkpoint, stage)
    before = {p for p in site.rglob("*")}
    out = _refused_run([f"bundles/{bundle}.json", *SMALL], dataset_dir=str(site / "labeled"),
                       output_dir=str(site), label_per_class=8, val_fraction=0.25, num_workers=0, ratio=0.25,
                       max_epochs=1) if bundle != "evaluate" else _refused_run(
        [f"bundles/{bundle}.json", *SMALL], output_dir=str(site))
    assert "UnsafeCheckpointError" in out and f"refused to load {site / checkpoint}" in out, out[-2000:]
    assert re.search(rf"refused to load {re.escape(str(site / checkpoint))} \(read by \w+", out)  # the reader named
    assert not marker.exists()
    written = {p for p in site.rglob("*")} - before
    assert not [p for p in written if p.is_file() and p.suffix in (".pt", ".png", ".jsonl")], sorted(written)


def test_pretrained_outputs_hold_only_safe_values(pretrained):
    """Everything the pre-training stages wrote (checkpoints, last.pt, latent cache) loads with weights_only=True."""
    import numpy as np

    files = sorted(pretrained.rglob("*.pt"))
    names = {f.name for f in files}
    assert {"autoencoder.pt", "diffusion.pt", "last.pt"} <= names
    for f in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
        torch.load(f, weights_only=True)
    (cache,) = [p for p in (pretrained / "pretrain_diffusion").glob("latent_cache_*") if p.is_dir()]
    shards = sorted(cache.glob("*.npy"))
    assert shards and (cache / "index.json").is_file()
    for f in shards:  # the latent cache's shards: plain numbers, read without unpickling
        assert not np.load(f, mmap_mode="r", allow_pickle=False).dtype.hasobject, f


# --- through the Python loaders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, loader",
    [
        ("pretrain_autoencoder", load_autoencoder),
        ("pretrain_diffusion", load_diffusion),
        ("train_aux_classifier", load_image_classifier),
        ("train_latent_classifier", load_latent_classifier),
        ("train_downstream", load_tile_classifier),
    ],
)
def test_loaders_refuse_crafted_checkpoints(tmp_path, stage, loader):
    path = tmp_path / stage / "model.pt"
    marker = _crafted_checkpoint(path, stage)
    expected = rf"refused to load {re.escape(str(path))} \(read by {loader.__name__}, .*'{stage}'"
    with pytest.raises(UnsafeCheckpointError, match=expected):
        loader(path)
    assert not marker.exists()


def test_fine_tuned_decoder_is_refused(tmp_path):
    ae = _tiny_autoencoder_checkpoint(tmp_path / "autoencoder.pt")
    dec = tmp_path / "finetune" / "decoder_ft.pt"
    marker = _crafted_checkpoint(dec, "finetune")
    expected = rf"refused to load {re.escape(str(dec))} \(read by load_autoencoder \(fine-tuned decoder\), .*'finetune'"
    with pytest.raises(UnsafeCheckpointError, match=expected):
        load_autoencoder(ae, decoder_path=dec)
    assert not marker.exists()


def test_latent_cache_is_refused(tmp_path):
    cache = tmp_path / "latent_cache_x.pt"
    marker = _crafted_cache(cache)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load {re.escape(str(cache))}.*latent cache"):
        LatentCache.load(cache)
    assert not marker.exists()


def test_best_metric_resume_is_refused(tmp_path):
    best = tmp_path / "aux_classifier.pt"
    marker = _crafted_checkpoint(best, "train_aux_classifier")
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load {re.escape(str(best))}.*resume=True"):
        BestMetricCheckpoint(best, {}, resume=True)
    assert not marker.exists()


# --- converting a file written elsewhere ----------------------------------------------------------------------


def test_convert_checkpoint_command(tmp_path, capsys):
    src = tmp_path / "old.pt"
    marker = _crafted_checkpoint(src, "pretrain_autoencoder")
    dst = tmp_path / "converted.pt"
    # without the explicit flag nothing is unpickled
    assert main(["convert-checkpoint", str(src), str(dst)]) == 1
    assert "--trust-source-and-run-its-code" in capsys.readouterr().err
    assert not marker.exists() and not dst.exists()
    # with it: a warning, then full unpickling (the payload runs: that is what the flag allows) and a plain rewrite
    with pytest.warns(UserWarning, match="runs any code the file holds"):
        assert main(["convert-checkpoint", str(src), str(dst), "--trust-source-and-run-its-code"]) == 0
    assert marker.is_file()
    marker.unlink()
    ckpt = load_checkpoint(dst, stage="pretrain_autoencoder")  # weights_only=True
    assert ckpt["meta"]["note"] is None and ckpt["engine"]["iteration"] == 1  # exec(...) returned None
    assert not marker.exists()
    with pytest.raises(ValueError, match="another file"):
        convert_checkpoint(dst, dst)


# --- downloaded checkpoints -----------------------------------------------------------------------------------


def test_download_large_files_refuses_a_mismatching_file(tmp_path):
    """What docs/new_site.md relies on: MONAI's ``download_large_files`` checks the sha256 of large_files.yml and
    keeps no file that fails (monai_histodiff itself downloads no checkpoint)."""
    import yaml
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    from monai_histodiff.handlers import file_sha256

    published = tmp_path / "published.pt"
    torch.save({"state": {}, "meta": {"stage": "pretrain_autoencoder"}}, published)
    site = tmp_path / "site"
    site.mkdir()
    expected = "0" * 64
    (site / "large_files.yml").write_text(yaml.safe_dump({"large_files": [
        {"path": "runs/pretrain_autoencoder/autoencoder.pt", "url": published.as_uri(), "hash_val": expected,
         "hash_type": "sha256"}]}))
    with pytest.raises(HashCheckError, match=rf"autoencoder\.pt.*expected sha256={expected}"):
        download_large_files(bundle_path=str(site))
    assert not (site / "runs" / "pretrain_autoencoder" / "autoencoder.pt").exists()
    # a file already in place with other bytes is refused too, not used
    (site / "runs" / "pretrain_autoencoder").mkdir(parents=True)
    shutil.copy(published, site / "runs" / "pretrain_autoencoder" / "autoencoder.pt")
    assert file_sha256(published) != expected
    with pytest.raises(HashCheckError, match=r"existing file failed.*autoencoder\.pt"):
        download_large_files(bundle_path=str(site))
