"""Export of the downstream classifier as a MONAI bundle, checked with MONAI's own bundle verifications.

``verify_metadata`` (against the shipped schema, offline), ``verify_net_in_out``, ``ckpt_export`` to TorchScript, an
inference run of ``configs/inference.json`` on PNG tiles and a one-epoch run of ``configs/train.json``. The
``python -m monai.bundle`` commands are forked from the package's launcher (tests/bundles/conftest.py ``launch``).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from monai_histodiff.__main__ import main
from monai_histodiff.bundle.export import META_SCHEMA_FILE, export_bundle
from monai_histodiff.data.toy import make_toy_dataset
from monai_histodiff.data.transforms import tile_transforms
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint
from monai_histodiff.networks import TileClassifier
from tests.bundles.conftest import launch

ARGS = {"backbone": "resnet", "num_classes": 3, "image_size": 64}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A downstream checkpoint of a small resnet TileClassifier, toy tiles, and its exported bundle."""
    root = tmp_path_factory.mktemp("bundle_export")
    toy = root / "toy"
    make_toy_dataset(toy, num_per_class=4, image_size=64, num_classes=3)
    classes = sorted(p.name for p in toy.iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = TileClassifier(**ARGS).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics so that eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = save_checkpoint(root / "downstream.pt", {"classifier": model}, checkpoint_meta(
        "train_downstream", config={"network_args": ARGS, "image_size": 64}, classes=classes))
    bundle = export_bundle(ckpt, root / "histodiff_tile_classifier")
    return {"root": root, "toy": toy, "classes": classes, "model": model, "ckpt": ckpt, "bundle": bundle}


def test_layout_and_metadata(exported: dict) -> None:
    b = exported["bundle"]
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (b / rel).is_file(), rel
    md = json.loads((b / "configs/metadata.json").read_text())
    assert md["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): c for i, c in
                                                                             enumerate(exported["classes"])}
    assert md["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert "Ye" in md["references"][0]
    assert "monai.networks.nets.ResNet" in (b / "configs/inference.json").read_text()
    state = torch.load(b / "models/model.pt", weights_only=True)
    assert not any(k.startswith("backbone.") for k in state)
    verify_metadata(meta_file=str(b / "configs/metadata.json"), filepath=str(META_SCHEMA_FILE))


def test_schema_rejects_incomplete_metadata(exported: dict, tmp_path: Path) -> None:
    md = json.loads((exported["bundle"] / "configs/metadata.json").read_text())
    del md["copyright"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(md))
    with pytest.raises(ValueError, match="copyright"):
        verify_metadata(meta_file=str(bad), filepath=str(META_SCHEMA_FILE))


def test_verify_cli_net_in_out_and_torchscript(exported: dict, tmp_path: Path) -> None:
    b = exported["bundle"]
    meta, cfg = str(b / "configs/metadata.json"), str(b / "configs/inference.json")
    out = launch([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta, "--filepath",
                  str(META_SCHEMA_FILE)], PYTHONWARNINGS="ignore")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "metadata is verified with no error" in out.stdout + out.stderr
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu", bundle_root=str(b))
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(b / "models/model.pt"), meta_file=meta,
                config_file=cfg, bundle_root=str(b))
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), exported["model"](x), rtol=1e-5, atol=1e-5)


def test_inference_matches_checkpoint(exported: dict) -> None:
    b, toy = exported["bundle"], exported["toy"]
    files = sorted(str(p) for p in toy.rglob("*.png"))[::2]
    cfg = str(b / "configs/inference.json")
    out = launch([sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, "--bundle_root", str(b),
                  "--datalist", repr(files)], PYTHONWARNINGS="ignore")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(b / "eval" / "predictions.csv", newline="") as f:
        got = {row[0]: int(float(row[1])) for row in csv.reader(f)}
    assert sorted(got) == files
    t = tile_transforms(64)
    with torch.no_grad():
        x = torch.stack([t({"image": f})["image"] for f in files])
        expected = exported["model"](x).argmax(1).tolist()
    assert [got[f] for f in files] == expected


def test_train_one_epoch(exported: dict, tmp_path: Path) -> None:
    import shutil

    b = shutil.copytree(exported["bundle"], tmp_path / "bundle")
    before = (b / "models/model.pt").stat().st_mtime_ns
    out = launch([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(b / "configs/train.json"),
                  "--bundle_root", str(b), "--dataset_dir", str(exported["toy"]), "--max_epochs", "1", "--batch_size",
                  "4"], PYTHONWARNINGS="ignore")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "val_accuracy" in out.stdout + out.stderr
    assert (b / "models/model.pt").stat().st_mtime_ns != before
    state = torch.load(b / "models/model.pt", weights_only=True)
    net = TileClassifier(**ARGS).backbone
    net.load_state_dict(state)


def test_cli_export(exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b"
    assert main(["export-bundle", "--checkpoint", str(exported["ckpt"]), "--output", str(out), "--name", "x"]) == 0
    assert (out / "configs/metadata.json").is_file()
    assert json.loads((out / "configs/metadata.json").read_text())["name"] == "x"
    with pytest.raises(FileExistsError):
        main(["export-bundle", "--checkpoint", str(exported["ckpt"]), "--output", str(out)])
    assert "wrote the MONAI bundle" in capsys.readouterr().out


def test_vit_export_uses_tile_classifier(tmp_path: Path) -> None:
    args = {"backbone": "vit", "num_classes": 2, "image_size": 32,
            "backbone_args": {"patch_size": 16, "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}}
    model = TileClassifier(**args).eval()
    ckpt = save_checkpoint(tmp_path / "vit.pt", {"classifier": model}, checkpoint_meta(
        "train_downstream", config={"network_args": args}, classes=["A", "B"]))
    b = export_bundle(ckpt, tmp_path / "vit_bundle")
    assert "monai_histodiff.networks.TileClassifier" in (b / "configs/inference.json").read_text()
    verify_metadata(meta_file=str(b / "configs/metadata.json"), filepath=str(META_SCHEMA_FILE))
    verify_net_in_out(net_id="network_def", meta_file=str(b / "configs/metadata.json"),
                      config_file=str(b / "configs/inference.json"), device="cpu")
