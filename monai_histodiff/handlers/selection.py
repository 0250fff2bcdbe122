"""Centroid-based selective augmentation (Xue et al., HistoGAN, MedIA 2021) as a drop-in MONAI/Ignite component.

HistoDiffusion (Ye et al., MICCAI 2023, Table 1) adds synthetic tiles to the small real training set either
"selectively" (a tile generated for class ``k`` is kept only if, in the feature space of a classifier trained on the
real labeled subset, its nearest class centroid is ``k`` and it lies within the class's distance threshold) or at
"random". :class:`CentroidSelectionHandler` wires the pure functions of :mod:`monai_histodiff.selection` to files:
it reads the split datalist and the generation manifest, embeds real and synthetic tiles, decides, and writes the
augmented datalist together with an audit trail (decisions CSV, report JSON, distance histograms, per-class
kept/rejected bars, class map). It never changes the class balance or misses a quota silently: short classes are
logged as warnings and recorded, ``balance`` keeps the real class proportions, ``min_fill`` fails the stage.

It is a plain class: call :meth:`CentroidSelectionHandler.run` (or the handler itself) directly, or
:meth:`~CentroidSelectionHandler.attach` it to an Ignite engine (for example a MONAI ``SupervisedEvaluator`` or the
tiny engine of the ``select`` bundle) so the selection runs on ``Events.COMPLETED``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.utils import OptionalImportError, min_version, optional_import

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.datalist import class_counts, load_datalist, write_datalist
from monai_histodiff.data.manifest import read_generation_manifest
from monai_histodiff.data.transforms import tile_transforms
from monai_histodiff.selection import (
    BALANCE_MODES,
    SelectionResult,
    class_centroids,
    distances_to_centroids,
    extract_features,
    extract_features_and_probs,
    plot_decisions_by_class,
    plot_distance_histograms,
    quotas_from_ratio,
    real_distance_thresholds,
    select_candidates,
    write_decisions_csv,
    write_selection_report,
)

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["CentroidSelectionHandler", "SelectionShortError"]

logger = logging.getLogger(__name__)

#: Names of the files written to ``output_dir``.
AUGMENTED_DATALIST = "augmented_datalist.json"
DECISIONS_CSV = "decisions.csv"
SELECTION_REPORT = "selection_report.json"
HISTOGRAMS_PNG = "distance_histograms.png"
KEPT_BY_CLASS_PNG = "kept_by_class.png"
CLASSES_JSON = "classes.json"


class SelectionShortError(ValueError):
    """Raised when the smallest class fill of a selection is below ``min_fill``: the row should not be trained."""



def _is_rank0() -> bool:
    from monai_histodiff.engines.distributed import is_main_process  # not at import: engines imports handlers

    return is_main_process()




def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


class CentroidSelectionHandler:
    """Select synthetic tiles by distance to real class centroids and write the augmented datalist.

    Procedure (Xue et al. 2021, as followed by HistoDiffusion):

    1. embed the REAL training tiles of ``real_datalist`` (plus its validation tiles with ``include_validation``) with
       ``feature_extractor`` (``features(x)``, its penultimate output, when it has one, else its output; L2-normalised);
       per class, the centroid is their mean and the threshold the ``percentile`` of their distances to it.
       Synthetic tiles never enter the centroids;
    2. embed every candidate of ``synthetic_manifest`` and, in the same pass, take the extractor's softmax
       probability of the candidate's target class as its ``confidence`` (Xue et al.: the classifier trained on real
       tiles; the manifest's ``confidence``, the generating latent classifier's, is only recorded); in
       ``"selective"`` mode a candidate for class ``k`` is eligible when its nearest centroid is ``k``, its distance
       is within the threshold of ``k`` and, with ``min_confidence``, its confidence is at least that; per class,
       the quota is filled closest first. In ``"random"`` mode (Table 1's baseline) the quota is filled by a seeded
       random draw, without filtering;
    3. balance: when some class cannot fill its quota, ``balance="proportional"`` trims every class to the same
       fraction of its quota (the smallest class fill, :func:`~monai_histodiff.selection.balance_to_quota_fraction`),
       so the synthetic tiles keep the real class proportions; ``"none"`` keeps what passed. A short class is logged
       as a warning naming it, its kept count and its quota; with ``min_fill`` > the smallest class fill the stage
       raises :class:`SelectionShortError` after writing the audit trail (and no augmented datalist);
    4. write to ``output_dir``: ``augmented_datalist.json`` (real training + kept tiles as
       ``{"image", "label", "synthetic": true}`` (real items ``"synthetic": false``); ``validation`` / ``test``
       unchanged; a ``selection`` block with the settings and counts), ``decisions.csv`` (one row per candidate, columns
       :data:`~monai_histodiff.selection.DECISION_COLUMNS`; ``file`` as written in the manifest),
       ``selection_report.json``, ``distance_histograms.png``, ``kept_by_class.png`` and ``classes.json``.

    Files are written atomically, and only by rank 0 when ``torch.distributed`` is initialised (every rank computes
    the same result, available as :attr:`result` / :attr:`report`). There is no barrier: in a multi-process run,
    synchronise before other ranks read the outputs.

    Args:
        feature_extractor: the embedding network, normally a classifier trained on the real labeled subset (e.g. the
            auxiliary :class:`~monai_histodiff.networks.HistoImageClassifier`). A DDP/DataParallel wrapper is unwrapped.
            It is moved to ``device`` and run in eval mode (its previous mode is restored). Its class logits are
            ``classify(features)`` when it defines ``classify`` (one pass), else its output; when they are not one
            logit per datalist class the confidence is not available (recorded empty; ``min_confidence`` then fails).
        real_datalist: split JSON with ``training`` items ``{"image", "label"}`` and ``classes``.
        synthetic_manifest: generation ``manifest.jsonl``, see :func:`read_generation_manifest`.
        output_dir: folder for the outputs (created).
        image_size: tile size fed to the extractor (used by the default transform).
        ratio: per-class quota = ``round(ratio * real training count of the class)``; the paper's 0.5 / 1 / 2 / 3.
            Exclusive with ``quotas``; when both are ``None`` every eligible tile is kept (random: every tile).
        quotas: explicit per-class quotas as ``{class name or index: n}`` (missing classes get 0) or a sequence in
            class order.
        percentile: per-class percentile of the real distances used as threshold.
        min_confidence: optional minimum extractor softmax probability of the target class (selective mode).
        mode: ``"selective"`` or ``"random"``.
        balance: ``"proportional"`` (default) or ``"none"``, see step 3.
        min_fill: fail when the smallest class fill (kept / quota) is below this, in ``[0, 1]``; 0 never fails.
        seed: seed of the random draw in ``"random"`` mode.
        batch_size: batch size of the feature extraction.
        device: device of the feature extraction.
        amp: run the extractor under autocast.
        transform: item transform producing ``{"image": [3, H, W] tensor}`` from ``{"image": path, ...}``. Defaults to
            ``tile_transforms(image_size)`` (load, RGB, resize, [0, 255] -> [-1, 1], no augmentation): the same
            preprocessing the package's classifiers are trained with. The features are only meaningful when this
            matches the extractor's training preprocessing, so pass your own transform for an external extractor.
        include_validation: also use the real validation tiles for centroids and thresholds (quotas still follow the
            training counts).
        num_workers: DataLoader workers of the feature extraction.
    """

    def __init__(
        self,
        feature_extractor: torch.nn.Module,
        real_datalist: str | os.PathLike,
        synthetic_manifest: str | os.PathLike,
        output_dir: str | os.PathLike,
        image_size: int | Sequence[int],
        ratio: float | None = None,
        quotas: Mapping[str | int, int] | Sequence[int] | None = None,
        percentile: float = 95.0,
        min_confidence: float | None = None,
        mode: str = "selective",
        balance: str = "proportional",
        min_fill: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        amp: bool = False,
        transform: Callable | None = None,
        include_validation: bool = False,
        num_workers: int = 0,
    ) -> None:
        if mode not in ("selective", "random"):
            raise ValueError(f"mode must be 'selective' or 'random', got {mode!r}.")
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}.")
        if not (math.isfinite(float(min_fill)) and 0.0 <= float(min_fill) <= 1.0):
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}.")
        if min_confidence is not None and not (math.isfinite(float(min_confidence)) and 0 <= min_confidence <= 1):
            raise ValueError(f"min_confidence must be a probability in [0, 1] or None, got {min_confidence}.")
        if ratio is not None and quotas is not None:
            raise ValueError("give at most one of ratio and quotas.")
        if ratio is not None and not (math.isfinite(float(ratio)) and float(ratio) >= 0):
            raise ValueError(f"ratio must be a non-negative number, got {ratio}.")
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.feature_extractor = feature_extractor
        self.real_datalist = Path(real_datalist)
        self.synthetic_manifest = Path(synthetic_manifest)
        self.output_dir = Path(output_dir)
        self.image_size = image_size
        self.ratio = None if ratio is None else float(ratio)
        self.quotas = quotas
        self.percentile = float(percentile)
        self.min_confidence = None if min_confidence is None else float(min_confidence)
        self.mode = mode
        self.balance = balance
        self.min_fill = float(min_fill)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.transform = transform if transform is not None else tile_transforms(image_size)
        self.include_validation = bool(include_validation)
        self.num_workers = int(num_workers)
        self.result: SelectionResult | None = None
        self.report: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Run the selection when ``engine`` completes (``Events.COMPLETED``)."""
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict[str, Any]:
        """Ignite entry point; ``engine`` is not used. Same as :meth:`run`."""
        return self.run()

    # ------------------------------------------------------------------------------------------------ helpers
    def _model(self) -> torch.nn.Module:
        model = self.feature_extractor
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model.to(self.device)

    def _embed(
        self, model: torch.nn.Module, items: Sequence[Mapping[str, Any]], with_probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features [N, D], softmax [N, K'] or None)`` of the items, from one pass of the extractor."""
        data = [{"image": it["image"], "label": int(it["label"])} for it in items]
        loader = DataLoader(
            Dataset(data, transform=self.transform), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers,
        )
        if with_probs:
            features, _, probs = extract_features_and_probs(model, loader, device=self.device, amp=self.amp)
            return features, probs
        features, _ = extract_features(model, loader, device=self.device, amp=self.amp)
        return features, None

    def _quota_list(self, classes: Sequence[str], real_counts: Sequence[int]) -> list[int] | None:
        k = len(classes)
        if self.ratio is not None:
            q = quotas_from_ratio(real_counts, self.ratio)
            return [q[i] for i in range(k)]
        if self.quotas is None:
            return None
        if isinstance(self.quotas, Mapping):
            out = [0] * k
            for key, n in self.quotas.items():
                if isinstance(key, str) and key in classes:
                    index = classes.index(key)
                elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= int(key) < k:
                    index = int(key)
                else:
                    raise ValueError(f"quota given for unknown class {key!r}; classes are {list(classes)}.")
                out[index] = int(n)
        else:
            out = [int(n) for n in self.quotas]
            if len(out) != k:
                raise ValueError(f"quotas has {len(out)} entries but the datalist has {k} classes {list(classes)}.")
        if any(n < 0 for n in out):
            raise ValueError(f"quotas must be non-negative, got {out}.")
        return out

    # ------------------------------------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        """Select the synthetic tiles and write the outputs (rank 0 only).

        Returns:
            The selection report (also written as ``selection_report.json`` and kept as :attr:`report`).

        Raises:
            FileNotFoundError: a missing datalist, manifest or synthetic tile (named).
            ValueError: a manifest class not in the datalist classes (named), a datalist without ``classes`` or a class
                without real training tiles, inconsistent quotas, or ``min_confidence`` with an extractor that gives
                no class probabilities for the datalist classes.
            SelectionShortError: (a ``ValueError``) the smallest class fill is below ``min_fill``; the message names
                the short classes with their kept, quota and eligible counts. The audit trail is written first.
        """
        split = load_datalist(self.real_datalist)
        classes = [str(c) for c in split.get("classes") or []]
        if not classes:
            raise ValueError(f"datalist {self.real_datalist} has no 'classes' list.")
        k = len(classes)
        training = list(split.get("training") or [])
        if not training:
            raise ValueError(f"datalist {self.real_datalist} has no 'training' items.")
        reference = training + (list(split.get("validation") or []) if self.include_validation else [])
        candidates = read_generation_manifest(self.synthetic_manifest, classes)

        real_counts = class_counts(training, k)
        empty = [classes[i] for i in range(k) if real_counts[i] == 0]
        if empty:
            raise ValueError(f"datalist {self.real_datalist} has no real training tiles for class(es) {empty}.")
        quotas = self._quota_list(classes, real_counts)

        manifest_conf = np.array([it["confidence"] for it in candidates], dtype=np.float64)

        model = self._model()
        real_feats, _ = self._embed(model, reference)
        real_labels = torch.tensor([int(it["label"]) for it in reference], dtype=torch.long)
        cand_feats, cand_probs = self._embed(model, candidates, with_probs=True)
        cand_labels = torch.tensor([it["label"] for it in candidates], dtype=torch.long)
        conf = self._own_class_confidence(model, cand_probs, cand_labels, k)

        centroids = class_centroids(real_feats, real_labels, k)
        thresholds = real_distance_thresholds(real_feats, real_labels, centroids, self.percentile)
        result = select_candidates(
            cand_feats,
            cand_labels,
            centroids,
            thresholds,
            confidences=conf,
            min_confidence=self.min_confidence if self.mode == "selective" else None,
            quotas=quotas,
            mode=self.mode,
            seed=self.seed,
            balance=self.balance,
        )
        self.result = result
        self.report = self._build_report(classes, real_counts, thresholds, quotas, candidates, result, type(model))
        self._warn_short(self.report)
        error = self._min_fill_error(self.report)
        if error:
            self.report["error"] = error

        if _is_rank0():
            self._write(
                split, classes, candidates, manifest_conf, result, real_feats, real_labels, centroids, thresholds,
                write_datalist_file=not error,
            )
        if error:
            raise SelectionShortError(error)
        return self.report

    def _own_class_confidence(
        self, model: torch.nn.Module, probs: torch.Tensor | None, labels: torch.Tensor, num_classes: int
    ) -> np.ndarray | None:
        """The extractor's softmax probability of each candidate's target class, or None when it is no classifier
        of the datalist classes (then ``min_confidence`` is refused)."""
        if probs is not None and probs.ndim == 2 and probs.shape[1] == num_classes:
            return probs.gather(1, labels.unsqueeze(1)).squeeze(1).double().numpy()
        width = None if probs is None else int(probs.shape[-1])
        msg = (f"feature extractor {type(model).__name__} gives {width} outputs per tile, not one logit per class of "
               f"{self.real_datalist} ({num_classes})")
        if self.min_confidence is not None and self.mode == "selective":
            raise ValueError(f"min_confidence={self.min_confidence} needs the extractor's class probabilities: {msg}; "
                             "use a classifier trained on these classes or set min_confidence to null.")
        logger.info("selection: no extractor confidence recorded (%s).", msg)
        return None

    def _build_report(
        self,
        classes: list[str],
        real_counts: Sequence[int],
        thresholds: torch.Tensor,
        quotas: Sequence[int] | None,
        candidates: Sequence[Mapping[str, Any]],
        result: SelectionResult,
        model_type: type,
    ) -> dict[str, Any]:
        """The ``selection_report.json`` content: per class counts, fills, short classes, status and settings."""
        per_class_raw = result.per_class_summary()
        reasons = result.reason_counts()
        per_class: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(classes):
            by_reason = {r: n for r, n in reasons[i].items() if n and "kept" not in r}
            per_class[name] = {"real": int(real_counts[i]), "threshold": float(thresholds[i]), **per_class_raw[i],
                               "rejected_by_reason": by_reason}
        kept_total = int(result.kept.sum())
        if quotas is None:
            quota_total, fill, min_class_fill, short, status = None, None, None, [], "no_quota"
        else:
            quota_total = int(sum(quotas))
            fill = kept_total / quota_total if quota_total else 1.0
            min_class_fill = min(float(v["fill"]) for v in per_class.values())
            short = [n for n, v in per_class.items() if v["kept"] < v["quota"]]
            status = "short" if short else "full"
        limited = [float(v["selected"]) / v["quota"] for v in per_class.values() if v["quota"]]
        totals = {
            "real": int(sum(real_counts)),
            "candidates": len(candidates),
            "eligible": int(result.eligible.sum()),
            "kept": kept_total,
            "shortfall": int(sum(int(v["shortfall"] or 0) for v in per_class.values())),
            "rejected_by_reason": {
                r: int((result.reason == r).sum()) for r in sorted(set(result.reason.tolist())) if "kept" not in r
            },
        }
        settings = {
            "mode": self.mode,
            "ratio": self.ratio,
            "quotas": None if quotas is None else dict(zip(classes, quotas)),
            "percentile": self.percentile,
            "min_confidence": self.min_confidence,
            "confidence_source": "feature_extractor_softmax" if not np.isnan(result.confidence).all() else None,
            "balance": self.balance,
            "min_fill": self.min_fill,
            "seed": self.seed,
            "include_validation": self.include_validation,
            "image_size": self.image_size,
            "real_datalist": str(self.real_datalist.resolve()),
            "synthetic_manifest": str(self.synthetic_manifest.resolve()),
            "feature_extractor": model_type.__name__,
        }
        return {
            "status": status,
            "quota_total": quota_total,
            "kept_total": kept_total,
            "fill": fill,
            "min_class_fill": min_class_fill,
            "short_classes": short,
            "balance": {
                "mode": self.balance,
                # the fraction of its quota every class was trimmed to (the smallest fill before balancing)
                "fraction": min(limited) if self.balance == "proportional" and limited else None,
                "trimmed": {n: int(v["trimmed"]) for n, v in per_class.items()},
            },
            "classes": classes,
            "per_class": per_class,
            "totals": totals,
            "settings": settings,
        }

    def _warn_short(self, report: Mapping[str, Any]) -> None:
        """One WARNING per short class naming it, its kept count and its quota (and why), then the balancing."""
        per_class = report["per_class"]
        for name in report["short_classes"]:
            v = per_class[name]
            if v["selected"] < v["quota"]:
                rejected = {r: n for r, n in v["rejected_by_reason"].items() if r != "balance_trimmed"}
                logger.warning(
                    "selection (%s): class %s is short of its quota: kept %d of quota %d (%d of %d candidates "
                    "eligible%s; rejected %s)",
                    self.mode, name, v["kept"], v["quota"], v["eligible"], v["candidates"],
                    f", {v['trimmed']} trimmed by balance" if v["trimmed"] else "", rejected or "none",
                )
        trimmed = {n: t for n, t in report["balance"]["trimmed"].items() if t}
        if trimmed:
            logger.warning(
                "selection (%s): balance=proportional trimmed %s so every class keeps %.1f%% of its quota: kept %s",
                self.mode, ", ".join(f"{n} by {t}" for n, t in trimmed.items()),
                100.0 * report["balance"]["fraction"],
                ", ".join(f"{n} {v['kept']}/{v['quota']}" for n, v in per_class.items()),
            )
        logger.info(
            "selection (%s, %s): kept %d of %d synthetic tiles (quota %s); per class %s",
            self.mode, report["status"], report["kept_total"], report["totals"]["candidates"], report["quota_total"],
            {n: v["kept"] for n, v in per_class.items()},
        )

    def _min_fill_error(self, report: Mapping[str, Any]) -> str | None:
        """The error message when the smallest class fill is below ``min_fill``, else None."""
        if report["min_class_fill"] is None or report["min_class_fill"] >= self.min_fill:
            return None
        per_class = report["per_class"]
        low = [n for n, v in per_class.items() if v["fill"] < self.min_fill]
        return (
            f"selection ({self.mode}) of {self.synthetic_manifest}: smallest class fill {report['min_class_fill']:.3f} "
            f"is below min_fill={self.min_fill}: "
            + ", ".join(f"{n} kept {per_class[n]['kept']} of quota {per_class[n]['quota']} "
                        f"({per_class[n]['eligible']} eligible)" for n in low)
            + f"; not writing {AUGMENTED_DATALIST} (see {SELECTION_REPORT} and {DECISIONS_CSV} in {self.output_dir})"
        )

    def _write(
        self,
        split: dict[str, Any],
        classes: list[str],
        candidates: list[dict[str, Any]],
        manifest_conf: np.ndarray,
        result: SelectionResult,
        real_feats: torch.Tensor,
        real_labels: torch.Tensor,
        centroids: torch.Tensor,
        thresholds: torch.Tensor,
        write_datalist_file: bool = True,
    ) -> None:
        """Write the outputs; without ``write_datalist_file`` (a failed ``min_fill``) only the audit trail is
        written and a previous ``augmented_datalist.json`` is removed, so no stale datalist can be trained on."""
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        k = len(classes)
        report = self.report or {}
        kept_counts = [int(v["kept"]) for v in report["per_class"].values()]

        kept_items = [
            {"image": candidates[i]["image"], "label": int(candidates[i]["label"]), "synthetic": True}
            for i in result.kept_indices
        ]
        augmented = copy.deepcopy(split)
        # every item carries the same keys, so batches of mixed real and synthetic tiles collate: the flag, and a
        # group when the real tiles have groups (a synthetic tile is a group of its own)
        real_training = [dict(it, synthetic=False) for it in augmented.get("training") or []]
        if any("group" in it for it in real_training):
            for it in real_training + kept_items:
                it.setdefault("group", f"{'synthetic' if it['synthetic'] else 'tile'}:{Path(it['image']).name}")
        real_counts = class_counts(real_training, k)
        augmented["training"] = real_training + kept_items
        counts = dict(augmented.get("counts") or {})
        counts.update(
            {
                "training": [r + s for r, s in zip(real_counts, kept_counts)],
                "training_real": real_counts,
                "training_synthetic": kept_counts,
            }
        )
        augmented["counts"] = counts
        augmented["selection"] = {
            **{key: report["settings"][key] for key in ("mode", "ratio", "percentile", "min_confidence", "seed")},
            "quotas": report["settings"]["quotas"],
            "balance": report["settings"]["balance"],
            "status": report["status"],
            "min_class_fill": report["min_class_fill"],
            "short_classes": report["short_classes"],
            "counts": {
                "real": real_counts,
                "candidates": [int(v["candidates"]) for v in report["per_class"].values()],
                "eligible": [int(v["eligible"]) for v in report["per_class"].values()],
                "trimmed": [int(v["trimmed"]) for v in report["per_class"].values()],
                "kept": kept_counts,
            },
            "synthetic_manifest": report["settings"]["synthetic_manifest"],
            "real_datalist": report["settings"]["real_datalist"],
        }
        if write_datalist_file:
            # write_datalist is atomic and stores image paths relative to the output folder
            write_datalist(augmented, out / AUGMENTED_DATALIST)
        elif (out / AUGMENTED_DATALIST).exists():
            (out / AUGMENTED_DATALIST).unlink()

        rows = result.to_rows([c["file"] for c in candidates], classes, manifest_conf)
        atomic_write(out / DECISIONS_CSV, lambda p: write_decisions_csv(rows, p))
        atomic_write(out / SELECTION_REPORT, lambda p: write_selection_report(report, p))
        class_map = {"classes": classes, "class_to_index": {c: i for i, c in enumerate(classes)}}
        atomic_write(out / CLASSES_JSON, lambda p: _write_json(class_map, p))

        own_real = distances_to_centroids(real_feats, centroids).gather(1, real_labels.unsqueeze(1)).squeeze(1)
        real_d = {i: own_real[real_labels == i] for i in range(k)}
        cand_d = {i: result.distance[result.labels == i] for i in range(k)}
        quotas = [v["quota"] for v in report["per_class"].values()]
        try:
            atomic_write(out / HISTOGRAMS_PNG,
                         lambda p: plot_distance_histograms(real_d, cand_d, thresholds, classes, p))
            reasons = result.reason_counts()
            atomic_write(out / KEPT_BY_CLASS_PNG, lambda p: plot_decisions_by_class(reasons, quotas, classes, p))
        except OptionalImportError as e:
            logger.warning("matplotlib is not installed; %s and %s not written (%s).", HISTOGRAMS_PNG,
                           KEPT_BY_CLASS_PNG, e)

