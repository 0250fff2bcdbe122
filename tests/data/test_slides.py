"""Whole-slide images to tiles: pixel size from the file, pyramid level, tissue mask, streamed = extracted tiles,
annotated regions and tile lists to labeled class folders, unreadable slides reported, on real slides and on
pyramidal TIFFs written here."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.data import ensure_split, prepare_unlabeled, tile_transforms
from monai_histodiff.data.slides import (
    SlideError,
    extract_labeled_tiles,
    extract_tiles,
    is_slide,
    labeled_tiles_from_csv,
    labeled_tiles_from_regions,
    open_slide,
    plan_tiles,
    read_geojson_regions,
    read_tile,
    slide_datalist,
    slide_mpp,
)

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide", reason="the default slide backend: pip install tiffslide imagecodecs")


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """H&E-like pixels: pink stroma with purple blobs (saturated, unlike the white glass)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (230, 150, 190)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(h * w // 400):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = (110, 60, 160)
    return img


def write_pyramid(path, width=1024, height=512, mpp=0.25, levels=3, blank_right=True):
    """A tiled pyramidal TIFF: level k downsampled 2^k, resolution tags in pixels per centimetre, the right half
    blank glass when ``blank_right``."""
    base = np.full((height, width, 3), 245, np.uint8)
    base[:, : width // 2 if blank_right else width] = _tissue(height, width // 2 if blank_right else width)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        res = (1e4 / mpp, 1e4 / mpp)
        tif.write(base, tile=(128, 128), photometric="rgb", resolution=res, resolutionunit="CENTIMETER",
                  subifds=levels - 1, compression="zlib")
        for k in range(1, levels):
            level = np.asarray(Image.fromarray(base).resize((width >> k, height >> k), Image.BOX))
            tif.write(level, tile=(64, 64) if k < 2 else None, photometric="rgb", subfiletype=1,
                      resolution=(res[0] / 2 ** k, res[1] / 2 ** k), resolutionunit="CENTIMETER",
                      compression="zlib")
    return path


def test_written_pyramid_pixel_size_level_and_blank_region(tmp_path):
    path = write_pyramid(tmp_path / "pyramid.tif")
    assert is_slide(path) and not is_slide(tmp_path / "x.png")
    slide = open_slide(path)
    assert slide_mpp(slide, path) == pytest.approx(0.25) and len(slide.level_dimensions) == 3
    # 1 um per pixel is 4x the level-0 size: read from level 2 (downsample 4) without resizing
    tiles = plan_tiles(path, mpp=1.0, tile_size=32, min_tissue=0.5, mask_picture=tmp_path / "mask.png")
    assert {t.level for t in tiles} == {2} and {t.read_size for t in tiles} == {32}
    assert all(t.x + t.footprint <= 512 for t in tiles)  # nothing from the blank right half
    assert len(tiles) == (512 // 128) * (512 // 128)  # every tile of the tissue half
    assert Image.open(tmp_path / "mask.png").size[0] > 0
    # 0.5 um: between levels 1 and 2, read from level 1 (2x) at tile size
    assert {t.level for t in plan_tiles(path, mpp=0.5, tile_size=32)} == {1}
    # 0.375 um: level 0, a 48 px region resized to 32
    t = plan_tiles(path, mpp=0.375, tile_size=32)[0]
    assert (t.level, t.read_size) == (0, 48) and read_tile(t).shape == (32, 32, 3)
    with pytest.raises(SlideError, match="finer than the slide"):
        plan_tiles(path, mpp=0.1, tile_size=32)


def test_a_blank_slide_has_no_tissue_and_is_named(tmp_path):
    path = tmp_path / "blank.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((256, 256, 3), 246, np.uint8), tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4),
                  resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match="blank.tif: no tissue found"):
        plan_tiles(path, mpp=0.5, tile_size=32)


def test_real_aperio_slide_streamed_equals_extracted(wsi_dir, tmp_path):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    assert slide_mpp(open_slide(svs), svs) == pytest.approx(0.499)  # Aperio's MPP in the ImageDescription
    listing = slide_datalist([str(svs)], mpp=1.0, tile_size=64, mask_dir=tmp_path / "masks")
    items = listing["unlabeled"]
    assert items and not listing["bad_slides"] and (tmp_path / "masks" / "CMU-1-Small-Region_tissue.png").is_file()
    assert {it["group"] for it in items} == {"CMU-1-Small-Region"} and {it["level"] for it in items} == {0}
    # tiles lie on tissue: saturated H&E pixels, not white glass
    rgb = read_tile(items[0]).astype(float)
    assert (rgb.max(-1) - rgb.min(-1)).mean() > 30
    # a streamed tile and the same tile extracted to PNG give the same tensor to every stage
    written = extract_tiles(items[:3], tmp_path / "tiles")
    load = tile_transforms(64)
    for streamed, png in zip(items[:3], written):
        assert png["slide"] == str(svs) and png["location"] == streamed["location"]
        assert torch.equal(load(dict(streamed))["image"], load({"image": png["image"]})["image"])


def test_pixel_size_stated_wrongly_or_not_at_all_is_an_error_naming_the_slide(wsi_dir):
    generic = wsi_dir / "CMU-1-Small-Region.jpeg.tiff"
    with pytest.raises(SlideError, match=r"CMU-1-Small-Region.jpeg.tiff: the file states 0.00499 um"):
        plan_tiles(generic, mpp=1.0, tile_size=64)
    a = plan_tiles(generic, mpp=1.0, tile_size=64, mpp_override={"CMU-1-Small-Region.jpeg.tiff": 0.499})
    b = plan_tiles(wsi_dir / "CMU-1-Small-Region.svs", mpp=1.0, tile_size=64)
    # the same tissue re-encoded: the same tiles, pixels within JPEG re-encoding error
    assert [(t.x, t.y) for t in a] == [(t.x, t.y) for t in b]
    diff = np.abs(read_tile(a[0]).astype(float) - read_tile(b[0]).astype(float)).mean()
    assert diff < 12
    tcga = wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(SlideError, match="TCGA-CR-7395-01A-01-TS1.svs: the file does not state its pixel size"):
        plan_tiles(tcga, mpp=1.0, tile_size=64)


def test_two_level_jpeg2000_slide_read_from_the_right_level(wsi_dir):
    tcga = wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    coarse = plan_tiles(tcga, mpp=1.0, tile_size=64, mpp_override=0.5)
    fine = plan_tiles(tcga, mpp=0.5, tile_size=64, mpp_override=0.5)
    assert {t.level for t in coarse} == {1} and {t.read_size for t in coarse} == {64}
    assert {t.level for t in fine} == {0} and len(fine) > 3 * len(coarse)
    # level 1 holds the same tissue as level 0 at half the size: the tile correlates with level 0 read at its place
    # (the scanner's own downsampling and JPEG 2000 differ from a box filter), not with level 0 half a tile away
    slide = open_slide(tcga)

    def grey(location):
        return np.asarray(slide.read_region(location, 0, (128, 128)).convert("L").resize((64, 64), Image.BOX), float)

    same, shifted = [], []
    for t in coarse[::20]:
        tile = np.asarray(Image.fromarray(read_tile(t)).convert("L"), float).ravel()
        same.append(np.corrcoef(grey((t.x, t.y)).ravel(), tile)[0, 1])
        shifted.append(np.corrcoef(grey((t.x + 64, t.y + 64)).ravel(), tile)[0, 1])
    assert np.mean(same) > 0.55 and np.mean(same) - np.mean(shifted) > 0.4


def test_hand_written_geojson_regions_become_labeled_class_folders(wsi_dir, tmp_path):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    tiles = plan_tiles(svs, mpp=1.0, tile_size=64)
    first, second = tiles[0], tiles[-1]

    def square(t, margin=4):
        x0, y0, x1, y1 = t.x - margin, t.y - margin, t.x + t.footprint + margin, t.y + t.footprint + margin
        return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]

    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(first)},
                 "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(second)},
                 "properties": {"classification": {"name": "Stroma", "color": [0, 0, 255]}}},
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(first)},
                 "properties": {"objectType": "annotation"}}]  # unclassified: ignored
    geojson = tmp_path / "annotations.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    regions = read_geojson_regions(geojson)
    assert [r["name"] for r in regions] == ["Tumor", "Stroma"]
    labeled = labeled_tiles_from_regions(svs, regions, mpp=1.0, tile_size=64)
    assert [(it["class"], tuple(it["location"])) for it in labeled] == [("Tumor", (first.x, first.y)),
                                                                          ("Stroma", (second.x, second.y))]
    # a region a few pixels smaller than the tile holds no tile
    small = [{"name": "Tumor", "polygons": [square(first, margin=-4)]}]
    assert labeled_tiles_from_regions(svs, small, mpp=1.0, tile_size=64) == []
    out = extract_labeled_tiles(labeled, tmp_path / "labeled")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Stroma", "Tumor"]
    rows = list(csv.DictReader(open(out / "groups.csv")))
    assert {r["group"] for r in rows} == {"slide:CMU-1-Small-Region"} and len(rows) == 2
    # the slide is one group holding both classes: drawn whole, never on two sides of the split
    split = ensure_split(tmp_path / "split.json", dataset_dir=out, per_class=1, val_fraction=0.0)
    assert split["classes"] == ["Stroma", "Tumor"] and len(split["training"]) + len(split["test"]) == 2
    assert {it["group"] for it in split["training"] + split["test"]} == {"slide:CMU-1-Small-Region"}
    assert not split["training"] or not split["test"]
    with pytest.raises(ValueError, match="no classified Polygon"):
        (tmp_path / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
        read_geojson_regions(tmp_path / "empty.geojson")


def test_tile_list_csv_with_level_or_pixel_size(wsi_dir, tmp_path):
    rows = [{"slide": "CMU-1-Small-Region.svs", "x": 1000, "y": 500, "level": 0, "mpp": "", "label": "a"},
            {"slide": "CMU-1-Small-Region.svs", "x": 1200, "y": 900, "level": "", "mpp": 1.0, "label": "b"}]
    listing = tmp_path / "tiles.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "x", "y", "level", "mpp", "label"])
        writer.writeheader()
        writer.writerows(rows)
    items = labeled_tiles_from_csv(listing, slide_dir=wsi_dir, tile_size=64)
    assert [it["class"] for it in items] == ["a", "b"] and [it["read_size"] for it in items] == [64, 128]
    assert all(read_tile(it).shape == (64, 64, 3) for it in items)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,x,label\nCMU-1-Small-Region.svs,1,a\n")
    with pytest.raises(ValueError, match="bad.csv, row 2"):
        labeled_tiles_from_csv(bad, slide_dir=wsi_dir)


def test_unlabeled_sources_with_slides_tiles_and_a_broken_slide(wsi_dir, tmp_path):
    """.svs files are listed, pyramidal TIFFs are planned as slides (not rejected as decompression bombs), a
    truncated slide is reported in bad_files.json and the run goes on."""
    source = tmp_path / "site"
    source.mkdir()
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", source)
    write_pyramid(source / "pyramid.tif")
    (source / "broken.svs").write_bytes((wsi_dir / "CMU-1-Small-Region.svs").read_bytes()[:5000])
    Image.fromarray(_tissue(64, 64)).save(source / "tile.png")
    data = prepare_unlabeled({"site": str(source)}, tmp_path / "run" / "unlabeled.json", weights="equal",
                             slides={"mpp": 1.0, "tile_size": 64})
    slides = {it["source"] for it in data["unlabeled"] if "location" in it}
    assert slides == {"CMU-1-Small-Region", "pyramid"}
    assert [it["image"] for it in data["unlabeled"] if "location" not in it] == [str(source / "tile.png")]
    bad = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert [b["image"] for b in bad] == [str(source / "broken.svs")] and "broken.svs" in bad[0]["reason"]
    assert (tmp_path / "run" / "slide_masks" / "pyramid_tissue.png").is_file()
    # every slide gets the draws of one source, as the tile folder does ("equal" weights)
    mass = {}
    for it in data["unlabeled"]:
        mass[it["source"]] = mass.get(it["source"], 0.0) + it["sample_weight"]
    assert mass["CMU-1-Small-Region"] == pytest.approx(1.0) and mass["pyramid"] == pytest.approx(1.0)
    assert mass["site"] == pytest.approx(1.0)  # the tile beside the slides keeps its source's whole share


def test_stain_normalisation_is_off_by_default_and_moves_the_stain(wsi_dir):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    plain = slide_datalist([str(svs)], mpp=1.0, tile_size=64)["unlabeled"]
    normed = slide_datalist([str(svs)], mpp=1.0, tile_size=64, stain_normalize=True)["unlabeled"]
    assert "stain_normalize" not in plain[0] and normed[0]["stain_normalize"] is True
    a, b = read_tile(plain[0]).astype(float), read_tile(normed[0]).astype(float)
    assert a.shape == b.shape and np.abs(a - b).mean() > 3  # a different stain, the same tissue layout
    assert np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1] > 0.8
    from monai_histodiff.data.slides import stain_normalize

    blank = np.full((16, 16, 3), 245, np.uint8)
    assert np.array_equal(stain_normalize(blank), blank)  # too little stain to estimate: unchanged
