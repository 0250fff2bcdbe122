"""``make demo``'s data: the toy tiles and the site archive it pre-trains on, a real set fetched on request (against a
local HTTP server serving an archive in the Kather 2016 layout: no network), and the per-stage time table."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_histodiff.apps import demo
from monai_histodiff.data import download as dl

KATHER_CLASSES = ("01_TUMOR", "02_STROMA")


def _kather_zip(path: Path, per_class: int = 24) -> str:
    """A zip in the Kather 2016 archive's layout (top folder, class folders, 150 px RGB TIFFs); returns its sha256."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for c, name in enumerate(KATHER_CLASSES):
            for i in range(per_class):
                pixels = rng.integers(0, 80, (150, 150, 3)) + np.array([150, 60 + 60 * c, 150])
                buffer = BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="TIFF")
                z.writestr(f"Kather_texture_2016_image_tiles_5000/{name}/{i:04d}_{name}.tif", buffer.getvalue())
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def kather_server(tmp_path, monkeypatch):
    """Serve a small Kather-layout archive on 127.0.0.1 and point the registry's ``kather2016`` entry at it."""
    www = tmp_path / "www" / "records" / "53169" / "files"
    www.mkdir(parents=True)
    sha256 = _kather_zip(www / "Kather_texture_2016_image_tiles_5000.zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/records/53169/files/Kather_texture_2016_image_tiles_5000.zip"
    monkeypatch.setitem(dl.DATASETS, "kather2016", {**dl.DATASETS["kather2016"], "url": url, "sha256": sha256})
    yield url
    server.shutdown()


def test_toy_data_and_the_site_archive_the_demo_pretrains_on(tmp_path):
    paths = demo.prepare_demo_data(tmp_path / "demo")
    assert paths["toy"]
    split = json.loads(Path(paths["split"]).read_text())
    assert split["counts"]["training"] == [9] * demo.DEMO_CLASSES and split["counts"]["validation"] == [3] * demo.DEMO_CLASSES
    archive = sorted(Path(paths["unlabeled_dir"], "site_archive").rglob("*.png"))
    assert len(archive) == demo.DEMO_CLASSES * demo.DEMO_ARCHIVE_PER_CLASS
    labeled = {hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(paths["dataset_dir"]).rglob("*.png")}
    assert not labeled & {hashlib.sha256(p.read_bytes()).hexdigest() for p in archive}  # no labeled tile re-used


def test_real_set_fetched_on_request_over_http_checksum_checked(kather_server, tmp_path):
    folder = demo.download_demo_data("kather2016", tmp_path / "data")
    assert Path(folder) == tmp_path / "data" / "Kather_texture_2016_image_tiles_5000"
    assert sorted(p.name for p in Path(folder).iterdir()) == list(KATHER_CLASSES)
    paths = demo.prepare_demo_data(tmp_path / "demo", dataset_dir=folder)
    split = json.loads(Path(paths["split"]).read_text())
    assert not paths["toy"] and paths["unlabeled_dir"] is None  # pre-training on the site's own tiles
    assert split["classes"] == list(KATHER_CLASSES)
    assert sum(split["counts"]["training"]) + sum(split["counts"]["validation"]) >= 2
    # a second call finds the extracted folder and fetches nothing (the URL now points at no file)
    dl.DATASETS["kather2016"]["url"] = kather_server.replace("/files/", "/gone/")
    assert demo.download_demo_data("kather2016", tmp_path / "data") == folder


def test_a_wrong_checksum_extracts_nothing(kather_server, tmp_path):
    dl.DATASETS["kather2016"]["sha256"] = "0" * 64
    with pytest.raises(Exception, match="(?i)hash"):
        demo.download_demo_data("kather2016", tmp_path / "data")
    assert not (tmp_path / "data" / "Kather_texture_2016_image_tiles_5000").exists()


def test_stage_times_sum_the_runs_of_each_stage(tmp_path):
    records = [("pretrain_autoencoder", 60.0), ("train_downstream", 20.0), ("select", 3.0), ("train_downstream", 22.0)]
    (tmp_path / "commands.jsonl").write_text(
        "\n".join(json.dumps({"stage": s, "log": s, "seconds": t}) for s, t in records) + "\n")
    times = demo.stage_times(tmp_path)
    assert times == [("pretrain_autoencoder", 1, 60.0), ("train_downstream", 2, 42.0), ("select", 1, 3.0)]
    table = demo.format_stage_times(times, elapsed=120.0)
    assert "train_downstream" in table and "   2 " in table
    assert table.splitlines()[-2].split()[-1] == "15"  # 120 s minus the 105 s the stages took
    assert "(2.0 min)" in table.splitlines()[-1]
    assert demo.stage_times(tmp_path, skip=2) == [("select", 1, 3.0), ("train_downstream", 1, 22.0)]  # a rerun's
