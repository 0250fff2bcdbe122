"""A new site receives the pre-training site's adaptation kit (``export-bundle --pretrained_runs``: a MONAI bundle
with the pre-trained checkpoints and one config per stage) and runs adaptation, generation, selection, downstream
training and evaluation on a second labeled dataset (Kather 2016: 8 classes, 150 px tiles, other class names) with
command-line overrides only, from a folder outside the repository, with monai_histodiff installed non-editable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monai_histodiff.apps.launcher import StageLauncher, launcher_enabled
from monai_histodiff.bundle.export import META_SCHEMA_FILE
from monai_histodiff.handlers import CheckpointMismatchError, file_sha256, load_checkpoint
from tests.bundles.conftest import FAST, REPO


def _install_non_editable(tmp: Path) -> Path:
    """``pip install --target`` of a copy of the package source (so no build files land in the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("monai_histodiff", "bundles"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    return site


#: prints where ``monai_histodiff`` and its bundle configs are found, without importing the package (and torch)
WHERE = ("import importlib.util as u; s = u.find_spec('monai_histodiff'); print(s.origin); "
         "c = u.spec_from_file_location('c', s.submodule_search_locations[0] + '/bundle/configs.py'); "
         "m = u.module_from_spec(c); c.loader.exec_module(m); print(m.config_dir())")


def _run(cmd: list[str], cwd: Path, env: dict, launcher: StageLauncher | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; a ``python -m monai.bundle`` / ``python -m monai_histodiff`` command through ``launcher`` (forks
    of a helper that imported the installed copy once) when one is given."""
    if launcher is None or not launcher_enabled():
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    else:
        out, err = cwd.parent / "stage.stdout", cwd.parent / "stage.stderr"
        code = launcher.run(cmd, out, err, cwd=cwd, env=env, timeout=600)
        proc = subprocess.CompletedProcess(cmd, code, out.read_text(errors="replace"), err.read_text(errors="replace"))
    if proc.returncode != 0:
        raise AssertionError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def test_site_bundle_runs_the_second_dataset_by_overrides_only(pretrained, kather2016_dir, tmp_path, request):
    site_packages = _install_non_editable(tmp_path)
    work = tmp_path / "anywhere"  # the site's working folder: no bundles/ here, no repository
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site_packages), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    where = _run([sys.executable, "-c", WHERE], work, env).stdout.split()
    assert len(where) == 2 and all(Path(p).is_relative_to(site_packages) for p in where), where  # not the checkout
    launcher = StageLauncher(env=env)  # its helper imports the installed copy (PYTHONPATH), once for every command
    request.addfinalizer(launcher.close)

    bundle = tmp_path / "histodiffusion_kit"
    _run([sys.executable, "-m", "monai_histodiff", "export-bundle", "--pretrained_runs", str(pretrained),
          "--output", str(bundle)], work, env, launcher)
    configs = sorted(p.name for p in (bundle / "configs").iterdir())
    assert configs == sorted([f"{s}.json" for s in ("train_aux_classifier", "finetune", "train_latent_classifier",
                                                     "generate", "select", "train_downstream", "evaluate")]
                             + ["inference.json", "metadata.json", "multi_gpu.json", "logging.conf"])
    for c in configs:  # self-contained: nothing but prose names the repository's bundles/
        content = json.loads((bundle / "configs" / c).read_text()) if c.endswith(".json") else {}
        assert "bundles/" not in json.dumps({k: v for k, v in content.items() if not k.startswith("_")}), c
    aux_cfg = json.loads((bundle / "configs" / "train_aux_classifier.json").read_text())
    assert aux_cfg["image_size"] == "$monai_histodiff.engines.trained_image_size(@autoencoder_ckpt)"  # from the file
    ckpts = bundle / "models"
    assert file_sha256(ckpts / "autoencoder.pt") == file_sha256(pretrained / "pretrain_autoencoder" / "autoencoder.pt")
    _run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bundle / "configs/metadata.json"),
          "--filepath", str(META_SCHEMA_FILE)], work, env, launcher)

    site = tmp_path / "site_runs"

    def stage(name: str, **overrides) -> None:
        o = dict(dataset_dir=str(kather2016_dir), output_dir=str(site), label_per_class=4, val_fraction=0.25,
                 lr=2e-3, **FAST, **overrides)
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / f"{name}.json"),
               "--bundle_root", str(bundle)]
        for k, v in o.items():
            cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
        _run(cmd, work, env, launcher)

    stage("train_aux_classifier", max_epochs=2, batch_size=8)
    stage("finetune", max_epochs=1, batch_size=4)
    stage("train_latent_classifier", max_epochs=2, batch_size=8)
    stage("generate", ratio=1.0, num_inference_steps=4, batch_size=8)
    stage("select", ratio=0.5, mode="random")
    stage("train_downstream", datalist_file=str(site / "select" / "augmented_datalist.json"), max_epochs=1,
          batch_size=8)
    stage("evaluate")
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written in the working folder

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
    assert load_checkpoint(site / "train_aux_classifier" / "aux_classifier.pt")["meta"]["config"]["image_size"] == 64
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


def test_kit_with_published_checkpoints_and_refusals(pretrained, tmp_path):
    """With ``url_base`` the kit lists the checkpoints (paths in ``models/``, sha256) instead of holding them; an
    existing kit is not overwritten silently, and a diffusion model built on another autoencoder is refused."""
    import torch
    import yaml

    from monai_histodiff.bundle.site_kit import export_site_bundle

    kit = export_site_bundle(pretrained, tmp_path / "kit", url_base="https://example.org/histodiff")
    assert not any((kit / "models").iterdir())
    entries = yaml.safe_load((kit / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/autoencoder.pt", "models/diffusion.pt"]
    assert entries[1]["hash_val"] == file_sha256(pretrained / "pretrain_diffusion" / "diffusion.pt")
    assert entries[0]["url"] == "https://example.org/histodiff/pretrain_autoencoder/autoencoder.pt"
    with pytest.raises(FileExistsError, match="kit exists and is not empty"):
        export_site_bundle(pretrained, kit)

    other = tmp_path / "other_runs"
    shutil.copytree(pretrained / "pretrain_diffusion", other / "pretrain_diffusion")
    (other / "pretrain_autoencoder").mkdir()
    ae = load_checkpoint(pretrained / "pretrain_autoencoder" / "autoencoder.pt")
    ae["meta"]["note"] = "retrained"
    torch.save(ae, other / "pretrain_autoencoder" / "autoencoder.pt")
    with pytest.raises(CheckpointMismatchError, match="diffusion.pt was built on autoencoder"):
        export_site_bundle(other, tmp_path / "kit2")
