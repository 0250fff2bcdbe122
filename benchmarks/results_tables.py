"""Markdown tables of an experiment folder for docs/results.md: every number read from the files the run wrote.

    python benchmarks/results_tables.py runs/lung > /tmp/tables.md
    python benchmarks/results_tables.py runs/lung_seeds_sources --against site=runs/lung_seeds > /tmp/tables.md

Prints: the split, the adaptation checks (latent classifier per noise bucket beside the auxiliary classifier), the
judge, the guidance sweep (judged conditional accuracy per scale and DDIM steps, per class), the pool rounds, what
selection kept and rejected (judged), per-class FD (for each generator's pool), Table 1 (results.md), the rows against
each other paired by seed (e.g. HistoDiffusion's selective 200% against StyleGAN2's; with ``--against LABEL=DIR``
also the rows of other folders that share this folder's split and baseline rows, e.g. another pre-training setting,
named ``LABEL: row``) and the ablations' tables.
"""

from __future__ import annotations

import json
from pathlib import Path


def _f(x: float | None, nd: int = 3) -> str:
    return "/" if x is None else f"{x:.{nd}f}"


def split_table(out: Path) -> list[str]:
    split = json.loads((out / "split.json").read_text())
    counts = split.get("counts", {})
    lines = ["| part | " + " | ".join(split["classes"]) + " |", "|---|" + "---|" * len(split["classes"])]
    for part in ("training", "validation", "test", "pool"):
        if part in counts:
            lines.append(f"| {part} | " + " | ".join(str(c) for c in counts[part]) + " |")
    return lines


def adaptation_table(report: dict) -> list[str]:
    lat = report["latent_classifier"]
    lines = [f"Auxiliary image classifier phi, best validation accuracy (top-1): {_f(report.get('aux_classifier'))}; "
             f"chance {_f(lat['chance'])}.", "",
             "| t bucket | " + " | ".join(f"{b['t_min']}-{b['t_max']}" for b in lat["buckets"]) + " |",
             "|---|" + "---|" * len(lat["buckets"]),
             "| latent classifier accuracy | " + " | ".join(_f(b["accuracy"], 2) for b in lat["buckets"]) + " |"]
    return lines


def sweep_table(report: dict) -> list[str]:
    sweep = report.get("judge", {}).get("sweep") or []
    if not sweep:
        return ["(no sweep)"]
    classes = list(sweep[0]["per_class"])
    lines = ["| DDIM steps | g | conditional accuracy | " + " | ".join(classes) + " | FD (judge) | seconds |",
             "|---|---|---|" + "---|" * len(classes) + "---|---|"]
    for s in sweep:
        lines.append(f"| {s['steps']} | {s['guidance_scale']:g} | {_f(s['conditional_accuracy'])} | "
                     + " | ".join(_f(s["per_class"][c]) for c in classes) + f" | {_f(s.get('fd'))} | {s['seconds']} |")
    return lines


def selection_table(report: dict) -> list[str]:
    lines = ["| row | kept / quota | status | judged accuracy of kept | of rejected | FD kept (judge) |",
             "|---|---|---|---|---|---|"]
    for name, sel in report.get("selections", {}).items():
        judged = sel.get("judge") or {}
        kept, rej = judged.get("kept") or {}, judged.get("rejected") or {}
        fd = (judged.get("frechet_kept") or {}).get("overall")
        lines.append(f"| {name} | {sel['kept_total']} / {sel['quota_total']} | {sel['status']} | "
                     f"{_f(kept.get('accuracy'))} (n={kept.get('count', 0)}) | "
                     f"{_f(rej.get('accuracy'))} (n={rej.get('count', 0)}) | {_f(fd)} |")
    return lines


def pool_table(report: dict, key: str = "pool") -> list[str]:
    """One generator's pool (``pool``: HistoDiffusion, ``pool_stylegan2``: the GAN baseline): rounds and judge."""
    pool = report.get(key) or {}
    judged = (report.get("judge") or {}).get(key) or {}
    lines = []
    for i, r in enumerate(pool.get("rounds", [])):
        lines.append(f"- round {i}: generated {r['counts']}, selectable {r.get('eligible')}, largest quota {r.get('quota')}")
    acc = judged.get("conditional_accuracy") or {}
    if acc:
        per = ", ".join(f"{c} {_f(v['accuracy'])}" for c, v in acc["per_class"].items())
        lines.append(f"- judged conditional accuracy of the whole pool: {_f(acc['accuracy'])} of {acc['count']} ({per})")
        fd = judged.get("frechet") or {}
        per_fd = ", ".join(f"{c} {_f((v or {}).get('fd'))}" for c, v in (fd.get("per_class") or {}).items())
        lines.append(f"- {fd.get('metric_name')}, pool vs real training + validation tiles "
                     f"({fd.get('num_samples')} per set): overall {_f(fd.get('overall'))}; per class {per_fd}")
        lines.append("- judge confusion of the pool (rows requested, columns judged): " + str(acc.get("confusion")))
    return lines


