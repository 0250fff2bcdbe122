"""The downloader against a local archive: served over HTTP on localhost, and as a file:// URL. No network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from monai_histodiff.data import download as dl


def _archive(folder):
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "CRC-VAL-HE-7K.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("CRC-VAL-HE-7K/ADI/ADI-1.tif", b"fake tile")
        z.writestr("CRC-VAL-HE-7K/TUM/TUM-1.tif", b"fake tile 2")
    return src, hashlib.md5(src.read_bytes()).hexdigest()


@pytest.fixture()
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www the way Zenodo lays out files."""
    www = tmp_path / "www"
    _, md5 = _archive(www / "records" / "1214456" / "files")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/records/1214456/files/CRC-VAL-HE-7K.zip", md5
    server.shutdown()


def test_download_and_extract_over_http(local_server, tmp_path):
    url, md5 = local_server
    root = dl.download_dataset("CRC-VAL-HE-7K", tmp_path / "root", url=url, md5=md5, progress=False)
    assert (root / "CRC-VAL-HE-7K" / "TUM" / "TUM-1.tif").read_bytes() == b"fake tile 2"
    # a rerun finds the verified archive and does not download again
    dl.download_dataset("CRC-VAL-HE-7K", root, url=url.replace("/files/", "/gone/"), md5=md5, progress=False)


def test_file_url_and_wrong_md5(tmp_path):
    src, md5 = _archive(tmp_path / "src")
    root = dl.download_dataset("CRC-VAL-HE-7K", tmp_path / "r1", url=src.as_uri(), md5=md5, progress=False)
    assert (root / "CRC-VAL-HE-7K" / "ADI" / "ADI-1.tif").is_file()
    with pytest.raises(Exception, match="(?i)hash"):
        dl.download_dataset("CRC-VAL-HE-7K", tmp_path / "r2", url=src.as_uri(), md5="0" * 32, progress=False)


def test_registry_points_at_zenodo_record():
    assert set(dl.DATASETS) >= {"NCT-CRC-HE-100K", "CRC-VAL-HE-7K", "kather2016"}
    assert all(d["url"].startswith(dl.ZENODO_RECORD + "/files/") for k, d in dl.DATASETS.items() if k != "kather2016")
    assert dl.DATASETS["CRC-VAL-HE-7K"]["md5"] == "2fd1651b4f94ebd818ebf90ad2b6ce06"
    kather = dl.DATASETS["kather2016"]  # record 53169; sha256 and size as TensorFlow Datasets pins them
    assert kather["url"] == "https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip"
    assert len(kather["sha256"]) == 64 and kather["bytes"] == 258_098_431
    with pytest.raises(ValueError, match="unknown dataset"):
        dl.download_dataset("nope", "/tmp")
