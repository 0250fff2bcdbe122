"""The judge: an independent tile classifier that measures synthetic tiles, and never selects or trains anything.

The judge is a downstream classifier (stage ``train_downstream``) trained on a large labeled set disjoint from the
test set: the split's ``pool`` (labeled tiles in none of training / validation / test) plus its training and
validation tiles, minus a held-out validation part drawn by groups. It is evaluated on the split's test set like any
downstream classifier, so its own accuracy is known, and then reads generated tiles:

* conditional accuracy: the share of generated tiles the judge assigns to the class they were generated for, overall,
  per class, and (with a selection ``decisions.csv``) separately for kept and rejected tiles, with the judge's
  confusion (requested x predicted counts);
* the Frechet distance between real and synthetic tiles in the judge's feature space, overall and per class, with a
  fixed number of tiles per set. The real tiles are the split's training + validation tiles (those the generator and
  the downstream classifier saw), as in the paper's FID; the test set is never a reference here.

No stage reads the judge's outputs back: selection, generation and model choice never see them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_histodiff.data.datalist import class_counts, load_datalist
from monai_histodiff.data.split import check_outside_test, stratified_sample
from monai_histodiff.metrics.evaluate import predict, synthetic_frechet_distance

__all__ = ["JUDGE_REAL_REFERENCE", "judge_datalist", "conditional_accuracy", "judge_generated", "judge_reconstructions",
           "paired_agreement", "read_decisions"]

#: What the Frechet distance of :func:`judge_generated` compares synthetic tiles with.
JUDGE_REAL_REFERENCE = "split training + validation tiles"


def judge_datalist(split: Mapping[str, Any] | str | os.PathLike, val_fraction: float = 0.1,
                   seed: int = 0) -> dict[str, Any]:
    """The datalist the judge is trained on: every labeled tile of the split except its test set.

    ``training`` is the split's ``pool`` + ``training`` + ``validation`` less ``validation``, a stratified
    ``val_fraction`` of it drawn by whole groups (for the ``train_downstream`` stage's model selection). Train it
    with ``bundles/train_downstream.json`` (``--datalist_file`` this file, ``--split_file`` the split) and evaluate
    it on the split's test set (``bundles/evaluate.json`` or :func:`~monai_histodiff.metrics.evaluate_classifier`).

    Args:
        split: the split datalist (see :func:`~monai_histodiff.data.split.make_split`) or the path of its file.
        val_fraction: share of each class held out, by groups, to select the judge's best epoch.
        seed: seed of the held-out draw.

    Returns:
        ``{"classes", "training", "validation", "counts", "seed", "val_fraction", "num_pool", "note"}``, with image
        paths as in ``split`` (write it with :func:`~monai_histodiff.data.write_datalist`).

    Raises:
        ValueError: when the split has no ``classes``, or when a tile of a test group (or a test image) would be in
            the judge's data (the group and both images are named).
    """
    if not isinstance(split, Mapping):
        split = load_datalist(split)
    classes = list(split.get("classes") or [])
    if not classes:
        raise ValueError("the split has no 'classes': give the split datalist written by make_split")
    pool = list(split.get("pool") or [])
    labeled = [*pool, *(split.get("training") or []), *(split.get("validation") or [])]
    check_outside_test(labeled, split, "the judge's data")
    k = len(classes)
    if val_fraction > 0:
        validation, training = stratified_sample(labeled, k, fraction=val_fraction, seed=seed, min_per_class=0)
    else:
        validation, training = [], labeled
    return {
        "classes": classes,
        "seed": seed,
        "val_fraction": val_fraction,
        "num_pool": len(pool),
        "counts": {"training": class_counts(training, k), "validation": class_counts(validation, k)},
        "training": [dict(it) for it in training],
        "validation": [dict(it) for it in validation],
        "note": "judge data: the split's pool + training + validation, never a test group; used only to measure",
    }


def _tally(labels: Sequence[int], preds: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """Conditional accuracy and confusion from requested and predicted class indices."""
    k = len(class_names)
    confusion = [[0] * k for _ in range(k)]
    for y, p in zip(labels, preds):
        confusion[int(y)][int(p)] += 1
    n = len(labels)
    hits = sum(confusion[c][c] for c in range(k))
    per_class = {}
    for c, name in enumerate(class_names):
        n_c = sum(confusion[c])
        per_class[str(name)] = {"count": n_c, "accuracy": confusion[c][c] / n_c if n_c else None}
    return {"count": n, "accuracy": hits / n if n else None, "per_class": per_class, "confusion": confusion,
            "confusion_axes": "rows: requested class, columns: judge's prediction", "classes": list(class_names)}


def conditional_accuracy(judge: torch.nn.Module, items: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                         image_size: int, batch_size: int = 64, device: str | torch.device = "cpu",
                         amp: bool = False) -> dict[str, Any]:
    """The share of generated tiles the judge assigns to the class they were generated for.

    Args:
        judge: a classifier returning logits (e.g. :func:`~monai_histodiff.engines.load_tile_classifier`).
        items: generated tiles ``{"image", "label"}``, ``label`` being the requested class index.
        class_names: class names in index order (the judge's).
        image_size: tile size the judge was trained at.
        batch_size: tiles per forward pass.
        device: where to run the judge.
        amp: run under ``torch.autocast``.

    Returns:
        ``{"count", "accuracy", "per_class": {name: {"count", "accuracy"}}, "confusion", "confusion_axes",
        "classes"}``: overall and per-class share assigned to the requested class (None where there is no tile) and
        the requested x predicted counts.
    """
    if not items:
        return _tally([], [], class_names)
    labels, preds, _ = predict(judge, items, image_size, batch_size, device, amp)
    return _tally(labels.tolist(), preds.tolist(), class_names)


def read_decisions(path: str | os.PathLike) -> dict[str, bool]:
    """``{file: kept}`` from a selection ``decisions.csv`` (columns ``file``, ``class``, ..., ``kept``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when a column is missing or a ``kept`` value is not true/false (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selection decisions not found: {path}")
    out: dict[str, bool] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file", "kept"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; a selection decisions.csv has "
                             f"file, class, ..., kept")
        for lineno, row in enumerate(reader, start=2):
            kept = str(row["kept"]).strip().lower()
            if kept not in ("true", "false", "1", "0"):
                raise ValueError(f"{path}, line {lineno}: kept must be true or false, got {row['kept']!r}")
            out[str(row["file"])] = kept in ("true", "1")
    return out


def _manifest_path(synthetic: str | os.PathLike) -> Path:
    from monai_histodiff.data.manifest import MERGED_MANIFEST

    path = Path(synthetic)
    return path / MERGED_MANIFEST if path.is_dir() else path


def judge_generated(judge_ckpt: str | os.PathLike, synthetic: str | os.PathLike, split_file: str | os.PathLike,
                    decisions_csv: str | os.PathLike | None = None, image_size: int | None = None,
                    fd_num_samples: int | None = 1000, batch_size: int = 64, device: str | torch.device = "cpu",
                    amp: bool = False, seed: int = 0, per_tile: bool = False) -> dict[str, Any]:
    """Measure a generation run with the judge: conditional accuracy (all / kept / rejected tiles) and the Frechet
    distance to real tiles in the judge's feature space.

    Args:
        judge_ckpt: the judge, a ``train_downstream`` checkpoint trained on :func:`judge_datalist`.
        synthetic: the generation folder or its ``manifest.jsonl``.
        split_file: the split the judge's data came from (classes are checked against the judge's; its training +
            validation tiles are the real reference of the Frechet distance).
        decisions_csv: a selection ``decisions.csv``; adds ``kept`` and ``rejected`` conditional accuracy and the
            Frechet distance of the kept tiles.
        image_size: tile size; default: the one the judge was trained at.
        fd_num_samples: tiles per set for the Frechet distance (capped at what both sets have; recorded).
        batch_size: tiles per forward pass.
        device: where to run the judge.
        amp: run under ``torch.autocast``.
        seed: seed of the Frechet distance's subsampling.
        per_tile: add ``"tiles"``, one ``{"file", "label", "pred"}`` per manifest row (for paired comparisons of two
            runs that share tile seeds, :func:`paired_agreement`).

    Returns:
        ``{"judge", "split_file", "manifest", "conditional_accuracy", "frechet"}`` and, with ``decisions_csv``,
        ``"decisions_csv"``, ``"kept"``, ``"rejected"``, ``"frechet_kept"`` and ``"not_in_decisions"`` (tiles of
        the manifest the decisions do not list).

    Raises:
        ValueError: when the judge's classes differ from the split's, or a decisions row names a tile the manifest
            does not list (file named).
    """
    from monai_histodiff.engines.loading import check_classes, checkpoint_classes, load_tile_classifier
    from monai_histodiff.handlers.checkpoint import load_checkpoint
    from monai_histodiff.data.manifest import read_generation_manifest

    classes = checkpoint_classes(judge_ckpt)
    split = load_datalist(split_file)
    check_classes(classes, split["classes"], judge_ckpt, split_file)
    if image_size is None:
        image_size = int(load_checkpoint(judge_ckpt, stage="train_downstream")["meta"]["config"]["image_size"])
    judge = load_tile_classifier(judge_ckpt, device=device)
    manifest = _manifest_path(synthetic)
    items = read_generation_manifest(manifest, classes)

    labels, preds, _ = predict(judge, items, image_size, batch_size, device, amp)
    labels, preds = labels.tolist(), preds.tolist()
    real = [*split.get("training", []), *split.get("validation", [])]
    name = f"judge/{Path(judge_ckpt).name}"

    def frechet(synthetic_items: Sequence[dict]) -> dict[str, Any]:
        fd = synthetic_frechet_distance(judge, name, real, synthetic_items, classes, image_size,
                                        num_samples=fd_num_samples, batch_size=batch_size, device=device, seed=seed)
        fd["real"] = JUDGE_REAL_REFERENCE
        return fd

    out: dict[str, Any] = {
        "judge": {"checkpoint": str(judge_ckpt), "classes": classes, "image_size": image_size},
        "split_file": str(split_file),
        "manifest": str(manifest),
        "conditional_accuracy": _tally(labels, preds, classes),
        "frechet": frechet(items),
    }
    if per_tile:
        out["tiles"] = [{"file": it["file"], "label": y, "pred": p} for it, y, p in zip(items, labels, preds)]
    if decisions_csv is not None:
        kept_of = read_decisions(decisions_csv)
        files = {it["file"] for it in items}
        unknown = sorted(set(kept_of) - files)
        if unknown:
            raise ValueError(f"{decisions_csv} lists {len(unknown)} tile(s) that {manifest} does not, e.g. "
                             f"{unknown[0]!r}: give the decisions of this generation run")
        for part, want in (("kept", True), ("rejected", False)):
            idx = [i for i, it in enumerate(items) if kept_of.get(it["file"]) is want]
            out[part] = _tally([labels[i] for i in idx], [preds[i] for i in idx], classes)
        out["decisions_csv"] = str(decisions_csv)
        out["not_in_decisions"] = sum(1 for it in items if it["file"] not in kept_of)
        out["frechet_kept"] = frechet([it for it in items if kept_of.get(it["file"]) is True])
    return out


def judge_reconstructions(judge_ckpt: str | os.PathLike, autoencoder_ckpt: str | os.PathLike,
                          split_file: str | os.PathLike, decoder_ckpt: str | os.PathLike | None = None,
                          per_class: int | None = 100, part: str = "test", grid_path: str | os.PathLike | None = None,
                          batch_size: int = 64, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """The ceiling of the generator: how well the judge still recognises real tiles after the autoencoder.

    The diffusion model only ever makes latents, so a class the autoencoder does not keep cannot come out of
    generation. The judge reads the same real tiles three ways: ``x``, ``D(E(x))`` (the pre-trained autoencoder) and,
    with ``decoder_ckpt``, ``D'(E(x))`` (the decoder fine-tuned at the site); ``E(x)`` is the posterior mean. Each
    reconstruction is rounded to 8 bits as a written tile is.

    Args:
        judge_ckpt: the judge (:func:`judge_datalist`, a ``train_downstream`` checkpoint).
        autoencoder_ckpt: the pre-trained autoencoder.
        split_file: the split; its ``part`` tiles are read.
        decoder_ckpt: the fine-tuned decoder D' (made from this autoencoder; checked).
        per_class: at most this many tiles per class (a seeded draw; None: all).
        part: the split's part to read (``"test"``: tiles no stage trained on).
        grid_path: write a PNG there: per class a row of x, of D(E(x)) and (with D') of D'(E(x)).
        batch_size: tiles per forward pass.
        device: where the networks run.
        seed: seed of the per-class draw.

    Returns:
        ``{"part", "tiles", "accuracy": {"x", "D(E(x))", ["D'(E(x))"]}, "per_class": {name: {...}},
        "l1": {"D(E(x))", ...} (mean absolute error in [-1, 1]), "confusion": {...}, "grid"}``.
    """
    import numpy as np

    from monai_histodiff.data.transforms import round_to_8bit, tile_transforms
    from monai_histodiff.engines.loading import check_classes, checkpoint_classes, load_autoencoder, \
        load_tile_classifier
    from monai_histodiff.handlers.checkpoint import load_checkpoint

    classes = checkpoint_classes(judge_ckpt)
    split = load_datalist(split_file)
    check_classes(classes, split["classes"], judge_ckpt, split_file)
    image_size = int(load_checkpoint(judge_ckpt, stage="train_downstream")["meta"]["config"]["image_size"])
    items = list(split.get(part) or [])
    if not items:
        raise ValueError(f"{split_file} has no '{part}' tiles to reconstruct")
    rng = np.random.default_rng(seed)
    chosen: list[dict] = []
    for c in range(len(classes)):
        of_c = [it for it in items if int(it["label"]) == c]
        if per_class is not None and len(of_c) > per_class:
            of_c = [of_c[i] for i in sorted(rng.choice(len(of_c), per_class, replace=False))]
        chosen += of_c
    judge = load_tile_classifier(judge_ckpt, device=device)
    coders = {"D(E(x))": load_autoencoder(autoencoder_ckpt, device=device)}
    if decoder_ckpt is not None:
        coders["D'(E(x))"] = load_autoencoder(autoencoder_ckpt, decoder_ckpt, device=device)
    load = tile_transforms(image_size)
    labels: list[int] = []
    preds: dict[str, list[int]] = {"x": [], **{k: [] for k in coders}}
    l1: dict[str, float] = {k: 0.0 for k in coders}
    shown: dict[str, list[torch.Tensor]] = {k: [] for k in preds}
    with torch.no_grad():
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start:start + batch_size]
            x = torch.stack([load(dict(it))["image"] for it in batch]).to(device)
            labels += [int(it["label"]) for it in batch]
            z = coders["D(E(x))"].encode(x)[0]  # the posterior mean; D and D' share the encoder
            views = {"x": x}
            for name, coder in coders.items():
                rec = round_to_8bit(coder.decode(z))
                l1[name] += float((rec - x).abs().mean(dim=(1, 2, 3)).sum())
                views[name] = rec
            for name, v in views.items():
                preds[name] += judge(v).argmax(1).tolist()
                shown[name].append(v.cpu())
    out: dict[str, Any] = {"judge": str(judge_ckpt), "autoencoder": str(autoencoder_ckpt),
                           "decoder": None if decoder_ckpt is None else str(decoder_ckpt), "part": part,
                           "tiles": len(chosen), "accuracy": {}, "per_class": {}, "confusion": {},
                           "l1": {k: v / len(chosen) for k, v in l1.items()}}
    for name, p in preds.items():
        tally = _tally(labels, p, classes)
        out["accuracy"][name] = tally["accuracy"]
        out["per_class"][name] = {c: v["accuracy"] for c, v in tally["per_class"].items()}
        out["confusion"][name] = tally["confusion"]
    if grid_path is not None:
        from monai_histodiff.handlers.image_grid import make_grid, save_grid

        views = {k: torch.cat(v) for k, v in shown.items()}
        rows = [views[k][[i for i, y in enumerate(labels) if y == c][:8]] for c in range(len(classes)) for k in views]
        out["grid"] = str(save_grid(make_grid(rows, max_items=8), grid_path))
    return out


def paired_agreement(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Compare the judge's verdicts on two generation runs tile by tile (the same tile seeds, so the same ``file``).

    Two runs of the same tiles with a different sampler setting differ only where the setting changed the judged
    class, so the difference of their conditional accuracies is estimated from the discordant tiles (McNemar's
    pairing): ``diff = (b - c) / n`` with ``b`` the tiles right only in ``other`` and ``c`` those right only in
    ``reference``, and a normal-approximation 95% interval ``diff +- 1.96 sqrt(b + c - (b - c)^2 / n) / n``, much
    narrower than two independent accuracies' intervals.

    Args:
        reference, other: the ``"tiles"`` of two :func:`judge_generated` results (``per_tile=True``).

    Returns:
        ``{"n", "both_right", "both_wrong", "only_reference_right", "only_other_right", "same_prediction", "diff",
        "ci95"}`` over the tiles both runs have.

    Raises:
        ValueError: when the runs share no tile, or a shared tile was requested for different classes.
    """
    ref = {t["file"]: t for t in reference}
    pairs = [(ref[t["file"]], t) for t in other if t["file"] in ref]
    if not pairs:
        raise ValueError("the two runs share no tile file: compare generation runs made with the same tile seeds")
    mixed = [a["file"] for a, b in pairs if a["label"] != b["label"]]
    if mixed:
        raise ValueError(f"tile {mixed[0]!r} was requested for class {ref[mixed[0]]['label']} in one run and another "
                         f"class in the other: not the same tiles")
    n = len(pairs)
    right = [(a["pred"] == a["label"], b["pred"] == b["label"]) for a, b in pairs]
    c = sum(1 for r, o in right if r and not o)
    b = sum(1 for r, o in right if o and not r)
    half = 1.96 * max(b + c - (b - c) ** 2 / n, 0.0) ** 0.5 / n
    diff = (b - c) / n
    return {"n": n, "both_right": sum(1 for r, o in right if r and o),
            "both_wrong": sum(1 for r, o in right if not (r or o)), "only_reference_right": c, "only_other_right": b,
            "same_prediction": sum(1 for x, y in pairs if x["pred"] == y["pred"]), "diff": diff,
            "ci95": [diff - half, diff + half]}
