"""Labeled datalists: class-folder trees, CSV/JSON datalists and the class-to-index map saved beside outputs.

A datalist is MONAI's decathlon-style JSON (``training``, ``validation``, ``test`` lists of ``{"image", "label"}``)
plus ``classes`` (names in index order). Image paths inside a datalist file are stored relative to that file, so a
datalist can be moved together with its data or shipped to another site.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "scan_class_folders",
    "read_labeled_list",
    "load_datalist",
    "write_datalist",
    "save_class_map",
    "class_counts",
    "items_digest",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _join(folder: str | os.PathLike, relative: str) -> str:
    """Absolute, normalised path of ``relative`` inside ``folder`` (lexically: symbolic links are kept)."""
    return os.path.normpath(os.path.join(os.path.abspath(folder), relative))


def list_images(folder: str | os.PathLike, recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted image files under ``folder`` (case-insensitive extension match); hidden files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    exts = tuple(e.lower() for e in extensions)
    return sorted(
        str(p) for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def scan_class_folders(
    root: str | os.PathLike, class_names: Sequence[str] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[dict[str, Any]], list[str]]:
    """Build a labeled list from a class-folder tree (the NCT-CRC-HE-100K layout ``root/<CLASS>/*.tif``).

    Args:
        root: folder holding one sub-folder per class.
        class_names: class names in index order; default: the sub-folder names, sorted. A name given here with no
            folder is an error (it would silently become a class with no examples).
        extensions: image file endings to accept.

    Returns:
        ``(items, classes)`` where items are ``{"image": absolute path, "label": index, "class": name}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(class_names) if class_names is not None else folders
    if not classes:
        raise ValueError(f"no class sub-folders in {root}: expected the layout <root>/<CLASS>/*.png")
    missing = [c for c in classes if c not in folders]
    if missing:
        raise ValueError(f"classes {missing} have no folder under {root} (found {folders})")
    items = []
    for index, name in enumerate(classes):
        for path in list_images(root / name, recursive=True, extensions=extensions):
            items.append({"image": os.path.abspath(path), "label": index, "class": name})
    if not items:
        raise ValueError(f"no images with endings {tuple(extensions)} under {root}")
    return items, classes


def read_labeled_list(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Read a labeled list from a CSV (columns ``image`` and ``label``) or a JSON datalist.

    ``label`` may be a class name or an index. Relative image paths are taken relative to the list file.
    For a JSON datalist all of ``training``, ``validation`` and ``test`` are returned together (each item keeps a
    ``split`` key); use :func:`load_datalist` to keep them apart.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = load_datalist(path)
        classes = list(class_names or data.get("classes") or [])
        items = [dict(it, split=split) for split in ("training", "validation", "test") for it in data.get(split, [])]
        return items, classes
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"{path}: a CSV datalist needs the columns 'image' and 'label'")
    raw = [r["label"] for r in rows]
    if class_names is None:
        class_names = sorted({str(r) for r in raw}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    classes = [str(c) for c in class_names]
    items = []
    for i, r in enumerate(rows):
        label = r["label"]
        if label in classes:
            index = classes.index(label)
        elif label.isdigit() and int(label) < len(classes):
            index = int(label)
        else:
            raise ValueError(f"{path}, row {i + 2}: label {label!r} is not one of {classes}")
        image = r["image"] if os.path.isabs(r["image"]) else _join(path.parent, r["image"])
        items.append({"image": image, "label": index, "class": classes[index]})
    return items, classes


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Load a datalist JSON written by :func:`write_datalist`, turning relative image paths into absolute ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    for split in ("training", "validation", "test", "unlabeled"):
        for item in data.get(split, []):
            if not os.path.isabs(item["image"]):
                item["image"] = _join(path.parent, item["image"])
    return data


def write_datalist(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a datalist JSON with image paths relative to the file, atomically (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(path.parent)  # lexical, like _join: the same paths come back through symbolic links
    out = dict(data)
    for split in ("training", "validation", "test", "unlabeled"):
        if split in data:
            out[split] = [dict(it, image=os.path.relpath(os.path.abspath(it["image"]), base)) for it in data[split]]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique per process: ranks may write the same list
    tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_class_map(classes: Sequence[str], folder: str | os.PathLike, filename: str = "classes.json") -> Path:
    """Save ``{"classes": [...], "class_to_index": {...}}`` next to an output, so every output names its labels."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(
        json.dumps({"classes": list(classes), "class_to_index": {c: i for i, c in enumerate(classes)}}, indent=1),
        encoding="utf-8",
    )
    return path


def class_counts(items: Iterable[dict], num_classes: int) -> list[int]:
    """Number of items per class index."""
    counts = [0] * num_classes
    for it in items:
        counts[int(it["label"])] += 1
    return counts


def items_digest(items: Iterable[dict], length: int = 12) -> str:
    """Short sha256 of the image paths and labels of a list: names a cache after the exact data it holds."""
    import hashlib

    h = hashlib.sha256()
    for it in sorted(items, key=lambda d: d["image"]):
        h.update(f"{os.path.abspath(it['image'])}|{it.get('label', '')}\n".encode())
    return h.hexdigest()[:length]
