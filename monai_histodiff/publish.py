"""``large_files.yml`` for the pre-trained checkpoints, in MONAI's model-zoo format, so another site downloads and
verifies them with ``python -m monai.bundle download_large_files --bundle_path .`` (sha256 checked)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from monai_histodiff.handlers.checkpoint import file_sha256, load_checkpoint

__all__ = ["PRETRAINED", "write_large_files"]

PRETRAINED = ("pretrain_autoencoder/autoencoder.pt", "pretrain_diffusion/diffusion.pt")


def write_large_files(runs: str | os.PathLike, url_base: str, output: str | os.PathLike = "large_files.yml",
                      target_dir: str = "runs") -> Path:
    """List the pre-trained checkpoints found under ``runs`` with their sha256 and download addresses.

    Args:
        runs: the pre-training run folder (holding ``pretrain_autoencoder/`` and ``pretrain_diffusion/``).
        url_base: where the pre-training site publishes the files; ``<url_base>/<stage>/<file>`` per checkpoint.
        output: the YAML file to write.
        target_dir: where a site's download puts them, relative to the bundle root (the bundles' ``output_dir``).
    """
    runs = Path(runs)
    entries, notes = [], []
    for rel, stage in zip(PRETRAINED, ("pretrain_autoencoder", "pretrain_diffusion")):
        path = runs / rel
        meta = load_checkpoint(path, stage=stage)["meta"]  # only real checkpoints of these stages are listed
        entries.append({"path": f"{target_dir}/{rel}", "url": f"{url_base.rstrip('/')}/{rel}",
                        "hash_val": file_sha256(path), "hash_type": "sha256"})
        notes.append(f"#   {rel}: image_size {meta['config'].get('image_size')}, monai_histodiff "
                     f"{meta.get('versions', {}).get('monai_histodiff')}")
    output = Path(output)
    header = "\n".join(["# Pre-trained HistoDiffusion checkpoints for a new site, written by",
                        f"#   python -m monai_histodiff large-files --runs {runs} --url_base {url_base}",
                        "# Download and verify (sha256): python -m monai.bundle download_large_files --bundle_path .",
                        *notes]) + "\n"
    output.write_text(header + yaml.safe_dump({"large_files": entries}, sort_keys=False))
    return output
