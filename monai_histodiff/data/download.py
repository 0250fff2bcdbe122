"""Download the public NCT-CRC-HE datasets (Zenodo record 1214456) through MONAI's ``download_and_extract``.

Only when a user asks (``python -m monai_histodiff download``): nothing in the package or its tests downloads at
run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from urllib.parse import urlparse

from monai.apps import download_and_extract, download_url, extractall

__all__ = ["ZENODO_RECORD", "DATASETS", "download_dataset"]

ZENODO_RECORD = "https://zenodo.org/records/1214456"

# md5 values as published on the Zenodo record. The record's md5 for the colour-normalised NCT-CRC-HE-100K.zip is not
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
}


def download_dataset(
    name: str, root: str | os.PathLike, url: str | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """Download and extract one dataset of :data:`DATASETS` into ``root`` and return ``root``.

    Args:
        name: a key of :data:`DATASETS`.
        root: destination folder; the archive is kept there so a rerun skips the download once the md5 matches.
        url: override the download address: a mirror (``http(s)://``, fetched with MONAI's ``download_and_extract``)
            or a ``file://`` archive already on disk (checked and extracted with MONAI's ``download_url`` and
            ``extractall``).
        md5: override the expected md5 checksum.
        progress: show a progress bar.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    checksum = md5 if md5 is not None else spec["md5"]
    url = url or spec["url"]
    filepath = str(root / spec["filename"])
    if urlparse(url).scheme == "file":  # MONAI's download_and_extract asks the server for the name: not for files
        download_url(url, filepath=filepath, hash_val=checksum, hash_type="md5", progress=progress)
        extractall(filepath, output_dir=str(root), hash_val=checksum, hash_type="md5")
    else:
        download_and_extract(url, filepath=filepath, output_dir=str(root), hash_val=checksum, hash_type="md5",
                             progress=progress)
    return root
