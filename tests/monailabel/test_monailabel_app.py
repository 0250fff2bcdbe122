"""The MONAI Label sample app (examples/monailabel): its tasks loaded through MONAI Label's own classes, the server
over HTTP (including every request it must refuse), and its README's commands against what the stages write.

Runs in its own environment (``make test-monailabel``); skipped where monailabel is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("monailabel")

import requests  # noqa: E402
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet  # noqa: E402

from monai_histodiff.bundle.export import export_bundle  # noqa: E402
from monai_histodiff.data.manifest import read_generation_manifest, read_manifest  # noqa: E402
from monai_histodiff.data.toy import make_toy_dataset  # noqa: E402
from monai_histodiff.data.transforms import tile_transforms  # noqa: E402
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint  # noqa: E402
from monai_histodiff.networks import TileClassifier  # noqa: E402
from monai_histodiff.networks.latent_classifier import TimeConditionedLatentClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "examples" / "monailabel"
ARGS = {"backbone": "resnet", "num_classes": 3, "image_size": 64}
MAX_SAMPLES = 8  # the server's synthesize_max_samples


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


def _check_generation_folder(folder: Path, files: list[str], classes: list[str], class_index: int) -> list[dict]:
    """The folder is a generation folder as the generate stage writes it: its manifest, read with the readers that
    select and the judge use, lists exactly ``files`` as tiles of ``class_index``; grids and classes.json exist."""
    items = read_generation_manifest(folder / "manifest.jsonl", classes)
    assert sorted(i["image"] for i in items) == sorted(str(Path(f).resolve()) for f in files)
    assert {i["label"] for i in items} == {class_index}
    assert (folder / "grids" / f"{classes[class_index]}.png").is_file()
    assert json.loads((folder / "classes.json").read_text())["classes"] == classes
    return read_manifest(folder / "manifest.jsonl")


def test_synthesize_task(setup: dict, tmp_path: Path) -> None:
    """In-process: defaults from bundles/generate.json, tiles + manifest as the generate stage writes them, reuse of
    a named folder with the same settings and refusal with other settings."""
    from lib import SynthesizeTilesInfer
    from lib.infers import RequestError
    from monailabel.tasks.infer.basic_infer import BasicInferTask
    from PIL import Image

    from monai_histodiff.bundle.configs import config_dir

    stage = json.loads((config_dir() / "generate.json").read_text())
    task = SynthesizeTilesInfer(output_root=tmp_path / "synth", num_inference_steps=3, **setup["ckpts"])
    assert isinstance(task, BasicInferTask) and task.is_valid()
    assert task._config["guidance_scale"] == stage["guidance_scale"]
    assert task._config["guidance_interval"] == stage["guidance_interval"]
    assert SynthesizeTilesInfer(output_root=tmp_path / "synth", **setup["ckpts"])._config["num_inference_steps"] == \
        stage["num_inference_steps"]

    first, result = task({"label": setup["classes"][1], "num_samples": 2, "output_dir": "pool", "device": "cpu"})
    assert result["class_index"] == 1 and len(result["files"]) == 2 and first not in result["files"]
    assert all(Path(f).parent.parent == (tmp_path / "synth" / "pool").resolve() for f in result["files"])
    assert [Image.open(f).size for f in result["files"]] == [(16, 16)] * 2
    assert Image.open(first).size == (32, 16)  # the preview: both tiles side by side
    os.unlink(first)  # (MONAI Label deletes it after sending it)
    rows = _check_generation_folder(tmp_path / "synth" / "pool", result["files"], setup["classes"], 1)
    assert {(r["steps"], r["guidance_scale"], r["guidance_interval"]) for r in rows} == {
        (3, stage["guidance_scale"], stage["guidance_interval"])}

    again, same = task({"label": 1, "num_samples": 2, "output_dir": "pool", "device": "cpu"})
    os.unlink(again)
    assert same["files"] == result["files"] and same["reused"] == 2 and same["generated"] == 0
    with pytest.raises(RequestError, match="other settings") as e:
        task({"label": 1, "num_samples": 2, "seed": 5, "output_dir": "pool", "device": "cpu"})
    assert e.value.status_code == 409


def test_app_and_train_task(setup: dict, tmp_path: Path) -> None:
    from main import HistoDiffusionApp

    bundle = shutil.copytree(setup["bundle"], tmp_path / "bundle")
    studies = shutil.copytree(setup["toy"], tmp_path / "studies")
    app = HistoDiffusionApp(str(APP), str(studies), {"bundle": str(bundle), **setup["ckpts"],
                                                      "num_inference_steps": "2",
                                                      "synthesize_dir": str(tmp_path / "synth")})
    assert set(app._infers) == {"tile_classifier", "synthesize"} and set(app._trainers) == {"tile_classifier"}
    trainer = app._trainers["tile_classifier"]
    items = [{"image": str(p), "label": None} for p in sorted(studies.rglob("*.png"))]

    class _Store:
        def datalist(self) -> list[dict]:
            return items

    models = bundle / "models"
    before = (models / "model.pt").read_bytes()
    result = trainer({"model": "tile_classifier", "max_epochs": 1, "device": "cpu", "multi_gpu": False,
                      "val_split": 0.25, "force_replace": True}, _Store())
    assert result["replaced"] and result["val_tiles"] == 3
    assert (models / "model.pt").read_bytes() != before and (models / "model.previous.pt").read_bytes() == before
    assert not (models / "model.candidate.pt").exists()


# ----------------------------------------------------------------------------------------------------- over HTTP
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``monailabel start_server`` with the exported bundle on a loopback port, its synthesis folder, its own empty
    temporary folder (TMPDIR) and a folder outside everything the app owns."""
    tmp = tmp_path_factory.mktemp("server").resolve()  # the app resolves its folder: compare resolved paths
    app = shutil.copytree(APP, tmp / "app", ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "synthetic"))
    bundle = shutil.copytree(setup["bundle"], tmp / "bundle")
    studies = tmp / "studies"  # a flat datastore of the toy tiles; their classes are sent over HTTP
    studies.mkdir()
    tiles = {}
    for tile in sorted(setup["toy"].rglob("*.png")):
        tiles[tile.stem] = tile.parent.name
        shutil.copy(tile, studies / tile.name)
    (tmp / "tmp").mkdir()
    (tmp / "outside").mkdir()
    synth = tmp / "synth"
    port = _free_port()
    conf = {"bundle": str(bundle), **setup["ckpts"], "num_inference_steps": "2", "synthesize_dir": str(synth),
            "synthesize_keep": "2", "synthesize_max_samples": str(MAX_SAMPLES)}
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app), "--studies",
           str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.png", "*.txt"]', "OMP_NUM_THREADS": "2",
           "TMPDIR": str(tmp / "tmp"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its script runs `python`
    log = open(tmp / "server.log", "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, (tmp / "server.log").read_text()[-4000:]
            try:
                info = requests.get(f"{url}/info/", timeout=5)
                if info.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, (tmp / "server.log").read_text()[-4000:]
            time.sleep(1)
        yield {"url": url, "info": info.json(), "tmp": tmp, "bundle": bundle, "tiles": tiles, "synth": synth,
               "tmpdir": tmp / "tmp", "outside": tmp / "outside", "log": tmp / "server.log"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _label_tiles(server: dict, classes: dict[str, str]) -> None:
    """Save each tile's class as its final label, as an annotator would."""
    for image_id, cls in classes.items():
        r = requests.put(f"{server['url']}/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": (f"{image_id}.txt", cls.encode())}, timeout=30)
        assert r.status_code == 200, r.text


def _synthesize(server: dict, params: dict, output: str = "json") -> requests.Response:
    return requests.post(f"{server['url']}/infer/synthesize", params={"image": sorted(server["tiles"])[0],
                                                                      "output": output},
                         data={"params": json.dumps(params)}, timeout=300)


def _train(server: dict, **params: object) -> requests.Response:
    return requests.post(f"{server['url']}/train/tile_classifier", params={"run_sync": "true"},
                         json={"max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.25, **params},
                         timeout=600)


def test_server_over_http(setup: dict, server: dict) -> None:
    """Over HTTP: label tiles, classify one, ask ``synthesize`` for tiles of a class in a named folder (a generation
    folder select can read), and run one short training that replaces the bundle's weights and keeps the old ones."""
    url = server["url"]
    info = server["info"]
    assert {"tile_classifier", "synthesize"} <= set(info["models"]) and "tile_classifier" in info["trainers"]
    _label_tiles(server, server["tiles"])
    listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert set(listed["objects"]) == set(server["tiles"])

    image_id = sorted(server["tiles"])[0]
    r = requests.post(f"{url}/infer/tile_classifier", params={"image": image_id, "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    scores = {p["label"]: p["score"] for p in r.json()["prediction"]}
    assert set(scores) == {c.lower() for c in setup["classes"]} and abs(sum(scores.values()) - 1) < 1e-4

    wanted = setup["classes"][2]
    r = _synthesize(server, {"label": wanted, "num_samples": 2, "output_dir": "runs/pool"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == wanted and r.json()["class_index"] == 2 and len(r.json()["files"]) == 2
    folder = server["synth"] / "runs" / "pool"
    assert sorted(r.json()["files"]) == sorted(str(f) for f in folder.glob(f"{wanted}/*.png"))
    _check_generation_folder(folder, r.json()["files"], setup["classes"], 2)

    models = server["bundle"] / "models"
    before = (models / "model.pt").read_bytes()
    r = _train(server, force_replace=True)
    assert r.status_code == 200, r.text
    assert r.json()["replaced"] and r.json()["previous_model"] == str(models / "model.previous.pt")
    assert (models / "model.pt").read_bytes() != before and (models / "model.previous.pt").read_bytes() == before


@pytest.mark.parametrize("params, words", [
    ({"output_dir": "ABSOLUTE"}, ["output_dir", "absolute"]),
    ({"output_dir": "../outside"}, ["output_dir", "'..'"]),
    ({"output_dir": "pool/../../outside"}, ["output_dir", "'..'"]),
    ({"output_dir": "link"}, ["output_dir", "resolves outside"]),
    ({"output_dir": "link/deeper"}, ["output_dir", "resolves outside"]),
    ({"output_dir": ".requests"}, ["output_dir", "'.requests'"]),
    ({"num_samples": 10**9}, ["num_samples", f"1..{MAX_SAMPLES}"]),
    ({"num_samples": 0}, ["num_samples", f"1..{MAX_SAMPLES}"]),
    ({"num_samples": -3}, ["num_samples", f"1..{MAX_SAMPLES}"]),
    ({"num_samples": 1.5}, ["num_samples", "integer"]),
    ({"num_samples": True}, ["num_samples"]),
    ({"num_samples": "many"}, ["num_samples"]),
    ({"num_inference_steps": -5}, ["num_inference_steps", "1..1000"]),
    ({"num_inference_steps": 10**7}, ["num_inference_steps", "1..1000"]),
    ({"guidance_scale": -1.0}, ["guidance_scale", "0..20"]),
    ({"guidance_scale": 1e9}, ["guidance_scale", "0..20"]),
    ({"guidance_scale": "nan"}, ["guidance_scale", "0..20"]),
    ({"guidance_interval": 0}, ["guidance_interval", "1..1000"]),
    ({"seed": -1}, ["seed", "0..4294967295"]),
    ({"label": "NOT_A_CLASS"}, ["label", "classes"]),
])
def test_synthesize_refuses_unsafe_requests(server: dict, params: dict, words: list[str]) -> None:
    """Over HTTP, each unsafe request gets 422 naming the field and what is allowed, and writes nothing: not outside
    the app's folder (an absolute path, '..' segments, a symbolic link pointing out), not even inside it."""
    outside = server["outside"]
    link = server["synth"] / "link"
    if not link.is_symlink():
        server["synth"].mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside, target_is_directory=True)
    params = {k: str(outside / "tiles") if v == "ABSOLUTE" else v for k, v in params.items()}
    listing = sorted(p.relative_to(server["synth"]) for p in server["synth"].rglob("*"))
    r = _synthesize(server, {"label": 0, "num_samples": 1, **params})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert all(w in detail for w in words), detail
    assert list(outside.iterdir()) == []
    assert sorted(p.relative_to(server["synth"]) for p in server["synth"].rglob("*")) == listing


def test_synthesize_cleans_up(setup: dict, server: dict) -> None:
    """Requests without output_dir: only the newest ``synthesize_keep`` (2) result folders stay; the preview MONAI
    Label sends back leaves no temporary file or folder (the server's TMPDIR ends empty of the app's files)."""
    area = server["synth"] / ".requests"
    answers = []
    for seed, output in ((0, "json"), (1, "image"), (2, "json")):
        r = _synthesize(server, {"label": 1, "num_samples": 1, "seed": seed}, output=output)
        assert r.status_code == 200, r.text
        if output == "image":
            assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            answers.append(r.json())
    first, last = answers
    assert not Path(first["output_dir"]).exists()
    assert Path(last["output_dir"]).parent == area and all(Path(f).is_file() for f in last["files"])
    assert len(list(area.iterdir())) == 2
    _check_generation_folder(Path(last["output_dir"]), last["files"], setup["classes"], 1)
    deadline = time.time() + 20  # MONAI Label deletes the result file in a background task after the response
    while [p for p in server["tmpdir"].iterdir() if p.name.startswith("histodiff")] and time.time() < deadline:
        time.sleep(0.5)
    assert [p.name for p in server["tmpdir"].iterdir() if p.name.startswith("histodiff")] == []


def test_train_keeps_a_better_model(setup: dict, server: dict) -> None:
    """The current model predicts the class every tile is labeled with; training from a model that predicts another
    class makes a worse one: refused (409) unless forced; forced, the current model is kept as model.previous.pt."""
    classes = setup["classes"]
    models = server["bundle"] / "models"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (len(classes),)][-1]
    good, bad = dict(state), dict(state)
    good[bias] = torch.tensor([1000.0, 0.0, 0.0])
    bad[bias] = torch.tensor([0.0, 1000.0, 0.0])
    torch.save(good, models / "model.pt")
    torch.save(bad, models / "model.bad.pt")
    current = (models / "model.pt").read_bytes()
    _label_tiles(server, dict.fromkeys(server["tiles"], classes[0]))

    for params, field in (({"model_filename": "../models/model.pt"}, "model_filename"),
                          ({"model_filename": "missing.pt"}, "model_filename"),
                          ({"max_epochs": 10**9}, "max_epochs"), ({"max_epochs": -1}, "max_epochs"),
                          ({"val_split": 0}, "val_split"), ({"force_replace": "maybe"}, "force_replace"),
                          ({"tracking": "mlflow", "tracking_uri": "file:///tmp/x"}, "tracking")):
        r = _train(server, **params)
        assert r.status_code == 422 and field in r.json()["detail"], r.text

    r = _train(server, model_filename="model.bad.pt")
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "not replacing models/model.pt" in detail and "force_replace" in detail and "0.000" in detail, detail
    assert (models / "model.pt").read_bytes() == current and (models / "model.candidate.pt").is_file()

    r = _train(server, model_filename="model.bad.pt", force_replace=True)
    assert r.status_code == 200, r.text
    assert r.json()["replaced"] and r.json()["forced"]
    assert r.json()["val_accuracy"] == 0.0 and r.json()["previous_val_accuracy"] == 1.0
    assert (models / "model.previous.pt").read_bytes() == current and (models / "model.pt").read_bytes() != current
    assert not (models / "model.candidate.pt").exists()


# ---------------------------------------------------------------------------------------------------- the README
def _readme_commands(text: str) -> list[list[str]]:
    """The commands of the README's ``bash`` blocks, each split as the shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _stage_outputs() -> dict[str, set[str]]:
    """Per stage, the paths (relative to the bundle root) under its own ``runs/<stage>/`` folder that its merged
    configs name: checkpoints (``*_ckpt``), folders (``*_dir``) and the manifest."""
    from monai.bundle import ConfigParser

    from monai_histodiff.bundle.configs import config_files, stage_names

    outputs = {}
    for stage in stage_names():
        parser = ConfigParser()
        parser.read_config(config_files(stage))
        parser["bundle_root"] = "."
        own = set()
        for key, raw in parser.get().items():
            if isinstance(raw, str) and (key.endswith(("_ckpt", "_dir")) or key == "manifest"):
                value = parser.get_parsed_content(key)
                if isinstance(value, str) and os.path.normpath(value).startswith(f"runs/{stage}"):
                    own.add(os.path.normpath(value))
        outputs[stage] = own
    return outputs


def test_readme_commands_match_the_stages() -> None:
    """Every command of examples/monailabel/README.md parses with its program's own parser, every ``python -m``
    module exists, every ``runs/...`` path it names is one a stage writes (per bundles/*.json) or a folder its
    commands create (the app's synthesis folder, select's output), and the defaults it quotes are generate.json's."""
    import ast
    import importlib.util

    from monai.bundle import ConfigParser
    from monailabel.main import Main

    from monai_histodiff.__main__ import build_parser

    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    from lib.infers import generate_defaults
    from main import CONF_KEYS

    text = (APP / "README.md").read_text()
    commands = _readme_commands(text)
    outputs = _stage_outputs()
    stages = set(outputs)
    makefile = (REPO / "Makefile").read_text()
    ml_venv = re.search(r"^ML_VENV \?= (\S+)", makefile, flags=re.M).group(1)
    created: set[str] = set()  # runs/ folders the README's commands choose (not a stage's)
    seen = set()

    for cmd in commands:
        if cmd[0] == "make":
            assert all(re.search(rf"^{re.escape(t)}:", makefile, flags=re.M) for t in cmd[1:]), cmd
            seen.add("make")
        elif cmd[:2] == ["python", "-m"]:
            module = cmd[2]
            assert importlib.util.find_spec(module) is not None, f"no module {module}: {cmd}"
            if module == "monai_histodiff":
                args = build_parser().parse_args(cmd[3:])
                assert args.command == "export-bundle", cmd
                assert os.path.normpath(args.checkpoint) in outputs["train_downstream"], args.checkpoint
                assert (REPO / args.output).resolve() == (APP / "model" / "histodiff_tile_classifier").resolve()
                seen.add("export-bundle")
            elif module == "monai.bundle":
                assert cmd[3] == "run", cmd
                options = dict(zip(cmd[4::2], cmd[5::2]))
                assert all(k.startswith("--") for k in options) and len(cmd[4:]) % 2 == 0, cmd
                files = ast.literal_eval(options.pop("--config_file"))
                assert all((REPO / f).is_file() for f in files), files
                parser = ConfigParser()
                parser.read_config([str(REPO / f) for f in files])
                for key, value in options.items():
                    assert key[2:] in parser.get(), f"{key} is not a setting of {files}"
                    if value.startswith("runs/") and key != "--synthetic_dir":
                        assert value.split("/")[1] not in stages, f"{key} {value} would write into a stage's folder"
                        created.add(os.path.normpath(value))
                seen.add("monai.bundle")
            else:
                raise AssertionError(f"unchecked command {cmd}")
        elif cmd[0].endswith("/monailabel"):
            assert cmd[0] == f"{ml_venv}/bin/monailabel", cmd
            args = Main().args_parser().parse_args(cmd[1:])
            assert args.action == "start_server" and (REPO / args.app).resolve() == APP
            conf = dict(args.conf or [])
            assert set(conf) <= set(CONF_KEYS), set(conf) - set(CONF_KEYS)
            for key, value in conf.items():
                if key in ("autoencoder", "diffusion", "latent_classifier", "decoder"):
                    stage = value.split("/")[1]
                    assert stage in stages and os.path.normpath(value) in outputs[stage], f"--conf {key} {value}"
            assert conf["synthesize_dir"].startswith("runs/") and conf["synthesize_dir"].split("/")[1] not in stages
            created.add(os.path.normpath(conf["synthesize_dir"]))
            seen.add("monailabel")
        else:
            raise AssertionError(f"unchecked command {cmd}")
    assert seen == {"make", "export-bundle", "monailabel", "monai.bundle"}, seen
    # the select command reads what synthesize writes into the app's folder
    select = next(c for c in commands if c[:3] == ["python", "-m", "monai.bundle"])
    synthetic = select[select.index("--synthetic_dir") + 1]
    assert any(synthetic.startswith(f"{c}/") for c in created), synthetic

    # the synthesize defaults the README quotes are the generate stage's
    defaults = generate_defaults()
    quoted = re.search(r"`bundles/generate.json`'s \((\d+), ([\d.]+), (\d+)\)", text).groups()
    assert (int(quoted[0]), float(quoted[1]), int(quoted[2])) == (
        defaults["num_inference_steps"], defaults["guidance_scale"], defaults["guidance_interval"])
    for field in ("num_inference_steps", "guidance_scale", "guidance_interval"):
        row = re.search(rf"^\| `{field}` \|.*\| generate stage's \(([\d.]+)\) \|$", text, flags=re.M)
        assert row and float(row.group(1)) == defaults[field], field

    for path in set(re.findall(r"runs/[\w./-]*\w", text)):
        path = os.path.normpath(path)
        stage = path.split("/")[1]
        if stage in stages:
            assert path in outputs[stage], f"README names {path}, which stage {stage} does not write"
        else:
            assert any(path == c or path.startswith(f"{c}/") for c in created), \
                f"README names {path}: no stage or command writes it"
