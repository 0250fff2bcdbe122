"""The bundle layer (what MONAI calls ``monai.bundle``): finding, checking, exporting and publishing the stage configs.

- :mod:`~monai_histodiff.bundle.configs`: where the stage configs of ``bundles/`` are (installed package data or the
  checkout), the config-file list a stage runs with (``common.json``, ``<stage>.json``, ``small.json``,
  ``multi_gpu.json``, in that order) and the merged content.
- :mod:`~monai_histodiff.bundle.settings`: every numeric stage setting's allowed range (:data:`SETTING_RULES`) and
  :func:`check_settings`, the first entry of each stage config's ``initialize``.
- :mod:`~monai_histodiff.bundle.export`: the downstream classifier as a MONAI model-zoo bundle (MONAI Label).
- :mod:`~monai_histodiff.bundle.site_kit`: the adaptation kit, the pre-trained checkpoints and one self-contained
  config per stage a new site runs (``export-bundle --pretrained_runs``).
- :mod:`~monai_histodiff.bundle.publish`: ``large_files.yml`` for the pre-trained checkpoints and their sha256-checked
  download (``large-files``, ``download-checkpoints``).

Only ``configs`` and ``settings`` are imported here (standard library only); the export and publish modules import
torch and the checkpoint handlers when imported themselves.
"""

from __future__ import annotations

from monai_histodiff.bundle.configs import (
    COMMON,
    MULTI_GPU,
    SMALL,
    config_dir,
    config_files,
    merged_config,
    stage_names,
)
from monai_histodiff.bundle.settings import SETTING_RULES, InvalidSettingError, SettingRule, check_settings

__all__ = [
    "COMMON",
    "MULTI_GPU",
    "SMALL",
    "config_dir",
    "config_files",
    "merged_config",
    "stage_names",
    "SETTING_RULES",
    "InvalidSettingError",
    "SettingRule",
    "check_settings",
]
