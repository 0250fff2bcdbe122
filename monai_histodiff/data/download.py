"""Download public H&E tile sets (Zenodo, CC BY 4.0) through MONAI's ``download_and_extract``, checksum checked.

The NCT-CRC-HE datasets of the paper (record 1214456) and the small Kather 2016 texture set (record 53169, 5,000
tiles, 8 classes, about 258 MB: the real-tissue demo for a user with internet). Only when a user asks
(``python -m monai_histodiff download``, ``python -m monai_histodiff demo --download kather2016``): nothing in the
package or its tests downloads at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from urllib.parse import urlparse

from monai.apps import download_and_extract, download_url, extractall

__all__ = ["ZENODO_RECORD", "DATASETS", "download_dataset", "dataset_folder"]

ZENODO_RECORD = "https://zenodo.org/records/1214456"

# md5 values as published on the Zenodo record (the Kather 2016 archive: the sha256 and byte size that TensorFlow
# Datasets pins for the same URL in its url_checksums/colorectal_histology.txt). The record's md5 for the colour-normalised NCT-CRC-HE-100K.zip is not
# pinned here (sources disagree); pass --md5 to check it, otherwise the archive is extracted with a warning.
DATASETS: dict[str, dict[str, Any]] = {
    "NCT-CRC-HE-100K": {
        "url": f"{ZENODO_RECORD}/files/NCT-CRC-HE-100K.zip",
        "filename": "NCT-CRC-HE-100K.zip",
        "md5": None,
        "description": "100,000 colour-normalised 224 px tiles, 9 classes (training set of the paper)",
    },
    "NCT-CRC-HE-100K-NONORM": {
        "url": f"{ZENODO_RECORD}/files/NCT-CRC-HE-100K-NONORM.zip",
        "filename": "NCT-CRC-HE-100K-NONORM.zip",
        "md5": "035777cf327776a71a05c95da6d6325f",
        "description": "the same 100,000 tiles without colour normalisation",
    },
    "CRC-VAL-HE-7K": {
        "url": f"{ZENODO_RECORD}/files/CRC-VAL-HE-7K.zip",
        "filename": "CRC-VAL-HE-7K.zip",
        "md5": "2fd1651b4f94ebd818ebf90ad2b6ce06",
        "description": "7,180 tiles from 50 other patients (the official test set)",
    },
    "kather2016": {
        "url": "https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip",
        "filename": "Kather_texture_2016_image_tiles_5000.zip",
        "sha256": "936d0b95ae0f04f1f7b18a2b7e8c55776c3e887d102f645bcee752d1a6626a32",
        "bytes": 258_098_431,
        "folder": "Kather_texture_2016_image_tiles_5000",
        "description": "Kather 2016 colorectal texture tiles: 5,000 tiles of 150 px, 8 classes (625 each), 258 MB",
    },
}


def download_dataset(
    name: str, root: str | os.PathLike, url: str | None = None, md5: str | None = None, progress: bool = True,
    sha256: str | None = None,
) -> Path:
    """Download and extract one dataset of :data:`DATASETS` into ``root`` and return ``root``.

    Args:
        name: a key of :data:`DATASETS`.
        root: destination folder; the archive is kept there so a rerun skips the download once the checksum matches.
        url: override the download address: a mirror (``http(s)://``, fetched with MONAI's ``download_and_extract``)
            or a ``file://`` archive already on disk (checked and extracted with MONAI's ``download_url`` and
            ``extractall``).
        md5: override the expected md5 checksum (datasets pinned by md5).
        progress: show a progress bar.
        sha256: override the expected sha256 checksum (datasets pinned by sha256, e.g. a local archive in the same
            format for a test).

    Raises:
        RuntimeError: from MONAI, when the archive's checksum differs from the expected one (nothing is extracted).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hash_type = "sha256" if "sha256" in spec else "md5"
    checksum = {"sha256": sha256 if sha256 is not None else spec.get("sha256"),
                "md5": md5 if md5 is not None else spec.get("md5")}[hash_type]
    url = url or spec["url"]
    filepath = str(root / spec["filename"])
    if urlparse(url).scheme == "file":  # MONAI's download_and_extract asks the server for the name: not for files
        download_url(url, filepath=filepath, hash_val=checksum, hash_type=hash_type, progress=progress)
        extractall(filepath, output_dir=str(root), hash_val=checksum, hash_type=hash_type)
    else:
        download_and_extract(url, filepath=filepath, output_dir=str(root), hash_val=checksum, hash_type=hash_type,
                             progress=progress)
    return root


def dataset_folder(name: str, root: str | os.PathLike) -> Path:
    """The class-folder tree of dataset ``name`` once extracted under ``root`` (the archive's top folder)."""
    spec = DATASETS[name]
    return Path(root) / spec.get("folder", Path(spec["filename"]).stem)
