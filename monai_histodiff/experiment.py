"""The paper's Table 1 protocol on the data it is given: baseline (real subset only), + random 50%, + selective
50/100/200/300%, downstream classifiers trained with several seeds, results as CSV, Markdown and a plot.

One pre-trained and adapted model serves every row: the guided generator runs once, for the largest ratio, and each
row selects its subset from that pool. Ablations of the paper's supplementary table: ``no_finetune`` (generate with
the pre-trained decoder D instead of D') and ``no_pretrain`` (autoencoder and diffusion model trained on the small
labeled training set only).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_histodiff.data.datalist import load_datalist, write_datalist
from monai_histodiff.data.prepare import ensure_split
from monai_histodiff.pipeline import run_stage

__all__ = ["ExperimentConfig", "Row", "experiment_rows", "run_experiment", "summarise", "write_results"]

METRICS = ("fd", "accuracy", "macro_f1", "macro_sensitivity", "macro_specificity")


@dataclass
class ExperimentConfig:
    """Settings of one experiment run (every path relative to the working directory or absolute).

    Epoch and step counts default to a short CPU run at the small size; the paper's values are in the bundles.
    """

    output_dir: str
    dataset_dir: str | None = None
    test_dir: str | None = None
    unlabeled_dir: str | None = None
    small: bool = True
    label_fraction: float | None = None
    label_per_class: int | None = None
    val_fraction: float = 0.2
    seeds: Sequence[int] = (0,)
    ratios: Sequence[float] = (0.5, 1.0, 2.0, 3.0)
    random_ratio: float | None = 0.5
    ablation: str | None = None
    aux_epochs: int = 10
    finetune_epochs: int = 3
    latent_epochs: int = 60
    downstream_epochs: int = 10
    downstream_batch_size: int | None = None
    pretrain_ae_epochs: int = 10
    pretrain_diffusion_epochs: int = 30
    generation_steps: int = 50
    lr: float = 1e-3
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One row of Table 1."""

    name: str
    mode: str | None  # None: baseline; "random" or "selective"
    ratio: float


def experiment_rows(ratios: Sequence[float], random_ratio: float | None = 0.5) -> list[Row]:
    """Baseline, + random (one ratio), + selective at each ratio: the rows of the paper's Table 1."""
    rows = [Row("Baseline (real only)", None, 0.0)]
    if random_ratio:
        rows.append(Row(f"+ random {random_ratio:.0%}", "random", random_ratio))
    rows += [Row(f"+ selective {r:.0%}", "selective", r) for r in ratios]
    return rows


def _slug(row: Row) -> str:
    return "baseline" if row.mode is None else f"{row.mode}_{int(round(row.ratio * 100))}"


def _pretrain_on_training_split(cfg: ExperimentConfig, out: Path, logs: Path, common: dict) -> None:
    """Ablation 'without large-scale pre-training': autoencoder and diffusion on the labeled training tiles only."""
    split = load_datalist(out / "split.json")
    items = [{"image": it["image"], "source": "labeled_training", "sample_weight": 1.0} for it in split["training"]]
    listing = out / "pretrain_training_only.json"
    write_datalist({"unlabeled": items}, listing)
    datalist = f"$monai_histodiff.data.load_datalist('{listing.as_posix()}')['unlabeled']"
    run_stage("pretrain_autoencoder", logs, cfg.small, max_epochs=cfg.pretrain_ae_epochs, lr=cfg.lr,
              adv_start=10**9, datalist=datalist, **common)
    run_stage("pretrain_diffusion", logs, cfg.small, max_epochs=cfg.pretrain_diffusion_epochs, lr=cfg.lr,
              warmup_steps=10, datalist=datalist, **common)


