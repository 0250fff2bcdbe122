"""Seeded procedural H&E-like toy tiles: the default data of ``make demo`` on a machine with no real data.

These are synthetic toy tiles, not histology. Each class has its own structure so that the pipeline has something
real to learn: nuclei density, size, shape and colour, background colour and texture differ per class (loosely
after adipose, lymphocytes, stroma, tumour epithelium, mucus and debris in H&E). The tiles are written as a
class-folder tree, the same layout as NCT-CRC-HE-100K, so every stage reads them exactly like real data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

__all__ = ["ToyClass", "TOY_CLASSES", "render_toy_tile", "make_toy_dataset", "TOY_NOTICE"]

TOY_NOTICE = (
    "NOTE: these are SYNTHETIC TOY TILES made by a seeded procedural generator (monai_histodiff.data.toy), not real "
    "histology. They only exercise the pipeline; set HISTODIFF_DATA (or --dataset_dir) to a class-folder tree of "
    "real tiles to run on real data."
)


@dataclass(frozen=True)
class ToyClass:
    """How one toy class looks: nuclei count, radius (px at 64 px), elongation, colours, background texture."""

    name: str
    nuclei: tuple[int, int]
    radius: tuple[float, float]
    elongation: float
    nucleus_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    texture: str  # "fat", "flat", "fibres", "speckle"


TOY_CLASSES: tuple[ToyClass, ...] = (
    ToyClass("ADI_TOY", (2, 5), (1.5, 2.2), 1.5, (120, 60, 150), (250, 246, 250), "fat"),
    ToyClass("LYM_TOY", (70, 110), (1.3, 1.9), 1.0, (60, 25, 120), (225, 170, 205), "flat"),
    ToyClass("STR_TOY", (6, 14), (1.0, 1.5), 4.0, (110, 50, 140), (235, 140, 180), "fibres"),
    ToyClass("TUM_TOY", (25, 40), (3.0, 4.5), 1.4, (95, 40, 135), (200, 120, 175), "flat"),
    ToyClass("MUC_TOY", (0, 4), (1.5, 2.5), 1.2, (130, 80, 160), (200, 195, 225), "flat"),
    ToyClass("DEB_TOY", (30, 60), (0.6, 1.2), 1.0, (150, 60, 150), (215, 130, 190), "speckle"),
)


def _background(spec: ToyClass, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(spec.background_rgb, dtype=np.float64) + rng.normal(0, 6, 3)  # stain variation per tile
    img = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    if spec.texture == "fat":  # large empty cells with thin pink membranes (Voronoi edges)
        centres = rng.uniform(0, 64, (int(rng.integers(5, 9)), 2))
        d = np.sort(np.hypot(yy[..., None] - centres[:, 0], xx[..., None] - centres[:, 1]), axis=-1)
        edge = np.exp(-((d[..., 1] - d[..., 0]) ** 2) / 2.0)
        img = img * (1 - edge[..., None]) + np.array([225, 135, 185]) * edge[..., None]
    elif spec.texture == "fibres":  # wavy eosin fibres along a random direction
        angle = rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        wave = 0.5 + 0.5 * np.sin(u * rng.uniform(0.6, 0.9) + 2.0 * np.sin(v * 0.15 + rng.uniform(0, 6)))
        img = img - 45 * wave[..., None] * np.array([0.2, 1.0, 0.5])
    elif spec.texture == "speckle":  # fragmented, granular material
        speck = gaussian_filter(rng.normal(0, 1, (size, size)), 1.0)
        img = img - 40 * np.clip(speck, 0, None)[..., None] * np.array([0.3, 1.0, 0.4])
    img += gaussian_filter(rng.normal(0, 5, (size, size, 3)), (1, 1, 0))
    return img


def render_toy_tile(spec: ToyClass, size: int, rng: np.random.Generator,
                    background: ToyClass | None = None) -> np.ndarray:
    """Render one ``[size, size, 3]`` uint8 toy tile of class ``spec`` (its nuclei), on the background (colour and
    texture) of ``background`` (default: its own)."""
    img = _background(background or spec, size, rng)
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mask = np.zeros((size, size))
    for _ in range(int(rng.integers(spec.nuclei[0], spec.nuclei[1] + 1))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(*spec.radius) * scale
        a, b = r * np.sqrt(spec.elongation), r / np.sqrt(spec.elongation)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        mask = np.maximum(mask, np.clip(1.5 - np.sqrt((u / a) ** 2 + (v / b) ** 2), 0, 1))
    mask = gaussian_filter(mask, 0.6 * scale)[..., None]
    nucleus = np.array(spec.nucleus_rgb, dtype=np.float64) + rng.normal(0, 8, 3)
    img = img * (1 - mask) + nucleus * mask
    return np.clip(img, 0, 255).astype(np.uint8)


def make_toy_dataset(
    output_dir: str | os.PathLike,
    num_per_class: int = 60,
    image_size: int = 64,
    num_classes: int = 4,
    seed: int = 0,
    confusion: float = 0.0,
    zoom: int = 1,
    classes: Sequence[str] | None = None,
) -> dict:
    """Write a class-folder tree ``output_dir/<CLASS>/<CLASS>_<i>.png`` of toy tiles and a README saying what they are.

    The same arguments always give byte-identical files; an existing complete tree is left as it is.

    Args:
        confusion: share of tiles drawn on the background of a random class (their own class shows only in their
            nuclei), so that a classifier trained on a few tiles is not already perfect; 0 keeps every class apart.
        zoom: a higher magnification: draw each tile at ``image_size`` px, keep its central ``image_size // zoom``
            px and enlarge them (bicubic) to ``image_size``, so every structure is ``zoom`` times larger (for an
            autoencoder that keeps a 64 px tile's coarse structure only: ``make demo`` uses 2).
        classes: names of :data:`TOY_CLASSES` to draw (default: the first ``num_classes``); a class's tiles are the
            same whichever others are drawn with it (for the same ``confusion``).
    """
    if not 0.0 <= confusion <= 1.0:
        raise ValueError(f"confusion must be in [0, 1], got {confusion}")
    names = [c.name for c in TOY_CLASSES]
    if classes is not None:
        unknown = [c for c in classes if c not in names]
        if unknown or not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names among {names}, got {list(classes)}")
        num_classes = len(classes)
    if not 1 <= num_classes <= len(TOY_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(TOY_CLASSES)}], got {num_classes}")
    chosen = [TOY_CLASSES[names.index(c)] for c in classes] if classes is not None else list(TOY_CLASSES[:num_classes])
    out = Path(output_dir)
    info = {"num_per_class": num_per_class, "image_size": image_size, "num_classes": num_classes, "seed": seed}
    if classes is not None:
        info["classes"] = list(classes)
    if not (isinstance(zoom, int) and zoom >= 1 and image_size % zoom == 0):
        raise ValueError(f"zoom must be a positive integer dividing image_size {image_size}, got {zoom!r}")
    if confusion:
        info["confusion"] = confusion
    if zoom != 1:
        info["zoom"] = zoom
    stamp = out / "toy_dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == info:
        return info
    for spec in chosen:
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        c = TOY_CLASSES.index(spec)
        for i in range(num_per_class):
            rng = np.random.default_rng([seed, c, i])  # per-tile stream: tile i is the same whatever the count
            background = None
            if confusion and rng.random() < confusion:
                background = chosen[int(rng.integers(num_classes))]
            tile = Image.fromarray(render_toy_tile(spec, image_size, rng, background))
            if zoom != 1:
                lo = (image_size - image_size // zoom) // 2
                tile = tile.crop((lo, lo, lo + image_size // zoom, lo + image_size // zoom)).resize(
                    (image_size, image_size), Image.Resampling.BICUBIC)
            tile.save(folder / f"{spec.name}_{i:04d}.png")
    (out / "README.txt").write_text(TOY_NOTICE + "\n", encoding="utf-8")
    stamp.write_text(json.dumps(info), encoding="utf-8")
    return info
