"""``large_files.yml`` for the pre-trained checkpoints, in MONAI's model-zoo format, and their download at a new site.

The pre-training site writes the file (:func:`write_large_files`); a new site fetches the checkpoints with
``python -m monai_histodiff download-checkpoints --bundle_path .`` (:func:`download_checkpoints`), which keeps a file
only when its sha256 matches and otherwise names the file, the expected and the actual hash. MONAI's
``python -m monai.bundle download_large_files`` reads the same file and refuses a mismatch too, without the actual
hash in its message.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from monai.apps import download_url

from monai_histodiff.handlers.checkpoint import file_sha256, load_checkpoint

__all__ = ["PRETRAINED", "ChecksumMismatchError", "write_large_files", "download_checkpoints"]

PRETRAINED = ("pretrain_autoencoder/autoencoder.pt", "pretrain_diffusion/diffusion.pt")


def write_large_files(runs: str | os.PathLike, url_base: str, output: str | os.PathLike = "large_files.yml",
                      target_dir: str = "runs", targets: Sequence[str] | None = None) -> Path:
    """List the pre-trained checkpoints found under ``runs`` with their sha256 and download addresses.

    Args:
        runs: the pre-training run folder (holding ``pretrain_autoencoder/`` and ``pretrain_diffusion/``).
        url_base: where the pre-training site publishes the files; ``<url_base>/<stage>/<file>`` per checkpoint.
        output: the YAML file to write.
        target_dir: where a site's download puts them, relative to the bundle root (the bundles' ``output_dir``).
        targets: the autoencoder's and the diffusion model's paths relative to the bundle root instead (the site
            bundle's ``models/autoencoder.pt``, ``models/diffusion.pt``); ``target_dir/<stage>/<file>`` when None.
    """
    runs = Path(runs)
    entries, notes = [], []
    targets = list(targets) if targets is not None else [f"{target_dir}/{rel}" for rel in PRETRAINED]
    for rel, stage, target in zip(PRETRAINED, ("pretrain_autoencoder", "pretrain_diffusion"), targets):
        path = runs / rel
        meta = load_checkpoint(path, stage=stage)["meta"]  # only real checkpoints of these stages are listed
        entries.append({"path": target, "url": f"{url_base.rstrip('/')}/{rel}",
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


class ChecksumMismatchError(RuntimeError):
    """A checkpoint whose sha256 differs from the one its ``large_files.yml`` lists; nothing of it is used."""


def _verify(path: Path, entry: dict[str, Any], source: str) -> None:
    """Raise :class:`ChecksumMismatchError` naming ``path``, the expected and the actual hash when they differ."""
    expected = str(entry.get("hash_val") or "").lower()
    if (entry.get("hash_type") or "sha256").lower() != "sha256" or not expected:
        raise ValueError(f"large_files.yml entry {entry.get('path')!r} must give a sha256 hash_val (hash_type "
                         f"{entry.get('hash_type')!r}, hash_val {entry.get('hash_val')!r})")
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(f"{source} {path}: sha256 {actual} but large_files.yml expects {expected}; the "
                                    "file is corrupt, truncated or not the published checkpoint: not used")


def download_checkpoints(bundle_path: str | os.PathLike = ".", large_files: str = "large_files.yml",
                         progress: bool = True) -> list[Path]:
    """Fetch every file ``large_files.yml`` lists into ``bundle_path`` and keep it only if its sha256 matches.

    A file already in place is verified, not fetched again. A download goes to a temporary name beside its target
    and is moved into place only after its hash matched, so a mismatch or an interrupted download never leaves a
    file that a stage would read.

    Args:
        bundle_path: the folder the entries' ``path`` values are relative to (the bundles' root).
        large_files: the list, relative to ``bundle_path`` (as written by :func:`write_large_files`).
        progress: show MONAI's download progress bar.

    Returns:
        The verified files.

    Raises:
        ChecksumMismatchError: a file's sha256 differs (message: file, actual and expected hash).
    """
    root = Path(bundle_path)
    listing = root / large_files
    entries = (yaml.safe_load(listing.read_text()) or {}).get("large_files")
    if not entries:
        raise ValueError(f"{listing} lists no large_files")
    done = []
    for entry in entries:
        target = root / entry["path"]
        if target.is_file():
            _verify(target, entry, "existing file")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".download")
            partial.unlink(missing_ok=True)
            with warnings.catch_warnings():  # MONAI warns that no hash is given: the hash is checked below
                warnings.filterwarnings("ignore", message="No hash value provided")
                download_url(entry["url"], partial, hash_val=None, progress=progress)
            try:
                _verify(partial, entry, f"download of {entry['url']} for")
            except ChecksumMismatchError as err:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatchError(str(err).replace(f"{partial}:", f"{target}:")) from None
            os.replace(partial, target)
        done.append(target)
    return done
