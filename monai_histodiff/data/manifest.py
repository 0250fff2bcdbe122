"""
The generation manifest: the one schema of ``manifest.jsonl`` (and its per-rank parts ``manifest.rank<r>.jsonl``)
that HistoDiffusion's and the StyleGAN2 baseline's generation stages write, and the one reader that the generation
stages (to resume), selection, the judge and the experiment's pictures use.

One JSON object per line and per tile, with the fields of :data:`MANIFEST_FIELDS` (``file`` relative to the
manifest's folder, the requested ``class`` and ``class_index``, the tile ``index`` and ``seed``, the generation
settings, the hashes of the checkpoints used, and the generator's ``confidence`` in the requested class or null).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.data.validation import CorruptFileError

__all__ = [
    "MANIFEST_FIELDS",
    "MERGED_MANIFEST",
    "RANK_MANIFEST_GLOB",
    "read_manifest",
    "read_generation_manifest",
    "tile_filename",
]

#: Fields of every manifest row (a generator may add its own, e.g. StyleGAN2's ``truncation_psi``).
MANIFEST_FIELDS = (
    "file",
    "class",
    "class_index",
    "index",
    "seed",
    "guidance_scale",
    "guidance_window",
    "steps",
    "scheduler",
    "eta",
    "checkpoint_hashes",
    "confidence",
)
#: The merged manifest of a generation folder, and the pattern of its per-rank parts.
MERGED_MANIFEST = "manifest.jsonl"
RANK_MANIFEST_GLOB = "manifest.rank*.jsonl"

REMEDY_RERUN_GENERATE = ("rerun generate with the same output_dir: it regenerates the tiles that are missing or whose "
                         "manifest line is broken, and rewrites manifest.jsonl")


def tile_filename(class_name: str, index: int) -> str:
    """Path of a tile relative to the output folder: ``<CLASS>/<CLASS>_<index:06d>.png``."""
    return f"{class_name}/{class_name}_{int(index):06d}.png"


def read_manifest(path: str | os.PathLike, on_bad_line: str = "raise", missing_ok: bool = False,
                  reader: str = "read_manifest") -> list[dict[str, Any]]:
    """
    The rows of a manifest, in file order.

    A line that is not a JSON object with a ``file`` entry (e.g. the last line of a rank manifest cut by a kill) is,
    with ``on_bad_line="raise"`` (what reads a finished folder: selection, the judge), a
    :class:`~monai_histodiff.data.validation.CorruptFileError` naming the file, the line and the remedy (rerun
    generate, which repairs it); with ``"skip"`` (what a generation stage reads to resume) it is dropped, and its tile
    is made again. Empty lines are ignored.

    Args:
        path: the manifest.
        on_bad_line: ``"raise"`` or ``"skip"``.
        missing_ok: a missing file gives no rows instead of ``FileNotFoundError``.
        reader: what reads it, named in errors.
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line must be 'raise' or 'skip', got {on_bad_line!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise FileNotFoundError(f"generation manifest not found: {path}") from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) and "file" in row else "a manifest row needs a 'file' entry"
        except ValueError as e:
            problem = f"not valid JSON: {e}"
        if problem is None:
            rows.append(row)
        elif on_bad_line == "raise":
            raise CorruptFileError(path, f"{reader}, line {lineno}", REMEDY_RERUN_GENERATE, problem)
    return rows


def read_generation_manifest(path: str | os.PathLike, classes: Sequence[str]) -> list[dict[str, Any]]:
    """
    The tiles of a finished generation folder as datalist items, for selection, the judge and the pictures.

    Each row names its tile by ``file`` (relative to the manifest's folder, or absolute) and its requested class by
    ``class_index`` and / or ``class`` (they must agree); ``confidence`` is optional (null for a generator without
    one).

    Args:
        path: the ``manifest.jsonl`` written by a generation stage.
        classes: class names in index order (the datalist's ``classes``).

    Returns:
        One ``{"file": manifest entry, "image": absolute path, "label": index, "confidence": float or NaN}`` per row.

    Raises:
        FileNotFoundError: when the manifest or one of its tiles does not exist (both are named).
        CorruptFileError: on a line that is not a JSON object with ``file`` (a ``ValueError``), naming the line.
        ValueError: on a class not in ``classes``, an out-of-range ``class_index`` or a mismatch of the two (the line
            and the value are named), or an empty manifest.
    """
    path = Path(path)
    rows = read_manifest(path, reader="read_generation_manifest")
    base = path.parent.resolve()
    names = [str(c) for c in classes]
    items: list[dict[str, Any]] = []
    for lineno, row in enumerate(rows, start=1):
        where = f"{path}, row {lineno}"
        index = _class_index(row, names, where)
        image = Path(row["file"]) if os.path.isabs(row["file"]) else base / row["file"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: synthetic tile not found: {image}; {REMEDY_RERUN_GENERATE}")
        conf = row.get("confidence")
        items.append({"file": str(row["file"]), "image": str(image.resolve()), "label": index,
                      "confidence": float("nan") if conf is None else float(conf)})
    if not items:
        raise ValueError(f"generation manifest {path} lists no synthetic tiles.")
    return items


def _class_index(row: Mapping[str, Any], names: Sequence[str], where: str) -> int:
    """The requested class of a row, from ``class_index`` and / or ``class`` (checked against each other)."""
    index = row.get("class_index")
    name = row.get("class")
    if index is None and name is None:
        raise ValueError(f"{where}: a manifest row needs 'class_index' or 'class'.")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names):
            raise ValueError(f"{where}: class_index {index!r} is not an index into the datalist classes {list(names)}.")
    if name is not None:
        if str(name) not in names:
            raise ValueError(f"{where}: class {name!r} is not one of the datalist classes {list(names)}.")
        if index is not None and names[index] != str(name):
            raise ValueError(f"{where}: class_index {index} ({names[index]!r}) does not match class {name!r}.")
        index = names.index(str(name))
    return int(index)
