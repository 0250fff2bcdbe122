"""Whole-file writes: every file a stage writes (checkpoints, caches, datalists, manifests, tiles, grids, reports)
appears complete or not at all, so a kill or a full disk never leaves a half-written file for the next stage to read."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai_histodiff.data.validation import no_space_error

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """
    Write ``path`` whole: ``write(tmp)`` fills a temporary file beside it (``.<name>.<pid>.tmp``, unique per process,
    so ranks never share one), which is then renamed over ``path``.

    A failure leaves the previous ``path`` untouched and no temporary file behind; a full disk (``OSError(ENOSPC)``,
    or the ``RuntimeError`` ``torch.save`` raises for it) becomes ``OSError(ENOSPC)`` naming ``path``.

    Args:
        path: the file to write; its folder is created.
        write: ``write(tmp_path)`` writes the whole content to ``tmp_path`` (e.g. ``lambda p: torch.save(obj, p)``);
            it may raise to abandon the write.
        fsync: flush the temporary file to disk before the rename (for files whose loss after a power cut matters:
            tiles and manifests a rerun resumes from).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = no_space_error(path, e)
        if full is None:
            raise
        raise full from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
