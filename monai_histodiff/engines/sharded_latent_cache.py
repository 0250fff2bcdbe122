# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The latent cache as a folder of shards, encoded by every rank of a run and read without loading it whole.

At the paper's scale a tile's posterior ``(mu, sigma)`` is 2 x 3x64x64 float32 values (96 KiB), so the 803k
pre-training tiles make about 79 GB: too much to build on one rank while the others wait, and too much for every rank
to hold in memory. :class:`~monai_histodiff.engines.latent_cache.LatentCache` (one ``.pt`` file, loaded whole) stays
for small sets; this module keeps the same content in shards.

Format (a folder, e.g. ``runs/pretrain_diffusion/latent_cache_<digest>/``)::

    shard_00000.mu.npy       [n, C, h, w] posterior means of items start .. start + n - 1 (float32, or float16)
    shard_00000.sigma.npy    [n, C, h, w] posterior standard deviations, same dtype
    shard_00000.labels.npy   [n] int64 class indices (labeled data only)
    shard_00000.json         the shard's record, written after its arrays: item range, byte size and sha256 of each
                             file, and statistics (for the signal-to-noise check without reading the arrays)
    ...
    index.json               written last, once every shard is finished: the shards, their item counts, byte sizes and
                             sha256, the latent shape and dtype, the sha256 of the autoencoder checkpoint, the tile
                             size, the digest of the datalist and the number of items

Why ``.npy`` files (their headers read with ``np.lib.format``, never ``allow_pickle``):

- no pickle: a shard loads without running anything from the file (an object array, the only way a ``.npy`` file can
  carry code, is refused), like the ``weights_only`` rule every other file of the package follows;
- random access per item: item ``i`` of a shard is one run of bytes of a flat file at a known offset (after the
  header), so a rank reads only the items it draws and never holds the whole cache;
- read by positional reads (``os.pread``) rather than through a memory map: the bytes land in the operating system's
  page cache, which the ranks on one node share and the kernel reclaims, and in the one batch being built. A memory map
  would count every page it touched (and the pages the kernel reads ahead around each fault) in the reader's resident
  set, which then grows with the part of the cache an epoch has visited (measured: 1.39 GB after 1,200 random items of
  a 1 GB cache, ``benchmarks/README.md``). Whole-array statistics of an old shard without recorded statistics still
  use a memory map, once;
- no extra dependency: numpy is already there (no zarr, HDF5 or LMDB to install and lock against concurrent readers).

Encoding in parallel: every rank of a torchrun run calls :func:`get_or_create_sharded_latent_cache` with the same
arguments. The unfinished shards, in order, are dealt round robin (on a fresh run shard ``k`` goes to rank
``k % world``), each rank encodes its shards and writes each one atomically (arrays first, then its ``.json`` record,
each a temporary file renamed into place), then, after a barrier, rank 0 writes ``index.json``. A run that stops
(killed, out of memory, a bad tile) leaves finished shards, each with its record, and nothing half-written: the next
run re-encodes only the shards without a record and shares them out over its own ranks.

Checks: the cache records the sha256 of the autoencoder checkpoint it was encoded with; a cache made with another
autoencoder (or for another datalist, tile size, dtype or shard size) is rebuilt with a warning naming the cache
folder and both autoencoders, as :func:`~monai_histodiff.engines.latent_cache.get_or_create_latent_cache` rebuilds a
single-file cache; :meth:`ShardedLatentCache.open` with an expected hash refuses it, naming both files. A shard that
is truncated, unreadable or holds another number of items than its record and the index say raises
:class:`~monai_histodiff.data.validation.CorruptFileError` naming the shard file and what to do: never a silently
short epoch.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import optional_import
from torch.utils.data import DataLoader, Dataset

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.validation import CorruptFileError
from monai_histodiff.engines.distributed import all_ranks_agree, barrier, get_rank, get_world_size, unwrap_model
from monai_histodiff.engines.latent_cache import CachedLatentDataset, LatentCache
from monai_histodiff.handlers.checkpoint import UnsafeCheckpointError, file_sha256

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "INDEX_NAME",
    "DEFAULT_SHARD_SIZE",
    "CACHE_DTYPES",
    "ShardedLatentCache",
    "encode_shards",
    "get_or_create_sharded_latent_cache",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
