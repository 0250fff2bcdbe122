"""Input validation: find every unreadable, truncated, zero-byte or non-image file before a run starts.

A bad tile found halfway through an epoch would crash a long run; scanning first lets a run either continue
without the bad files (policy ``skip``, the list written next to the outputs) or stop at once naming them all
(policy ``error``). A tile larger than PIL's decompression-bomb limit, or far smaller than the training size
(``min_size``), is reported with that reason rather than crashing or being blown up from a few pixels.

The scan decodes every tile, so at scale (the paper's 803k tiles) it runs in a pool of threads or processes with a
progress bar, and keeps its verdicts in a small SQLite record (:class:`ScanRecord`, ``scan_record.sqlite`` beside the
listing) keyed by each file's path, size and modification time: a rerun over unchanged tiles decodes none of them
again, and a file that changed is decoded again.

The same faults in the files the stages write and read back (a checkpoint, latent cache or split file truncated by a
copy or a full disk) raise :class:`CorruptFileError`, naming the file and what to do; :func:`no_space_error` turns a
write that failed for lack of space into an error naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "BadFilesError",
    "CorruptFileError",
    "REMEDY_RERUN",
    "no_space_error",
    "check_image",
    "scan_images",
    "ScanRecord",
    "SCAN_RECORD_NAME",
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
    reason, width, height = _decode_verdict(path)
    return _with_min_size(reason, width, height, min_size)


def _with_min_size(reason: str | None, width: int | None, height: int | None, min_size: int | None) -> str | None:
    if reason is None and min_size is not None and width is not None and min(width, height) < min_size:
        return (f"too small: {width}x{height}, shorter side under min_size={min_size} (resizing it up to the "
                f"training size would invent the tissue)")
    return reason


def _decode_verdict(path: str | os.PathLike, max_pixels: int | None | bool = False
                    ) -> tuple[str | None, int | None, int | None]:
    """Decode ``path`` completely: ``(why it cannot be used or None, width, height)``, the size when it was read.

    This is the expensive step of the scan (one full decode per tile) and does not depend on ``min_size``, so its
    result is what :class:`ScanRecord` keeps. ``max_pixels`` (when not ``False``) is PIL's decompression-bomb limit
    to apply, for worker processes that do not share the caller's ``Image.MAX_IMAGE_PIXELS``.
    """
    if max_pixels is not False and Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    path = Path(path)
    width = height = None
    try:
        if not path.is_file():
            return "missing", None, None
        if path.stat().st_size == 0:
            return "zero-byte file", None, None
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:  # PIL only warns up to twice the limit: refuse before decoding
                return _bomb_reason(f"{width}x{height} = {width * height} pixels"), width, height
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated pixel data
            if im.width == 0 or im.height == 0:
                return "empty image", width, height
    except Image.DecompressionBombError as e:
        return _bomb_reason(str(e)), width, height
    except UnidentifiedImageError:
        return "not an image (unrecognised format)", width, height
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation and corruption as these
        return f"unreadable or truncated: {e}", width, height
    return None, width, height


def _bomb_reason(size: str) -> str:
    return (f"larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): "
            f"{size}; not decoded. Cut it into tiles first")


#: the record's file name, beside the listing it was made for
SCAN_RECORD_NAME = "scan_record.sqlite"


class ScanRecord:
    """The bad-file scan's verdicts, keyed by ``(absolute path, size, mtime_ns)``, in a SQLite file.

    A verdict (why the file cannot be used, or nothing, and its width and height) is reused only while the file has
    the same size and modification time, and was made under the same PIL decompression-bomb limit and Pillow version;
    anything else is decoded again. SQLite keeps each batch of verdicts as soon as it is committed (an interrupted scan
    keeps what it did), serialises concurrent writers, and needs no extra dependency. An unreadable record is only a
    cache: it is replaced by an empty one, with a warning.

    Args:
        path: the record file (created with its folder).
    """

    _SCHEMA = ("CREATE TABLE IF NOT EXISTS verdicts (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
               "mtime_ns INTEGER NOT NULL, max_pixels INTEGER, reason TEXT, width INTEGER, height INTEGER)",
               "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._connect()
        except sqlite3.DatabaseError as e:
            warnings.warn(f"the scan record {self.path} is unreadable ({e}): starting a new one (the tiles are "
                          f"decoded again)", stacklevel=2)
            for leftover in (self.path, self.path.with_name(self.path.name + "-journal")):
                leftover.unlink(missing_ok=True)
            self.conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=600)
        try:
            for statement in self._SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'pillow'").fetchone()
            if row is None or row[0] != PIL.__version__:  # another Pillow may judge files differently
                conn.execute("DELETE FROM verdicts")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('pillow', ?)", (PIL.__version__,))
            conn.commit()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def lookup(self, keys: Sequence[tuple[str, int, int]], max_pixels: int | None
               ) -> dict[str, tuple[str | None, int | None, int | None]]:
        """Verdicts ``{path: (reason, width, height)}`` of the ``(path, size, mtime_ns)`` keys the record holds."""
        found: dict[str, tuple[str | None, int | None, int | None]] = {}
        wanted = {path: (size, mtime) for path, size, mtime in keys}
        paths = list(wanted)
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            rows = self.conn.execute(
                f"SELECT path, size, mtime_ns, max_pixels, reason, width, height FROM verdicts WHERE path IN "
                f"({','.join('?' * len(chunk))})", chunk)
            for path, size, mtime, limit, reason, width, height in rows:
                if (size, mtime) == wanted[path] and limit == max_pixels:
                    found[path] = (reason, width, height)
        return found

    def store(self, rows: Sequence[tuple[str, int, int, int | None, str | None, int | None, int | None]]) -> None:
        """Keep ``(path, size, mtime_ns, max_pixels, reason, width, height)`` verdicts (committed at once)."""
        self.conn.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.conn.commit()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ScanRecord:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (every rank of a torchrun run lists the same tiles: the first
    one scans, the others wait and then find every verdict in the record). Where locking is not available (Windows,
    some network file systems) nothing is held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("another process is scanning with the record %s: waiting for it", path)
                fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        except OSError:  # e.g. ENOLCK on a network file system without a lock daemon
            held = False
        try:
            yield
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _scan_reasons(paths: Sequence[str], min_size: int | None, num_workers: int, record: str | os.PathLike | None,
                  executor: str, progress: bool) -> list[str | None]:
    """Why each of ``paths`` cannot be used (or None), decoding only the files the record has no verdict for."""
    workers = max(1, int(num_workers))
    limit = Image.MAX_IMAGE_PIXELS
    verdicts: dict[str, tuple[str | None, int | None, int | None]] = {}
    with contextlib.ExitStack() as stack:
        book = None
        if record is not None:
            record = Path(record)
            record.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive(record))
            book = stack.enter_context(ScanRecord(record))
        absolute = [os.path.abspath(p) for p in paths]
        unique = list(dict.fromkeys(absolute))
        with ThreadPoolExecutor(workers) as io_pool:  # stat is I/O: threads, even on a network file system
            stats = dict(zip(unique, io_pool.map(_stat, unique)))
        keys = [(p, *stats[p]) for p in unique if stats[p] is not None]
        if book is not None:
            verdicts.update(book.lookup(keys, limit))
        todo = [k for k in keys if k[0] not in verdicts]
        for p in unique:  # a missing file needs no decoding (and is not recorded: it may appear)
            if stats[p] is None:
                verdicts[p] = ("missing", None, None)
        if todo:
            bar = None
            if progress:
                from monai.utils import optional_import

                tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
                if has_tqdm:
                    bar = tqdm(total=len(todo), desc=f"checking tiles ({len(keys) - len(todo)} known from the scan "
                                                     f"record)", unit="tile", leave=False)
            pool_type = ProcessPoolExecutor if executor == "process" else ThreadPoolExecutor
            chunk = max(256, workers * 64)
            with pool_type(workers) as pool:
                for start in range(0, len(todo), chunk):
                    part = todo[start : start + chunk]
                    names = [k[0] for k in part]
                    if executor == "process":
                        results = list(pool.map(_decode_verdict, names, [limit] * len(names),
                                                chunksize=max(1, len(names) // (workers * 4))))
                    else:
                        results = list(pool.map(_decode_verdict, names))
                    verdicts.update(zip(names, results))
                    if book is not None:
                        book.store([(p, size, mtime, limit, *result)
                                    for (p, size, mtime), result in zip(part, results)])
                    if bar is not None:
                        bar.update(len(part))
            if bar is not None:
                bar.close()
        if book is not None and keys:
            logger.info("scanned %d files: %d decoded, %d verdicts from %s", len(keys), len(todo),
                        len(keys) - len(todo), record)
    return [_with_min_size(*verdicts[p], min_size) for p in absolute]


def scan_images(
    items: Sequence[dict[str, Any]],
    policy: str = "skip",
    report_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
    key: str = "image",
    min_size: int | None = None,
    record: str | os.PathLike | None = None,
    executor: str = "thread",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Check every item's image; keep the good ones and report the bad ones with path and reason.

    Args:
        items: datalist items.
        policy: ``"skip"`` (continue without bad files) or ``"error"`` (raise :class:`BadFilesError` naming them).
        report_dir: where to write ``bad_files.json`` when bad files are found.
        num_workers: threads (or processes) used to decode files.
        key: the item key holding the path.
        min_size: report tiles whose shorter side is below it (see :func:`check_image`).
        record: a :class:`ScanRecord` file (e.g. ``scan_record.sqlite`` beside the listing): files it holds a verdict
            for, with the same size and modification time, are not decoded again; new verdicts are added. Processes
            sharing one record take turns (a file lock), so the ranks of a run decode each tile once. None: no record.
        executor: ``"thread"`` (default; Pillow decodes without holding the GIL) or ``"process"`` (a process pool,
            for decoders that hold it).
        progress: show a progress bar over the files being decoded.

    Returns:
        ``(good_items, bad)`` with bad as ``[{"image": path, "reason": why}]``.
    """
    if policy not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {policy!r}")
    if executor not in ("thread", "process"):
        raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
    reasons = _scan_reasons([os.fspath(it[key]) for it in items], min_size, num_workers, record, executor, progress)
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
