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
"""
Guided tile generation: the engine behind ``bundles/generate.json``.

:class:`GuidedTileGenerator` samples class-conditional synthetic tiles with
:class:`~monai_histodiff.inferers.ClassifierGuidedLatentDiffusionInferer` and writes them as
``<output_dir>/<CLASS>/<CLASS>_<index:06d>.png`` plus one manifest row per tile. It is deterministic per tile
(independent of batch size and of how the work is sharded over ranks), resumable after a kill, and shardable over
ranks without coordination beyond a final barrier. Everything but the sampling (layout, manifest, seeds, sharding,
resume, lock, grids) lives in :class:`TileGenerator`, which the StyleGAN2 baseline's
:class:`~monai_histodiff.engines.stylegan2.GanTileGenerator` shares.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.networks.schedulers import Scheduler
from monai.utils import optional_import
from PIL import Image

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.manifest import (
    MANIFEST_FIELDS,
    MERGED_MANIFEST,
    RANK_MANIFEST_GLOB,
    read_manifest,
    tile_filename,
)
from monai_histodiff.data.transforms import to_uint8_image
from monai_histodiff.data.validation import no_space_error
from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.engines.locking import LOCK_NAME, OutputLock
from monai_histodiff.handlers.image_grid import tile_mosaic
from monai_histodiff.inferers.guided import ClassifierGuidedLatentDiffusionInferer
from monai_histodiff.schedulers.per_sample import (
    PerSampleNoiseDDIMScheduler,
    PerSampleNoiseDDPMScheduler,
    per_sample_sampler,
)
from monai_histodiff.selection.rules import quotas_from_ratio

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["GUIDANCE_CHECK_OFFSET", "GuidedTileGenerator", "TileGenerator", "merge_manifests", "tile_seed"]

logger = logging.getLogger(__name__)


def _guidance_ratio(trace: Sequence[Mapping[str, float]], parts: int = 4) -> list[dict[str, float]]:
    """The guidance term's size over the model term's, averaged over the guided steps of each quarter of the
    trajectory (from high noise to low): where guidance acts, and how strongly against what the model does."""
    steps = [s for s in trace if s["guidance_norm"] > 0]
    if not steps:
        return []
    ts = sorted({s["t"] for s in steps}, reverse=True)
    out = []
    for k in range(parts):
        chunk = set(ts[k * len(ts) // parts:(k + 1) * len(ts) // parts])
        rows = [s for s in steps if s["t"] in chunk]
        if rows:
            out.append({"t_max": max(chunk), "t_min": min(chunk), "ratio": sum(
                s["guidance_norm"] / max(s["model_norm"], 1e-12) for s in rows) / len(rows)})
    return out


#: tile indices of :meth:`GuidedTileGenerator.guidance_check`: far above any pool's, so the check never reuses the
#: noise of a tile it might write
GUIDANCE_CHECK_OFFSET = 10**9


def tile_seed(seed: int, class_index: int, index: int) -> int:
    """
    The seed of tile ``index`` of class ``class_index``: the first 8 bytes of
    ``sha256(f"{seed}:{class_index}:{index}")`` as a big-endian integer, masked to 63 bits.

    A hash (not a linear formula such as ``seed * 1_000_003 + c * 10_007 + i``) so that no two tiles of any class
    share a seed however many tiles a class gets, and so that neighbouring seeds are unrelated. Stable across
    Python / torch versions and platforms.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def _manifest_files(output_dir: str) -> list[str]:
    """Every manifest of ``output_dir`` (rank files and the merged one), oldest modification first."""
    paths = glob.glob(os.path.join(glob.escape(output_dir), RANK_MANIFEST_GLOB))
    merged = os.path.join(output_dir, MERGED_MANIFEST)
    if os.path.isfile(merged):
        paths.append(merged)
    return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))


