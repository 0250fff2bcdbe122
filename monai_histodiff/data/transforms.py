"""MONAI dictionary transforms for RGB histology tiles.

Every stage reads tiles through :func:`tile_transforms`: load (PIL by default, ITK when the ``itk`` extra is
installed), channel first, any mode (RGBA, grayscale, palette, CMYK, 16-bit) turned into 3-channel RGB and an
EXIF-rotated JPEG turned upright, resized to ``image_size``, intensity mapped from [0, 255] to [-1, 1] (the range the
autoencoder is trained on), and, for training, flips and 90-degree rotations (H&E tiles have no preferred
orientation).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, PILReader
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import optional_import
from PIL import Image, ImageOps

__all__ = ["pil_to_rgb", "ToRGBd", "tile_transforms", "tile_reader", "to_uint8_image", "round_to_8bit"]

_, HAS_ITK = optional_import("itk")


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, upright: an EXIF orientation (a phone or scanner JPEG) applied, 16-bit
    scaled to 8-bit, transparency composited on white, CMYK / palette / grey converted."""
    image = ImageOps.exif_transpose(image)  # the image itself when it has no orientation tag
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


class ToRGBd(MapTransform):
    """Make a channel-first tile 3-channel RGB in [0, 255]: grey repeated, alpha composited on white, 16-bit scaled.

    The PIL path already yields RGB through :func:`pil_to_rgb`; this transform makes the ITK path give the same
    array.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.max() > 255:  # 16-bit data
                img = img * (255.0 / 65535.0)
            c = img.shape[0]
            if c in (2, 4):  # grey+alpha or RGB+alpha: composite on white
                alpha = img[-1:] / 255.0
                img = img[:-1] * alpha + 255.0 * (1 - alpha)
                c -= 1
            if c == 1:
                img = img.repeat(3, *([1] * (img.ndim - 1))) if isinstance(img, torch.Tensor) else np.repeat(img, 3, 0)
            elif c != 3:
                raise ValueError(f"tile {key!r} has {c} channels; expected 1 to 4")
            d[key] = img
        return d


def tile_reader(reader: str = "PILReader"):
    """The image reader for tiles: ``"PILReader"`` (default) or ``"ITKReader"`` (needs the ``itk`` extra)."""
    if reader == "PILReader":
        return PILReader(converter=pil_to_rgb, reverse_indexing=False)
    if reader == "ITKReader":
        if not HAS_ITK:
            raise ImportError("reader='ITKReader' needs ITK: pip install 'monai-histodiff[itk]'")
        return ITKReader(reverse_indexing=True)  # ITK's index order is the reverse of PIL's: same [H, W] array
    raise ValueError(f"reader must be 'PILReader' or 'ITKReader', got {reader!r}")


def tile_transforms(
    image_size: int | Sequence[int],
    augment: bool = False,
    keys: KeysCollection = "image",
    reader: str = "PILReader",
    flip_prob: float = 0.5,
    rotate90_prob: float = 0.5,
    load: bool = True,
    color_jitter: float = 0.0,
) -> Compose:
    """Transforms that turn a datalist item into a normalised tile tensor ``[3, H, W]`` in [-1, 1].

    Args:
        image_size: output size (int for square tiles); nothing assumes 224 px.
        augment: add random flips along both axes and random 90-degree rotations (training only).
        keys: keys holding image paths.
        reader: ``"PILReader"`` or ``"ITKReader"``.
        flip_prob: probability of each flip when ``augment``.
        rotate90_prob: probability of a 90/180/270-degree rotation when ``augment``.
        load: include the load step (False when the item already holds an array).
        color_jitter: with ``augment``, mild colour jitter: each channel scaled by a random factor in
            ``[1 - color_jitter, 1 + color_jitter]`` and shifted by up to ``color_jitter`` (in the [-1, 1] range), the
            stain variation a pathology user augments with anyway; 0: none.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps: list = []
    if load:  # a tile file, or a region of a slide (items planned by monai_histodiff.data.slides carry "location")
        from monai_histodiff.data.slides import LoadTiled

        steps.append(LoadTiled(keys, reader=tile_reader(reader)))
    steps += [
        ToRGBd(keys),
        Resized(keys, spatial_size=size, mode="area" if load else "bilinear"),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0, clip=True),
    ]
    if augment:
        steps += [
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=flip_prob, spatial_axis=1),
            RandRotate90d(keys, prob=rotate90_prob, max_k=3),
        ]
        if color_jitter > 0:
            steps += [
                RandScaleIntensityd(keys, factors=color_jitter, prob=1.0, channel_wise=True),
                RandShiftIntensityd(keys, offsets=color_jitter, prob=1.0, channel_wise=True),
            ]
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return Compose(steps)


def round_to_8bit(tiles: torch.Tensor) -> torch.Tensor:
    """Tiles in [-1, 1] as a written PNG holds them: clamped and rounded to 256 levels, still in [-1, 1] (to read a
    decoded tile, e.g. a reconstruction, as a classifier would read it from disk)."""
    return ((tiles.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def to_uint8_image(tile: torch.Tensor) -> np.ndarray:
    """Turn one ``[3, H, W]`` tile in [-1, 1] back into an ``[H, W, 3]`` uint8 array for saving as PNG."""
    arr = ((tile.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()
