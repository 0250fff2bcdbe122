"""The MONAI Label sample app (examples/monailabel): its tasks loaded through MONAI Label's own classes.

Runs in its own environment (``make test-monailabel``); skipped where monailabel is not installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("monailabel")

from monai.networks.nets import AutoencoderKL, DiffusionModelUNet  # noqa: E402

from monai_histodiff.bundle_export import export_bundle  # noqa: E402
from monai_histodiff.data.toy import make_toy_dataset  # noqa: E402
from monai_histodiff.data.transforms import tile_transforms  # noqa: E402
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint  # noqa: E402
from monai_histodiff.networks import TileClassifier  # noqa: E402
from monai_histodiff.networks.latent_classifier import TimeConditionedLatentClassifier  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "monailabel"
ARGS = {"backbone": "resnet", "num_classes": 3, "image_size": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Toy tiles, an exported classifier bundle and tiny autoencoder / diffusion / latent classifier checkpoints."""
    root = tmp_path_factory.mktemp("monailabel")
    toy = root / "studies"
    make_toy_dataset(toy, num_per_class=4, image_size=64, num_classes=3)
    classes = sorted(p.name for p in toy.iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = TileClassifier(**ARGS).eval()
    down = save_checkpoint(root / "downstream.pt", {"classifier": model}, checkpoint_meta(
        "train_downstream", config={"network_args": ARGS}, classes=classes))
    bundle = export_bundle(down, root / "histodiff_tile_classifier")

    ae_args = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [8, 16], "latent_channels": 3,
               "num_res_blocks": 1, "norm_num_groups": 8, "attention_levels": [False, False]}
    ae = save_checkpoint(root / "autoencoder.pt", {"autoencoder": AutoencoderKL(**ae_args)},
                         checkpoint_meta("pretrain_autoencoder", config={"autoencoder_args": ae_args}))
    unet_args = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [8, 16],
                 "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 8}
    diff = save_checkpoint(root / "diffusion.pt", {"diffusion": DiffusionModelUNet(**unet_args)}, checkpoint_meta(
        "pretrain_diffusion", config={"diffusion_args": unet_args, "scheduler_args": {"num_train_timesteps": 1000}},
        parents={"autoencoder": ae}, scale_factor=1.0, latent_shape=[3, 8, 8]))
    clf_args = {"num_classes": 3, "latent_size": 8, "channels": [8, 16], "norm_num_groups": 8, "num_heads": 2,
                "num_res_blocks": 1}
    clf = save_checkpoint(root / "latent_classifier.pt", {"classifier": TimeConditionedLatentClassifier(**clf_args)},
                          checkpoint_meta("train_latent_classifier", config={"network_args": clf_args},
                                          parents={"diffusion": diff}, classes=classes))
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    return {"root": root, "toy": toy, "classes": classes, "model": model, "bundle": bundle,
            "ckpts": {"autoencoder": str(ae), "diffusion": str(diff), "latent_classifier": str(clf)}}


def test_infer_task_classifies_like_the_checkpoint(setup: dict) -> None:
    from lib import TileClassifierInfer

    task = TileClassifierInfer(str(setup["bundle"]), {})
    assert task.is_valid()
    tile = sorted(setup["toy"].rglob("*.png"))[0]
    _, result = task({"image": str(tile), "device": "cpu"})
    scores = [p["score"] for p in result["prediction"]]
    assert [p["label"] for p in result["prediction"]] == [c.lower() for c in setup["classes"]]
    with torch.no_grad():
        expected = torch.softmax(setup["model"](tile_transforms(64)({"image": str(tile)})["image"][None]), 1)[0]
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-4, atol=1e-5)


def test_synthesize_task(setup: dict, tmp_path: Path) -> None:
    from lib import SynthesizeTilesInfer
    from monailabel.tasks.infer.basic_infer import BasicInferTask

    task = SynthesizeTilesInfer(num_inference_steps=3, **setup["ckpts"])
    assert isinstance(task, BasicInferTask) and task.is_valid()
    first, result = task({"label": setup["classes"][1], "num_samples": 2, "output_dir": str(tmp_path),
                          "device": "cpu"})
    assert result["class_index"] == 1 and len(result["files"]) == 2 and first not in result["files"]
    from PIL import Image

    assert [Image.open(f).size for f in result["files"]] == [(16, 16)] * 2
    assert Image.open(first).size == (32, 16)  # the preview: both tiles side by side


