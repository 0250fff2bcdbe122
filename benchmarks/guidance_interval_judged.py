"""Does guiding on fewer steps keep the tiles right? The judge's conditional accuracy per ``guidance_interval``.

    python benchmarks/guidance_interval_judged.py runs/lung/ablation_no_pretrain runs/lung/judge/classifier.pt \\
        --intervals 1 2 4 --per_class 48

For one adapted site folder (its checkpoints, ``split.json``), generates ``per_class`` tiles per class with the
``generate`` bundle at guidance scale 1 for each interval (and unguided, g = 0, as the floor), the same tile seeds in
every setting, and measures each set with the independent judge (conditional accuracy per class, Frechet distance in
its features). Writes ``results/guidance_interval_judged.json`` (settings, date, machine, seconds per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", help="an adapted site folder (an experiment's output or ablation folder)")
    parser.add_argument("judge", help="the judge checkpoint (a train_downstream classifier.pt)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--per_class", type=int, default=48)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", default=str(RESULTS / "guidance_interval_judged.json"))
    args = parser.parse_args(argv)

    import torch

    from monai_histodiff.data import load_datalist
    from monai_histodiff.metrics.judge import judge_generated
    from monai_histodiff.pipeline import run_stage

    site = Path(args.site).resolve()
    classes = load_datalist(site / "split.json")["classes"]
    settings = [(0.0, 1)] + [(1.0, k) for k in args.intervals]
    rows = []
    for g, k in settings:
        out = site / "interval_check" / f"g{g:g}_every{k}_steps{args.steps}"
        t0 = time.time()
        run_stage("generate", site / "logs", log_name=f"interval_check_g{g:g}_every{k}", quiet=True,
                  output_dir=site.as_posix(), split_file=(site / "split.json").as_posix(), synthetic_dir=out.as_posix(),
                  counts=[args.per_class] * len(classes), num_inference_steps=args.steps, guidance_scale=g,
                  guidance_interval=k)
        seconds = time.time() - t0
        judged = judge_generated(args.judge, out, site / "split.json")
        acc, fd = judged["conditional_accuracy"], judged["frechet"]
        rows.append({"guidance_scale": g, "guidance_interval": k, "steps": args.steps, "seconds": round(seconds, 1),
                     "conditional_accuracy": round(acc["accuracy"], 4),
                     "per_class": {c: round(v["accuracy"], 4) for c, v in acc["per_class"].items()},
                     "fd": None if fd.get("overall") is None else round(fd["overall"], 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "guidance_interval_judged", "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "site": site.name, "judge": str(args.judge),
              "per_class": args.per_class, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "torch": torch.__version__, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print("| g | guidance_interval | conditional accuracy | " + " | ".join(classes) + " | FD (judge) | seconds |")
    print("|---|---|---|" + "---|" * len(classes) + "---|---|")
    for r in rows:
        print(f"| {r['guidance_scale']:g} | {r['guidance_interval']} | {r['conditional_accuracy']:.3f} | "
              + " | ".join(f"{r['per_class'][c]:.3f}" for c in classes) + f" | {r['fd']} | {r['seconds']} |")
    return result


if __name__ == "__main__":
    main()