def run_experiment(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Run every stage the rows need (reusing checkpoints already in ``output_dir``) and write the results."""
    out = Path(cfg.output_dir)
    logs = out / "logs"
    common = {"output_dir": out.as_posix(), **cfg.extra}
    labeled = {"dataset_dir": cfg.dataset_dir, "test_dir": cfg.test_dir, "val_fraction": cfg.val_fraction,
               "label_fraction": cfg.label_fraction, "label_per_class": cfg.label_per_class}
    ensure_split(out / "split.json", cfg.dataset_dir, cfg.label_fraction, cfg.label_per_class, cfg.val_fraction,
                 0, cfg.test_dir)
    (out / "experiment_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))

    # stage 1: pre-trained checkpoints (reused when present)
    if cfg.ablation == "no_pretrain":
        _pretrain_on_training_split(cfg, out, logs, common)
    elif not (out / "pretrain_diffusion" / "diffusion.pt").is_file():
        if cfg.unlabeled_dir is None:
            raise FileNotFoundError(f"no pre-trained checkpoints in {out}/pretrain_*/ and no unlabeled_dir to "
                                    f"pre-train on: copy autoencoder.pt / diffusion.pt there or pass --unlabeled_dir")
        if not (out / "pretrain_autoencoder" / "autoencoder.pt").is_file():
            run_stage("pretrain_autoencoder", logs, cfg.small, dataset_dir=cfg.unlabeled_dir,
                      max_epochs=cfg.pretrain_ae_epochs, lr=cfg.lr, **common)
        run_stage("pretrain_diffusion", logs, cfg.small, dataset_dir=cfg.unlabeled_dir,
                  max_epochs=cfg.pretrain_diffusion_epochs, lr=cfg.lr, warmup_steps=10, **common)

    # stage 2: adaptation (reused when present)
    stages = [("train_aux_classifier", "train_aux_classifier/aux_classifier.pt", cfg.aux_epochs),
              ("finetune", "finetune/decoder_ft.pt", cfg.finetune_epochs),
              ("train_latent_classifier", "train_latent_classifier/latent_classifier.pt", cfg.latent_epochs)]
    for stage, artifact, epochs in stages:
        if stage == "finetune" and cfg.ablation == "no_finetune":
            continue
        if not (out / artifact).is_file():
            extra = {"val_interval": max(1, epochs // 5)} if stage == "train_latent_classifier" else {}
            run_stage(stage, logs, cfg.small, max_epochs=epochs, lr=cfg.lr, **extra, **labeled, **common)

    # stage 3: one generated pool for the largest ratio, each row selects from it
    rows = experiment_rows(cfg.ratios, cfg.random_ratio)
    pool_ratio = max(r.ratio for r in rows)
    synthetic_dir = out / "generate"
    run_stage("generate", logs, cfg.small, ratio=pool_ratio, num_inference_steps=cfg.generation_steps,
              use_finetuned_decoder=cfg.ablation != "no_finetune", synthetic_dir=synthetic_dir.as_posix(), **common)

    # stage 4: downstream per row and seed, evaluated on the test split
    results: list[dict[str, Any]] = []
    baseline_ckpt = out / "rows" / "baseline" / f"seed{cfg.seeds[0]}" / "classifier.pt"
    for row in rows:
        row_dir = out / "rows" / _slug(row)
        datalist = (out / "split.json").as_posix()
        if row.mode is not None:
            run_stage("select", logs, cfg.small, log_name=f"select_{_slug(row)}", mode=row.mode, ratio=row.ratio,
                      synthetic_dir=synthetic_dir.as_posix(), selection_dir=(row_dir / "select").as_posix(),
                      feature_extractor_ckpt=baseline_ckpt.as_posix() if baseline_ckpt.is_file() else None, **common)
            datalist = (row_dir / "select" / "augmented_datalist.json").as_posix()
        for seed in cfg.seeds:
            seed_dir = row_dir / f"seed{seed}"
            run_stage("train_downstream", logs, cfg.small, log_name=f"train_downstream_{_slug(row)}_seed{seed}",
                      datalist_file=datalist, stage_dir=seed_dir.as_posix(), seed=seed, lr=cfg.lr,
                      max_epochs=cfg.downstream_epochs, batch_size=cfg.downstream_batch_size, **common)
            run_stage("evaluate", logs, cfg.small, log_name=f"evaluate_{_slug(row)}_seed{seed}",
                      downstream_ckpt=(seed_dir / "classifier.pt").as_posix(), eval_dir=(seed_dir / "evaluate").as_posix(),
                      synthetic_datalist=None if row.mode is None else datalist,
                      fd_extractor_ckpt=baseline_ckpt.as_posix(), fd_extractor_name=f"baseline-seed{cfg.seeds[0]}",
                      seed=seed, **common)
            metrics = json.loads((seed_dir / "evaluate" / "metrics.json").read_text())
            fd = (metrics.get("frechet") or {}).get("overall")
            results.append({"row": row.name, "mode": row.mode or "baseline", "ratio": row.ratio, "seed": seed,
                            "fd": fd, "fd_name": (metrics.get("frechet") or {}).get("metric_name"),
                            **{k: metrics[k] for k in METRICS[1:]}})
    write_results(results, out, ablation=cfg.ablation)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per row, in row order."""
    order: list[str] = []
    for r in results:
        if r["row"] not in order:
            order.append(r["row"])
    summary = []
    for name in order:
        rs = [r for r in results if r["row"] == name]
        entry: dict[str, Any] = {"row": name, "mode": rs[0]["mode"], "ratio": rs[0]["ratio"], "seeds": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            entry[m] = _mean_std(vals) if vals else None
        summary.append(entry)
    return summary


def write_results(results: Sequence[dict[str, Any]], output_dir: str | os.PathLike, ablation: str | None = None) -> dict:
    """Write ``results.csv`` (one line per row and seed), ``results.md`` (mean +- std, the paper's columns) and
    ``accuracy_vs_ratio.png``; return their paths."""
    out = Path(output_dir)
    fields = ["row", "mode", "ratio", "seed", "fd_name", *METRICS]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    summary = summarise(results)
    fd_name = next((r["fd_name"] for r in results if r.get("fd_name")), "FD")
    title = f"Table 1 protocol{f' (ablation: {ablation})' if ablation else ''}; mean +- std over seeds"
    lines = [f"<!-- {title} -->", f"| | {fd_name} | Accuracy | F1 (macro) | Sensitivity (macro) | Specificity (macro) |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        cells = ["/" if s[m] is None else f"{s[m][0]:.3f} +- {s[m][1]:.3f}" for m in METRICS]
        lines.append(f"| {s['row']} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "accuracy_vs_ratio.png")
    return {"csv": str(out / "results.csv"), "md": str(out / "results.md"), "png": str(out / "accuracy_vs_ratio.png")}


def _plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    from monai.utils import optional_import

    figure_mod, has_mpl = optional_import("matplotlib.figure")
    backend, _ = optional_import("matplotlib.backends.backend_agg")
    if not has_mpl:
        return
    fig = figure_mod.Figure(figsize=(5, 3.5))
    backend.FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    sel = [s for s in summary if s["mode"] in ("baseline", "selective") and s["accuracy"]]
    xs = [100 * s["ratio"] for s in sel]
    ax.errorbar(xs, [s["accuracy"][0] for s in sel], yerr=[s["accuracy"][1] for s in sel], marker="o",
                label="baseline / + selective")
    for s in summary:
        if s["mode"] == "random" and s["accuracy"]:
            ax.errorbar([100 * s["ratio"]], [s["accuracy"][0]], yerr=[s["accuracy"][1]], marker="x", ls="none",
                        color="tab:red", label="+ random")
    ax.set_xlabel("synthetic tiles (% of the real training set)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
