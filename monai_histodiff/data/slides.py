"""Whole-slide images as training data: tiles at a physical resolution, where there is tissue, with provenance.

A hospital's data are slides, not tiles. This module turns a folder (or list) of slides into the tile items the
stages read, in two ways with the same tiles:

* **streamed**: :func:`slide_datalist` plans the tiles (no pixels are written) and every item names its slide and
  location; :class:`LoadTiled` (used by :func:`~monai_histodiff.data.tile_transforms`) reads the region from the slide
  when a stage asks for the tile. No disk beyond the slides; every epoch decodes the slide's tiles again.
* **extracted**: :func:`extract_tiles` writes each planned tile once as PNG with its provenance (slide, location,
  level, pixel size) and returns an ordinary datalist; labeled regions become class folders with ``groups.csv``
  (:func:`extract_labeled_tiles`), which every labeled stage reads as it reads any tile dataset.

Resolution: a tile of ``tile_size`` pixels at ``mpp`` microns per pixel is read from the pyramid level nearest to
(and not coarser than) that resolution and resized. The pixel size comes from the file (Aperio's ``MPP`` in the
ImageDescription, TIFF resolution tags; read by the backend) or from an override; a slide whose pixel size is needed
and unknown, or implausible, is an error naming it. Tissue: a mask computed on a low-resolution image of the slide
(MONAI's :class:`~monai.transforms.ForegroundMask` on saturation, Otsu's threshold by default) keeps the tiles with at
least ``min_tissue`` of their area on tissue; the mask is saved as a PNG per slide for a person to check. Each slide
is its own source and group: its tiles never straddle a split.

Backends: ``tiffslide`` (default: tifffile + imagecodecs, pip-installable everywhere, JPEG and JPEG 2000 tiles) and
``openslide`` (the same API, when OpenSlide is installed). Slides that cannot be read, use a compression the backend
cannot decode, or show no tissue are reported (``bad_slides``) and the run goes on with the others.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import ForegroundMask, LoadImaged, MapTransform
from monai.utils import optional_import
from PIL import Image

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.datalist import SLIDE_GROUP_PREFIX, list_images

__all__ = [
    "SLIDE_EXTENSIONS",
    "SLIDE_BACKENDS",
    "PLAUSIBLE_MPP",
    "SlideError",
    "SlideTile",
    "list_slides",
    "open_slide",
    "slide_mpp",
    "tissue_mask",
    "plan_tiles",
    "read_tile",
    "slide_datalist",
    "extract_tiles",
    "read_geojson_regions",
    "labeled_tiles_from_regions",
    "labeled_tiles_from_csv",
    "extract_labeled_tiles",
    "LoadTiled",
    "is_slide",
    "stain_normalize",
]

#: file endings read as slides (by the default backend: Aperio SVS, generic and pyramidal TIFF, Hamamatsu NDPI,
#: Leica SCN, Ventana BIF)
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
SLIDE_BACKENDS = ("tiffslide", "openslide")
#: a stated pixel size outside this range (microns) is not believed: resolution tags written in the wrong unit
PLAUSIBLE_MPP = (0.05, 50.0)
#: the smallest saturation counted as tissue, whatever Otsu's threshold says (a blank slide has none)
MIN_TISSUE_SATURATION = 0.05


class SlideError(ValueError):
    """A slide cannot be used as asked (unreadable, pixel size unknown or implausible, no tissue); names the slide."""


@dataclass(frozen=True)
class SlideTile:
    """One planned tile: ``size`` x ``size`` pixels at ``mpp``, read from ``level`` at level-0 ``(x, y)`` with a
    ``read_size`` square region of that level; it covers ``footprint`` level-0 pixels a side, ``tissue`` of it on
    tissue."""

    slide: str
    x: int
    y: int
    level: int
    read_size: int
    size: int
    mpp: float
    tissue: float
    footprint: float

    def item(self) -> dict[str, Any]:
        """The datalist item of the tile (streamed: the slide is the ``image``; its location says where)."""
        name = Path(self.slide).stem
        return {"image": self.slide, "location": [self.x, self.y], "level": self.level, "read_size": self.read_size,
                "size": self.size, "mpp": self.mpp, "tissue": round(self.tissue, 3), "source": name, "group": name}


def list_slides(folder: str | os.PathLike, extensions: Sequence[str] = SLIDE_EXTENSIONS) -> list[str]:
    """Every slide file under ``folder`` (recursive, sorted; :func:`~monai_histodiff.data.datalist.list_images`)."""
    return list_images(folder, recursive=True, extensions=extensions)


def is_slide(path: str | os.PathLike) -> bool:
    """Whether a file is a whole-slide image: a slide format (SVS, NDPI, ...), or a TIFF whose image is stored in
    tiles (the layout of pyramidal slides; tile images are stored in strips)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SLIDE_EXTENSIONS:
        return False
    if suffix not in (".tif", ".tiff"):
        return True
    tifffile, ok = optional_import("tifffile")
    if not ok:
        return False
    try:
        with tifffile.TiffFile(os.fspath(path)) as tif:
            return bool(tif.pages[0].is_tiled)
    except Exception:  # noqa: BLE001 - not a readable TIFF: the tile scan reports it
        return False


