"""The paper's Table 1 protocol on the data it is given, measured so that its rows can differ and its claims hold.

Rows: baseline (real subset only), + random 50%, + selective 50/100/200/300%, a downstream classifier per row and seed,
evaluated on the test split. What the runner guarantees, and reports, beyond running the stages:

* one split, drawn by groups (``groups_file`` or a ``groups.csv`` at the dataset root): no group on two sides of
  training / validation / test / judge pool (checked before any stage runs);
* the latent classifier must know the class at low noise (accuracy in the lowest timestep bucket clearly above
  chance), else the run stops: guidance would steer nowhere and every synthetic row would measure noise;
* one generated pool, topped up per class until the largest row's quota of selectable tiles is met (bounded by
  ``max_pool_factor``); each row selects from it; a row still short is marked so in the table (kept / quota);
* every row's downstream classifier gets the same number of optimizer steps from the same initialisation per seed;
* an independent judge (a classifier trained on every labeled tile outside the test groups, never used to select or
  train) measures what the generator makes: conditional accuracy of the pool and of what selection keeps and
  rejects, Frechet distance per class in its feature space.

Generators: HistoDiffusion (the default) and the paper's comparison system, a class-conditional StyleGAN2 trained on
the same labeled training split (``generators=("histodiffusion", "stylegan2")``); each gets its own pool, topped up
the same way, and its own + random / + selective rows, selected by the same rule and trained under the same budget
against the one shared baseline. A third, ``conditional``, is the classifier-free guidance route (the pre-trained
diffusion model fine-tuned at the site with the class as a condition, stage ``finetune_conditional``): its own pool,
rows, guidance check and w sweep, never in place of the paper's method.

Ablations of the paper's supplementary table run in ``<output_dir>/ablation_<name>/`` on the same split and judge:
``no_finetune`` (generate with the pre-trained decoder D instead of D') and ``no_pretrain`` (autoencoder and
diffusion model trained on the small labeled training set only).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_histodiff.data.datalist import class_counts, load_datalist, write_datalist
from monai_histodiff.data.prepare import ensure_split
from monai_histodiff.data.split import check_groups_disjoint
from monai_histodiff.apps.pipeline import run_stage
from monai_histodiff.selection.rules import quotas_from_ratio

__all__ = [
    "GENERATORS",
    "ExperimentConfig",
    "ExperimentError",
    "Row",
    "experiment_rows",
    "run_experiment",
    "check_latent_classifier",
    "stage_hparam",
    "pool_counts",
    "summarise",
    "paired_differences",
    "paired_interval",
    "write_results",
    "write_side_by_side",
]

METRICS = ("fd", "accuracy", "macro_f1", "macro_sensitivity", "macro_specificity")
STAGES = ("pretrain_autoencoder", "pretrain_diffusion", "train_aux_classifier", "finetune", "train_latent_classifier",
          "finetune_conditional", "generate", "train_stylegan2", "generate_stylegan2", "select", "train_downstream",
          "evaluate", "judge")
#: the generators a run can compare: name -> (label in the table, generation stage, pool folder, row-folder prefix)
GENERATORS = {
    "histodiffusion": ("HistoDiffusion", "generate", "generate", ""),
    "stylegan2": ("StyleGAN2", "generate_stylegan2", "generate_stylegan2", "stylegan2_"),
    "conditional": ("Conditional fine-tune (CFG)", "generate", "generate_conditional", "conditional_"),
}
#: the generators that sample the pre-trained diffusion model (and so need pre-training and the adaptation stages)
DIFFUSION_GENERATORS = ("histodiffusion", "conditional")


class ExperimentError(RuntimeError):
    """The protocol cannot produce a meaningful row (e.g. a latent classifier at chance); the message says why."""


@dataclass
class ExperimentConfig:
    """Settings of one experiment run (paths relative to the working directory or absolute).

    Hyper-parameters of each stage come from its bundle (the paper's Table 2 at paper scale) and, with ``small``,
    from ``bundles/small.json`` (the CPU size); ``stage_overrides`` changes them per stage
    (``{"train_latent_classifier": {"lr": 1e-3}}``) and ``extra`` for every stage.

    Attributes:
        downstream_steps: optimizer steps of every row's downstream classifier (same for every row, whatever its
            size); None: ``downstream_epochs`` over the baseline's training set.
        downstream_epochs: epochs of that budget (validation and best-checkpoint points); None: the bundle's.
        pool_factor: the first generated pool holds ``pool_factor`` x the largest row's quota per class.
        max_pool_factor: top-up bound: never more than this x the quota per class.
        balance: selection's rule when a class falls short (``"proportional"``: every class keeps the same share of
            its quota, so the class balance never changes; ``"none"``).
        min_confidence: the selection's confidence rule (the paper selects on confidence and centroid distance).
        min_latent_margin: the latent classifier's accuracy at the lowest noise bucket must exceed chance by this.
        judge: train (or reuse) the independent judge and measure the generated tiles with it.
        judge_epochs, judge_steps: its training budget (optimizer steps over every labeled tile outside the test
            groups; 160 steps of 32 tiles give a 0.93-accurate judge on the lung tiles at 64 px).
        sweep_scales, sweep_steps, sweep_per_class: guidance scales x DDIM steps measured by the judge (tiles per
            class each); empty: no sweep.
        generators: the synthetic-tile generators whose rows the table gets (:data:`GENERATORS`): HistoDiffusion,
            the class-conditional StyleGAN2 baseline, the pre-trained diffusion model fine-tuned with the class as a
            condition and sampled with classifier-free guidance (``conditional``: stage ``finetune_conditional``,
            its own rows and wall time, never in place of the paper's method), in any combination.
        cfg_scale: classifier-free guidance ``w`` of the ``conditional`` generator (None: the generate bundle's).
        sweep_cfg_scales: classifier-free guidance scales of the ``conditional`` generator measured by the judge
            (at each of ``sweep_steps``); empty: no such sweep.
        pretraining: what the autoencoder and the diffusion model are pre-trained on when the folder has no
            checkpoints (:data:`~monai_histodiff.data.unlabeled.PRETRAINING_SETTINGS`): ``"sources"`` (the paper's
            setting, ``unlabeled_dir``, which must exclude the target set), ``"site"`` (the site's own tiles outside
            the test groups, labels dropped: the split's pool, training and validation tiles) or ``"site+sources"``.
            Every setting's listing is checked against the split before each run (a test group stops it, named).
        site_weight: with ``"site+sources"``, the share of pre-training draws that go to the site's tiles.
        pseudo_labels: train the latent classifier also on the site's own pre-training tiles that the auxiliary
            classifier labels confidently (``train_latent_classifier``'s ``pseudo_labels``; not the paper's method;
            needs ``pretraining`` ``"site"`` or ``"site+sources"``, whose site tiles are used).
    """

    output_dir: str
    dataset_dir: str | None = None
    test_dir: str | None = None
    unlabeled_dir: str | Sequence[str] | None = None
    groups_file: str | None = None
    small: bool = True
    label_fraction: float | None = None
    label_per_class: int | None = None
    val_fraction: float = 0.2
    test_per_class: int | None = None
    seeds: Sequence[int] = (0,)
    ratios: Sequence[float] = (0.5, 1.0, 2.0, 3.0)
    random_ratio: float | None = 0.5
    ablation: str | None = None
    downstream_steps: int | None = None
    downstream_epochs: int | None = None
    generation_steps: int | None = None
    guidance_scale: float | None = None
    pool_factor: float = 1.5
    max_pool_factor: float = 6.0
    balance: str = "proportional"
    min_confidence: float | None = None
    min_latent_margin: float = 0.1
    judge: bool = True
    judge_epochs: int = 2
    judge_steps: int = 160
    sweep_scales: Sequence[float] = ()
    sweep_steps: Sequence[int] = ()
    sweep_per_class: int = 16
    generators: Sequence[str] = ("histodiffusion",)
    cfg_scale: float | None = None
    sweep_cfg_scales: Sequence[float] = ()
    pretraining: str = "sources"
    site_weight: float = 0.5
    pseudo_labels: bool = False
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.stage_overrides) - set(STAGES)
        if unknown:
            raise ValueError(f"stage_overrides names unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        if self.ablation not in (None, "no_finetune", "no_pretrain"):
            raise ValueError(f"ablation must be None, 'no_finetune' or 'no_pretrain', got {self.ablation!r}")
        from monai_histodiff.data.unlabeled import PRETRAINING_SETTINGS

        if self.pretraining not in PRETRAINING_SETTINGS:
            raise ValueError(f"pretraining must be one of {list(PRETRAINING_SETTINGS)}, got {self.pretraining!r}")
        if self.pretraining == "site+sources" and not 0.0 < self.site_weight < 1.0:
            raise ValueError(f"site_weight must be in (0, 1), got {self.site_weight}")
        if self.pseudo_labels and self.pretraining == "sources":
            raise ValueError("pseudo_labels labels the site's own unlabeled tiles: use pretraining 'site' or "
                             "'site+sources'")
        if self.balance not in ("proportional", "none"):
            raise ValueError(f"balance must be 'proportional' or 'none', got {self.balance!r}")
        if not 1.0 <= self.pool_factor <= self.max_pool_factor:
            raise ValueError(f"need 1 <= pool_factor ({self.pool_factor}) <= max_pool_factor ({self.max_pool_factor})")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        unknown = [g for g in self.generators if g not in GENERATORS]
        if unknown or not self.generators:
            raise ValueError(f"generators must name one or more of {list(GENERATORS)}, got {list(self.generators)}")
        if self.ablation and "histodiffusion" not in self.generators:
            raise ValueError(f"ablation {self.ablation!r} changes HistoDiffusion: include 'histodiffusion' in "
                             "generators")
        self.check_stage_settings()

    def check_stage_settings(self) -> None:
        """Check every numeric setting the runner passes to a stage (its own and ``stage_overrides``) against the
        stages' rules (:func:`monai_histodiff.bundle.check_settings`) before anything runs."""
        from monai_histodiff.bundle.settings import SETTING_RULES, check_settings

        optional = {k: v for k, v in (("label_fraction", self.label_fraction),
                                      ("guidance_scale", self.guidance_scale)) if v is not None}
        check_settings("experiment", **optional, label_per_class=self.label_per_class, val_fraction=self.val_fraction,
                       test_per_class=self.test_per_class, min_confidence=self.min_confidence,
                       generation_steps=self.generation_steps, downstream_steps=self.downstream_steps,
                       downstream_epochs=self.downstream_epochs, judge_epochs=self.judge_epochs,
                       judge_steps=self.judge_steps, sweep_per_class=self.sweep_per_class,
                       min_latent_margin=self.min_latent_margin)
        for ratio in [*self.ratios, *([self.random_ratio] if self.random_ratio else [])]:
            check_settings("experiment (--ratios, --random_ratio)", ratio=ratio)
        for seed in self.seeds:
            check_settings("experiment (--seeds)", seed=seed)
        for scale in self.sweep_scales:
            check_settings("experiment (--sweep_scales)", guidance_scale=scale)
        for scale in [*self.sweep_cfg_scales, *([self.cfg_scale] if self.cfg_scale is not None else [])]:
            check_settings("experiment (--cfg_scale, --sweep_cfg_scales)", cfg_scale=scale)
        for steps in self.sweep_steps:
            check_settings("experiment (--sweep_steps)", num_inference_steps=steps)
        checked = set(SETTING_RULES) | {"counts", "guidance_window"}
        for stage, overrides in {"every stage": self.extra, **self.stage_overrides}.items():
            check_settings(stage, **{k: v for k, v in overrides.items() if k in checked})


@dataclass
class Row:
    """One row of Table 1."""

    name: str
    mode: str | None  # None: baseline; "random" or "selective"
    ratio: float
    generator: str | None = None  # None: the baseline; else a key of GENERATORS


def experiment_rows(ratios: Sequence[float], random_ratio: float | None = 0.5,
                    generators: Sequence[str] = ("histodiffusion",)) -> list[Row]:
    """Baseline, then per generator + random (one ratio) and + selective at each ratio: the rows of the paper's
    Table 1. With one generator the rows are named as in the paper (``+ selective 50%``); with several, each row
    starts with its generator's name (``StyleGAN2 + selective 50%``)."""
    rows = [Row("Baseline (real only)", None, 0.0)]
    for generator in generators:
        label = f"{GENERATORS[generator][0]} " if len(generators) > 1 or generator != "histodiffusion" else ""
        if random_ratio:
            rows.append(Row(f"{label}+ random {random_ratio:.0%}", "random", random_ratio, generator))
        rows += [Row(f"{label}+ selective {r:.0%}", "selective", r, generator) for r in ratios]
    return rows


def _slug(row: Row) -> str:
    """The row's folder under ``rows/``: ``baseline``, ``selective_50``, ``stylegan2_selective_50``."""
    if row.mode is None:
        return "baseline"
    return f"{GENERATORS[row.generator or 'histodiffusion'][3]}{row.mode}_{int(round(row.ratio * 100))}"


class _Stages:
    """Runs the stages of one experiment folder with the per-stage overrides, logging each to ``<out>/logs``.

    Every call is recorded in ``<out>/commands.jsonl`` (stage, log name, overrides, seconds). The judge's checkpoint
    is fire-walled: no stage but ``evaluate`` (which measures it) may be given its path.
    """

    def __init__(self, cfg: ExperimentConfig, out: Path) -> None:
        self.cfg, self.out, self.logs = cfg, out, out / "logs"
        self.seconds: dict[str, float] = {}
        self.firewall: set[str] = set()

    def __call__(self, stage: str, log_name: str | None = None, **overrides: Any) -> float:
        merged = {"output_dir": self.out.as_posix(), **self.cfg.extra, **overrides,
                  **self.cfg.stage_overrides.get(stage, {})}
        if stage != "evaluate":
            leaked = [k for k, v in merged.items() if isinstance(v, str) and any(f in v for f in self.firewall)]
            if leaked:
                raise ExperimentError(f"stage {stage} was given the judge's checkpoint ({leaked}): the judge only "
                                      f"measures, it never selects or trains")
        name = log_name or stage
        seconds = run_stage(stage, self.logs, self.cfg.small, log_name=name, **merged)
        self.seconds[name] = round(seconds, 1)
        with open(self.out / "commands.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, "log": name, "overrides": merged, "seconds": round(seconds, 1)},
                               default=str) + "\n")
        return seconds


def check_latent_classifier(stage_dir: str | os.PathLike, num_classes: int, margin: float = 0.1) -> dict[str, Any]:
    """Read ``timestep_accuracy.json`` of the latent classifier and refuse one that does not know the class.

    Guidance follows ``grad log p(y | z_t)``; a classifier at chance at the lowest noise level steers nowhere.

    Returns:
        ``{"buckets": [...], "lowest_bucket_accuracy": a, "chance": 1/K}``.

    Raises:
        ExperimentError: when the lowest bucket's accuracy is below ``1/K + margin`` (the message names the file).
    """
    path = Path(stage_dir) / "timestep_accuracy.json"
    if not path.is_file():
        raise ExperimentError(f"{path} not found: the latent classifier stage wrote no accuracy per noise bucket")
    data = json.loads(path.read_text())
    buckets = data.get("buckets") or []
    if not buckets:
        raise ExperimentError(f"{path} holds no buckets")
    lowest = min(buckets, key=lambda b: b["t_min"])
    chance = 1.0 / num_classes
    if lowest["accuracy"] < chance + margin:
        raise ExperimentError(
            f"the latent classifier reached only {lowest['accuracy']:.3f} accuracy at t in [{lowest['t_min']}, "
            f"{lowest['t_max']}] on the validation tiles ({path}), chance is {chance:.3f}: guidance would steer "
            f"nowhere and every synthetic row would measure noise. Train it longer or check its learning rate "
            f"(stage_overrides train_latent_classifier), then delete {Path(stage_dir)} and rerun."
        )
    return {"buckets": buckets, "lowest_bucket_accuracy": lowest["accuracy"], "chance": chance}


def pool_counts(quotas: Sequence[int], counts: Sequence[int], eligible: Sequence[int], max_pool_factor: float,
                margin: float = 1.2) -> list[int]:
    """Per-class tile counts of the next generation round so that each class can fill its quota.

    A class that already has ``eligible >= quota`` keeps its count; a short one grows by its deficit divided by its
    observed acceptance rate (at least ``1 / max_pool_factor``), times ``margin``, capped at
    ``max_pool_factor * quota``.
    """
    nxt = []
    for q, n, e in zip(quotas, counts, eligible):
        cap = max(n, math.ceil(max_pool_factor * q))
        if e >= q or n >= cap:
            nxt.append(int(n))
            continue
        rate = max(e / max(n, 1), 1.0 / max_pool_factor)
        nxt.append(int(min(cap, n + math.ceil(margin * (q - e) / rate))))
    return nxt


def _selection_summary(report_path: Path) -> dict[str, Any]:
    report = json.loads(report_path.read_text())
    per_class = report["per_class"]
    kept = {c: int(v["kept"]) for c, v in per_class.items()}
    quota = {c: int(v["quota"]) for c, v in per_class.items()}
    eligible = {c: int(v.get("eligible") or 0) for c, v in per_class.items()}
    short = sorted(c for c in per_class if kept[c] < quota[c])
    return {"kept": kept, "quota": quota, "eligible": eligible, "kept_total": sum(kept.values()),
            "quota_total": sum(quota.values()), "short_classes": short, "status": "short" if short else "full"}


def _judge_ckpt(cfg: ExperimentConfig, out: Path, stages: _Stages) -> Path | None:
    """Train (or reuse) the independent judge on every labeled tile outside the test groups; evaluate it on test."""
    if not cfg.judge:
        return None
    from monai_histodiff.metrics.judge import judge_datalist

    jdir = out / "judge"
    ckpt = jdir / "classifier.pt"
    if not ckpt.is_file():
        datalist = jdir / "datalist.json"
        write_datalist(judge_datalist(load_datalist(out / "split.json")), datalist)
        stages("train_downstream", log_name="judge_train", datalist_file=datalist.as_posix(),
               stage_dir=jdir.as_posix(), seed=0,
               **{"max_epochs": cfg.judge_epochs, "epoch_length": max(1, cfg.judge_steps // cfg.judge_epochs),
                  **cfg.stage_overrides.get("judge", {})})
    if not (jdir / "evaluate" / "metrics.json").is_file():
        stages("evaluate", log_name="judge_evaluate", downstream_ckpt=ckpt.as_posix(),
               eval_dir=(jdir / "evaluate").as_posix(), seed=0)
    return ckpt


def _judge(judge_ckpt: Path | None, out: Path, synthetic_dir: Path, decisions: Path | None, name: str) -> dict | None:
    if judge_ckpt is None:
        return None
    from monai_histodiff.metrics.judge import judge_generated

    path = out / "judged" / f"{name}.json"
    if _is_current(path, [synthetic_dir / "manifest.jsonl", judge_ckpt, *([decisions] if decisions else [])]):
        return json.loads(path.read_text())
    result = judge_generated(judge_ckpt, synthetic_dir, out / "split.json", decisions_csv=decisions)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def _ceiling(judge_ckpt: Path | None, out: Path, use_finetuned: bool = True) -> dict | None:
    """The judge on the test tiles x, D(E(x)) and D'(E(x)) (:func:`~monai_histodiff.metrics.judge_reconstructions`):
    what the autoencoder lets through; ``<out>/judged/ceiling.json`` and ``<out>/ceiling.png`` (rows x, D(E(x)),
    D'(E(x)) per class). Reused while newer than the judge and the autoencoder's checkpoints."""
    if judge_ckpt is None:
        return None
    from monai_histodiff.metrics.judge import judge_reconstructions

    path = out / "judged" / "ceiling.json"
    autoencoder, decoder = out / "pretrain_autoencoder" / "autoencoder.pt", out / "finetune" / "decoder_ft.pt"
    decoder = decoder if use_finetuned and decoder.is_file() else None
    if _is_current(path, [judge_ckpt, autoencoder, *([decoder] if decoder else [])]):
        return json.loads(path.read_text())
    result = judge_reconstructions(judge_ckpt, autoencoder, out / "split.json", decoder, grid_path=out / "ceiling.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    acc = result["accuracy"]
    print("[experiment] ceiling (judge on " + str(result["tiles"]) + " test tiles): " +
          ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    return result


def _prepare_ablation(cfg: ExperimentConfig, main: Path) -> Path:
    """``<main>/ablation_<name>/`` with the main run's split (and, for no_finetune, its adapted checkpoints)."""
    out = main / f"ablation_{cfg.ablation}"
    out.mkdir(parents=True, exist_ok=True)
    reuse = ["split.json", "classes.json", "train_aux_classifier/aux_classifier.pt"]
    if cfg.ablation == "no_finetune":
        reuse += ["pretrain_autoencoder/autoencoder.pt", "pretrain_diffusion/diffusion.pt",
                  "train_latent_classifier/latent_classifier.pt", "train_latent_classifier/timestep_accuracy.json"]
    for rel in reuse:
        src, dst = main / rel, out / rel
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel == "split.json":  # its image paths are relative to its folder: rewritten for the new one
                write_datalist(load_datalist(src), dst)
            else:
                shutil.copy2(src, dst)
    return out


def _pretrain_on_training_split(out: Path, stages: _Stages) -> None:
    """Ablation 'without large-scale pre-training': autoencoder and diffusion on the labeled training tiles only."""
    split = load_datalist(out / "split.json")
    items = [{"image": it["image"], "source": "labeled_training", "sample_weight": 1.0} for it in split["training"]]
    listing = out / "pretrain_training_only.json"
    write_datalist({"unlabeled": items}, listing)
    datalist = f"$monai_histodiff.data.load_datalist('{listing.as_posix()}')['unlabeled']"
    if not (out / "pretrain_autoencoder" / "autoencoder.pt").is_file():
        stages("pretrain_autoencoder", datalist=datalist)
    if not (out / "pretrain_diffusion" / "diffusion.pt").is_file():
        stages("pretrain_diffusion", datalist=datalist)


def _pretraining_listing(cfg: ExperimentConfig, out: Path, split: dict[str, Any]) -> dict[str, Any]:
    """The pre-training data of the run: ``<out>/pretraining.json`` (written when the folder has no checkpoints yet,
    from ``cfg.pretraining``), checked against the split on every run so that no test group enters pre-training.

    Returns:
        the report's record: setting, listing file, tiles and draw share per source; ``{"setting": "unknown"}`` when
        the checkpoints came into the folder without a listing.

    Raises:
        ExperimentError: when a tile of a test group is in the listing (the group is named).
        FileNotFoundError: when pre-training is needed and its data are missing.
    """
    from monai_histodiff.data.split import check_outside_test
    from monai_histodiff.data.unlabeled import pretraining_datalist

    listing_file = out / "pretraining.json"
    trained = (out / "pretrain_diffusion" / "diffusion.pt").is_file()
    if not listing_file.is_file():
        if trained:
            return {"setting": "unknown", "note": "checkpoints found in the folder without pretraining.json"}
        if cfg.pretraining != "site" and cfg.unlabeled_dir is None:
            raise FileNotFoundError(f"no pre-trained checkpoints in {out}/pretrain_*/ and no unlabeled_dir to "
                                    f"pre-train on: copy autoencoder.pt / diffusion.pt there, pass --unlabeled_dir, "
                                    f"or pre-train on the site's own tiles (--pretraining site)")
        sources = cfg.unlabeled_dir if isinstance(cfg.unlabeled_dir, (str, type(None))) else list(cfg.unlabeled_dir)
        try:
            listing = pretraining_datalist(cfg.pretraining, split, sources, cfg.site_weight)
        except ValueError as e:
            raise ExperimentError(f"pre-training data ({cfg.pretraining}): {e}") from e
        write_datalist(listing, listing_file)
    listing = load_datalist(listing_file)
    try:
        check_outside_test(listing["unlabeled"], split, f"pre-training ({listing_file})")
    except ValueError as e:
        raise ExperimentError(str(e)) from e
    return {"setting": listing.get("setting", "sources"), "listing": listing_file.as_posix(),
            "tiles": len(listing["unlabeled"]), "sources": listing.get("sources", {})}


def _conditional_unlabeled(cfg: ExperimentConfig, unlabeled: dict[str, Any]) -> dict[str, Any]:
    """The ``finetune_conditional`` overrides naming its null-class tiles: the run's pre-training listing, else
    ``cfg.unlabeled_dir``, else none (labeled tiles only, with a warning)."""
    if "dataset_dir" in unlabeled:
        return {"unlabeled_dir": unlabeled["dataset_dir"]}
    if unlabeled:
        return unlabeled
    if isinstance(cfg.unlabeled_dir, str):
        return {"unlabeled_dir": cfg.unlabeled_dir}
    print("[experiment] WARNING: finetune_conditional: no pre-training listing and no single unlabeled_dir; the "
          "conditional model is fine-tuned on the labeled tiles alone (null class: dropped labels only)", flush=True)
    return {"datalist": "$[]"}


def _pseudo_label_overrides(pretraining: dict[str, Any] | None) -> dict[str, Any]:
    """The ``train_latent_classifier`` overrides that pseudo-label the site's own tiles of the run's pre-training
    listing (``cfg.pseudo_labels``)."""
    setting = (pretraining or {}).get("setting")
    if setting not in ("site", "site+sources"):
        raise ExperimentError("pseudo_labels needs the site's own unlabeled tiles, i.e. a run pre-trained with "
                              f"pretraining 'site' or 'site+sources' (this run's: {setting})")
    listing = pretraining["listing"]
    return {"pseudo_labels": True, "pseudo_label_datalist": f"$[it for it in monai_histodiff.data.load_datalist("
                                                            f"'{listing}')['unlabeled'] if it.get('source') == 'site']"}


def _generate_pool(cfg: ExperimentConfig, out: Path, stages: _Stages, rows: list[Row], classes: list[str],
                   real_counts: list[int], generation: dict[str, Any], generator: str = "histodiffusion"
                   ) -> dict[str, Any]:
    """Generate (and top up) one pool of ``generator`` from which each of its rows can fill its quota; returns the
    rounds' record. A round whose tiles already exist is not redone (the generation stages resume)."""
    _, stage, folder, prefix = GENERATORS[generator]
    synthetic_dir = out / folder
    own = [r for r in rows if r.mode is not None and r.generator == generator]
    max_ratio = max(r.ratio for r in own)
    quotas = list(quotas_from_ratio(real_counts, max_ratio).values())  # what select's quotas will be
    counts = [math.ceil(cfg.pool_factor * q) for q in quotas]
    selective = [r for r in own if r.mode == "selective"]
    rounds = []
    while True:
        stages(stage, log_name=f"{folder}_round{len(rounds)}", counts=counts,
               synthetic_dir=synthetic_dir.as_posix(), **generation)
        counts = _pool_sizes(synthetic_dir, classes, counts)  # a rerun finds the tiles of the earlier rounds too
        if not selective:
            rounds.append({"counts": dict(zip(classes, counts))})
            break
        probe = out / f"{prefix}pool_check"
        stages("select", log_name=f"{prefix}pool_check_round{len(rounds)}", mode="selective", ratio=max_ratio,
               balance="none", synthetic_dir=synthetic_dir.as_posix(), selection_dir=probe.as_posix(),
               min_confidence=cfg.min_confidence)
        summary = _selection_summary(probe / "selection_report.json")
        eligible = [summary["eligible"][c] for c in classes]
        rounds.append({"counts": dict(zip(classes, counts)), "eligible": dict(zip(classes, eligible)),
                       "quota": dict(zip(classes, quotas))})
        nxt = pool_counts(quotas, counts, eligible, cfg.max_pool_factor)
        if nxt == counts:
            break
        counts = nxt
    last = rounds[-1]
    short = [c for c in classes if last.get("eligible", {}).get(c, quotas[classes.index(c)]) < last["quota"][c]] \
        if "quota" in last else []
    if short:
        print(f"[experiment] WARNING: {GENERATORS[generator][0]}: after {len(rounds)} generation round(s) (bound "
              f"{cfg.max_pool_factor}x the quota) class(es) {short} have fewer selectable tiles than the "
              f"{max_ratio:.0%} row needs; rows that need them are marked short in the table", flush=True)
    return {"rounds": rounds, "max_ratio": max_ratio, "short_classes": short}


def _pool_sizes(synthetic_dir: Path, classes: list[str], requested: list[int]) -> list[int]:
    """Tiles per class in a generation folder's manifest, at least what was requested of it."""
    from monai_histodiff.data.manifest import read_manifest

    rows = read_manifest(synthetic_dir / "manifest.jsonl", missing_ok=True)
    return [max(n, sum(1 for r in rows if r.get("class") == c)) for c, n in zip(classes, requested)]


def run_experiment(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Run every stage the rows need (reusing checkpoints already in the folder) and write the results."""
    start = time.time()
    main = Path(cfg.output_dir)
    main.mkdir(parents=True, exist_ok=True)
    if not (main / "split.json").is_file() or cfg.ablation is None:
        ensure_split(main / "split.json", dataset_dir=cfg.dataset_dir, fraction=cfg.label_fraction,
                     per_class=cfg.label_per_class, val_fraction=cfg.val_fraction, seed=0, test_dir=cfg.test_dir,
                     groups_file=cfg.groups_file, test_per_class=cfg.test_per_class)
    split = load_datalist(main / "split.json")
    check_groups_disjoint(split)
    out = _prepare_ablation(cfg, main) if cfg.ablation else main
    stages = _Stages(cfg, out)
    (out / "experiment_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))
    classes = list(split["classes"])
    real_counts = class_counts(split["training"], len(classes))
    labeled = {"dataset_dir": cfg.dataset_dir, "test_dir": cfg.test_dir, "val_fraction": cfg.val_fraction,
               "label_fraction": cfg.label_fraction, "label_per_class": cfg.label_per_class,
               "split_file": (out / "split.json").as_posix()}

    diffusion = any(g in DIFFUSION_GENERATORS for g in cfg.generators)

    # stage 1: pre-trained checkpoints (reused when present)
    unlabeled: dict[str, Any] = {}
    if cfg.ablation == "no_pretrain":
        _pretrain_on_training_split(out, stages)
        pretraining = {"setting": "no_pretrain (the labeled training tiles)"}
    elif diffusion:
        pretraining = _pretraining_listing(cfg, out, split)
        # one source folder: the stages list it themselves (bad-file scan, slides, equal source weights), the
        # listing above checked the same files; otherwise the stages read the checked listing
        if pretraining["setting"] == "sources" and isinstance(cfg.unlabeled_dir, str):
            unlabeled = {"dataset_dir": cfg.unlabeled_dir}
        elif "listing" in pretraining:
            unlabeled = {"datalist": f"$monai_histodiff.data.load_datalist('{pretraining['listing']}')['unlabeled']"}
        if not (out / "pretrain_diffusion" / "diffusion.pt").is_file():
            if not (out / "pretrain_autoencoder" / "autoencoder.pt").is_file():
                stages("pretrain_autoencoder", **unlabeled)
            stages("pretrain_diffusion", **unlabeled)
    else:
        pretraining = None

    # stage 2: adaptation (reused when present); the latent classifier must know the class at low noise. The
    # auxiliary classifier is the selection's feature extractor for every generator; StyleGAN2 trains on the same split
    adaptation = [("train_aux_classifier", "train_aux_classifier/aux_classifier.pt")]
    if diffusion:
        adaptation += [("finetune", "finetune/decoder_ft.pt"),
                       ("train_latent_classifier", "train_latent_classifier/latent_classifier.pt")]
    if "stylegan2" in cfg.generators:
        adaptation.append(("train_stylegan2", "train_stylegan2/stylegan2.pt"))
    if "conditional" in cfg.generators:
        adaptation.append(("finetune_conditional", "finetune_conditional/diffusion_conditional.pt"))
    for stage, artifact in adaptation:
        if stage == "finetune" and cfg.ablation == "no_finetune":
            continue
        if not (out / artifact).is_file():
            if stage == "finetune_conditional":  # the site's unlabeled tiles (the pre-training listing): null class
                stages(stage, **labeled, **_conditional_unlabeled(cfg, unlabeled))
            elif stage == "train_latent_classifier" and cfg.pseudo_labels:
                stages(stage, **labeled, **_pseudo_label_overrides(pretraining))
            else:
                stages(stage, **labeled)
    latent = check_latent_classifier(out / "train_latent_classifier", len(classes),
                                     cfg.min_latent_margin) if diffusion else None
    judge_ckpt = _judge_ckpt(cfg, main, stages)
    if judge_ckpt is not None:
        stages.firewall.add(judge_ckpt.as_posix())
    ceiling = _ceiling(judge_ckpt, out, use_finetuned=cfg.ablation != "no_finetune") if diffusion else None

    # stage 3: per generator one generated pool, topped up until its largest row can fill its quota
    rows = experiment_rows(cfg.ratios, cfg.random_ratio, cfg.generators)
    generation = {"use_finetuned_decoder": cfg.ablation != "no_finetune", "num_inference_steps": cfg.generation_steps,
                  "guidance_scale": cfg.guidance_scale, **labeled}
    # classifier-free guidance alone (no classifier guidance) for the conditional generator
    conditional = {**generation, "use_conditional": True, "cfg_scale": cfg.cfg_scale, "guidance_scale": 0.0}
    overrides = {"histodiffusion": generation, "conditional": conditional}
    pools: dict[str, dict[str, Any]] = {}
    judged: dict[str, Any] = {}
    for generator in cfg.generators if len(rows) > 1 else ():
        pools[generator] = _generate_pool(cfg, out, stages, rows, classes, real_counts,
                                          overrides.get(generator, labeled), generator)
        judged[_pool_key(generator)] = _judge(judge_ckpt, out, out / GENERATORS[generator][2], None,
                                              _pool_key(generator))
    pool = pools.get("histodiffusion", {})
    if "histodiffusion" in cfg.generators and cfg.sweep_scales and cfg.sweep_steps:
        judged["sweep"] = guidance_sweep(cfg, out, stages, judge_ckpt, classes, generation)
    if "conditional" in cfg.generators and cfg.sweep_cfg_scales and cfg.sweep_steps:
        judged["sweep_conditional"] = guidance_sweep(cfg, out, stages, judge_ckpt, classes, conditional,
                                                     key="cfg_scale")

    # stage 4: per row, select; per row and seed, downstream training with the same step budget, then evaluation
    batch = cfg.stage_overrides.get("train_downstream", {}).get("batch_size") or stage_hparam(
        "train_downstream", "batch_size", cfg.small)
    epochs = cfg.downstream_epochs or stage_hparam("train_downstream", "max_epochs", cfg.small)
    steps = cfg.downstream_steps or epochs * math.ceil(sum(real_counts) / batch)
    epochs = max(1, min(epochs, steps))
    budget = {"max_epochs": epochs, "epoch_length": max(1, steps // epochs), "batch_size": batch}
    results: list[dict[str, Any]] = []
    selections: dict[str, dict[str, Any]] = {}
    fd_ckpt = judge_ckpt or out / "rows" / "baseline" / f"seed{cfg.seeds[0]}" / "classifier.pt"
    fd_name = "judge" if judge_ckpt else f"baseline-seed{cfg.seeds[0]}"
    for row in rows:
        row_dir = out / "rows" / _slug(row)
        datalist = (out / "split.json").as_posix()
        if row.mode is not None:
            sel_dir = row_dir / "select"
            synthetic_dir = out / GENERATORS[row.generator or "histodiffusion"][2]
            selection = {"mode": row.mode, "ratio": row.ratio, "balance": cfg.balance,
                         "min_confidence": cfg.min_confidence if row.mode == "selective" else None}
            if _selection_is_current(sel_dir, synthetic_dir, out, selection):
                print(f"[experiment] {row.name}: reusing the selection in {sel_dir}", flush=True)
            else:
                stages("select", log_name=f"select_{_slug(row)}", synthetic_dir=synthetic_dir.as_posix(),
                       selection_dir=sel_dir.as_posix(), **selection)
            selections[row.name] = _selection_summary(sel_dir / "selection_report.json")
            if row.mode == "selective" and judge_ckpt is not None:
                selections[row.name]["judge"] = _judge(judge_ckpt, out, synthetic_dir, sel_dir / "decisions.csv",
                                                       f"selection_{_slug(row)}")
            datalist = (sel_dir / "augmented_datalist.json").as_posix()
        for seed in cfg.seeds:
            seed_dir = row_dir / f"seed{seed}"
            metrics_file = seed_dir / "evaluate" / "metrics.json"
            if _is_current(metrics_file, [Path(datalist), seed_dir / "classifier.pt"]):
                print(f"[experiment] {row.name}, seed {seed}: reusing {metrics_file}", flush=True)
            else:
                stages("train_downstream", log_name=f"train_downstream_{_slug(row)}_seed{seed}",
                       datalist_file=datalist, stage_dir=seed_dir.as_posix(), seed=seed, **budget)
            if not _is_current(metrics_file, [Path(datalist), seed_dir / "classifier.pt"]):
                stages("evaluate", log_name=f"evaluate_{_slug(row)}_seed{seed}",
                       downstream_ckpt=(seed_dir / "classifier.pt").as_posix(),
                       eval_dir=(seed_dir / "evaluate").as_posix(),
                       synthetic_datalist=None if row.mode is None else datalist,
                       fd_extractor_ckpt=fd_ckpt.as_posix(), fd_extractor_name=fd_name, seed=seed)
            metrics = json.loads((seed_dir / "evaluate" / "metrics.json").read_text())
            ckpt_meta = _downstream_meta(seed_dir / "classifier.pt")
            sel = selections.get(row.name)
            results.append({"row": row.name, "mode": row.mode or "baseline", "ratio": row.ratio, "seed": seed,
                            "generator": row.generator,
                            "fd": (metrics.get("frechet") or {}).get("overall"),
                            "fd_name": (metrics.get("frechet") or {}).get("metric_name"),
                            "kept": sel["kept_total"] if sel else 0, "quota": sel["quota_total"] if sel else 0,
                            "status": sel["status"] if sel else "full",
                            "steps": ckpt_meta.get("iterations"), "init_digest": ckpt_meta.get("init_digest"),
                            **{k: metrics[k] for k in METRICS[1:]}})
    _check_equal_budget(results)
    check = out / "generate" / "guidance_check.json"
    check_conditional = out / GENERATORS["conditional"][2] / "guidance_check.json"
    pseudo = out / "train_latent_classifier" / "pseudo_labels.json"
    extra = {"pretraining": pretraining, "ceiling": ceiling,
             "pseudo_labels": json.loads(pseudo.read_text()) if diffusion and pseudo.is_file() else None,
             "guidance_check": json.loads(check.read_text()) if check.is_file() else None,
             "guidance_check_conditional": json.loads(check_conditional.read_text()) if "conditional" in
             cfg.generators and check_conditional.is_file() else None,
             "latent_classifier": latent, "aux_classifier": _aux_accuracy(out), "pool": pool,
             **{_pool_key(g): v for g, v in pools.items() if g != "histodiffusion"}, "judge": judged,
             "selections": selections, "budget": {**budget, "steps": budget["max_epochs"] * budget["epoch_length"]},
             "stage_seconds": stages.seconds, "wall_seconds": round(time.time() - start, 1),
             "judge_test_accuracy": _judge_test_accuracy(main) if judge_ckpt else None}
    (out / "experiment_report.json").write_text(json.dumps(extra, indent=1))
    write_results(results, out, ablation=cfg.ablation, report=extra)
    pictures = []  # per generator: its pool and what its largest selective row kept
    for generator in pools:
        largest = max((r for r in rows if r.mode == "selective" and r.generator == generator), key=lambda r: r.ratio,
                      default=None)
        kept = out / "rows" / _slug(largest) / "select" / "augmented_datalist.json" if largest else None
        pictures.append((out / GENERATORS[generator][2], kept))
        name = "real_vs_synthetic.png" if generator == "histodiffusion" else f"real_vs_synthetic_{generator}.png"
        write_side_by_side(out / "split.json", pictures[-1][0], out / name, _image_size(out), kept_datalist=kept)
    if len(pictures) > 1:
        write_side_by_side(out / "split.json", pictures[0][0], out / "real_vs_generators.png", _image_size(out),
                           kept_datalist=pictures[0][1], more=pictures[1:])
    return results


def _pool_key(generator: str) -> str:
    """The report's name of a generator's pool: ``pool`` (HistoDiffusion, as before) or ``pool_<generator>``."""
    return "pool" if generator == "histodiffusion" else f"pool_{generator}"


def _selection_is_current(sel_dir: Path, synthetic_dir: Path, out: Path, selection: dict[str, Any]) -> bool:
    """Whether ``sel_dir`` holds a selection with these settings, newer than the pool's manifest and the
    auxiliary classifier, so that a rerun of the runner (e.g. adding a generator) keeps the rows trained on it."""
    report_path, datalist = sel_dir / "selection_report.json", sel_dir / "augmented_datalist.json"
    inputs = [synthetic_dir / "manifest.jsonl", out / "train_aux_classifier" / "aux_classifier.pt"]
    if not (_is_current(report_path, inputs) and _is_current(datalist, inputs)):
        return False
    settings = json.loads(report_path.read_text()).get("settings", {})
    same_pool = Path(settings.get("synthetic_manifest", "")).resolve() == inputs[0].resolve()
    return same_pool and all(settings.get(k) == v for k, v in selection.items())


def _image_size(out: Path) -> int:
    """The tile size of the run: the autoencoder's, else (a StyleGAN2-only run) the GAN's."""
    from monai_histodiff.handlers.checkpoint import load_checkpoint

    ckpt = out / "pretrain_autoencoder" / "autoencoder.pt"
    if not ckpt.is_file():
        ckpt = out / "train_stylegan2" / "stylegan2.pt"
    return int(load_checkpoint(ckpt)["meta"]["config"]["image_size"])


def guidance_sweep(cfg: ExperimentConfig, out: Path, stages: _Stages, judge_ckpt: Path | None, classes: list[str],
                   generation: dict[str, Any], key: str = "guidance_scale") -> list[dict[str, Any]]:
    """Conditional accuracy (judged) of ``sweep_per_class`` tiles per class at each guidance scale and step count.

    ``key`` is the scale swept: ``guidance_scale`` (classifier guidance, :attr:`ExperimentConfig.sweep_scales`) or
    ``cfg_scale`` (classifier-free guidance of the conditional generator, ``sweep_cfg_scales``)."""
    if judge_ckpt is None:
        raise ExperimentError("the guidance sweep needs the judge (judge=True)")
    scales, prefix = (cfg.sweep_cfg_scales, "w") if key == "cfg_scale" else (cfg.sweep_scales, "g")
    table = []
    for steps in cfg.sweep_steps:
        for g in scales:
            name = f"{prefix}{g:g}_steps{steps}"
            sdir = out / "sweep" / name
            t0 = time.time()
            stages("generate", log_name=f"sweep_{name}", synthetic_dir=sdir.as_posix(),
                   counts=[cfg.sweep_per_class] * len(classes),
                   **{**generation, key: g, "num_inference_steps": steps})
            seconds = time.time() - t0
            judged = _judge(judge_ckpt, out, sdir, None, f"sweep_{name}")
            acc = judged["conditional_accuracy"]
            table.append({key: g, "steps": steps, "seconds": round(seconds, 1),
                          "conditional_accuracy": acc["accuracy"],
                          "per_class": {c: v["accuracy"] for c, v in acc["per_class"].items()},
                          "fd": judged["frechet"].get("overall"),
                          "fd_per_class": {c: (v or {}).get("fd") for c, v in (judged["frechet"].get("per_class")
                                                                                or {}).items()}})
    return table


def stage_hparam(stage: str, key: str, small: bool = True) -> Any:
    """A stage's training setting (``lr``, ``batch_size``, ``max_epochs``) as the bundles define it: the paper's
    (``bundles/common.json#hparams``) or, with ``small``, the CPU size's (``bundles/small.json#hparams``)."""
    from monai_histodiff.bundle.configs import config_dir

    name = "small" if small else "common"
    hparams = json.loads((config_dir() / f"{name}.json").read_text())["hparams"]
    if stage not in hparams or key not in hparams[stage]:
        raise KeyError(f"bundles/{name}.json#hparams has no '{stage}' -> '{key}'")
    return hparams[stage][key]


def _is_current(output: Path, inputs: Sequence[Path]) -> bool:
    """Whether ``output`` exists and is newer than every input (a rerun of the runner reuses it)."""
    return output.is_file() and all(p.is_file() and p.stat().st_mtime <= output.stat().st_mtime for p in inputs)


def _downstream_meta(ckpt: Path) -> dict[str, Any]:
    from monai_histodiff.handlers.checkpoint import load_checkpoint

    meta = load_checkpoint(ckpt, stage="train_downstream")["meta"]
    return {"iterations": meta.get("config", {}).get("iterations"), "init_digest": meta.get("init_digest")}


def _check_equal_budget(results: Sequence[dict[str, Any]]) -> None:
    """Every row of a seed trained for the same steps from the same initial weights (recorded in the checkpoints)."""
    for seed in {r["seed"] for r in results}:
        rs = [r for r in results if r["seed"] == seed]
        for key in ("steps", "init_digest"):
            values = {r[key] for r in rs}
            if len(values) > 1:
                raise ExperimentError(f"seed {seed}: rows differ in {key} ({sorted(map(str, values))}): "
                                      f"the rows would not compare like with like")


def _aux_accuracy(out: Path) -> float | None:
    from monai_histodiff.handlers.checkpoint import load_checkpoint

    path = out / "train_aux_classifier" / "aux_classifier.pt"
    if not path.is_file():
        return None
    return (load_checkpoint(path)["meta"].get("best_metric") or {}).get("value")


def _judge_test_accuracy(main: Path) -> float | None:
    path = main / "judge" / "evaluate" / "metrics.json"
    return json.loads(path.read_text()).get("accuracy") if path.is_file() else None


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
        entry: dict[str, Any] = {"row": name, "mode": rs[0]["mode"], "ratio": rs[0]["ratio"], "seeds": len(rs),
                                 "generator": rs[0].get("generator"),
                                 "kept": rs[0].get("kept", 0), "quota": rs[0].get("quota", 0),
                                 "status": rs[0].get("status", "full")}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            entry[m] = _mean_std(vals) if vals else None
        summary.append(entry)
    return summary


def paired_differences(results: Sequence[dict[str, Any]], metric: str = "accuracy") -> dict[str, dict[str, Any]]:
    """Per row, ``metric`` minus the baseline's on the same seed: per seed, mean and std of the differences, and the
    95% interval of the mean paired difference (Student's t with n - 1 degrees of freedom; None with one seed). An
    interval that excludes 0 is a gain (or loss) the seeds show, not the spread of one poor seed."""
    base = {r["seed"]: r[metric] for r in results if r["mode"] == "baseline"}
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["mode"] == "baseline" or r["seed"] not in base:
            continue
        out.setdefault(r["row"], {"per_seed": {}})["per_seed"][r["seed"]] = r[metric] - base[r["seed"]]
    for entry in out.values():
        entry["mean"], entry["std"] = _mean_std(list(entry["per_seed"].values()))
        entry["ci95"] = paired_interval(list(entry["per_seed"].values()))
    return out


def paired_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of paired differences (Student's t); None for fewer than 2."""
    from scipy.stats import t

    n = len(differences)
    if n < 2:
        return None
    mean, std = _mean_std(list(differences))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def write_results(results: Sequence[dict[str, Any]], output_dir: str | os.PathLike, ablation: str | None = None,
                  report: dict[str, Any] | None = None) -> dict:
    """Write ``results.csv`` (one line per row and seed), ``results.md`` (mean +- std, the paper's columns, kept /
    quota, paired difference to the baseline) and ``accuracy_vs_ratio.png``; return their paths."""
    out = Path(output_dir)
    fields = ["row", "mode", "ratio", "seed", "kept", "quota", "status", "steps", "fd_name", *METRICS]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    summary = summarise(results)
    diffs = paired_differences(results)
    fd_name = next((r["fd_name"] for r in results if r.get("fd_name")), "FD")
    seeds = sorted({r["seed"] for r in results})
    steps = next((r.get("steps") for r in results if r.get("steps")), None)
    title = (f"Table 1 protocol{f' (ablation: {ablation})' if ablation else ''}; mean +- std over seeds {seeds}; "
             f"every row's downstream classifier trained for the same {steps} optimizer steps from the same "
             f"initialisation per seed; paired difference = row - baseline on the same seed, mean +- std "
             f"[95% interval, Student's t]")
    lines = [f"<!-- {title} -->",
             f"| | kept / quota | {fd_name} | Accuracy | F1 (macro) | Sensitivity (macro) | Specificity (macro) "
             f"| Accuracy - baseline (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = ["/" if s[m] is None else f"{s[m][0]:.3f} +- {s[m][1]:.3f}" for m in METRICS]
        kept = "/" if s["mode"] == "baseline" else f"{s['kept']} / {s['quota']}" + (
            " **short**" if s["status"] == "short" else "")
        d = diffs.get(s["row"])
        diff = "/" if d is None else f"{d['mean']:+.3f} +- {d['std']:.3f}" + (
            "" if d["ci95"] is None else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
        lines.append(f"| {s['row']} | {kept} | " + " | ".join(cells) + f" | {diff} |")
    lines.append("")
    lines.append(f"_{title}._")
    lines += _report_lines(report or {})
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "accuracy_vs_ratio.png")
    return {"csv": str(out / "results.csv"), "md": str(out / "results.md"), "png": str(out / "accuracy_vs_ratio.png")}


def _report_lines(report: dict[str, Any]) -> list[str]:
    """What ``results.md`` says below the table of the run's pre-training data and of its ceiling."""
    lines = []
    pre = report.get("pretraining")
    if pre:
        sources = ", ".join(f"{name} {info.get('count')}" for name, info in (pre.get("sources") or {}).items())
        lines += ["", f"Pre-training data: {pre.get('setting')}" + (f" ({pre.get('tiles')} tiles: {sources})"
                                                                   if sources else "") + "."]
    for name, what in (("guidance_check", "Guidance check"),
                       ("guidance_check_conditional", "Classifier-free guidance check (conditional fine-tune)")):
        check = report.get(name)
        if not check:
            continue
        key = check["measure"]
        scale = "w" if check.get("cfg_scale") is not None else "g"
        value = check["cfg_scale"] if scale == "w" else check["guidance_scale"]
        lines += ["", f"{what} ({check['per_class']} tiles per class, {key}): {scale} = 0 "
                      f"{check['unguided'][key]:.3f}, {scale} = {value:g} {check['guided'][key]:.3f} "
                      f"(chance {check['chance']:.3f}): " + ("guidance steers." if check["steers"] else
                                                             "**guidance does nothing here**.")]
    pseudo = report.get("pseudo_labels")
    if pseudo:
        per_class = ", ".join(f"{k} {v}" for k, v in pseudo["kept_per_class"].items())
        lines += ["", f"Latent classifier also trained on pseudo-labels (not the paper's method): {pseudo['kept']} of "
                      f"{pseudo['labeled']} unlabeled site tiles labeled by the auxiliary classifier with confidence "
                      f">= {pseudo['min_confidence']:g} ({per_class})."]
    ceiling = report.get("ceiling")
    if ceiling:
        acc = ", ".join(f"{k} {v:.3f}" for k, v in ceiling["accuracy"].items())
        lines += ["", f"Ceiling (the judge on {ceiling['tiles']} {ceiling['part']} tiles): {acc}."]
    return lines


def _plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    from monai.utils import optional_import

    figure_mod, has_mpl = optional_import("matplotlib.figure")
    backend, _ = optional_import("matplotlib.backends.backend_agg")
    if not has_mpl:
        return
    fig = figure_mod.Figure(figsize=(5, 3.5))
    backend.FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    base = [s for s in summary if s["mode"] == "baseline" and s["accuracy"]]
    generators = list(dict.fromkeys(s.get("generator") or "histodiffusion" for s in summary if s["mode"] != "baseline"))
    for k, generator in enumerate(generators or ["histodiffusion"]):
        label = GENERATORS[generator][0] if len(generators) > 1 else "baseline"
        own = [s for s in summary if (s.get("generator") or "histodiffusion") == generator and s["accuracy"]]
        sel = base + [s for s in own if s["mode"] == "selective"]
        ax.errorbar([100 * s["ratio"] for s in sel], [s["accuracy"][0] for s in sel],
                    yerr=[s["accuracy"][1] for s in sel], marker="o", color=f"C{2 * k}",
                    label=f"{label} / + selective" if len(generators) <= 1 else f"baseline / {label} + selective")
        for s in own:
            if s["mode"] == "random":
                ax.errorbar([100 * s["ratio"]], [s["accuracy"][0]], yerr=[s["accuracy"][1]], marker="x", ls="none",
                            color=f"C{2 * k + 1}", label=f"{label} + random" if len(generators) > 1 else "+ random")
    ax.set_xlabel("synthetic tiles (% of the real training set)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_side_by_side(split_file: str | os.PathLike, synthetic_dir: str | os.PathLike, path: str | os.PathLike,
                       image_size: int, kept_datalist: str | os.PathLike | None = None, per_row: int = 8,
                       more: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]] = ()) -> Path:
    """PNG of real and synthetic tiles per class: for each class a row of real training tiles, a row of generated
    tiles requested for that class and, with ``kept_datalist``, a row of the tiles selection kept and a row of those
    it rejected (requested for the class, not kept); then the same rows for each further
    ``(synthetic_dir, kept_datalist)`` of ``more`` (another generator, side by side)."""
    import torch

    from monai_histodiff.data.transforms import tile_transforms
    from monai_histodiff.handlers.image_grid import make_grid, save_grid
    from monai_histodiff.data.manifest import read_generation_manifest

    split = load_datalist(split_file)
    classes = list(split["classes"])
    sources = []
    for folder, kept_list in [(synthetic_dir, kept_datalist), *more]:
        generated = read_generation_manifest(Path(folder) / "manifest.jsonl", classes)
        kept = [it for it in load_datalist(kept_list)["training"] if it.get("synthetic")] if kept_list else None
        sources.append((generated, kept))
    load = tile_transforms(image_size)

    def tiles(items: Sequence[dict]) -> torch.Tensor:
        return torch.stack([load(dict(it))["image"] for it in items[:per_row]]) if items else torch.zeros(
            1, 3, image_size, image_size)

    rows = []
    for c in range(len(classes)):
        rows.append(tiles([it for it in split["training"] if int(it["label"]) == c]))
        for generated, kept in sources:
            rows.append(tiles([it for it in generated if int(it["label"]) == c]))
            if kept is not None:
                rows.append(tiles([it for it in kept if int(it["label"]) == c]))
                taken = {os.path.abspath(it["image"]) for it in kept}
                rows.append(tiles([it for it in generated if int(it["label"]) == c
                                   and os.path.abspath(it["image"]) not in taken]))
    return save_grid(make_grid(rows, max_items=per_row), path)