def test_app_and_train_task(setup: dict, tmp_path: Path) -> None:
    from main import HistoDiffusionApp

    bundle = shutil.copytree(setup["bundle"], tmp_path / "bundle")
    studies = shutil.copytree(setup["toy"], tmp_path / "studies")
    app = HistoDiffusionApp(str(APP), str(studies), {"bundle": str(bundle), **setup["ckpts"],
                                                      "num_inference_steps": "2"})
    assert set(app._infers) == {"tile_classifier", "synthesize"} and set(app._trainers) == {"tile_classifier"}
    trainer = app._trainers["tile_classifier"]
    items = [{"image": str(p), "label": None} for p in sorted(studies.rglob("*.png"))]

    class _Store:
        def datalist(self) -> list[dict]:
            return items

    before = (bundle / "models" / "model.pt").stat().st_mtime_ns
    trainer({"model": "tile_classifier", "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.25},
            _Store())
    assert (bundle / "models" / "model.pt").stat().st_mtime_ns != before


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_over_http(setup: dict, tmp_path: Path) -> None:
    """``monailabel start_server`` with the exported bundle on a loopback port: over HTTP, label tiles, classify one,
    ask ``synthesize`` for tiles of a class, and run one short training that replaces the bundle's weights."""
    import json
    import os
    import subprocess
    import time

    import requests

    app = shutil.copytree(APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__", "model", "logs"))
    bundle = shutil.copytree(setup["bundle"], tmp_path / "bundle")
    studies = tmp_path / "studies"  # a flat datastore of the toy tiles; their classes are sent over HTTP
    studies.mkdir()
    tiles = {}
    for tile in sorted(setup["toy"].rglob("*.png")):
        tiles[tile.stem] = tile.parent.name
        shutil.copy(tile, studies / tile.name)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    conf = {"bundle": str(bundle), **setup["ckpts"], "num_inference_steps": "2"}
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app), "--studies",
           str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.png", "*.txt"]', "OMP_NUM_THREADS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its script runs `python`
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                info = requests.get(f"{url}/info/", timeout=5)
                if info.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, (tmp_path / "server.log").read_text()[-4000:]
            time.sleep(1)
        info = info.json()
        assert {"tile_classifier", "synthesize"} <= set(info["models"]) and "tile_classifier" in info["trainers"]

        for image_id, cls in tiles.items():  # the class of each tile, as an annotator would save it
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": (f"{image_id}.txt", cls.encode())}, timeout=30)
            assert r.status_code == 200, r.text
        listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
        assert set(listed["objects"]) == set(tiles)

        image_id = sorted(tiles)[0]
        r = requests.post(f"{url}/infer/tile_classifier", params={"image": image_id, "output": "json"}, timeout=120)
        assert r.status_code == 200, r.text
        scores = {p["label"]: p["score"] for p in r.json()["prediction"]}
        assert set(scores) == {c.lower() for c in setup["classes"]} and abs(sum(scores.values()) - 1) < 1e-4

        out = tmp_path / "synth"
        wanted = setup["classes"][2]
        r = requests.post(f"{url}/infer/synthesize", params={"image": image_id, "output": "json"},
                          data={"params": json.dumps({"label": wanted, "num_samples": 2, "output_dir": str(out)})},
                          timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["label"] == wanted and r.json()["class_index"] == 2
        assert sorted(r.json()["files"]) == sorted(str(f) for f in out.glob("*.png")) and len(r.json()["files"]) == 2

        before = (bundle / "models" / "model.pt").stat().st_mtime_ns
        r = requests.post(f"{url}/train/tile_classifier", params={"run_sync": "true"},
                          json={"max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.25}, timeout=600)
        assert r.status_code == 200, r.text
        assert (bundle / "models" / "model.pt").stat().st_mtime_ns != before
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
