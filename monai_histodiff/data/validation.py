"""Input validation: find every unreadable, truncated, zero-byte or non-image file before a run starts.

A bad tile found halfway through an epoch would crash a long run; scanning first lets a run either continue
without the bad files (policy ``skip``, the list written next to the outputs) or stop at once naming them all
(policy ``error``). A tile larger than PIL's decompression-bomb limit, or far smaller than the training size
(``min_size``), is reported with that reason rather than crashing or being blown up from a few pixels.

The same faults in the files the stages write and read back (a checkpoint, latent cache or split file truncated by a
copy or a full disk) raise :class:`CorruptFileError`, naming the file and what to do; :func:`no_space_error` turns a
write that failed for lack of space into an error naming the file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "BadFilesError",
    "CorruptFileError",
    "REMEDY_RERUN",
    "no_space_error",
    "check_image",
    "scan_images",
    "check_class_images",
]

#: What to do about a corrupt file that a stage of the pipeline writes.
REMEDY_RERUN = "delete it and rerun the stage that writes it (or copy it again, if it came from elsewhere)"


class BadFilesError(RuntimeError):
    """Raised with policy ``error`` when a dataset holds files that cannot be read as images."""


class CorruptFileError(ValueError):
    """A file a stage reads back (checkpoint, latent cache, datalist, manifest) is truncated or corrupt.

    The message names the file, what was reading it and what to do, e.g. delete it and rerun the stage that writes
    it; nothing else is lost, since every such file is written whole (temporary file, then rename) or appended line
    by line.

    Args:
        path: the file.
        reader: what was reading it (a stage, a loader), named in the message.
        remedy: what to do (default :data:`REMEDY_RERUN`).
        detail: what was wrong (the underlying error), shortened to its first line.
    """

    def __init__(self, path: str | os.PathLike, reader: str, remedy: str = REMEDY_RERUN, detail: str = "") -> None:
        self.path, self.reader, self.remedy = os.fspath(path), reader, remedy
        self.detail = (str(detail).strip().splitlines() or [""])[0][:300]
        why = f" ({self.detail})" if self.detail else ""
        super().__init__(f"{self.path} (read by {reader}) is truncated or corrupt{why}: {remedy}")

    def __reduce__(self):  # rebuilt from its arguments when sent between processes
        return type(self), (self.path, self.reader, self.remedy, self.detail)


def no_space_error(path: str | os.PathLike, error: BaseException) -> OSError | None:
    """An ``OSError(ENOSPC)`` naming ``path`` when ``error`` (raised writing it) came from a full disk, else None.

    A full disk shows as ``OSError(ENOSPC)`` from Python's own writes but as an unhelpful ``RuntimeError`` from
    ``torch.save``'s archive writer (e.g. "unexpected pos 704 vs 598"); that one is put down to a full disk when the
    file system holding ``path`` has under 1 MiB left to the process. Call it before removing the partial file.
    """
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        full = True
    elif isinstance(error, RuntimeError):
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(path)))
            full = st.f_bavail * st.f_frsize < (1 << 20)
        except (OSError, AttributeError):  # no statvfs (Windows) or the folder is gone
            full = False
    else:
        full = False
    if not full:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} while writing it (free some space and rerun; files "
                                 f"written before are intact)", os.fspath(path))


def check_image(path: str | os.PathLike, min_size: int | None = None) -> str | None:
    """Return why ``path`` cannot be used as an image tile, or None when it decodes completely.

    Args:
        path: the image file.
        min_size: when given, a tile whose shorter side is below it is reported (e.g. ``image_size // 4``: resizing
            such a tile up to the training size would invent the tissue).
    """
    path = Path(path)
    try:
        if not path.is_file():
            return "missing"
        if path.stat().st_size == 0:
            return "zero-byte file"
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:  # PIL only warns up to twice the limit: refuse before decoding
                return _bomb_reason(f"{width}x{height} = {width * height} pixels")
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated pixel data
            if im.width == 0 or im.height == 0:
                return "empty image"
        if min_size is not None and min(width, height) < min_size:
            return (f"too small: {width}x{height}, shorter side under min_size={min_size} (resizing it up to the "
                    f"training size would invent the tissue)")
    except Image.DecompressionBombError as e:
        return _bomb_reason(str(e))
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation and corruption as these
        return f"unreadable or truncated: {e}"
    return None


def _bomb_reason(size: str) -> str:
    return (f"larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): "
            f"{size}; not decoded. Cut it into tiles first")


def scan_images(
    items: Sequence[dict[str, Any]],
    policy: str = "skip",
    report_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
    key: str = "image",
    min_size: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Check every item's image; keep the good ones and report the bad ones with path and reason.

    Args:
        items: datalist items.
        policy: ``"skip"`` (continue without bad files) or ``"error"`` (raise :class:`BadFilesError` naming them).
        report_dir: where to write ``bad_files.json`` when bad files are found.
        num_workers: threads used to decode files.
        key: the item key holding the path.
        min_size: report tiles whose shorter side is below it (see :func:`check_image`).

    Returns:
        ``(good_items, bad)`` with bad as ``[{"image": path, "reason": why}]``.
    """
    if policy not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {policy!r}")
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        reasons = list(pool.map(lambda it: check_image(it[key], min_size), items))
    good = [it for it, r in zip(items, reasons) if r is None]
    bad = [{"image": str(it[key]), "reason": r} for it, r in zip(items, reasons) if r is not None]
    if bad and report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "bad_files.json").write_text(json.dumps(bad, indent=1), encoding="utf-8")
    if bad and policy == "error":
        listing = "\n".join(f"  {b['image']}: {b['reason']}" for b in bad)
        raise BadFilesError(f"{len(bad)} of {len(items)} files cannot be read as images:\n{listing}")
    return good, bad


def check_class_images(
    items: Sequence[dict[str, Any]], classes: Sequence[str], source: str | os.PathLike, bad: Sequence[dict] = ()
) -> None:
    """Refuse a labeled dataset a class-guided model cannot learn from: fewer than two classes, or a class with no
    readable image.

    Args:
        items: the readable items (``label`` indices into ``classes``), e.g. the good items of :func:`scan_images`.
        classes: the class names in index order.
        source: the dataset (a class-folder root, whose ``<source>/<CLASS>`` folder is named, or a list file).
        bad: the unreadable items :func:`scan_images` reported (counted in the message).

    Raises:
        ValueError: naming the dataset, and the class and its folder.
    """
    if len(classes) < 2:
        raise ValueError(
            f"{source} holds a single class ({list(classes)}): class-guided generation and its classifiers need at "
            f"least two classes (one sub-folder, or one label, per class)"
        )
    present = {int(it["label"]) for it in items}
    for index, name in enumerate(classes):
        if index in present:
            continue
        where = Path(source) / name if Path(source).is_dir() else Path(source)
        unreadable = sum(1 for b in bad if Path(where) in Path(b["image"]).parents) if Path(source).is_dir() else 0
        raise ValueError(
            f"class {name!r} has no readable image in {where}"
            + (f" ({unreadable} unreadable file(s), listed in bad_files.json)" if unreadable else "")
            + ": add its tiles or leave the class out (class_names)"
        )