def _rows_by_seed(root: Path, metric: str) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """A folder's ``results.csv``: the baseline's ``metric`` per seed and every other row's."""
    import csv

    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    baseline: dict[int, float] = {}
    per_row: dict[str, dict[int, float]] = {}
    for r in rows:
        target = baseline if r["mode"] == "baseline" else per_row.setdefault(r["row"], {})
        target[int(r["seed"])] = float(r[metric])
    return baseline, per_row


def between_rows_table(root: Path, metric: str = "accuracy", against: dict[str, Path] | None = None) -> list[str]:
    """Every pair of non-baseline rows compared seed by seed (``results.csv``): the paired difference of ``metric``
    (first row minus second), its 95% interval, and on how many seeds the first is above; e.g. HistoDiffusion's
    selective 200% against StyleGAN2's on the same seeds and baseline.

    ``against`` adds the rows of other folders (``{label: folder}``, rows named ``label: row``); their baseline rows
    must equal this folder's seed by seed (the folders share the split, the seeds and the baseline's files), otherwise
    the pairing would mean nothing and a ValueError says which folder differs."""
    from itertools import combinations

    from monai_histodiff.apps.experiment import paired_interval

    baseline, per_row = _rows_by_seed(root, metric)
    for label, folder in (against or {}).items():
        other_baseline, other_rows = _rows_by_seed(folder, metric)
        shared = set(baseline) & set(other_baseline)
        if not shared or any(abs(baseline[s] - other_baseline[s]) > 1e-9 for s in shared):
            raise ValueError(f"{folder}: its baseline rows differ from {root}'s (or share no seed): not paired")
        per_row.update({f"{label}: {name}": values for name, values in other_rows.items()})
    lines = [f"| first row | second row | seeds | {metric} difference (paired) [95% interval] | first above on |",
             "|---|---|---|---|---|"]
    for a, b in combinations(per_row, 2):
        seeds = sorted(set(per_row[a]) & set(per_row[b]))
        d = [per_row[a][s] - per_row[b][s] for s in seeds]
        if len(d) < 2:
            continue
        mean = sum(d) / len(d)
        lo, hi = paired_interval(d)
        lines.append(f"| {a} | {b} | {len(d)} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {sum(x > 0 for x in d)} of "
                     f"{len(d)} |")
    return lines


def main(out: str, against: dict[str, Path] | None = None) -> None:
    root = Path(out)
    report = json.loads((root / "experiment_report.json").read_text())
    sections = [("Split", split_table(root)), ("Adaptation", adaptation_table(report)),
                ("Judge", [f"Judge test accuracy: {_f(report.get('judge_test_accuracy'))}"]),
                ("Guidance sweep (judged)", sweep_table(report)), ("Pool (HistoDiffusion)", pool_table(report)),
                ("Pool (StyleGAN2)", pool_table(report, "pool_stylegan2")),
                ("Selection (judged)", selection_table(report)),
                ("Table 1", (root / "results.md").read_text().splitlines()),
                ("Rows against each other (paired by seed)", between_rows_table(root, against=against))]
    for ablation in sorted(root.glob("ablation_*/results.md")):
        sections.append((ablation.parent.name, ablation.read_text().splitlines()))
        rep = ablation.parent / "experiment_report.json"
        if rep.is_file():
            sections.append((f"{ablation.parent.name}: selection", selection_table(json.loads(rep.read_text()))))
    sections.append(("Budget and wall time", [json.dumps(report.get("budget")),
                                              f"wall seconds: {report.get('wall_seconds')}",
                                              json.dumps(report.get("stage_seconds"))]))
    for title, lines in sections:
        print(f"### {title}\n")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/lung", help="the experiment folder")
    parser.add_argument("--against", nargs="+", default=[], metavar="LABEL=DIR",
                        help="other folders with the same split and baseline rows whose rows are paired with these")
    args = parser.parse_args()
    main(args.out, {k: Path(v) for k, v in (a.split("=", 1) for a in args.against)})
