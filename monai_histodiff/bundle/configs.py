"""Where the stage bundle configs live, and the config-file list a stage runs with, from any working directory.

The configs of ``bundles/`` are installed inside the package (``monai_histodiff/bundles/``, see ``setup.py``); in a
source checkout (or an editable install) they are read from the repository's ``bundles/``. A stage runs with MONAI's
list form: the shared definitions first, the stage second, the CPU size and other overrides after, and for several
processes (model-zoo style) ``multi_gpu.json`` after the stage config, under torchrun::

    python -m monai.bundle run --config_file "['bundles/common.json','bundles/finetune.json','bundles/small.json']"
    torchrun --nproc_per_node=2 -m monai.bundle run \\
        --config_file "['bundles/common.json','bundles/generate.json','bundles/small.json','bundles/multi_gpu.json']"

:func:`config_files` gives that list as absolute paths, so the experiment runner, the demo and the site-bundle export
work from an installed package and any folder; :func:`merged_config` gives the merged content as one dictionary (what
the exported site bundle writes as one self-contained file per stage).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMON", "SMALL", "MULTI_GPU", "config_dir", "config_files", "merged_config", "stage_names"]

COMMON = "common.json"
SMALL = "small.json"
MULTI_GPU = "multi_gpu.json"
_NOT_STAGES = {COMMON, SMALL, MULTI_GPU, "metadata.json"}


def config_dir() -> Path:
    """The folder holding ``common.json`` and the stage configs: installed package data, else the checkout's."""
    package = Path(__file__).resolve().parents[1]  # monai_histodiff/ (this file is monai_histodiff/bundle/configs.py)
    for folder in (package / "bundles", package.parent / "bundles"):
        if (folder / COMMON).is_file():
            return folder
    raise FileNotFoundError(f"no bundle configs next to {package}: neither {package / 'bundles'} (installed package) "
                            f"nor {package.parent / 'bundles'} (source checkout) holds {COMMON}; reinstall "
                            "monai-histodiff")


def stage_names() -> list[str]:
    """The stages that have a config (``pretrain_autoencoder``, ..., ``evaluate``)."""
    return sorted(p.stem for p in config_dir().glob("*.json") if p.name not in _NOT_STAGES)


def config_files(stage: str, small: bool = False, extra: Sequence[str | os.PathLike] = (), *,
                 multi_gpu: bool = False) -> list[str]:
    """The config files ``stage`` runs with, in merge order (later files override earlier keys): ``common.json``,
    ``<stage>.json``, ``small.json`` when ``small``, ``multi_gpu.json`` when ``multi_gpu`` (the model-zoo override
    merged after the stage config, launched with torchrun), then ``extra`` (other files: a bare name or
    ``bundles/<name>`` of a packaged file is looked up in :func:`config_dir`).

    Raises:
        FileNotFoundError: naming the stage and the known stages when ``stage`` has no config.
    """
    folder = config_dir()
    stage_file = folder / f"{stage}.json"
    if not stage_file.is_file() or stage_file.name in _NOT_STAGES:
        raise FileNotFoundError(f"no stage config '{stage}' in {folder}; stages: {', '.join(stage_names())}")
    files = [folder / COMMON, stage_file]
    files += [folder / SMALL] if small else []
    files += [folder / MULTI_GPU] if multi_gpu else []
    for item in extra:
        path = Path(item)
        packaged = folder / path.name
        path = packaged if str(path) in (path.name, f"bundles/{path.name}") and packaged.is_file() else path
        if path not in files:
            files.append(path)
    return [str(f) for f in files]


def merged_config(stage: str, small: bool = False, extra: Sequence[str | os.PathLike] = (), *,
                  multi_gpu: bool = False) -> dict[str, Any]:
    """The content ``stage`` runs with, merged as ``monai.bundle`` merges :func:`config_files` (later files replace
    earlier top-level keys; ``a#b`` keys replace one nested entry)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(stage, small, extra, multi_gpu=multi_gpu))
    return parser.get()