#: items per shard: about 200 MB of float32 posteriors per shard at the paper's 3x64x64 latents (96 KiB per tile)
DEFAULT_SHARD_SIZE = 2048
#: storage dtypes; float16 halves the folder but rounds mu and sigma (relative error ~5e-4): measure before using it
CACHE_DTYPES = ("float32", "float16")
_FORMAT = "monai_histodiff.sharded_latent_cache"
_FORMAT_VERSION = 1
_ARRAYS = ("mu", "sigma", "labels")
_READER = "ShardedLatentCache (latent cache shard)"
_INDEX_READER = "ShardedLatentCache (latent cache index)"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the shards of ``count`` items, ``shard_size`` items each (the last one shorter)."""
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def _shard_remedy(folder: Path, name: str) -> str:
    return (f"delete {folder / name}.* and {folder / INDEX_NAME}: the next run of the stage encodes that shard again "
            f"and keeps the others")


_INDEX_REMEDY = ("delete it: the next run of the stage writes it again from the finished shards (their shard_*.json "
                 "records) without encoding them again")


def _read_json(path: Path, reader: str, remedy: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, reader, remedy, f"not JSON: {e}") from None
    if not isinstance(value, dict) or value.get("format") != _FORMAT:
        raise CorruptFileError(path, reader, remedy, f"not a {_FORMAT} file")
    if value.get("format_version") != _FORMAT_VERSION:
        raise CorruptFileError(path, reader, remedy, f"format_version {value.get('format_version')!r}, this version "
                                                     f"reads {_FORMAT_VERSION}")
    return value


def _write_json(path: Path, value: Mapping[str, Any]) -> Path:
    text = json.dumps(value, indent=1)
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), fsync=True)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, read from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise ValueError("Fortran-ordered array")
        return tuple(shape), np.dtype(dtype), f.tell()


def _check_file(folder: Path, shard: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: np.dtype,
                sha256: bool = False) -> Path:
    """Check one array file of a shard against its record: present, the recorded size, a plain ``.npy`` of the
    expected shape and dtype (and the recorded sha256 when asked). Returns its path."""
    info = shard["files"][key]
    path = folder / info["file"]
    remedy = _shard_remedy(folder, shard["name"])
    if not path.is_file():
        raise CorruptFileError(path, _READER, remedy, "missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CorruptFileError(path, _READER, remedy, f"{size} bytes where its record says {info['bytes']}")
    try:
        found_shape, found_dtype, _ = _npy_header(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptFileError(path, _READER, remedy, f"not a readable .npy file: {e}") from None
    if found_dtype.hasobject:
        raise UnsafeCheckpointError(
            f"refused to load {path} (read by {_READER}): it holds Python objects, which only unpickling (which can "
            f"run code from the file) rebuilds; a latent cache shard holds numbers only. {remedy}")
    if found_shape != shape or found_dtype != dtype:
        raise CorruptFileError(path, _READER, remedy, f"holds {found_shape} {found_dtype} where the index says "
                                                      f"{shape} {dtype} ({shard['count']} items)")
    if sha256 and file_sha256(path) != info["sha256"]:
        raise CorruptFileError(path, _READER, remedy, "its sha256 differs from the one recorded when it was written")
    return path


# --- reading ---------------------------------------------------------------------------------------------------


def _pread(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes of file ``fd`` from ``offset`` (``os.pread`` where the platform has it; Windows seeks, which is
    safe because every read opens its own descriptor)."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


class _Part:
    """A run of items of a cache: one shard (files opened on first use) or arrays in memory."""

    def __init__(self, count: int, mu: Any = None, sigma: Any = None, labels: Any = None,
                 paths: Mapping[str, Path] | None = None, stats: Mapping[str, float] | None = None) -> None:
        self.count = int(count)
        self._mu, self._sigma, self._labels = mu, sigma, labels
        self.paths = dict(paths or {})
        self._stats = dict(stats) if stats is not None else None
        self.constant_label: int | None = None

    def __getstate__(self) -> dict[str, Any]:  # maps are reopened by the process that unpickles (workers)
        state = dict(self.__dict__)
        if self.paths:
            state["_mu"] = state["_sigma"] = state["_labels"] = None
        return state

    def rows(self, key: str, a: int, b: int) -> np.ndarray:
        """Items ``a .. b - 1`` of array ``key`` (``"mu"`` or ``"sigma"``) as a new array in the stored dtype.

        A shard on disk is opened, read with one positional read of the rows' bytes and closed (nothing is mapped, so
        the reader's resident memory is the rows it asked for, and no descriptor stays open: a rank may draw from
        hundreds of shards in an epoch); an in-memory part is sliced.
        """
        if key not in self.paths:
            return np.array((self._mu if key == "mu" else self._sigma)[a:b])
        layout = self.__dict__.setdefault("_layout", {})
        if key not in layout:  # item shape, dtype and data offset from the header, once
            shape, dtype, offset = _npy_header(self.paths[key])
            layout[key] = (shape[1:], dtype, offset)
        item_shape, dtype, offset = layout[key]
        item_bytes = int(np.prod(item_shape, dtype=np.int64)) * dtype.itemsize
        count = max(0, min(b, self.count) - a)
        nbytes = count * item_bytes
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        fd = os.open(self.paths[key], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            while done < nbytes:  # a positional read may return fewer bytes than asked
                chunk = _pread(fd, nbytes - done, offset + a * item_bytes + done)
                if not chunk:
                    raise CorruptFileError(self.paths[key], _READER, _shard_remedy(self.paths[key].parent,
                                                                                   self.paths[key].name.split(".")[0]),
                                           f"ends before item {a + done // max(item_bytes, 1)}")
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
        finally:
            os.close(fd)
        return np.frombuffer(buffer, dtype=dtype).reshape((count, *item_shape))

    def _map(self, key: str) -> np.ndarray:
        return np.load(self.paths[key], mmap_mode="r", allow_pickle=False)

    @property
    def mu(self) -> np.ndarray:
        """The whole ``mu`` array (memory-mapped: for one pass over a shard, e.g. its statistics)."""
        if self._mu is None:
            self._mu = self._map("mu")
        return self._mu

    @property
    def sigma(self) -> np.ndarray:
        """The whole ``sigma`` array (memory-mapped, as :attr:`mu`)."""
        if self._sigma is None:
            self._sigma = self._map("sigma")
        return self._sigma

    @property
    def has_labels(self) -> bool:
        return self.constant_label is not None or "labels" in self.paths or self._labels is not None

    def labels(self) -> np.ndarray | None:
        if self.constant_label is not None:
            return np.full(self.count, self.constant_label, dtype=np.int64)
        if "labels" in self.paths and self._labels is None:
            self._labels = self._map("labels")
        return None if self._labels is None else np.asarray(self._labels, dtype=np.int64)

    def label(self, j: int) -> int | None:
        if self.constant_label is not None:
            return self.constant_label
        if "labels" in self.paths and self._labels is None:
            self._labels = self._map("labels")
        return None if self._labels is None else int(self._labels[j])

    def with_constant_label(self, label: int) -> _Part:
        part = _Part(self.count, self._mu, self._sigma, self._labels, self.paths, self._stats)
        part.constant_label = int(label)
        return part

    def stats(self) -> dict[str, float]:
        """Moments of the part's ``mu`` values (count, mean, sum of squared deviations) and the sum of its sigmas."""
        if self._stats is None:
            self._stats = _array_stats(self.mu, self.sigma)
        return self._stats


