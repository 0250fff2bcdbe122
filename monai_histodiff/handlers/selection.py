"""Centroid-based selective augmentation (Xue et al., HistoGAN, MedIA 2021) as a drop-in MONAI/Ignite component.

HistoDiffusion (Ye et al., MICCAI 2023, Table 1) adds synthetic tiles to the small real training set either
"selectively" (a tile generated for class ``k`` is kept only if, in the feature space of a classifier trained on the
real labeled subset, its nearest class centroid is ``k`` and it lies within the class's distance threshold) or at
"random". :class:`CentroidSelectionHandler` wires the pure functions of :mod:`monai_histodiff.selection` to files:
it reads the split datalist and the generation manifest, embeds real and synthetic tiles, decides, and writes the
augmented datalist together with an audit trail (decisions CSV, report JSON, distance histograms, class map).

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

from monai_histodiff.data.datalist import class_counts, load_datalist, write_datalist
from monai_histodiff.data.transforms import tile_transforms
from monai_histodiff.selection import (
    SelectionResult,
    class_centroids,
    distances_to_centroids,
    extract_features,
    plot_distance_histograms,
    quotas_from_ratio,
    real_distance_thresholds,
    select_candidates,
    write_decisions_csv,
    write_selection_report,
)

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["CentroidSelectionHandler", "read_generation_manifest"]

logger = logging.getLogger(__name__)

#: Names of the files written to ``output_dir``.
AUGMENTED_DATALIST = "augmented_datalist.json"
DECISIONS_CSV = "decisions.csv"
SELECTION_REPORT = "selection_report.json"
HISTOGRAMS_PNG = "distance_histograms.png"
CLASSES_JSON = "classes.json"


def read_generation_manifest(path: str | os.PathLike, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Read the generation manifest (JSON lines) into candidate items.

    Each non-empty line is a JSON object with at least ``file`` (relative to the manifest's folder, or absolute) and
    the target class as ``class_index`` (int) or ``class`` (a name in ``classes``); ``confidence`` (the generating
    classifier's probability of the target class) is optional. When both ``class_index`` and ``class`` are given they
    must agree.

    Args:
        path: the ``manifest.jsonl`` written by the generation stage.
        classes: class names in index order (the datalist's ``classes``).

    Returns:
        One ``{"file": manifest entry, "image": absolute path, "label": index, "confidence": float or NaN}`` per line.

    Raises:
        FileNotFoundError: when the manifest or one of its tiles does not exist (both are named).
        ValueError: on invalid JSON, a missing key, a class not in ``classes`` or an out-of-range ``class_index``
            (the line and the value are named), or an empty manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generation manifest not found: {path}")
    base = path.parent.resolve()
    names = [str(c) for c in classes]
    items: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(row, Mapping) or "file" not in row:
                raise ValueError(f"{where}: a manifest row needs a 'file' entry, got {line.strip()[:200]!r}")
            index = _manifest_class_index(row, names, where)
            image = Path(row["file"]) if os.path.isabs(row["file"]) else base / row["file"]
            if not image.is_file():
                raise FileNotFoundError(f"{where}: synthetic tile not found: {image}")
            conf = row.get("confidence")
            items.append(
                {
                    "file": str(row["file"]),
                    "image": str(image.resolve()),
                    "label": index,
                    "confidence": float("nan") if conf is None else float(conf),
                }
            )
    if not items:
        raise ValueError(f"generation manifest {path} lists no synthetic tiles.")
    return items


def _manifest_class_index(row: Mapping[str, Any], names: Sequence[str], where: str) -> int:
    index = row.get("class_index")
    name = row.get("class")
    if index is None and name is None:
        raise ValueError(f"{where}: a manifest row needs 'class_index' or 'class'.")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names):
            raise ValueError(f"{where}: class_index {index!r} is not an index into the datalist classes {list(names)}.")
    if name is not None:
        if str(name) not in names:
            raise ValueError(f"{where}: class {name!r} is not one of the datalist classes {list(names)}.")
        if index is not None and names[index] != str(name):
            raise ValueError(f"{where}: class_index {index} ({names[index]!r}) does not match class {name!r}.")
        index = names.index(str(name))
    return int(index)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


class CentroidSelectionHandler:
    """Select synthetic tiles by distance to real class centroids and write the augmented datalist.

    Procedure (Xue et al. 2021, as followed by HistoDiffusion):

    1. embed the REAL training tiles of ``real_datalist`` (plus its validation tiles with ``include_validation``) with
       ``feature_extractor`` (``features(x)``, its penultimate output, when it has one, else its output; L2-normalised);
       per class, the centroid is their mean and the threshold the ``percentile`` of their distances to it.
       Synthetic tiles never enter the centroids;
    2. embed every candidate of ``synthetic_manifest``; in ``"selective"`` mode a candidate for class ``k`` is
       eligible when its nearest centroid is ``k``, its distance is within the threshold of ``k`` and, with
       ``min_confidence``, its manifest confidence is at least that; per class, the quota is filled closest first.
       In ``"random"`` mode (Table 1's baseline) the quota is filled by a seeded random draw, without filtering;
    3. write to ``output_dir``: ``augmented_datalist.json`` (real training + kept tiles as
       ``{"image", "label", "synthetic": true}`` (real items ``"synthetic": false``); ``validation`` / ``test`` unchanged; a ``selection`` block with the
       settings and counts), ``decisions.csv`` (one row per candidate, columns
       :data:`~monai_histodiff.selection.DECISION_COLUMNS`; ``file`` as written in the manifest),
       ``selection_report.json``, ``distance_histograms.png`` and ``classes.json``.

    Files are written atomically, and only by rank 0 when ``torch.distributed`` is initialised (every rank computes
    the same result, available as :attr:`result` / :attr:`report`). There is no barrier: in a multi-process run,
    synchronise before other ranks read the outputs. A class whose quota cannot be filled is reported by a logged
    warning naming it (and as ``shortfall`` in the report).

    Args:
        feature_extractor: the embedding network, normally a classifier trained on the real labeled subset (e.g. the
            auxiliary :class:`~monai_histodiff.networks.HistoImageClassifier`). A DDP/DataParallel wrapper is unwrapped.
            It is moved to ``device`` and run in eval mode (its previous mode is restored).
        real_datalist: split JSON with ``training`` items ``{"image", "label"}`` and ``classes``.
        synthetic_manifest: generation ``manifest.jsonl``, see :func:`read_generation_manifest`.
        output_dir: folder for the outputs (created).
        image_size: tile size fed to the extractor (used by the default transform).
        ratio: per-class quota = ``round(ratio * real training count of the class)``; the paper's 0.5 / 1 / 2 / 3.
            Exclusive with ``quotas``; when both are ``None`` every eligible tile is kept (random: every tile).
        quotas: explicit per-class quotas as ``{class name or index: n}`` (missing classes get 0) or a sequence in
            class order.
        percentile: per-class percentile of the real distances used as threshold.
        min_confidence: optional minimum manifest ``confidence`` (selective mode; a row without one fails it).
        mode: ``"selective"`` or ``"random"``.
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

    def _embed(self, model: torch.nn.Module, items: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        data = [{"image": it["image"], "label": int(it["label"])} for it in items]
        loader = DataLoader(
            Dataset(data, transform=self.transform), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers,
        )
        features, _ = extract_features(model, loader, device=self.device, amp=self.amp)
        return features

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
                without real training tiles, or inconsistent quotas.
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

        conf = np.array([it["confidence"] for it in candidates], dtype=np.float64)
        has_conf = bool(np.isfinite(conf).any())
        if self.min_confidence is not None and not has_conf and self.mode == "selective":
            raise ValueError(
                f"min_confidence={self.min_confidence} is set but no row of {self.synthetic_manifest} "
                "has a 'confidence'."
            )

        model = self._model()
        real_feats = self._embed(model, reference)
        real_labels = torch.tensor([int(it["label"]) for it in reference], dtype=torch.long)
        cand_feats = self._embed(model, candidates)
        cand_labels = torch.tensor([it["label"] for it in candidates], dtype=torch.long)

        centroids = class_centroids(real_feats, real_labels, k)
        thresholds = real_distance_thresholds(real_feats, real_labels, centroids, self.percentile)
        result = select_candidates(
            cand_feats,
            cand_labels,
            centroids,
            thresholds,
            confidences=conf if has_conf else None,
            min_confidence=self.min_confidence if self.mode == "selective" else None,
            quotas=quotas,
            mode=self.mode,
            seed=self.seed,
        )
        self.result = result

        per_class_raw = result.per_class_summary()
        per_class: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(classes):
            per_class[name] = {"real": real_counts[i], "threshold": float(thresholds[i]), **per_class_raw[i]}
        kept_counts = [int(per_class_raw[i]["kept"]) for i in range(k)]
        totals = {
            "real": int(sum(real_counts)),
            "candidates": len(candidates),
            "eligible": int(result.eligible.sum()),
            "kept": int(result.kept.sum()),
            "shortfall": int(sum(int(v["shortfall"] or 0) for v in per_class_raw.values())),
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
            "seed": self.seed,
            "include_validation": self.include_validation,
            "image_size": self.image_size,
            "real_datalist": str(self.real_datalist.resolve()),
            "synthetic_manifest": str(self.synthetic_manifest.resolve()),
            "feature_extractor": type(model).__name__,
        }
        self.report = {"classes": classes, "per_class": per_class, "totals": totals, "settings": settings}

        short = {n: v for n, v in per_class.items() if v["shortfall"]}
        if short:
            logger.warning(
                "selection (%s) could not fill the quota of class(es) %s: %s",
                self.mode,
                sorted(short),
                ", ".join(f"{n} kept {v['kept']}/{v['quota']} ({v['eligible']} eligible)" for n, v in short.items()),
            )
        logger.info(
            "selection (%s): kept %d of %d synthetic tiles; per class %s",
            self.mode, totals["kept"], totals["candidates"], dict(zip(classes, kept_counts)),
        )

        if _is_rank0():
            self._write(split, classes, candidates, result, real_feats, real_labels, centroids, thresholds, kept_counts)
        return self.report

    def _write(
        self,
        split: dict[str, Any],
        classes: list[str],
        candidates: list[dict[str, Any]],
        result: SelectionResult,
        real_feats: torch.Tensor,
        real_labels: torch.Tensor,
        centroids: torch.Tensor,
        thresholds: torch.Tensor,
        kept_counts: list[int],
    ) -> None:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        k = len(classes)
        report = self.report or {}

        kept_items = [
            {"image": candidates[i]["image"], "label": int(candidates[i]["label"]), "synthetic": True}
            for i in result.kept_indices
        ]
        augmented = copy.deepcopy(split)
        # every item carries the flag, so batches of mixed real and synthetic tiles collate
        real_training = [dict(it, synthetic=False) for it in augmented.get("training") or []]
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
            "counts": {
                "real": real_counts,
                "candidates": [int(v["candidates"]) for v in report["per_class"].values()],
                "eligible": [int(v["eligible"]) for v in report["per_class"].values()],
                "kept": kept_counts,
            },
            "synthetic_manifest": report["settings"]["synthetic_manifest"],
            "real_datalist": report["settings"]["real_datalist"],
        }
        # write_datalist is atomic and stores image paths relative to the output folder
        write_datalist(augmented, out / AUGMENTED_DATALIST)

        rows = result.to_rows([c["file"] for c in candidates], classes)
        _atomic(out / DECISIONS_CSV, lambda p: write_decisions_csv(rows, p))
        _atomic(out / SELECTION_REPORT, lambda p: write_selection_report(report, p))
        class_map = {"classes": classes, "class_to_index": {c: i for i, c in enumerate(classes)}}
        _atomic(out / CLASSES_JSON, lambda p: _write_json(class_map, p))

        own_real = distances_to_centroids(real_feats, centroids).gather(1, real_labels.unsqueeze(1)).squeeze(1)
        real_d = {i: own_real[real_labels == i] for i in range(k)}
        cand_d = {i: result.distance[result.labels == i] for i in range(k)}
        try:
            _atomic(out / HISTOGRAMS_PNG, lambda p: plot_distance_histograms(real_d, cand_d, thresholds, classes, p))
        except OptionalImportError as e:
            logger.warning("matplotlib is not installed; %s not written (%s).", HISTOGRAMS_PNG, e)

