"""Input validation: find every unreadable, truncated, zero-byte or non-image file before a run starts.

A bad tile found halfway through an epoch would crash a long run; scanning first lets a run either continue
without the bad files (policy ``skip``, the list written next to the outputs) or stop at once naming them all
(policy ``error``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = ["BadFilesError", "check_image", "scan_images"]


class BadFilesError(RuntimeError):
    """Raised with policy ``error`` when a dataset holds files that cannot be read as images."""


def check_image(path: str | os.PathLike) -> str | None:
    """Return why ``path`` cannot be used as an image tile, or None when it decodes completely."""
    path = Path(path)
    try:
        if not path.is_file():
            return "missing"
        if path.stat().st_size == 0:
            return "zero-byte file"
        with Image.open(path) as im:
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated pixel data
            if im.width == 0 or im.height == 0:
                return "empty image"
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation and corruption as these
        return f"unreadable or truncated: {e}"
    except Image.DecompressionBombError as e:
        return f"refused: {e}"
    return None


def scan_images(
    items: Sequence[dict[str, Any]],
    policy: str = "skip",
    report_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
    key: str = "image",
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Check every item's image; keep the good ones and report the bad ones with path and reason.

    Args:
        items: datalist items.
        policy: ``"skip"`` (continue without bad files) or ``"error"`` (raise :class:`BadFilesError` naming them).
        report_dir: where to write ``bad_files.json`` when bad files are found.
        num_workers: threads used to decode files.
        key: the item key holding the path.

    Returns:
        ``(good_items, bad)`` with bad as ``[{"image": path, "reason": why}]``.
    """
    if policy not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {policy!r}")
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        reasons = list(pool.map(lambda it: check_image(it[key]), items))
    good = [it for it, r in zip(items, reasons) if r is None]
    bad = [{"image": str(it[key]), "reason": r} for it, r in zip(items, reasons) if r is not None]
    if bad and report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "bad_files.json").write_text(json.dumps(bad, indent=1), encoding="utf-8")
    if bad and policy == "error":
        listing = "\n".join(f"  {b['image']}: {b['reason']}" for b in bad)
        raise BadFilesError(f"{len(bad)} of {len(items)} files cannot be read as images:\n{listing}")
    return good, bad