def _array_stats(mu: Any, sigma: Any) -> dict[str, float]:
    m = torch.from_numpy(np.asarray(mu, dtype=np.float64)).reshape(-1)
    s = torch.from_numpy(np.asarray(sigma, dtype=np.float64)).reshape(-1)
    if m.numel() == 0:
        return {"values": 0, "mu_mean": 0.0, "mu_m2": 0.0, "sigma_sum": 0.0, "sigma_sq_sum": 0.0}
    mean = float(m.mean())
    return {"values": int(m.numel()), "mu_mean": mean, "mu_m2": float(((m - mean) ** 2).sum()),
            "sigma_sum": float(s.sum()), "sigma_sq_sum": float((s * s).sum())}


def _merge_moments(stats: Sequence[Mapping[str, float]]) -> tuple[int, float, float]:
    count, mean, m2 = 0, 0.0, 0.0
    for st in stats:
        n = int(st["values"])
        if n == 0:
            continue
        total = count + n
        delta = st["mu_mean"] - mean
        m2 += st["mu_m2"] + delta * delta * count * n / total
        mean += delta * n / total
        count = total
    return count, mean, m2


class ShardedLatentCache:
    """Posteriors ``(mu, sigma)`` of a set of tiles (and their labels, if any), read item by item from the shard
    files: the same content and methods as :class:`~monai_histodiff.engines.latent_cache.LatentCache` without
    loading it whole (``mu`` / ``sigma`` tensors of the whole set are not attributes here: use :meth:`in_memory` for a
    small cache, e.g. validation latents).

    Built by :meth:`open` (a cache folder) or :meth:`concatenate` (several caches, e.g. labeled and unlabeled tiles).
    Values come back as float32 tensors whatever the storage dtype.
    """

    def __init__(self, parts: Sequence[_Part], latent_shape: Sequence[int], autoencoder_sha256: str | None = None,
                 image_size: int | tuple[int, ...] | None = None, folder: str | os.PathLike | None = None,
                 dtype: str = "float32") -> None:
        self.parts = list(parts)
        self._latent_shape = tuple(int(v) for v in latent_shape)
        self.autoencoder_sha256 = autoencoder_sha256
        self.image_size = image_size
        self.folder = None if folder is None else Path(folder)
        self.dtype = dtype
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + part.count)
        self._labels: torch.Tensor | None = None

    # -- construction --

    @classmethod
    def open(cls, folder: str | os.PathLike, expected_autoencoder_sha256: str | None = None,
             autoencoder_path: str | os.PathLike | None = None, check: str = "size") -> ShardedLatentCache:
        """Open the cache in ``folder`` (written by :func:`get_or_create_sharded_latent_cache`).

        Args:
            folder: the cache folder, holding ``index.json``.
            expected_autoencoder_sha256: when given, the hash of the autoencoder checkpoint in use; a cache made with
                another autoencoder (or with no recorded hash) raises ``ValueError`` naming the folder and
                ``autoencoder_path``.
            autoencoder_path: the autoencoder checkpoint in use, named in that error.
            check: ``"size"`` (default) checks every shard file's byte size and ``.npy`` header against the index (a
                stat and a few hundred bytes per file); ``"sha256"`` also hashes every file (reads the whole cache).

        Raises:
            CorruptFileError: naming ``index.json`` or the shard file, when either is missing, truncated, unreadable
                or disagrees with the other (item counts, shape, dtype, size), and what to do.
            UnsafeCheckpointError: a shard file holds Python objects.
        """
        if check not in ("size", "sha256"):
            raise ValueError(f"check must be 'size' or 'sha256', got {check!r}")
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no latent cache in {folder}: {INDEX_NAME} is missing (an unfinished encode "
                                    f"leaves none; the stage that writes the cache resumes it)")
        index = _read_json(index_path, _INDEX_READER, _INDEX_REMEDY)
        build = index.get("build") or {}
        stored = build.get("autoencoder_sha256")
        if expected_autoencoder_sha256 is not None and stored != expected_autoencoder_sha256:
            raise ValueError(_other_autoencoder(folder, index, expected_autoencoder_sha256, autoencoder_path)
                             + ": delete the cache folder or point to the right autoencoder")
        return cls._from_index(folder, index, check)

    @classmethod
    def _from_index(cls, folder: Path, index: Mapping[str, Any], check: str = "size") -> ShardedLatentCache:
        index_path = folder / INDEX_NAME
        try:
            build = index["build"]
            latent_shape = tuple(int(v) for v in index["latent_shape"])
            dtype = np.dtype(index["dtype"])
            shards = list(index["shards"])
            count = int(index["count"])
            has_labels = bool(index["has_labels"])
            expected = shard_ranges(int(build["count"]), int(build["shard_size"]))
            starts = [(int(s["start"]), int(s["start"]) + int(s["count"])) for s in shards]
            for s in shards:
                s["name"], s["files"], s["stats"]  # noqa: B018 - present, checked below
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptFileError(index_path, _INDEX_READER, _INDEX_REMEDY, f"incomplete: {e!r}") from None
        if count != build["count"] or starts != expected:
            raise CorruptFileError(index_path, _INDEX_READER, _INDEX_REMEDY,
                                   f"its shards hold items {starts[:3]}... ({sum(b - a for a, b in starts)} items), "
                                   f"not the {build['count']} items in shards of {build['shard_size']} it records")
        parts = []
        for shard in shards:
            n = int(shard["count"])
            if set(shard["files"]) != ({"mu", "sigma", "labels"} if has_labels else {"mu", "sigma"}):
                raise CorruptFileError(index_path, _INDEX_READER, _INDEX_REMEDY,
                                       f"shard {shard['name']} lists files {sorted(shard['files'])}")
            paths = {key: _check_file(folder, shard, key, (n, *latent_shape), dtype, check == "sha256")
                     for key in ("mu", "sigma")}
            if has_labels:
                paths["labels"] = _check_file(folder, shard, "labels", (n,), np.dtype(np.int64), check == "sha256")
            parts.append(_Part(n, paths=paths, stats=shard["stats"]))
        image_size = build.get("image_size")
        return cls(parts, latent_shape, build.get("autoencoder_sha256"),
                   tuple(image_size) if isinstance(image_size, list) else image_size, folder, str(dtype))

    @classmethod
    def concatenate(cls, caches: Sequence[LatentCache | ShardedLatentCache],
                    constant_labels: Sequence[int | None] | None = None) -> ShardedLatentCache:
        """One cache holding the items of ``caches`` in order (nothing is copied).

        Args:
            caches: in-memory or sharded caches of one latent shape.
            constant_labels: per cache, a class index given to all of its items (e.g. the null class of unlabeled
                tiles), or None to keep its own labels.
        """
        if not caches:
            raise ValueError("concatenate needs at least one cache")
        constant_labels = list(constant_labels) if constant_labels is not None else [None] * len(caches)
        if len(constant_labels) != len(caches):
            raise ValueError(f"{len(constant_labels)} constant labels for {len(caches)} caches")
        shapes = {tuple(c.latent_shape) for c in caches}
        if len(shapes) != 1:
            raise ValueError(f"the caches hold latents of different shapes: {sorted(shapes)}")
        parts: list[_Part] = []
        for cache, label in zip(caches, constant_labels):
            own = _parts_of(cache)
            parts += own if label is None else [p.with_constant_label(label) for p in own]
        first = caches[0]
        return cls(parts, shapes.pop(), first.autoencoder_sha256, first.image_size)

    # -- what LatentCache offers --

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape ``(C, h, w)`` of one latent."""
        return self._latent_shape

    @property
    def labels(self) -> torch.Tensor | None:
        """Class indices ``[N]`` (int64), or None for unlabeled data (read once, then kept: 8 bytes per item)."""
        if self._labels is None:
            with_labels = [p.has_labels for p in self.parts]
            if not any(with_labels):
                return None
            if not all(with_labels):
                raise ValueError("some parts of this latent cache have labels and others not")
            self._labels = torch.from_numpy(np.concatenate([p.labels() for p in self.parts]))
        return self._labels

    def _locate(self, index: int) -> tuple[_Part, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a latent cache of {n} items")
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[k], index - self.offsets[k]

    def read_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """``(mu, sigma, label)`` of item ``index``: float32 tensors ``[C, h, w]`` and the class index (or None)."""
        part, j = self._locate(int(index))
        mu = torch.from_numpy(part.rows("mu", j, j + 1)[0].astype(np.float32, copy=False))
        sigma = torch.from_numpy(part.rows("sigma", j, j + 1)[0].astype(np.float32, copy=False))
        return mu, sigma, part.label(j)

    def iter_posteriors(self, chunk: int = 1024, start: int = 0, stop: int | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(mu, sigma)`` float32 tensors of items ``start .. stop - 1`` in runs of at most ``chunk`` items."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        for k, part in enumerate(self.parts):
            lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                i, j = a - self.offsets[k], b - self.offsets[k]
                yield (torch.from_numpy(part.rows("mu", i, j).astype(np.float32, copy=False)),
                       torch.from_numpy(part.rows("sigma", i, j).astype(np.float32, copy=False)))

    def posterior_signal_to_noise(self) -> float:
        """As :meth:`LatentCache.posterior_signal_to_noise`: the std of the posterior means over the mean posterior
        standard deviation (from the statistics each shard recorded when written: nothing is read)."""
        stats = [p.stats() for p in self.parts]
        count, _, m2 = _merge_moments(stats)
        mu_std = math.sqrt(m2 / (count - 1)) if count > 1 else float("nan")
        sigma_mean = sum(st["sigma_sum"] for st in stats) / max(count, 1)
        return float(mu_std / max(sigma_mean, 1e-12))

    def _spread(self) -> tuple[float, float]:
        stats = [p.stats() for p in self.parts]
        count, _, m2 = _merge_moments(stats)
        return (math.sqrt(m2 / (count - 1)) if count > 1 else float("nan"),
                sum(st["sigma_sum"] for st in stats) / max(count, 1))

    def warn_if_noisy(self, name: str, threshold: float = 2.0) -> float:
        """Log a warning naming ``name`` when :meth:`posterior_signal_to_noise` is below ``threshold``; return it."""
        snr = self.posterior_signal_to_noise()
        if snr < threshold:
            mu_std, sigma_mean = self._spread()
            logger.warning(
                "%s: the autoencoder's posteriors are mostly noise (std of the means %.3f vs mean sigma %.3f, ratio "
                "%.2f < %.1f): latents sampled from them hardly depend on the tile. Check the autoencoder's KL weight "
                "and training length.", name, mu_std, sigma_mean, snr, threshold)
        return snr

    def sample_latents(self, num: int, scale_factor: float, seed: int = 0) -> torch.Tensor:
        """As :meth:`LatentCache.sample_latents` (the same draws for the same content and seed): ``num`` latents
        ``scale_factor * (mu + sigma * eps)`` of distinct tiles drawn at random."""
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:num]
        items = [self.read_item(i) for i in index.tolist()]
        mu = torch.stack([it[0] for it in items]) if items else torch.zeros((0, *self.latent_shape))
        sigma = torch.stack([it[1] for it in items]) if items else torch.zeros((0, *self.latent_shape))
        eps = torch.randn(mu.shape, generator=generator)
        return float(scale_factor) * (mu + sigma * eps)

    def in_memory(self) -> LatentCache:
        """The whole cache as an in-memory :class:`LatentCache` (float32): for small caches only."""
        mus, sigmas = zip(*self.iter_posteriors(chunk=max(len(self), 1))) if len(self) else ((), ())
        empty = torch.zeros((0, *self.latent_shape))
        return LatentCache(torch.cat(mus) if mus else empty, torch.cat(sigmas) if sigmas else empty, self.labels,
                           self.autoencoder_sha256, self.image_size)

    def dataset(self, augment: bool = False) -> CachedLatentDataset:
        """A :class:`CachedLatentDataset` over this cache (the same items and augmentation as over a LatentCache)."""
        return CachedLatentDataset(self, augment=augment)

    def verify(self) -> None:
        """Hash every shard file and compare with the sha256 recorded when it was written (reads the whole cache).

        Raises:
            CorruptFileError: naming the first file that differs.
        """
        if self.folder is None:
            raise ValueError("only an opened cache folder can be verified")
        ShardedLatentCache.open(self.folder, check="sha256")


def _parts_of(cache: LatentCache | ShardedLatentCache) -> list[_Part]:
    if isinstance(cache, ShardedLatentCache):
        return list(cache.parts)
    labels = None if cache.labels is None else cache.labels.numpy()
    return [_Part(len(cache), cache.mu.numpy(), cache.sigma.numpy(), labels)]


def _other_autoencoder(folder: Path, index_or_marker: Mapping[str, Any], expected: str | None,
                       autoencoder_path: str | os.PathLike | None) -> str:
    stored = (index_or_marker.get("build") or {}).get("autoencoder_sha256")
    made_from = index_or_marker.get("autoencoder_ckpt")
    made = f"autoencoder hash {stored}" + (f" (from {made_from})" if made_from else "")
    in_use = f"the autoencoder in use{f', {autoencoder_path},' if autoencoder_path else ''} has hash {expected}"
    return f"latent cache {folder} was made with {made} but {in_use}"


# --- writing -----------------------------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would add a second ".npy" to the temporary name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _write_shard(folder: Path, k: int, start: int, mu: torch.Tensor, sigma: torch.Tensor,
                 labels: torch.Tensor | None, build: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write shard ``k``'s arrays, each atomically, then its record (which marks it finished); return the record."""
    name = shard_name(k)
    dtype = np.dtype(build["dtype"])
    arrays = {"mu": mu.numpy().astype(dtype, copy=False), "sigma": sigma.numpy().astype(dtype, copy=False)}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64, copy=False)
    files = {}
    for key, array in arrays.items():
        path = folder / f"{name}.{key}.npy"
        atomic_write(path, lambda p, a=array: _save_npy(p, a), fsync=True)
        files[key] = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    record = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "name": name, "shard": k, "start": start,
              "count": int(mu.shape[0]), "latent_shape": list(mu.shape[1:]), "files": files,
              "stats": _array_stats(arrays["mu"], arrays["sigma"]), "build": dict(build), **extra}
    _write_json(folder / f"{name}.json", record)
    return record


