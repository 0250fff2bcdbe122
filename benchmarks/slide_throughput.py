"""Tiles per second from whole-slide images: streamed from the slides vs extracted once to PNG.

    python benchmarks/slide_throughput.py ../shared/data/wsi > benchmarks/results/slide_throughput.json

On the given slides (the TCGA slide, which states no pixel size, is read at 0.5 um per level-0 pixel), at
``--mpp`` um per pixel and ``--tile_size`` px: the time to plan the tiles (tissue mask and grid), then, over the same
tiles, the rate at which a training loader (``tile_transforms``, MONAI ``DataLoader``, ``--num_workers``) delivers
them streamed from the slides and read back from PNG files extracted once, and what the extraction costs (seconds
and bytes on disk). Each rate is the median of ``--rounds`` passes over every tile. Last, what the optional Macenko
stain normalisation changes that can be measured here: the spread across slides of their tiles' mean colour (the
stain differences between scanners and labs that normalisation is for), with and without it, and its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from monai.data import DataLoader, Dataset

from monai_histodiff.data import slide_datalist, tile_transforms
import numpy as np

from monai_histodiff.data.slides import extract_tiles, list_slides, read_tile


def _rate(items: list[dict], tile_size: int, workers: int, rounds: int) -> float:
    loader = DataLoader(Dataset(items, tile_transforms(tile_size)), batch_size=32, num_workers=workers)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = sum(batch["image"].shape[0] for batch in loader)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slides", help="folder of slides")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--tile_size", type=int, default=224)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    files = list_slides(a.slides)
    start = time.perf_counter()
    listing = slide_datalist(files, mpp=a.mpp, tile_size=a.tile_size, mpp_override={
        "TCGA-CR-7395-01A-01-TS1.svs": 0.5, "CMU-1-Small-Region.jpeg.tiff": 0.499})
    plan_s = time.perf_counter() - start
    items = listing["unlabeled"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        written = extract_tiles(items, tmp)
        extract_s = time.perf_counter() - start
        disk = sum(os.path.getsize(it["image"]) for it in written)
        extracted = _rate([{"image": it["image"]} for it in written], a.tile_size, a.num_workers, a.rounds)
    streamed = _rate(items, a.tile_size, a.num_workers, a.rounds)
    colour = {}
    of = {name: [it for it in items if it["source"] == name][:50] for name in listing["sources"]}
    for normalise in (False, True):
        start = time.perf_counter()
        means = [np.mean([read_tile({**it, "stain_normalize": normalise}).reshape(-1, 3).mean(0) for it in of[name]],
                         axis=0) for name in of]
        colour["normalised" if normalise else "as scanned"] = {
            "per_slide_mean_rgb": {n: [round(float(v), 1) for v in m] for n, m in zip(listing["sources"], means)},
            "spread_across_slides": round(float(np.std(means, axis=0).mean()), 2),
            "seconds": round(time.perf_counter() - start, 2)}
    result = {
        "command": "python benchmarks/slide_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cores", "slides": {Path(info["folder"]).name: info["count"]
                                               for info in listing["sources"].values()},
        "bad_slides": listing["bad_slides"], "mpp": a.mpp, "tile_size": a.tile_size, "tiles": len(items),
        "num_workers": a.num_workers, "plan_seconds": round(plan_s, 2),
        "streamed_tiles_per_s": round(streamed, 1), "extracted_tiles_per_s": round(extracted, 1),
        "extract_seconds": round(extract_s, 2), "extract_tiles_per_s": round(len(items) / extract_s, 1),
        "extracted_bytes_per_tile": round(disk / len(items)),
        "stain": colour,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