def open_slide(path: str | os.PathLike, backend: str = "tiffslide") -> Any:
    """Open a slide with ``backend`` (an object with OpenSlide's API: ``level_dimensions``, ``level_downsamples``,
    ``properties``, ``read_region``, ``get_thumbnail``, ``get_best_level_for_downsample``).

    Raises:
        ValueError: for an unknown backend; ImportError naming the package to install.
        SlideError: naming the slide when it cannot be opened.
    """
    if backend not in SLIDE_BACKENDS:
        raise ValueError(f"slide backend must be one of {list(SLIDE_BACKENDS)}, got {backend!r}")
    module, ok = optional_import(backend)
    if not ok:
        hint = "pip install tiffslide imagecodecs" if backend == "tiffslide" else "pip install openslide-python " \
                                                                                  "openslide-bin"
        raise ImportError(f"slide backend {backend!r} is not installed: {hint}")
    opener = module.TiffSlide if backend == "tiffslide" else module.OpenSlide
    try:
        return opener(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is this slide's fault, named
        raise SlideError(f"{path}: cannot be read as a slide by {backend} ({type(e).__name__}: {e})") from e


def slide_mpp(slide: Any, path: str | os.PathLike, override: float | Mapping[str, float] | None = None) -> float:
    """The level-0 pixel size in microns: ``override`` (a number, or ``{slide file name: mpp}``) when it names one,
    else what the file states (Aperio ``MPP``, TIFF resolution tags, as the backend reads them).

    Raises:
        SlideError: naming the slide when the pixel size is not stated, or is outside :data:`PLAUSIBLE_MPP` (e.g.
            resolution tags written in another unit): pass it as ``override``.
    """
    if isinstance(override, Mapping):
        override = override.get(Path(path).name, override.get(str(path)))
    if override is not None:
        return float(override)
    props = slide.properties
    stated = props.get("openslide.mpp-x") or props.get("tiffslide.mpp-x")
    if stated in (None, ""):
        raise SlideError(f"{path}: the file does not state its pixel size (no MPP in the description, no resolution "
                         f"tags): pass it, e.g. slide_mpp={{'{Path(path).name}': 0.5}}")
    mpp = float(stated)
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        raise SlideError(f"{path}: the file states {mpp:g} um per pixel, outside the plausible {PLAUSIBLE_MPP[0]}-"
                         f"{PLAUSIBLE_MPP[1]} um (resolution tags in another unit?): pass the true pixel size, e.g. "
                         f"slide_mpp={{'{Path(path).name}': 0.5}}")
    return mpp


def _saturation_threshold(threshold: float | str):
    """``ForegroundMask``'s saturation threshold: a number, or Otsu's (never below :data:`MIN_TISSUE_SATURATION`)."""
    if threshold != "otsu":
        return float(threshold)
    threshold_otsu = optional_import("skimage.filters", name="threshold_otsu")[0]

    def otsu(channel: np.ndarray) -> float:
        flat = np.asarray(channel, dtype=float)
        return max(float(threshold_otsu(flat)) if flat.max() > flat.min() else float(flat.max()),
                   MIN_TISSUE_SATURATION)

    return otsu


def tissue_mask(slide: Any, threshold: float | str = "otsu", max_size: int = 1024,
                picture: str | os.PathLike | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of a slide on a low-resolution image of it (at most ``max_size`` pixels a side).

    Tissue is where the saturation exceeds ``threshold`` (``"otsu"``: Otsu's threshold of the image, at least
    :data:`MIN_TISSUE_SATURATION`), by MONAI's :class:`~monai.transforms.ForegroundMask`.

    Returns:
        ``(mask [h, w] bool, downsample)``: mask pixel ``(r, c)`` covers level-0 pixels from ``(c, r) * downsample``.
        With ``picture``, a PNG of the thumbnail beside the mask (tissue in green) is written there.
    """
    width, height = slide.level_dimensions[0]
    scale = max(width, height) / max_size
    size = (max(1, round(width / scale)), max(1, round(height / scale))) if scale > 1 else (width, height)
    thumb = np.asarray(slide.get_thumbnail(size).convert("RGB"))
    mask = ForegroundMask(threshold={}, hsv_threshold={"S": _saturation_threshold(threshold)})(
        np.moveaxis(thumb, -1, 0))
    mask = np.asarray(mask)[0].astype(bool)
    if picture is not None:
        overlay = thumb.copy()
        overlay[mask] = (0.5 * overlay[mask] + [0, 127, 0]).astype(np.uint8)
        side = np.concatenate([thumb, np.full((thumb.shape[0], 4, 3), 255, np.uint8), overlay], 1)
        atomic_write(picture, lambda p: Image.fromarray(side).save(p, format="PNG"))
    return mask, width / thumb.shape[1]


def plan_tiles(path: str | os.PathLike, mpp: float = 0.5, tile_size: int = 224, min_tissue: float = 0.5,
               tissue_threshold: float | str = "otsu", backend: str = "tiffslide",
               mpp_override: float | Mapping[str, float] | None = None, stride: int | None = None,
               mask_picture: str | os.PathLike | None = None) -> list[SlideTile]:
    """The tiles of one slide: a grid of ``tile_size`` tiles at ``mpp`` um/px over the slide, kept where at least
    ``min_tissue`` of the tile is tissue (:func:`tissue_mask`).

    Args:
        path: the slide file.
        mpp: output resolution in microns per pixel (0.5 is about 20x, 0.25 about 40x).
        tile_size: output tile side in pixels.
        min_tissue: share of a tile's area that must be tissue.
        tissue_threshold: saturation threshold of the mask (``"otsu"`` or a number in [0, 1]).
        backend: :data:`SLIDE_BACKENDS`.
        mpp_override: the slide's level-0 pixel size when the file does not state it (see :func:`slide_mpp`).
        stride: grid step in output pixels (default ``tile_size``: no overlap).
        mask_picture: write the tissue mask picture there.

    Raises:
        SlideError: naming the slide (unreadable, pixel size unknown, finer than the slide, or no tissue tile).
    """
    slide = open_slide(path, backend)
    try:
        return _plan(slide, path, mpp, tile_size, min_tissue, tissue_threshold, mpp_override, stride, mask_picture)
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated file, unknown compression: this slide's fault, named
        raise SlideError(f"{path}: cannot be read as a slide by {backend} ({type(e).__name__}: {e})") from e
    finally:
        slide.close()


def _plan(slide: Any, path: str | os.PathLike, mpp: float, tile_size: int, min_tissue: float,
          tissue_threshold: float | str, mpp_override: float | Mapping[str, float] | None, stride: int | None,
          mask_picture: str | os.PathLike | None) -> list[SlideTile]:
    """The tiles of :func:`plan_tiles` on an open slide."""
    base = slide_mpp(slide, path, mpp_override)
    downsample = mpp / base
    if downsample < 0.99:
        raise SlideError(f"{path}: {mpp} um per pixel is finer than the slide's {base:g}: ask for {base:g} or "
                         f"coarser")
    level = int(slide.get_best_level_for_downsample(downsample * 1.001))
    level_ds = float(slide.level_downsamples[level])
    read_size = max(1, round(tile_size * downsample / level_ds))
    footprint = tile_size * downsample  # level-0 pixels per tile side
    step = (stride or tile_size) * downsample
    mask, mask_ds = tissue_mask(slide, tissue_threshold, picture=mask_picture)
    width, height = slide.level_dimensions[0]
    tiles = []
    for y in np.arange(0, height - footprint + 1, step):
        for x in np.arange(0, width - footprint + 1, step):
            r0, r1 = int(y / mask_ds), max(int(y / mask_ds) + 1, int((y + footprint) / mask_ds))
            c0, c1 = int(x / mask_ds), max(int(x / mask_ds) + 1, int((x + footprint) / mask_ds))
            tissue = float(mask[r0:r1, c0:c1].mean()) if mask[r0:r1, c0:c1].size else 0.0
            if tissue >= min_tissue:
                tiles.append(SlideTile(os.fspath(path), int(round(x)), int(round(y)), level, read_size,
                                       tile_size, mpp, tissue, footprint))
    if not tiles:
        raise SlideError(f"{path}: no tissue found (no {tile_size} px tile at {mpp} um with at least "
                         f"{min_tissue:.0%} tissue; threshold {tissue_threshold})")
    return tiles


_OPEN: dict[tuple[int, str, str], Any] = {}
_OPEN_LOCK = threading.Lock()


def _cached_slide(path: str, backend: str) -> Any:
    """One open slide per (process, path, backend): a streamed epoch reads many tiles of each slide."""
    key = (os.getpid(), path, backend)
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = open_slide(path, backend)
        return _OPEN[key]


def stain_normalize(tile: np.ndarray) -> np.ndarray:
    """Macenko stain normalisation of an ``[H, W, 3]`` uint8 tile to MONAI's reference H&E stain
    (:class:`monai.apps.pathology.transforms.NormalizeHEStains`); a tile with too little stain to estimate its stain
    vectors (nearly blank) is returned unchanged."""
    from monai.apps.pathology.transforms import NormalizeHEStains

    try:
        return np.asarray(NormalizeHEStains()(np.ascontiguousarray(tile)), dtype=np.uint8)
    except ValueError:  # all pixels below the absorbance threshold
        return tile


def read_tile(item: Mapping[str, Any], backend: str = "tiffslide") -> np.ndarray:
    """The ``[size, size, 3]`` uint8 RGB pixels of a planned tile (a :meth:`SlideTile.item` or a
    :class:`SlideTile`), read from its level and resized with a box filter; stain-normalised when the item says
    ``"stain_normalize": true``."""
    if isinstance(item, SlideTile):
        item = item.item()
    slide = _cached_slide(str(item["image"]), backend)
    x, y = item["location"]
    region = slide.read_region((int(x), int(y)), int(item["level"]), (int(item["read_size"]),) * 2)
    region = region.convert("RGB")
    size = int(item["size"])
    if region.size != (size, size):
        region = region.resize((size, size), Image.BOX)
    tile = np.asarray(region)
    return stain_normalize(tile) if item.get("stain_normalize") else tile


def slide_datalist(slides: Sequence[str] | str | os.PathLike, mpp: float = 0.5, tile_size: int = 224,
                   min_tissue: float = 0.5, tissue_threshold: float | str = "otsu", backend: str = "tiffslide",
                   mpp_override: float | Mapping[str, float] | None = None, mask_dir: str | os.PathLike | None = None,
                   weights: str = "size", stain_normalize: bool = False) -> dict[str, Any]:
    """Plan the tiles of many slides for pre-training (streamed: nothing is written but the mask pictures).

    Args:
        slides: slide files, or a folder searched for them (:data:`SLIDE_EXTENSIONS`).
        mpp, tile_size, min_tissue, tissue_threshold, backend, mpp_override: see :func:`plan_tiles`.
        mask_dir: write ``<slide>_tissue.png`` there per slide.
        weights: ``"size"`` (every tile drawn equally often) or ``"equal"`` (every slide drawn equally often).
        stain_normalize: Macenko-normalise every tile to one reference stain (:func:`stain_normalize`) when it is
            read (streamed) or written (:func:`extract_tiles`); off by default.

    Returns:
        ``{"unlabeled": [items], "sources": {slide: {"folder", "count", "weight"}}, "bad_slides": [{"image",
        "reason"}], "settings": {...}}``: the form of :func:`~monai_histodiff.data.unlabeled.unlabeled_datalist`;
        each slide is a source and a group.
    """
    files = list_slides(slides) if isinstance(slides, (str, os.PathLike)) else [os.fspath(s) for s in slides]
    items: list[dict[str, Any]] = []
    sources: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, str]] = []
    for path in files:
        picture = None if mask_dir is None else Path(mask_dir) / f"{Path(path).stem}_tissue.png"
        try:
            tiles = plan_tiles(path, mpp, tile_size, min_tissue, tissue_threshold, backend, mpp_override,
                               mask_picture=picture)
        except SlideError as e:
            bad.append({"image": path, "reason": str(e)})
            continue
        name = Path(path).stem
        share = None if weights == "size" else 1.0
        extra = {**({} if backend == "tiffslide" else {"slide_backend": backend}),
                 **({"stain_normalize": True} if stain_normalize else {})}
        items += [dict(t.item(), sample_weight=1.0 if share is None else share / len(tiles), **extra) for t in tiles]
        sources[name] = {"folder": path, "count": len(tiles), "weight": share}
    settings = {"mpp": mpp, "tile_size": tile_size, "min_tissue": min_tissue, "tissue_threshold": tissue_threshold,
                "backend": backend, "stain_normalize": stain_normalize}
    if bad and mask_dir is not None:
        atomic_write(Path(mask_dir) / "bad_slides.json", lambda p: p.write_text(json.dumps(bad, indent=1)))
    return {"unlabeled": items, "sources": sources, "bad_slides": bad, "settings": settings}


def extract_tiles(items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, backend: str = "tiffslide",
                  subfolder_key: str | None = None) -> list[dict[str, Any]]:
    """Write each planned tile once as PNG (``<output_dir>/[<class>/]<slide>_x<X>_y<Y>.png``) and return the items
    with ``image`` the PNG and the provenance kept (``slide``, ``location``, ``level``, ``mpp``). A tile already
    written is not read again (an interrupted extraction resumes)."""
    out = Path(output_dir)
    written = []
    for it in items:
        x, y = it["location"]
        folder = out / str(it[subfolder_key]) if subfolder_key else out
        path = folder / f"{Path(str(it['image'])).stem}_x{int(x)}_y{int(y)}.png"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tile = read_tile(it, backend)
            atomic_write(path, lambda p, t=tile: Image.fromarray(t).save(p, format="PNG"))
        entry = {k: v for k, v in it.items() if k not in ("image", "read_size")}
        written.append({**entry, "image": str(path), "slide": str(it["image"])})
    return written


def read_geojson_regions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Classified regions of a QuPath GeoJSON export (a FeatureCollection, a list of features or one feature).

    Returns:
        ``[{"name": class, "polygons": [[exterior, *holes], ...]}]`` with rings as ``[[x, y], ...]`` in level-0
        pixels; features without a classification are skipped.

    Raises:
        ValueError: naming the file when it is not GeoJSON or holds no classified polygon.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable GeoJSON file ({e})") from e
    features = data.get("features", []) if isinstance(data, dict) and data.get("type") == "FeatureCollection" else (
        data if isinstance(data, list) else [data])
    regions = []
    for f in features:
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else cls
        geom = f.get("geometry") or {}
        if not name or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else list(geom["coordinates"])
        regions.append({"name": str(name), "polygons": polygons})
    if not regions:
        raise ValueError(f"{path}: no classified Polygon or MultiPolygon feature (QuPath: export annotations with "
                         f"their classification)")
    return regions


def labeled_tiles_from_regions(slide: str | os.PathLike, regions: Sequence[Mapping[str, Any]], mpp: float = 0.5,
                               tile_size: int = 224, min_tissue: float = 0.5, tissue_threshold: float | str = "otsu",
                               backend: str = "tiffslide",
                               mpp_override: float | Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The planned tissue tiles of ``slide`` that lie wholly inside one classified region (all four corners and the
    centre inside its exterior, none in a hole), labelled with the region's class; the slide is the group."""
    from matplotlib.path import Path as Polygon

    items = []
    for tile in plan_tiles(slide, mpp, tile_size, min_tissue, tissue_threshold, backend, mpp_override):
        side = tile.footprint
        points = np.array([[tile.x, tile.y], [tile.x + side, tile.y], [tile.x, tile.y + side],
                           [tile.x + side, tile.y + side], [tile.x + side / 2, tile.y + side / 2]], dtype=float)
        for region in regions:
            if any(_inside(points, rings, Polygon) for rings in region["polygons"]):
                items.append({**tile.item(), "class": region["name"]})
                break
    return items


def _inside(points: np.ndarray, rings: Sequence[Sequence[Sequence[float]]], polygon_cls: Any) -> bool:
    exterior, holes = rings[0], rings[1:]
    if not polygon_cls(np.asarray(exterior, float)).contains_points(points).all():
        return False
    return not any(polygon_cls(np.asarray(h, float)).contains_points(points).any() for h in holes)


def labeled_tiles_from_csv(path: str | os.PathLike, slide_dir: str | os.PathLike | None = None, tile_size: int = 224,
                           backend: str = "tiffslide",
                           mpp_override: float | Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Labeled tiles listed one per row: ``slide, x, y, level | mpp, label`` (level-0 ``x, y`` of the tile's top-left
    corner; either the level to read ``tile_size`` pixels from, or the output resolution in um per pixel).

    Raises:
        ValueError: naming the file and row when a column is missing or a value is not a number.
    """
    base = Path(slide_dir) if slide_dir else Path(path).parent
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                slide = str(base / row["slide"]) if not os.path.isabs(row["slide"]) else row["slide"]
                x, y, label = int(float(row["x"])), int(float(row["y"])), row["label"]
                handle = _cached_slide(slide, backend)
                if row.get("mpp") not in (None, ""):
                    mpp = float(row["mpp"])
                    downsample = mpp / slide_mpp(handle, slide, mpp_override)
                    level = int(handle.get_best_level_for_downsample(downsample * 1.001))
                    read = max(1, round(tile_size * downsample / float(handle.level_downsamples[level])))
                else:
                    level, read, mpp = int(row["level"]), tile_size, None
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}, row {n}: need slide, x, y, level or mpp, label ({e})") from e
            name = Path(slide).stem
            items.append({"image": slide, "location": [x, y], "level": level, "read_size": read, "size": tile_size,
                          "mpp": mpp, "source": name, "group": name, "class": label})
    return items


def extract_labeled_tiles(items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                          backend: str = "tiffslide") -> Path:
    """Write labeled slide tiles as a class-folder dataset (``<output_dir>/<class>/...png``) with ``groups.csv``
    (image, label, group ``slide:<slide name>``: a slide may hold several classes and is drawn whole) and
    ``provenance.jsonl``: what every labeled stage reads as ``dataset_dir``, the
    split keeping each slide on one side."""
    out = Path(output_dir)
    written = extract_tiles(items, out, backend, subfolder_key="class")
    with open(out / "groups.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "group"])
        for it in written:
            writer.writerow([os.path.relpath(it["image"], out), it["class"], f"{SLIDE_GROUP_PREFIX}{it['group']}"])
    with open(out / "provenance.jsonl", "w", encoding="utf-8") as f:
        for it in written:
            f.write(json.dumps({**it, "image": os.path.relpath(it["image"], out)}) + "\n")
    return out


class LoadTiled(MapTransform):
    """Load a tile: from its file (MONAI's ``LoadImaged``), or, for an item planned on a slide (it has
    ``location``), from the slide region (:func:`read_tile`) as the same ``[C, H, W]`` array as a tile file.

    Args:
        keys: keys of the image paths.
        reader: the ``LoadImaged`` reader for tile files.
        backend: the slide backend (:data:`SLIDE_BACKENDS`).
    """

    def __init__(self, keys: KeysCollection, reader: Any, backend: str = "tiffslide",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.load = LoadImaged(keys, reader=reader, image_only=True, ensure_channel_first=True,
                               allow_missing_keys=allow_missing_keys)
        self.backend = backend

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if "location" not in data:
            return self.load(data)
        d = dict(data)
        backend = d.get("slide_backend", self.backend)
        for key in self.key_iterator(d):
            d[key] = np.ascontiguousarray(np.moveaxis(read_tile({**d, "image": d[key]}, backend), -1, 0))
        return d