@torch.no_grad()
def encode_shards(
    folder: str | os.PathLike,
    autoencoder: nn.Module,
    dataset: Dataset,
    shards: Sequence[int],
    build: Mapping[str, Any],
    device: str | torch.device = "cpu",
    amp: bool = False,
    batch_size: int = 16,
    num_workers: int = 0,
    collate_fn: Any = None,
    progress: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Encode shards ``shards`` of ``dataset`` (items ``k * shard_size ..``) and write each as soon as it is full.

    Batches never cross a shard, so a shard's posteriors do not depend on which rank encodes it or with which other
    shards. The autoencoder runs in eval mode without gradients (its mode is restored after).

    Returns:
        the records of the written shards.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(int(build["count"]), int(build["shard_size"]))
    todo = sorted(int(k) for k in shards)
    for k in todo:  # a killed writer of an unfinished shard leaves its temporary files: this rank owns the shard now
        for stale in folder.glob(f".{shard_name(k)}.*.tmp"):
            stale.unlink(missing_ok=True)
    if not todo:
        return []
    batches = [list(range(a, min(a + batch_size, stop))) for k in todo
               for start, stop in [ranges[k]] for a in range(start, stop, batch_size)]
    if collate_fn is None:
        from monai.data import list_data_collate

        collate_fn = list_data_collate
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn)
    model = unwrap_model(autoencoder)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    records: list[dict[str, Any]] = []
    position = 0  # index into todo
    mus: list[torch.Tensor] = []
    sigmas: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    has_labels: bool | None = None
    iterator = tqdm(loader, total=len(batches), desc=f"encoding {len(todo)} latent shard(s)", leave=False) \
        if (progress and has_tqdm) else loader
    try:
        for batch, wanted in zip(iterator, batches):
            if not isinstance(batch, Mapping):
                raise TypeError(f"encode_shards expects dict batches with key {image_key!r}, got {type(batch)}")
            images = torch.as_tensor(batch[image_key]).to(device)
            if images.shape[0] != len(wanted):
                raise ValueError(f"a batch of items {wanted[0]}..{wanted[-1]} holds {images.shape[0]} tiles")
            with torch.autocast(device.type, enabled=amp):
                z_mu, z_sigma = model.encode(images)
            mus.append(z_mu.detach().float().cpu())
            sigmas.append(z_sigma.detach().float().cpu())
            label = batch.get(label_key)
            batch_has = isinstance(label, torch.Tensor) and label.numel() == len(wanted)
            if has_labels is None:
                has_labels = batch_has
            elif batch_has != has_labels:
                raise ValueError(f"some items have a {label_key!r} and others not (items {wanted[0]}..{wanted[-1]})")
            if batch_has:
                labels.append(label.reshape(-1).long().cpu())
            k = todo[position]
            if wanted[-1] == ranges[k][1] - 1:  # the shard is full: write it
                written_by = {"rank": get_rank(), "world_size": get_world_size()}
                records.append(_write_shard(folder, k, ranges[k][0], torch.cat(mus), torch.cat(sigmas),
                                            torch.cat(labels) if has_labels else None, build,
                                            {**dict(extra or {}), **written_by}))
                mus, sigmas, labels = [], [], []
                position += 1
    finally:
        model.train(was_training)
    return records


