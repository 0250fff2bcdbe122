"""Image grids people can look at: PNG files and TensorBoard images of tiles, reconstructions and samples."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import min_version, optional_import
from PIL import Image

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.handlers.ema import warn_if_unconverged

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["make_grid", "tile_mosaic", "save_grid", "ImageGridHandler", "SampleGridHandler"]


def _is_main_process() -> bool:
    from monai_histodiff.engines.distributed import is_main_process  # not at import: engines imports handlers

    return is_main_process()


def make_grid(rows: Sequence[torch.Tensor], max_items: int = 8, pad: int = 2) -> np.ndarray:
    """Lay out batches of ``[B, 3, H, W]`` tiles in [-1, 1] as rows of one ``[H', W', 3]`` uint8 image.

    Each entry of ``rows`` becomes one row (e.g. input, reconstruction, fine-tuned reconstruction).
    """
    rows = [r[:max_items].detach().float().cpu() for r in rows]
    n = max(r.shape[0] for r in rows)
    _, c, h, w = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        tiles = ((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if tiles.shape[1] == 1:
            tiles = tiles.repeat(1, 3, 1, 1)
        for j in range(tiles.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = tiles[j, :3].permute(1, 2, 0).numpy()
    return grid


def tile_mosaic(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Written ``[H, W, 3]`` uint8 tiles laid out edge to edge in a square-ish ``ceil(sqrt(n))``-column mosaic (the
    class grids of generation); every tile is cropped to the first one's size."""
    h, w = tiles[0].shape[:2]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, q = divmod(k, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = tile[:h, :w]
    return grid


def save_grid(grid: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a grid as PNG atomically."""
    return atomic_write(path, lambda p: Image.fromarray(grid).save(p, format="PNG"))


class ImageGridHandler:
    """Ignite handler writing a grid of output images (e.g. input vs reconstruction) every ``interval`` iterations.

    The grid goes to ``<output_dir>/<tag>_latest.png`` and, when a ``summary_writer`` is given, to TensorBoard under
    ``tag``. Rank 0 only.

    Args:
        keys: keys of ``engine.state.output`` holding ``[B, 3, H, W]`` tensors in [-1, 1], one grid row each.
        output_dir: folder of the PNG files.
        tag: name of the grid.
        interval: iterations between grids (the last iteration of every epoch also writes one).
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` or None.
        max_items: columns of the grid.
    """

    def __init__(self, keys: Sequence[str], output_dir: str | os.PathLike, tag: str = "images", interval: int = 100,
                 summary_writer: Any = None, max_items: int = 8) -> None:
        self.keys = list(keys)
        self.output_dir = Path(output_dir)
        self.tag = tag
        self.interval = max(1, int(interval))
        self.writer = summary_writer
        self.max_items = max_items

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        out = engine.state.output
        if isinstance(out, Sequence) and out and isinstance(out[0], Mapping):  # decollated
            out = {k: torch.stack([o[k] for o in out]) for k in self.keys}
        rows = [out[k] for k in self.keys if k in out and isinstance(out[k], torch.Tensor)]
        if not rows:
            return
        grid = make_grid(rows, self.max_items)
        save_grid(grid, self.output_dir / f"{self.tag}_latest.png")
        if self.writer is not None:
            self.writer.add_image(self.tag, grid, engine.state.iteration, dataformats="HWC")


class SampleGridHandler:
    """Ignite handler drawing samples with a callable every ``interval`` epochs and saving them as a grid.

    Used to watch unconditional latent diffusion samples during pre-training (the callable decodes sampled latents).

    Args:
        sample_fn: ``sample_fn() -> [B, 3, H, W]`` tiles in [-1, 1] (laid out 8 per row), or a list of such
            batches (one grid row each).
        output_dir: folder of ``<tag>_epoch<E>.png``.
        tag: name of the grid.
        interval: epochs between grids (the final epoch always writes one).
        summary_writer: optional TensorBoard writer.
        ema: the ``WarmupEMAHandler`` whose EMA model ``sample_fn`` samples from, if any: each grid then warns when
            that EMA still holds over 10% of its random initialisation.
    """

    def __init__(self, sample_fn: Callable[[], torch.Tensor], output_dir: str | os.PathLike, tag: str = "samples",
                 interval: int = 1, summary_writer: Any = None, ema: Any = None) -> None:
        self.sample_fn = sample_fn
        self.output_dir = Path(output_dir)
        self.tag = tag
        self.interval = max(1, int(interval))
        self.writer = summary_writer
        self.ema = ema

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        last = engine.state.epoch == engine.state.max_epochs
        if not _is_main_process() or (engine.state.epoch % self.interval and not last):
            return
        if self.ema is not None:
            warn_if_unconverged(self.ema.summary(), f"the model being trained (grid of epoch {engine.state.epoch})")
        samples = self.sample_fn()
        rows = list(samples) if isinstance(samples, (list, tuple)) else [
            samples[i : i + 8] for i in range(0, min(len(samples), 32), 8)]
        grid = make_grid(rows)
        save_grid(grid, self.output_dir / f"{self.tag}_epoch{engine.state.epoch:04d}.png")
        if self.writer is not None:
            self.writer.add_image(self.tag, grid, engine.state.epoch, dataformats="HWC")
