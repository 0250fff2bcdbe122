"""Does guiding on fewer steps keep the tiles right? The judge's conditional accuracy per guidance schedule.

    python benchmarks/guidance_interval_judged.py runs/lung/ablation_no_pretrain runs/lung/judge/classifier.pt \\
        --steps 50 200 --intervals 1 2 4 8 --windows 0:499 500:999 --per_class 150

For one adapted site folder (its checkpoints, ``split.json``) and each DDIM step count, generates ``per_class`` tiles
per class with the ``generate`` bundle: unguided (g = 0, the floor), then at guidance scale 1 on every
``guidance_interval``-th step (1 is the paper's: every step) and on every step of a timestep window ``t_min:t_max``
only. Every setting draws the same tile seeds, so the tiles differ only where the schedule changed them, and each
setting is compared with the paper's schedule (g = 1, every step) tile by tile
(:func:`monai_histodiff.metrics.judge.paired_agreement`): the difference of conditional accuracy with a paired 95%
interval, and the share of tiles the judge labels alike. Writes ``results/guidance_interval_judged.json`` (settings,
date, machine, seconds per setting with model loading; speed is measured by ``guided_sampling.py``).
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


def parse_window(text: str) -> tuple[int, int]:
    """``"t_min:t_max"`` -> ``(t_min, t_max)``."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"a window is t_min:t_max, got {text!r}")
    return int(lo), int(hi)


def schedules(intervals: list[int], windows: list[tuple[int, int]]) -> list[dict]:
    """The settings of one step count: the unguided floor, the paper's schedule first among the guided ones, then
    the other intervals and the windows."""
    out = [{"guidance_scale": 0.0, "guidance_interval": 1, "guidance_window": None},
           {"guidance_scale": 1.0, "guidance_interval": 1, "guidance_window": None}]
    out += [{"guidance_scale": 1.0, "guidance_interval": k, "guidance_window": None} for k in intervals if k != 1]
    out += [{"guidance_scale": 1.0, "guidance_interval": 1, "guidance_window": list(w)} for w in windows]
    return out


def _name(s: dict) -> str:
    window = "" if s["guidance_window"] is None else "_t{}-{}".format(*s["guidance_window"])
    return f"g{s['guidance_scale']:g}_every{s['guidance_interval']}{window}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", help="an adapted site folder (an experiment's output or ablation folder)")
    parser.add_argument("judge", help="the judge checkpoint (a train_downstream classifier.pt)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--windows", type=parse_window, nargs="*", default=[], help="t_min:t_max, guided every step")
    parser.add_argument("--per_class", type=int, default=48)
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--output", default=str(RESULTS / "guidance_interval_judged.json"))
    args = parser.parse_args(argv)

    import torch

    from monai_histodiff.data import load_datalist
    from monai_histodiff.metrics.judge import judge_generated, paired_agreement
    from monai_histodiff.apps.pipeline import run_stage

    site = Path(args.site).resolve()
    classes = load_datalist(site / "split.json")["classes"]
    rows = []
    for steps in args.steps:
        reference = None
        for s in schedules(args.intervals, args.windows):
            out = site / "interval_check" / f"{_name(s)}_steps{steps}"
            t0 = time.time()
            run_stage("generate", site / "logs", log_name=f"interval_check_{_name(s)}_steps{steps}", quiet=True,
                      output_dir=site.as_posix(), split_file=(site / "split.json").as_posix(),
                      synthetic_dir=out.as_posix(), counts=[args.per_class] * len(classes), num_inference_steps=steps,
                      **s)
            seconds = time.time() - t0
            judged = judge_generated(args.judge, out, site / "split.json", per_tile=True)
            acc, fd = judged["conditional_accuracy"], judged["frechet"]
            row = {**s, "steps": steps, "tiles": len(judged["tiles"]), "seconds": round(seconds, 1),
                   "conditional_accuracy": round(acc["accuracy"], 4),
                   "per_class": {c: round(v["accuracy"], 4) for c, v in acc["per_class"].items()},
                   "fd": None if fd.get("overall") is None else round(fd["overall"], 4)}
            if s["guidance_scale"] == 1.0 and s["guidance_interval"] == 1 and s["guidance_window"] is None:
                reference = judged["tiles"]
            elif reference is not None:
                paired = paired_agreement(reference, judged["tiles"])
                row["vs_every_step"] = {**paired, "diff": round(paired["diff"], 4),
                                        "ci95": [round(x, 4) for x in paired["ci95"]]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"benchmark": "guidance_interval_judged", "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "site": site.name, "judge": str(args.judge),
              "per_class": args.per_class, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "torch": torch.__version__, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result, classes))
    return result


def table(result: dict, classes: list[str]) -> str:
    """The markdown table of a result: one row per step count and schedule."""
    lines = ["| steps | g | interval | window | conditional accuracy | " + " | ".join(classes)
             + " | vs every step: diff [95% CI] | same judged label | FD (judge) | seconds |",
             "|---|---|---|---|---|" + "---|" * len(classes) + "---|---|---|---|"]
    for r in result["rows"]:
        p = r.get("vs_every_step")
        paired = "-" if p is None else f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
        same = "-" if p is None else f"{p['same_prediction'] / p['n']:.3f}"
        window = "all" if r["guidance_window"] is None else "{}-{}".format(*r["guidance_window"])
        lines.append(f"| {r['steps']} | {r['guidance_scale']:g} | {r['guidance_interval']} | {window} | "
                     f"{r['conditional_accuracy']:.3f} | " + " | ".join(f"{r['per_class'][c]:.3f}" for c in classes)
                     + f" | {paired} | {same} | {r['fd']} | {r['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
