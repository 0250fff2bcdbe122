"""Wall time of the ``generate`` stage as a user runs it, from the command to the last tile, per setting and run size.

    python benchmarks/generate_stage_wall.py runs/lung/ablation_no_pretrain --tiles 144 432 \\
        --settings eager compile=cold compile=warm --set guidance_interval=4

Each run is ``python -m monai.bundle run`` of the installed ``generate`` configs (at the CPU size) in a fresh process,
into a fresh folder, with the site's checkpoints: process start, imports, checkpoint loading, the first batches'
compilation where ``compile`` is on, sampling, PNG tiles, manifest and grids. ``eager`` runs the networks as loaded,
``compile=*`` with ``compile`` and ``channels_last`` on. ``compile=cold`` runs with an empty
TorchInductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new temporary folder: a first run on a new machine or after an
upgrade), ``compile=warm`` with the cache the cold run of the same size filled (a second run on the same machine).
Two run sizes give each setting's fixed cost and its cost per tile (a straight line through the two), so the number
of tiles from which compiling pays can be read off. Writes ``results/generate_stage_wall.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guided_sampling import spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> (overrides, inductor cache); compiled with channels-last, the fastest compiled setting of guided_sampling.py
SETTINGS = {"eager": ({"compile": False, "channels_last": False}, None),
            "compile=cold": ({"compile": True, "channels_last": True}, "cold"),
            "compile=warm": ({"compile": True, "channels_last": True}, "warm")}


def line_fit(points: list[tuple[int, float]]) -> dict:
    """Fixed seconds and seconds per tile of the least-squares line through two or more ``(tiles, seconds)``."""
    fit = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return {"fixed_s": round(fit.intercept, 2), "s_per_tile": round(fit.slope, 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", help="an adapted site folder (its checkpoints and split.json)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[144, 432], help="run sizes (tiles, over the classes)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--set", nargs="*", default=[], help="overrides every run gets, key=value")
    parser.add_argument("--output", default=str(RESULTS / "generate_stage_wall.json"))
    args = parser.parse_args(argv)
    if len(args.tiles) < 2:
        parser.error("--tiles needs two run sizes or more (fixed cost and cost per tile)")
    if "compile=warm" in args.settings and "compile=cold" not in args.settings:
        parser.error("compile=warm reuses the cache of the compile=cold runs: name both")

    import torch

    from monai_histodiff.data import load_datalist
    from monai_histodiff.apps.pipeline import bundle_command, override_value

    site = Path(args.site).resolve()
    classes = load_datalist(site / "split.json")["classes"]
    common = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes key=value, got {item!r}")
        common[key] = override_value(value)
    work = Path(tempfile.mkdtemp(prefix="generate_wall_"))
    rows = []
    try:
        for tiles in args.tiles:
            counts = spread(tiles, len(classes))
            cache = work / f"inductor_{tiles}"
            for name in args.settings:
                overrides, cache_state = SETTINGS[name]
                out = work / f"{name.replace('=', '_')}_{tiles}"
                cmd = bundle_command("generate", True, output_dir=site.as_posix(),
                                     split_file=(site / "split.json").as_posix(), synthetic_dir=out.as_posix(),
                                     counts=counts, **common, **overrides)
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if cache_state is not None:
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
                    if cache_state == "cold":
                        shutil.rmtree(cache, ignore_errors=True)
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}, {tiles} tiles failed:\n{proc.stderr[-3000:]}")
                written = sum(1 for _ in open(out / "manifest.jsonl"))
                if written != tiles:
                    raise RuntimeError(f"{name}, {tiles} tiles: the manifest has {written} rows")
                rows.append({"setting": name, "tiles": tiles, "seconds": round(seconds, 1),
                             "tiles_per_s": round(tiles / seconds, 2)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fits = {name: line_fit([(r["tiles"], r["seconds"]) for r in rows if r["setting"] == name])
            for name in args.settings}
    eager = fits.get("eager")
    for name, fit in fits.items():
        if eager is not None and name != "eager":
            saved = eager["s_per_tile"] - fit["s_per_tile"]
            extra = fit["fixed_s"] - eager["fixed_s"]
            fit["pays_from_tiles"] = round(extra / saved) if saved > 0 else None
    result = {"benchmark": "generate_stage_wall", "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "site": site.name, "overrides": common,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "rows": rows, "fits": fits,
              "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print("| setting | " + " | ".join(f"{t} tiles: s (tiles/s)" for t in args.tiles)
          + " | fixed s | s per tile | compiling pays from |")
    print("|---|" + "---|" * len(args.tiles) + "---|---|---|")
    for name in args.settings:
        cells = [f"{r['seconds']} ({r['tiles_per_s']})" for r in rows if r["setting"] == name]
        fit = fits[name]
        pays = fit.get("pays_from_tiles", "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {fit['fixed_s']} | {fit['s_per_tile']} | {pays} |")
    return result


if __name__ == "__main__":
    main()