# --- get or create -------------------------------------------------------------------------------------------------


def _loader_parts(data: DataLoader | Dataset) -> tuple[Dataset, int, int, Any]:
    if isinstance(data, DataLoader):
        return data.dataset, int(data.batch_size or 16), int(data.num_workers), data.collate_fn
    return data, 16, 0, None


def _dataset_digest(dataset: Dataset) -> str | None:
    items = getattr(dataset, "data", None)
    if isinstance(items, Sequence) and items and all(
            isinstance(it, Mapping) and isinstance(it.get("image"), (str, os.PathLike)) for it in items):
        from monai_histodiff.data.datalist import items_digest

        return items_digest(items)
    return None


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The build settings in which a cache (index or shard record) differs from the one asked for."""
    out = []
    for key, value in wanted.items():
        if value is None and key in ("autoencoder_sha256", "datalist_digest", "image_size"):
            continue  # not known here: any value is accepted (as get_or_create_latent_cache without a hash)
        if stored.get(key) != value:
            out.append(key)
    return out


def _read_markers(folder: Path) -> dict[int, dict[str, Any]]:
    markers = {}
    for path in sorted(folder.glob("shard_*.json")):
        name = path.name[: -len(".json")]
        record = _read_json(path, _READER, _shard_remedy(folder, name))
        k = record.get("shard")
        if not isinstance(k, int) or shard_name(k) != name:
            raise CorruptFileError(path, _READER, _shard_remedy(folder, name), f"records shard {k!r}")
        markers[k] = record
    return markers


def _remove_cache_files(folder: Path) -> None:
    for pattern in (INDEX_NAME, "shard_*.npy", "shard_*.json", ".shard_*.tmp", f".{INDEX_NAME}.*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def _check_marker_files(folder: Path, record: Mapping[str, Any], has_labels: bool) -> None:
    n = int(record["count"])
    shape, dtype = (n, *record["latent_shape"]), np.dtype(record["build"]["dtype"])
    _check_file(folder, record, "mu", shape, dtype)
    _check_file(folder, record, "sigma", shape, dtype)
    if has_labels:
        _check_file(folder, record, "labels", (n,), np.dtype(np.int64))


def _write_index(folder: Path, build: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """Rank 0, once every shard has its record: check each against its files and write ``index.json``."""
    ranges = shard_ranges(int(build["count"]), int(build["shard_size"]))
    markers = _read_markers(folder)
    missing = [k for k in range(len(ranges)) if k not in markers]
    if missing:
        raise RuntimeError(f"latent cache {folder}: shards {missing[:5]} have no record after every rank finished "
                           f"encoding (was the folder changed by another run?)")
    records = [markers[k] for k in range(len(ranges))]
    shapes = {tuple(r["latent_shape"]) for r in records}
    labelled = {"labels" in r["files"] for r in records}
    if len(shapes) != 1 or len(labelled) != 1:
        raise RuntimeError(f"latent cache {folder}: shards disagree on the latent shape {sorted(shapes)} or on "
                           f"having labels")
    has_labels = labelled.pop()
    for k, record in enumerate(records):
        if (record["start"], record["start"] + record["count"]) != ranges[k] or _differences(record["build"], build):
            raise RuntimeError(f"latent cache {folder}: {shard_name(k)}.json does not belong to this cache")
        _check_marker_files(folder, record, has_labels)
    index = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "build": dict(build), "count": int(build["count"]),
             "latent_shape": list(shapes.pop()), "dtype": build["dtype"], "has_labels": has_labels, **extra,
             "shards": [{k: r[k] for k in ("name", "start", "count", "files", "stats")} for r in records]}
    return _write_json(folder / INDEX_NAME, index)


def get_or_create_sharded_latent_cache(
    folder: str | os.PathLike,
    autoencoder: nn.Module,
    data: DataLoader | Dataset,
    device: str | torch.device = "cpu",
    autoencoder_sha256: str | None = None,
    amp: bool = False,
    image_size: int | tuple[int, ...] | None = None,
    progress: bool = True,
    autoencoder_ckpt: str | os.PathLike | None = None,
    datalist_digest: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "float32",
    image_key: str = "image",
    label_key: str = "label",
) -> ShardedLatentCache:
    """Open the sharded cache in ``folder`` when it is complete and was made from these tiles with this autoencoder,
    else encode what is missing (every rank its share) and open it.

    Call it on every rank of a distributed run, with the same arguments (it synchronises the ranks), on a folder every
    rank sees (a shared file system across nodes, like the run's output folder: rank 0 indexes the shards the others
    wrote, and stops naming the shards it cannot find otherwise); in a single process it encodes alone. A cache made
    with another autoencoder, for another datalist, tile size, dtype or shard size is rebuilt with a warning naming the folder and both autoencoder checkpoints; a corrupt shard or index raises
    :class:`~monai_histodiff.data.validation.CorruptFileError` naming it.

    Args:
        folder: the cache folder (created).
        autoencoder: the frozen first-stage model (``encode(x) -> (mu, sigma)``).
        data: a non-augmenting, non-shuffling DataLoader over the tiles (its dataset, batch size, workers and collate
            function are used; batches are drawn per shard) or the dataset itself (batches of 16, no workers).
        device: device to encode on.
        autoencoder_sha256: hash of the autoencoder checkpoint; computed from ``autoencoder_ckpt`` when not given;
            ``None`` for both trusts any cache.
        amp: encode under autocast (stored as ``dtype`` either way).
        image_size: tile size, recorded and checked.
        progress: show a progress bar while encoding.
        autoencoder_ckpt: the autoencoder checkpoint file (named in messages, recorded in the index).
        datalist_digest: digest of the datalist (:func:`~monai_histodiff.data.items_digest`), recorded and checked;
            taken from ``dataset.data`` (a MONAI ``Dataset``'s list) when not given.
        shard_size: items per shard. A shard is the unit of resuming and of the work shared out between ranks: keep
            one shard's encoding well under the process group's timeout (minutes).
        dtype: ``"float32"`` (default) or ``"float16"`` storage. float16 halves the folder and the pages read per item
            but rounds mu and sigma; measure its effect on training before using it.
        image_key: key of the tiles in each batch.
        label_key: key of the class index in each batch (stored when every item has one).
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    folder = Path(folder)
    dataset, batch_size, num_workers, collate_fn = _loader_parts(data)
    if autoencoder_sha256 is None and autoencoder_ckpt is not None:
        autoencoder_sha256 = file_sha256(autoencoder_ckpt)
    count = len(dataset)
    if count == 0:
        raise ValueError(f"no tiles to encode into the latent cache {folder}")
    build = {"count": count, "shard_size": int(shard_size), "dtype": dtype, "autoencoder_sha256": autoencoder_sha256,
             "datalist_digest": datalist_digest or _dataset_digest(dataset),
             "image_size": list(image_size) if isinstance(image_size, tuple) else image_size}
    extra = {"autoencoder_ckpt": None if autoencoder_ckpt is None else os.fspath(autoencoder_ckpt)}
    ranges = shard_ranges(count, int(shard_size))
    rank, world = get_rank(), get_world_size()

    # 1. what is there: a finished cache, finished shards, or the latents of something else
    error: BaseException | None = None
    cache, stale, markers = None, "", {}
    try:
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            index = _read_json(index_path, _INDEX_READER, _INDEX_REMEDY)
            differs = _differences(index.get("build") or {}, build)
            if not differs:
                cache = ShardedLatentCache._from_index(folder, index)  # checks every shard against the index
            else:
                stale = _stale_message(folder, index, differs, build, autoencoder_ckpt)
        if cache is None and not stale:
            markers = _read_markers(folder) if folder.is_dir() else {}
            for record in markers.values():
                differs = _differences(record.get("build") or {}, build)
                if differs or record["shard"] >= len(ranges):
                    stale = _stale_message(folder, record, differs or ["count"], build, autoencoder_ckpt)
                    break
        if cache is None and not stale:
            for record in markers.values():  # finished shards must still hold what their record says
                _check_marker_files(folder, record, "labels" in record["files"])
    except BaseException as e:  # noqa: B902 - every rank must learn that one failed before anyone waits on the others
        error = e
    if not all_ranks_agree(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"another rank could not read the latent cache {folder} (its error is in its log)")
    if all_ranks_agree(cache is not None):
        return cache
    if not all_ranks_agree(not stale):
        warnings.warn(f"rebuilding the latent cache: {stale or folder}", stacklevel=2)
        barrier()  # every rank has read the folder before rank 0 empties it
        if rank == 0:
            _remove_cache_files(folder)
        markers = {}
    # 2. the unfinished shards, dealt round robin (on a fresh run: shard k to rank k % world)
    missing = [k for k in range(len(ranges)) if k not in markers]
    barrier()  # every rank has listed the finished shards before anyone writes one
    if missing:
        logger.info("latent cache %s: encoding %d of %d shards on %d rank(s)%s", folder, len(missing), len(ranges),
                    world, f" ({len(ranges) - len(missing)} finished before)" if len(missing) < len(ranges) else "")
    model_error: BaseException | None = None
    try:
        encode_shards(folder, autoencoder, dataset, missing[rank::world], build, device=device, amp=amp,
                      batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                      progress=progress and rank == 0,
                      image_key=image_key, label_key=label_key, extra=extra)
    except BaseException as e:  # noqa: B902 - the shards written so far stay; the other ranks must not wait forever
        model_error = e
    if not all_ranks_agree(model_error is None):
        if model_error is not None:
            raise model_error
        raise RuntimeError(f"another rank failed encoding the latent cache {folder} (its error is in its log); the "
                           f"finished shards are kept and the next run encodes the rest")
    # 3. rank 0 writes the index once every shard is finished
    barrier()
    index_error: BaseException | None = None
    if rank == 0:
        try:
            _write_index(folder, build, extra)
        except BaseException as e:  # noqa: B902
            index_error = e
    if not all_ranks_agree(index_error is None):
        if index_error is not None:
            raise index_error
        raise RuntimeError(f"rank 0 could not write the index of the latent cache {folder} (its error is in its log)")
    return ShardedLatentCache.open(folder, expected_autoencoder_sha256=autoencoder_sha256,
                                   autoencoder_path=autoencoder_ckpt)


def _stale_message(folder: Path, stored: Mapping[str, Any], differs: Sequence[str], build: Mapping[str, Any],
                   autoencoder_ckpt: str | os.PathLike | None) -> str:
    if "autoencoder_sha256" in differs:
        return _other_autoencoder(folder, stored, build["autoencoder_sha256"], autoencoder_ckpt)
    old = stored.get("build") or {}
    what = ", ".join(f"{key} {old.get(key)!r} (this run: {build.get(key)!r})" for key in differs)
    return f"latent cache {folder} was made for {what}"
