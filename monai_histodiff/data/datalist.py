"""Labeled datalists: class-folder trees, CSV/JSON datalists and the class-to-index map saved beside outputs.

A datalist is MONAI's decathlon-style JSON (``training``, ``validation``, ``test`` lists of ``{"image", "label"}``)
plus ``classes`` (names in index order). Image paths inside a datalist file are stored relative to that file, so a
datalist can be moved together with its data or shipped to another site.

Items may carry a ``group`` (patient, slide or original-image id): tiles of one group are kept on one side of every
split (see :mod:`monai_histodiff.data.split`). Groups come from a ``group`` column of a CSV datalist or from a groups
file beside a class-folder tree (``groups.csv``, found automatically at the dataset root); without groups, exact
duplicate files are grouped by :func:`group_duplicate_files`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.validation import CorruptFileError

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
    "GROUPS_FILENAME",
    "find_groups_file",
    "read_groups_file",
    "attach_groups",
    "group_duplicate_files",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
GROUPS_FILENAME = "groups.csv"
DUPLICATE_GROUP_PREFIX = "sha256:"
#: groups of tiles cut from one whole-slide image: a slide may hold regions of several classes, drawn as one unit
SLIDE_GROUP_PREFIX = "slide:"

logger = logging.getLogger(__name__)


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
    root: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    groups_file: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Build a labeled list from a class-folder tree (the NCT-CRC-HE-100K layout ``root/<CLASS>/*.tif``).

    Args:
        root: folder holding one sub-folder per class.
        class_names: class names in index order; default: the sub-folder names, sorted. A name given here with no
            folder is an error (it would silently become a class with no examples).
        extensions: image file endings to accept.
        groups_file: CSV (``image,group`` or ``image,label,group``) naming each tile's group; default: ``groups.csv``
            at ``root`` when there is one (see :func:`find_groups_file`).

    Returns:
        ``(items, classes)`` where items are ``{"image": absolute path, "label": index, "class": name}``, plus
        ``"group"`` for the tiles the groups file names.
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
    groups_file = find_groups_file(root, groups_file)
    if groups_file is not None:
        attach_groups(items, groups_file, root=root, classes=classes)
    return items, classes


def read_labeled_list(
    path: str | os.PathLike, class_names: Sequence[str] | None = None, groups_file: str | os.PathLike | None = None
) -> tuple[list[dict], list[str]]:
    """Read a labeled list from a CSV (columns ``image``, ``label`` and optionally ``group``) or a JSON datalist.

    ``label`` may be a class name or an index. Relative image paths are taken relative to the list file. A ``group``
    column (patient / slide / original image id; an empty cell means the tile is its own group) keeps tiles of one
    group on one side of a split; ``groups_file`` (see :func:`attach_groups`) sets the groups instead.
    For a JSON datalist all of ``training``, ``validation`` and ``test`` are returned together (each item keeps a
    ``split`` key, and its ``group`` when it has one); use :func:`load_datalist` to keep them apart.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = load_datalist(path)
        classes = list(class_names or data.get("classes") or [])
        items = [dict(it, split=split) for split in ("training", "validation", "test") for it in data.get(split, [])]
        if groups_file is not None:
            attach_groups(items, groups_file, root=path.parent, classes=classes)
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
        item = {"image": image, "label": index, "class": classes[index]}
        if (r.get("group") or "").strip():
            item["group"] = r["group"].strip()
        items.append(item)
    if groups_file is not None:
        attach_groups(items, groups_file, root=path.parent, classes=classes)
    return items, classes


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Load a datalist JSON written by :func:`write_datalist`, turning relative image paths into absolute ones.

    Raises:
        FileNotFoundError: naming the file.
        CorruptFileError: naming the file and what to do, when it is truncated, not JSON, or not a datalist (a
            ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    remedy = ("delete it and rerun the stage that writes it (a split file is drawn again, the same, by any labeled "
              "stage run with the same dataset_dir, seed and split settings)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(path, "load_datalist", remedy, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(path, "load_datalist", remedy, f"a datalist is a JSON object, got {type(data).__name__}")
    for split in ("training", "validation", "test", "pool", "unlabeled"):
        for i, item in enumerate(data.get(split, [])):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise CorruptFileError(path, "load_datalist", remedy, f"{split}[{i}] has no 'image' path")
            if not os.path.isabs(item["image"]):
                item["image"] = _join(path.parent, item["image"])
    return data


def write_datalist(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a datalist JSON with image paths relative to the file, atomically (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(path.parent)  # lexical, like _join: the same paths come back through symbolic links
    out = dict(data)
    for split in ("training", "validation", "test", "pool", "unlabeled"):
        if split in data:
            out[split] = [dict(it, image=os.path.relpath(os.path.abspath(it["image"]), base)) for it in data[split]]
    return atomic_write(path, lambda p: p.write_text(json.dumps(out, indent=1), encoding="utf-8"))


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
    """Short sha256 of the image paths and labels of a list (and, for slide tiles, their location, level and size):
    names a cache after the exact data it holds."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda d: (d["image"], *d.get("location", ()))):
        region = (f"|{it['location']}|{it.get('level')}|{it.get('read_size')}|{it.get('size')}"
                  if "location" in it else "")
        h.update(f"{os.path.abspath(it['image'])}|{it.get('label', '')}{region}\n".encode())
    return h.hexdigest()[:length]


def find_groups_file(root: str | os.PathLike, groups_file: str | os.PathLike | None = None) -> Path | None:
    """The groups file to use for the dataset at ``root``: ``groups_file`` when given (it must exist), else
    ``root/groups.csv`` when there is one (logged, since it changes the split), else None."""
    if groups_file is not None:
        groups_file = Path(groups_file)
        if not groups_file.is_file():
            raise FileNotFoundError(f"groups_file not found: {groups_file}")
        return groups_file
    found = Path(root) / GROUPS_FILENAME
    if Path(root).is_dir() and found.is_file():
        logger.info("using the groups file found at the dataset root: %s (tiles of one group stay on one side)", found)
        return found
    return None


def read_groups_file(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows ``{"image", "group"[, "label"]}`` of a groups CSV (columns ``image,group`` or ``image,label,group``)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "image" not in columns or "group" not in columns:
            raise ValueError(f"{path}: a groups file needs the columns 'image' and 'group' (found {columns})")
        rows = []
        for i, r in enumerate(reader):
            if not (r.get("image") or "").strip() or not (r.get("group") or "").strip():
                raise ValueError(f"{path}, row {i + 2}: empty 'image' or 'group'")
            rows.append({k: r[k].strip() for k in ("image", "group", "label") if r.get(k) is not None})
    return rows


def attach_groups(
    items: Sequence[dict[str, Any]],
    groups_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
) -> int:
    """Set each item's ``group`` from a groups file, in place; return the number of items it named.

    Relative image paths in the file are taken relative to the file's folder, or, where that names no item, to
    ``root`` (the dataset root). A ``label`` column, when present, must agree with the item's class. Items the file
    does not name keep no group (each is its own group) and are counted in a warning; rows naming no item (a tile
    removed or skipped as unreadable) are ignored.

    Raises:
        ValueError: when the file names none of the items (wrong file or paths), or a label disagrees.
    """
    groups_file = Path(groups_file)
    if not groups_file.is_file():
        raise FileNotFoundError(f"groups_file not found: {groups_file}")
    bases = [groups_file.parent] + ([Path(root)] if root is not None else [])
    by_image = {os.path.normpath(os.path.abspath(it["image"])): it for it in items}
    named: set[int] = set()
    for row in read_groups_file(groups_file):
        candidates = [row["image"]] if os.path.isabs(row["image"]) else [_join(b, row["image"]) for b in bases]
        item = next((by_image[c] for c in candidates if c in by_image), None)
        if item is None:
            continue
        label = row.get("label")
        if label and classes is not None:
            expected = {str(item["label"]), str(classes[int(item["label"])])}
            if label not in expected:
                raise ValueError(
                    f"{groups_file}: {row['image']} has label {label!r} there but class "
                    f"{classes[int(item['label'])]!r} in the dataset"
                )
        named.add(id(item))
        item["group"] = row["group"]
    if items and not named:
        raise ValueError(
            f"groups file {groups_file} names none of the {len(items)} images (image paths are read relative to "
            f"{' or '.join(str(b) for b in bases)})"
        )
    missing = [it["image"] for it in items if id(it) not in named]
    if missing:
        warnings.warn(
            f"groups file {groups_file} does not name {len(missing)} of {len(items)} images; each is its own group: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
            stacklevel=2,
        )
    return len(named)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def group_duplicate_files(items: Sequence[dict[str, Any]], num_workers: int = 4) -> list[list[str]]:
    """Put byte-identical files (same sha256) into one group, in place, so copies never straddle a split.

    Meant for datasets without groups: items that already carry a ``group`` are left alone and not hashed. A
    duplicate set gets the group ``"sha256:<first 16 hex digits>"``, the same in any dataset, so a file present in
    both the labeled set and a separate test set is caught too. Warns naming the first few sets.

    Returns:
        the duplicate sets found, each a sorted list of image paths (largest sets first).
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [it for it in items if "group" not in it]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        digests = list(pool.map(lambda it: _sha256(it["image"]), todo))
    by_digest: dict[str, list[dict[str, Any]]] = {}
    for it, digest in zip(todo, digests):
        by_digest.setdefault(digest, []).append(it)
    sets = []
    for digest, same in by_digest.items():
        if len(same) > 1:
            for it in same:
                it["group"] = DUPLICATE_GROUP_PREFIX + digest[:16]
            sets.append(sorted(os.path.abspath(it["image"]) for it in same))
    sets.sort(key=lambda s: (-len(s), s[0]))
    if sets:
        shown = "; ".join(" = ".join(s) for s in sets[:3])
        warnings.warn(
            f"{len(sets)} set(s) of byte-identical files ({sum(len(s) for s in sets)} files) are grouped to stay on one "
            f"side of the split: {shown}{' ...' if len(sets) > 3 else ''}",
            stacklevel=2,
        )
    return sets