def _valid_rows(output_dir: str, paths: Iterable[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows of ``paths`` whose PNG exists, one per ``(class, index)``; a later row (newer file, later line) wins."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        for row in read_manifest(path, on_bad_line="skip", missing_ok=True, reader="generate (resume)"):
            if "class" in row and "index" in row and os.path.isfile(os.path.join(output_dir, str(row["file"]))):
                rows[(str(row["class"]), int(row["index"]))] = row
    return rows


def _write_jsonl_atomic(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write JSON lines whole (temporary file, then rename). A file that already holds exactly these lines is left
    untouched, so that rerunning a finished stage keeps its manifests' modification times (the experiment runner
    reuses what is newer than its inputs)."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), fsync=True)


def merge_manifests(output_dir: str | os.PathLike) -> str:
    """
    Merge the rank manifests ``manifest.rank<r>.jsonl`` of ``output_dir`` (and any previous ``manifest.jsonl``) into
    ``manifest.jsonl``, sorted by ``(class, index)``, one row per tile.

    Unparsable lines and rows whose PNG is missing are dropped. When a tile has several rows (it was regenerated
    after its PNG was lost), the row from the most recently modified file wins, the later line within a file.
    The merged file is written to a temporary file and renamed, so readers never see a partial one.

    Returns:
        the path of the merged manifest.
    """
    output_dir = os.fspath(output_dir)
    rows = _valid_rows(output_dir, _manifest_files(output_dir))
    path = os.path.join(output_dir, MERGED_MANIFEST)
    _write_jsonl_atomic(path, (rows[k] for k in sorted(rows)))
    return path


class TileGenerator:
    """
    The part of a tile generation stage that does not depend on the generative model: per-tile seeds, the output
    layout and manifest, sharding over ranks, resume after a kill, the one-writer lock, full-disk handling and the
    class grids. :class:`GuidedTileGenerator` (HistoDiffusion) and
    :class:`~monai_histodiff.engines.stylegan2.GanTileGenerator` (the StyleGAN2 baseline) subclass it, so that both
    write folders that the selection, training and evaluation stages read the same way.

    A subclass implements :meth:`generate_batch` (the tiles of a list of ``(class_index, index)`` pairs, each drawn
    from the generator :meth:`tile_generator` gives it), :meth:`_settings` (the generation settings recorded in every
    manifest row: the :data:`MANIFEST_FIELDS` other than ``file``, ``class``, ``class_index``, ``index``, ``seed`` and
    ``confidence``) and :meth:`_models` (the networks moved to the device and put in eval mode at the start of a run);
    optionally :meth:`_prepare`, whose result :meth:`run` passes to every :meth:`generate_batch` call.

    Output layout::

        output_dir/<CLASS>/<CLASS>_<index:06d>.png     one tile (written to a temporary file, then renamed)
        output_dir/manifest.rank<r>.jsonl              one row per finished tile of rank r (see MANIFEST_FIELDS)
        output_dir/manifest.jsonl                      merged rows, sorted by (class, index) (see merge_manifests)
        output_dir/grids/<CLASS>.png                   the first up to 16 tiles of the class

    Determinism. Tile ``index`` of class ``c`` gets its own CPU ``torch.Generator`` seeded with
    :func:`tile_seed` ``(seed, c, index)`` (:meth:`tile_generator`), from which a subclass draws all of the tile's
    randomness; a tile therefore does not depend on the batch size, on which other tiles share its batch, or on the
    rank that makes it, up to the floating-point behaviour of the networks for different batch sizes.

    Sharding. The work list is every ``(class, index)`` pair, classes in ``class_names`` order and indices
    ascending; rank ``r`` of ``W`` takes the pairs whose position ``p`` satisfies ``p % W == r``. ``rank`` and
    ``world_size`` default to the initialised process group, else 0 and 1; passing them explicitly runs one shard
    without ``torch.distributed``.

    Resume. A tile is done when a manifest row for it exists (in any manifest of ``output_dir``) and its PNG
    exists. On start, this rank rewrites its own manifest keeping only such rows (which also drops a last line
    truncated by a kill); PNGs without a row are regenerated and overwritten, rows without a PNG are dropped and
    their tiles regenerated. Rows are appended only after the batch's PNGs are complete, and flushed and fsynced
    per batch, so rerunning after a kill completes exactly the missing tiles.

    One writer. :meth:`run` holds a lock file in ``output_dir`` naming its pid (``.lock`` for rank 0,
    ``.lock.rank<r>`` for rank ``r``, see :class:`~monai_histodiff.engines.locking.OutputLock`): a second run on the
    same folder refuses, naming the holder; a lock left by a killed run is taken over with a warning.

    Full disk. A tile or manifest write that runs out of space raises ``OSError(ENOSPC)`` naming the file; the
    partial tile is removed, finished tiles and their rows are intact, and a rerun completes the rest.

    Args:
        class_names: class names in label-index order (also the folder and file name prefixes).
        counts: tiles to generate per class, ``{name: count}`` (missing names: 0) or one count per class.
        output_dir: the output folder.
        batch_size: tiles per batch.
        seed: base seed of :func:`tile_seed`.
        device: device to generate on; CUDA when available if None.
        checkpoint_hashes: hashes of the checkpoints used, recorded in every row.
        rank: this process's shard; from ``torch.distributed`` (else 0) when None.
        world_size: number of shards; from ``torch.distributed`` (else 1) when None.
        progress: show a tqdm progress bar over this rank's tiles.
        grid_size: number of tiles in each class's sample grid (0: no grids).
        background_writer: encode and write each batch's PNG tiles and manifest rows in a background thread while
            the next batch is sampled (at most one batch waits; an interrupted run still writes the batches it
            sampled); False writes them before sampling the next batch.
    """

    #: the stage's name, in the lock's owner and the progress bar.
    stage = "generate"
    #: values of settings that rows written before the setting existed had (not a change of settings).
    setting_defaults: dict[str, Any] = {"guidance_interval": 1}

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        counts: Mapping[str, int] | Sequence[int],
        output_dir: str | os.PathLike,
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        checkpoint_hashes: Mapping[str, str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        grid_size: int = 16,
        background_writer: bool = True,
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {self.class_names}.")
        for name in self.class_names:
            if not name or name in (".", "..") or "/" in name or os.sep in name:
                raise ValueError(f"class name {name!r} cannot be used as a folder name.")
        self.counts = self._resolve_counts(counts, self.class_names)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        is_dist = dist.is_available() and dist.is_initialized()
        self.rank = int(rank) if rank is not None else (dist.get_rank() if is_dist else 0)
        self.world_size = int(world_size) if world_size is not None else (dist.get_world_size() if is_dist else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}.")
        self.output_dir = os.fspath(output_dir)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.checkpoint_hashes = dict(checkpoint_hashes or {})
        self.progress = progress
        self.grid_size = int(grid_size)
        self.background_writer = bool(background_writer)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def counts_from_ratio(real_counts: Sequence[int], ratio: float) -> list[int]:
        """
        Tiles to generate per class for an augmentation ratio (the paper's 50/100/200/300 %): ``round(ratio * n)``
        for each real class count ``n`` (Python's round, half to even; same as
        :func:`monai_histodiff.selection.quotas_from_ratio`).
        """
        quotas = quotas_from_ratio(list(real_counts), ratio)
        return [quotas[k] for k in range(len(real_counts))]

    @staticmethod
    def _resolve_counts(counts: Mapping[str, int] | Sequence[int], class_names: list[str]) -> list[int]:
        if isinstance(counts, Mapping):
            unknown = [k for k in counts if str(k) not in class_names]
            if unknown:
                raise ValueError(f"counts given for unknown class(es) {unknown}; classes are {class_names}.")
            out = [int(counts.get(name, 0)) for name in class_names]
        else:
            out = [int(c) for c in counts]
            if len(out) != len(class_names):
                raise ValueError(f"counts has {len(out)} entries but there are {len(class_names)} classes.")
        if any(c < 0 for c in out):
            raise ValueError(f"counts must be non-negative, got {out}.")
        return out

    @property
    def manifest_path(self) -> str:
        """This rank's manifest, ``output_dir/manifest.rank<r>.jsonl``."""
        return os.path.join(self.output_dir, f"manifest.rank{self.rank}.jsonl")

    def work_list(self) -> list[tuple[int, int]]:
        """Every ``(class_index, index)`` pair in the fixed order (classes, then indices ascending)."""
        return [(c, i) for c, n in enumerate(self.counts) for i in range(n)]

    def shard(self) -> list[tuple[int, int]]:
        """This rank's pairs: positions ``p`` of :meth:`work_list` with ``p % world_size == rank``."""
        return [pair for p, pair in enumerate(self.work_list()) if p % self.world_size == self.rank]

    def tile_path(self, class_index: int, index: int) -> str:
        """Absolute path of a tile."""
        return os.path.join(self.output_dir, tile_filename(self.class_names[class_index], index))

    def tile_generator(self, class_index: int, index: int) -> torch.Generator:
        """The CPU generator of one tile, seeded with :func:`tile_seed` ``(seed, class_index, index)``: every random
        draw of the tile comes from it."""
        return torch.Generator(device="cpu").manual_seed(tile_seed(self.seed, class_index, index))

    def _settings(self) -> dict[str, Any]:
        """The generation settings recorded in every manifest row (and compared on resume)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _settings().")

    def _models(self) -> Sequence[torch.nn.Module]:
        """The networks that :meth:`run` moves to ``device`` and puts in eval mode before generating."""
        raise NotImplementedError(f"{type(self).__name__} must implement _models().")

    def _prepare(self) -> Any:
        """Per-run state passed to every :meth:`generate_batch` call of :meth:`run` (None by default)."""
        return None

    def generate_batch(
        self, pairs: Sequence[tuple[int, int]], context: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Make the tiles ``pairs`` (``(class_index, index)``) in one batch.

        Returns:
            the tiles ``[B, 3, H, W]`` in ``[-1, 1]`` (on CPU, float32) and a per-tile confidence ``[B]`` recorded in
            the manifest, or None when the model has no such score (recorded as ``null``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement generate_batch().")

    def _scan_done(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Tiles done on disk (row and PNG); rewrites this rank's manifest with only its valid rows."""
        os.makedirs(self.output_dir, exist_ok=True)
        done = _valid_rows(self.output_dir, _manifest_files(self.output_dir))
        own = _valid_rows(self.output_dir, [self.manifest_path])
        if os.path.exists(self.manifest_path):
            _write_jsonl_atomic(self.manifest_path, (own[k] for k in sorted(own)))
        return done

    def _write_batch(self, manifest: Any, pairs: Sequence[tuple[int, int]], tiles: Sequence[np.ndarray],
                     scores: Sequence[float | None], settings: Mapping[str, Any]) -> None:
        """Write a batch's tiles (uint8 ``[H, W, 3]`` arrays), then append their manifest rows and flush them to
        disk: a row is never written before its tile, so a run cut anywhere resumes from whole tiles (a cut line is
        dropped, its tile redone). No torch call: the background writer runs it beside the sampler's threads."""
        rows = []
        for (c, i), tile, conf in zip(pairs, tiles, scores):
            self._write_tile(tile, self.tile_path(c, i))
            rows.append({"file": tile_filename(self.class_names[c], i), "class": self.class_names[c],
                         "class_index": c, "index": i, "seed": tile_seed(self.seed, c, i), **settings,
                         "confidence": conf})
        try:
            manifest.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            manifest.flush()
            os.fsync(manifest.fileno())
        except OSError as e:
            full = no_space_error(self.manifest_path, e)
            if full is None:
                raise
            raise full from e

    def _write_tile(self, tile: np.ndarray, path: str) -> None:
        """Write one PNG whole (temporary file, then rename); a failed write leaves no partial file, and a full disk
        raises ``OSError(ENOSPC)`` naming the tile."""
        atomic_write(path, lambda p: Image.fromarray(tile).save(p, format="PNG"), fsync=True)

    @property
    def lock_name(self) -> str:
        """This rank's lock file in ``output_dir``: ``.lock`` for rank 0, ``.lock.rank<r>`` for the others (the
        ranks of one run share the folder; two runs of the same rank may not)."""
        return LOCK_NAME if self.rank == 0 else f"{LOCK_NAME}.rank{self.rank}"

    def run(self) -> dict[str, Any]:
        """
        Generate this rank's missing tiles, then (after a barrier when running distributed) merge the manifests and
        write the sample grids on rank 0. Manually sharded ranks (``rank`` / ``world_size`` passed, no process
        group) should call :meth:`finalize` once every rank is done.

        Returns:
            a summary: ``rank``, ``world_size``, ``assigned`` (this rank's tiles), ``generated``,
            ``skipped_existing``, ``per_class`` (generated per class name), ``per_class_skipped``, ``manifest`` (this
            rank's manifest path) and ``seconds``.

        Raises:
            OutputLockedError: another live process is generating this rank's share into ``output_dir`` (its pid is
                named); see :class:`~monai_histodiff.engines.locking.OutputLock`.
        """
        with OutputLock(self.output_dir, self.lock_name, owner=f"{self.stage} (rank {self.rank})"):
            return self._run()

    def _run(self) -> dict[str, Any]:
        start = time.perf_counter()
        done = self._scan_done()
        shard = self.shard()
        todo = [(c, i) for c, i in shard if (self.class_names[c], i) not in done]
        self._warn_on_changed_settings(done, shard)
        per_class = dict.fromkeys(self.class_names, 0)
        per_class_skipped = dict.fromkeys(self.class_names, 0)
        for c, i in shard:
            if (self.class_names[c], i) in done:
                per_class_skipped[self.class_names[c]] += 1

        for model in self._models():
            model.to(self.device).eval()
        context = self._prepare()
        settings = self._settings()
        bar = None
        if self.progress and has_tqdm:
            bar = tqdm(total=len(todo), desc=f"{self.stage} (rank {self.rank})", unit="tile")
        generated = 0
        writer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage}-writer") if self.background_writer else None
        pending: deque[tuple[Future, Sequence[tuple[int, int]]]] = deque()

        def written(pairs: Sequence[tuple[int, int]]) -> None:
            nonlocal generated
            generated += len(pairs)
            for c, _ in pairs:
                per_class[self.class_names[c]] += 1
            if bar is not None:
                bar.update(len(pairs))

        failed = threading.Event()

        def write_after(manifest: Any, pairs: Sequence[tuple[int, int]], tiles: list[np.ndarray],
                        scores: list[float | None]) -> bool:
            """The writer thread's job: write a batch unless an earlier one failed (nothing is written after it)."""
            if failed.is_set():
                return False
            try:
                self._write_batch(manifest, pairs, tiles, scores, settings)
            except BaseException:
                failed.set()
                raise
            return True

        try:
            with open(self.manifest_path, "a", encoding="utf-8") as manifest:
                try:
                    for b in range(0, len(todo), self.batch_size):
                        pairs = todo[b : b + self.batch_size]
                        images, confidence = self.generate_batch(pairs, context)
                        # torch work stays on this thread: a torch op on the writer thread would start a second
                        # intra-op thread pool beside the sampler's and oversubscribe the cores
                        tiles = [to_uint8_image(image) for image in images]
                        scores = [None] * len(pairs) if confidence is None else confidence.tolist()
                        if writer is None:
                            self._write_batch(manifest, pairs, tiles, scores, settings)
                            written(pairs)
                            continue
                        # a batch is written while the next one is sampled, and is on disk before a third is sampled
                        pending.append((writer.submit(write_after, manifest, pairs, tiles, scores), pairs))
                        while len(pending) > 1:
                            future, done_pairs = pending.popleft()
                            if future.result():
                                written(done_pairs)
                finally:  # an interrupted run still records every batch it sampled (or raises the writer's error)
                    while pending:
                        future, done_pairs = pending.popleft()
                        if future.result():
                            written(done_pairs)
        finally:
            if writer is not None:
                writer.shutdown(wait=True)
            if bar is not None:
                bar.close()

        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            self.finalize()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "assigned": len(shard),
            "generated": generated,
            "skipped_existing": len(shard) - len(todo),
            "per_class": per_class,
            "per_class_skipped": per_class_skipped,
            "manifest": self.manifest_path,
            "seconds": time.perf_counter() - start,
        }

    def _warn_on_changed_settings(self, done: Mapping[tuple[str, int], Mapping[str, Any]], shard: list) -> None:
        settings = self._settings()
        changed = 0
        for c, i in shard:
            row = done.get((self.class_names[c], i))
            if row is None:
                continue
            expected = {**settings, "seed": tile_seed(self.seed, c, i)}
            if any(row.get(k, self.setting_defaults.get(k)) != v for k, v in expected.items()):
                changed += 1
        if changed:
            logger.warning(
                f"{changed} existing tile(s) in {self.output_dir} were made with other settings "
                f"({', '.join(['seed', *settings])}); they are kept, not regenerated. Use a new output_dir to redo "
                "them."
            )

    # ------------------------------------------------------------------ outputs
    def finalize(self) -> str:
        """Merge the manifests into ``manifest.jsonl`` and write the class grids; returns the merged manifest path."""
        path = merge_manifests(self.output_dir)
        self.write_grids()
        return path

    def write_grids(self) -> list[str]:
        """
        Write ``output_dir/grids/<CLASS>.png``: the first up to ``grid_size`` tiles of each class present on disk
        (by index), in a square-ish grid. Returns the paths written.
        """
        if self.grid_size < 1:
            return []
        written = []
        for c, name in enumerate(self.class_names):
            tiles = []
            for i in range(self.counts[c]):
                if len(tiles) == self.grid_size:
                    break
                path = self.tile_path(c, i)
                if os.path.isfile(path):
                    with Image.open(path) as img:
                        tiles.append(np.asarray(img.convert("RGB")))
            if not tiles:
                continue
            grid = tile_mosaic(tiles)
            out = os.path.join(self.output_dir, "grids", f"{name}.png")
            atomic_write(out, lambda p, grid=grid: Image.fromarray(grid).save(p, format="PNG"))
            written.append(out)
        return written


class GuidedTileGenerator(TileGenerator):
    """
    Generate ``counts[c]`` classifier-guided synthetic tiles per class, resumably and shardably (HistoDiffusion's
    synthesis stage, Ye et al. MICCAI 2023, Sec. 2 Eq. 7-8; the decoder is the fine-tuned ``D'``).

    Layout, manifest, sharding, resume, lock and full-disk behaviour: see :class:`TileGenerator`.

    Determinism. Tile ``index`` of class ``c`` gets its own CPU ``torch.Generator`` seeded with
    :func:`tile_seed` ``(seed, c, index)``; it draws the tile's initial noise ``z_T`` and then, for DDPM or DDIM with
    ``eta > 0``, the tile's noise of every sampling step (the scheduler is wrapped so that each sample of a batch
    draws from its own generator). A tile therefore does not depend on the batch size, on which other tiles share
    its batch, or on the rank that makes it, up to the floating-point behaviour of the networks for different batch
    sizes (bit-exact on CPU in the tests; GPU kernels chosen per batch size may differ in the last bits, rarely
    changing a pixel after rounding to uint8). Noise is drawn on CPU, so it is the same on every device.

    Args:
        inferer: the guided inferer (holds ``scale_factor``).
        autoencoder: first-stage model whose decoder is the fine-tuned ``D'``.
        diffusion_model: the unconditional latent diffusion model, or a class-conditional one (stage
            ``finetune_conditional``) with ``cfg_scale`` and ``null_class``.
        classifier: time-conditioned latent classifier ``classifier(z_t, timesteps) -> logits``.
        scheduler: DDPM or DDIM scheduler (MONAI's or respaced); ``set_timesteps(num_inference_steps)`` is called
            on it.
        num_inference_steps: number of sampling steps.
        class_names: class names in label-index order (also the folder and file name prefixes).
        counts: tiles to generate per class, ``{name: count}`` (missing names: 0) or one count per class.
        latent_shape: ``[C, h, w]`` of the diffusion model's latents.
        output_dir: the output folder.
        guidance_scale: classifier guidance scale ``g`` (0: unguided).
        guidance_window: ``(t_min, t_max)``; guide only those timesteps (all when None).
        guidance_interval: compute the guidance gradient every this many guided steps, reusing it in between (1:
            every step, the paper's).
        eta: DDIM stochasticity (ignored by DDPM).
        batch_size: tiles per sampling batch.
        seed: base seed of :func:`tile_seed`.
        device: device to sample on; CUDA when available if None.
        amp: run the diffusion model under autocast (the guidance gradient and the scheduler stay float32).
        amp_dtype: the autocast dtype, a ``torch.dtype`` or its name (``"bfloat16"``, ``"float16"``); None: the
            device type's default (float16 on CUDA, bfloat16 on CPU).
        classifier_batch_size: micro-batch of the guidance gradient (and of the confidence).
        checkpoint_hashes: hashes of the checkpoints used, recorded in every row.
        rank: this process's shard; from ``torch.distributed`` (else 0) when None.
        world_size: number of shards; from ``torch.distributed`` (else 1) when None.
        progress: show a tqdm progress bar over this rank's tiles.
        grid_size: number of tiles in each class's sample grid (0: no grids).
        background_writer: write each batch's tiles and manifest rows in a background thread while the next batch
            is sampled (see :class:`TileGenerator`).
        cfg_scale: classifier-free guidance scale ``w`` of a class-conditional ``diffusion_model`` (0: its null
            class, 1: the class as is); None for an unconditional model. Combines with ``guidance_scale`` (set it
            to 0 for classifier-free guidance alone). The guidance check's unguided half uses ``w = 0`` and ``g = 0``.
        null_class: the conditional model's null class index.
    """

    stage = "generate"

    def __init__(
        self,
        *,
        inferer: ClassifierGuidedLatentDiffusionInferer,
        autoencoder: torch.nn.Module,
        diffusion_model: torch.nn.Module,
        classifier: torch.nn.Module,
        scheduler: Scheduler,
        num_inference_steps: int,
        class_names: Sequence[str],
        counts: Mapping[str, int] | Sequence[int],
        latent_shape: Sequence[int],
        output_dir: str | os.PathLike,
        guidance_scale: float = 1.0,
        guidance_window: Sequence[int] | None = None,
        guidance_interval: int = 1,
        eta: float = 0.0,
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str | None = None,
        classifier_batch_size: int | None = None,
        checkpoint_hashes: Mapping[str, str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        grid_size: int = 16,
        background_writer: bool = True,
        cfg_scale: float | None = None,
        null_class: int | None = None,
    ) -> None:
        super().__init__(
            class_names=class_names,
            counts=counts,
            output_dir=output_dir,
            batch_size=batch_size,
            seed=seed,
            device=device,
            checkpoint_hashes=checkpoint_hashes,
            rank=rank,
            world_size=world_size,
            progress=progress,
            grid_size=grid_size,
            background_writer=background_writer,
        )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}.")
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.inferer = inferer
        self.autoencoder = autoencoder
        self.diffusion_model = diffusion_model
        self.classifier = classifier
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.guidance_window = None if guidance_window is None else (int(guidance_window[0]), int(guidance_window[1]))
        self.guidance_interval = int(guidance_interval)
        self.eta = float(eta)
        self.amp = bool(amp)
        if isinstance(amp_dtype, str):
            named = getattr(torch, amp_dtype.removeprefix("torch."), None)
            if not isinstance(named, torch.dtype) or not named.is_floating_point:
                raise ValueError(f"amp_dtype must name a floating-point torch dtype such as 'bfloat16' or 'float16', "
                                 f"got {amp_dtype!r}.")
            amp_dtype = named
        self.amp_dtype = amp_dtype
        self.classifier_batch_size = classifier_batch_size
        if cfg_scale is not None and null_class is None:
            raise ValueError("cfg_scale is set but the diffusion model has no null class: classifier-free guidance "
                             "needs a class-conditional model (stage finetune_conditional).")
        self.cfg_scale = None if cfg_scale is None else float(cfg_scale)
        self.null_class = null_class

    def _settings(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            **({} if self.cfg_scale is None else {"cfg_scale": self.cfg_scale}),
            "guidance_window": None if self.guidance_window is None else list(self.guidance_window),
            "guidance_interval": self.guidance_interval,
            "steps": self.num_inference_steps,
            "scheduler": type(self.scheduler).__name__,
            "eta": self.eta,
            "checkpoint_hashes": self.checkpoint_hashes,
        }

    def _models(self) -> Sequence[torch.nn.Module]:
        return (self.autoencoder, self.diffusion_model, self.classifier)

    # ------------------------------------------------------------------ sampling
    def _sampler(self) -> PerSampleNoiseDDPMScheduler | PerSampleNoiseDDIMScheduler:
        self.scheduler.set_timesteps(self.num_inference_steps)
        return per_sample_sampler(self.scheduler)

    def _prepare(self) -> PerSampleNoiseDDPMScheduler | PerSampleNoiseDDIMScheduler:
        return self._sampler()

    def guidance_check(self, per_class: int = 8, image_classifier: torch.nn.Module | None = None,
                       min_gain: float = 0.1, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Before the pool: does guidance steer? ``per_class`` tiles per class sampled unguided (g = 0) and at the
        stage's g from the same noise, read by the site's auxiliary image classifier phi (the share it assigns to the
        requested class) and by the latent classifier (its mean probability of the requested class at t = 0).

        The check's tiles use indices from :data:`GUIDANCE_CHECK_OFFSET` on, so their noise is never a pool tile's;
        a check already in ``path`` with the same settings and checkpoints is reused (a resumed or topped-up run does
        not sample it again). A gain of phi's agreement under ``min_gain`` is logged as a warning that guidance does nothing here (a pool
        of thousands of tiles would then be unconditional samples with class names). Rank 0 only; nothing is
        written to the manifest.

        Returns:
            ``{"per_class", "guidance_scale", "steps", "unguided": {...}, "guided": {...}, "gain", "steers",
            "seconds"}`` with per setting ``latent_probability`` and, with ``image_classifier``, ``aux_agreement``
            and ``aux_agreement_per_class``; ``{}`` when ``per_class`` is 0 or on other ranks. Written to ``path``
            (default ``<output_dir>/guidance_check.json``).
        """
        if per_class < 1 or self.rank != 0:
            return {}
        path = path or os.path.join(self.output_dir, "guidance_check.json")
        settings = {"per_class": per_class, "seed": self.seed, "with_image_classifier": image_classifier is not None,
                    **self._settings()}
        if os.path.isfile(path):  # a resumed or topped-up run: the same check is not sampled again
            try:
                done = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                done = {}
            if done.get("settings") == json.loads(json.dumps(settings)):
                logger.info("guidance check: reusing %s (same settings)", path)
                return done
        start = time.perf_counter()
        pairs = [(c, GUIDANCE_CHECK_OFFSET + i) for c in range(len(self.class_names)) for i in range(per_class)]
        labels = torch.tensor([c for c, _ in pairs])
        scale, cfg, result, trace = self.guidance_scale, self.cfg_scale, {}, []
        try:
            for name, g in (("unguided", 0.0), ("guided", scale)):
                self.guidance_scale = g
                if cfg is not None:  # unguided: the conditional model's null class (w = 0)
                    self.cfg_scale = cfg if name == "guided" else 0.0
                images, probs = [], []
                for i in range(0, len(pairs), self.batch_size):
                    im, pr = self.generate_batch(pairs[i:i + self.batch_size], trace=trace if g else None)
                    images.append(im)
                    probs.append(pr)
                entry: dict[str, Any] = {"guidance_scale": g, "latent_probability": float(torch.cat(probs).mean()),
                                         **({} if cfg is None else {"cfg_scale": self.cfg_scale})}
                if image_classifier is not None:
                    with torch.no_grad():
                        pred = torch.cat([image_classifier(im.to(self.device)).argmax(1).cpu() for im in images])
                    hits = (pred == labels).float()
                    entry["aux_agreement"] = float(hits.mean())
                    entry["aux_agreement_per_class"] = {
                        n: float(hits[labels == c].mean()) for c, n in enumerate(self.class_names)}
                    entry["aux_predicted_counts"] = {
                        n: int((pred == c).sum()) for c, n in enumerate(self.class_names)}
                result[name] = entry
        finally:
            self.guidance_scale, self.cfg_scale = scale, cfg
        key = "aux_agreement" if image_classifier is not None else "latent_probability"
        gain = result["guided"][key] - result["unguided"][key]
        report = {"per_class": per_class, "guidance_scale": scale, "cfg_scale": cfg, "steps": self.num_inference_steps,
                  "measure": key, **result, "gain": gain, "steers": gain >= min_gain, "min_gain": min_gain,
                  "guidance_to_model": _guidance_ratio(trace),
                  "chance": 1.0 / len(self.class_names), "seconds": round(time.perf_counter() - start, 1),
                  "settings": settings}
        atomic_write(path, lambda p: p.write_text(json.dumps(report, indent=1)))
        setting = f"g={scale:g}" + ("" if cfg is None else f", w={cfg:g}")
        logger.info("guidance check (%d tiles per class, %s): unguided %.3f, %s %.3f (chance %.3f) -> %s", per_class,
                    key, result["unguided"][key], setting, result["guided"][key], report["chance"], path)
        if not report["steers"]:
            advice = ("fine-tune the conditional model longer or raise cfg_scale" if cfg is not None else
                      "check the latent classifier's accuracy per noise bucket, or raise guidance_scale")
            logger.warning("guidance does nothing here: at %s the %s is %.3f against %.3f unguided (gain %+.3f < "
                           "%.2f; %s). The pool would be unconditional samples labelled with classes: %s.", setting,
                           key, result["guided"][key], result["unguided"][key], gain, min_gain, path, advice)
        return report

    @torch.no_grad()
    def generate_batch(
        self, pairs: Sequence[tuple[int, int]], sampler: Scheduler | None = None,
        trace: list[dict[str, float]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Sample the tiles ``pairs`` (``(class_index, index)``) in one batch.

        Returns:
            the decoded tiles ``[B, 3, H, W]`` (on CPU, float32) and the classifier's softmax probability of each
            requested class at ``t = 0`` on the final latent, ``[B]`` (the latent the inferer returns, i.e. after its
            crop to ``autoencoder_latent_shape`` when that is set). With ``trace``, the inferer appends each step's
            model and guidance term sizes to it.
        """
        sampler = sampler if sampler is not None else self._sampler()
        generators = [self.tile_generator(c, i) for c, i in pairs]
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators]).to(self.device)
        labels = torch.tensor([c for c, _ in pairs], dtype=torch.long, device=self.device)
        sampler.sample_generators = generators  # type: ignore[union-attr]
        try:
            images, latents = self.inferer.sample(
                input_noise=noise,
                autoencoder_model=unwrap_model(self.autoencoder),
                diffusion_model=unwrap_model(self.diffusion_model),
                classifier=unwrap_model(self.classifier),
                labels=labels,
                scheduler=sampler,
                guidance_scale=self.guidance_scale,
                guidance_window=self.guidance_window,
                guidance_interval=self.guidance_interval,
                classifier_batch_size=self.classifier_batch_size,
                eta=self.eta,
                verbose=False,
                generator=None,
                return_latents=True,
                amp=self.amp,
                amp_dtype=self.amp_dtype,
                cfg_scale=self.cfg_scale,
                null_class=self.null_class,
                **({} if trace is None else {"trace": trace}),
            )
        finally:
            sampler.sample_generators = None  # type: ignore[union-attr]
        classifier = unwrap_model(self.classifier)
        size = self.classifier_batch_size or latents.shape[0]
        probs = []
        for z, y in zip(latents.float().split(size), labels.split(size)):
            t0 = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
            probs.append(torch.softmax(classifier(z, t0).float(), dim=-1).gather(1, y[:, None])[:, 0])
        return images.float().cpu(), torch.cat(probs).cpu()
