"""Evaluate a trained tissue classifier on the held-out test set, and the Frechet distance of synthetic tiles.

This is the only place that reads the test split: training and model selection see the training subset and its
validation carve-out only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from monai_histodiff.data.datalist import load_datalist, save_class_map
from monai_histodiff.data.transforms import tile_transforms
from monai_histodiff.metrics.classification import classification_report, plot_confusion_matrix, write_report_json
from monai_histodiff.metrics.frechet import frechet_distance_report
from monai_histodiff.selection.features import extract_features

__all__ = ["predict", "evaluate_classifier", "synthetic_frechet_distance"]


@torch.no_grad()
def predict(model: torch.nn.Module, items: Sequence[dict], image_size: int, batch_size: int = 64,
            device: str | torch.device = "cpu", amp: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, predicted labels and softmax probabilities of ``model`` over every item (no augmentation)."""
    device = torch.device(device)
    loader = DataLoader(Dataset(list(items), tile_transforms(image_size)), batch_size=batch_size, shuffle=False)
    model = model.to(device).eval()
    labels, probs = [], []
    for batch in loader:
        with torch.autocast(device.type, enabled=amp):
            logits = model(batch["image"].to(device))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
    p = torch.cat(probs)
    return torch.cat(labels), p.argmax(1), p


def synthetic_frechet_distance(extractor: torch.nn.Module, extractor_name: str, real_items: Sequence[dict],
                               synthetic_items: Sequence[dict], class_names: Sequence[str], image_size: int,
                               num_samples: int | None = None, batch_size: int = 64,
                               device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """Frechet distance between real and synthetic tiles in ``extractor``'s feature space, overall and per class.

    Reported as ``FD (<extractor_name>)``; only Inception features may be called FID. ``num_samples`` fixes the
    number of tiles per set (capped at what both sets have, and recorded) so numbers are comparable across rows.
    """
    def feats(items):
        loader = DataLoader(Dataset(list(items), tile_transforms(image_size)), batch_size=batch_size, shuffle=False)
        return extract_features(extractor, loader, device=device)

    n = min(x for x in (num_samples, len(real_items), len(synthetic_items)) if x is not None)
    if n < 2:
        return {"metric_name": f"FD ({extractor_name})", "is_fid": False, "overall": None,
                "num_samples_requested": num_samples,
                "reason": f"needs >= 2 tiles per set, got {len(real_items)} real and {len(synthetic_items)} synthetic"}
    real_f, real_y = feats(real_items)
    synth_f, synth_y = feats(synthetic_items)
    report = frechet_distance_report(real_f, real_y, synth_f, synth_y, class_names, extractor_name, num_samples=n,
                                     seed=seed)
    out = report.to_dict()
    out["num_samples_requested"] = num_samples
    return out


def evaluate_classifier(model: torch.nn.Module, split_file: str | os.PathLike, output_dir: str | os.PathLike,
                        image_size: int, part: str = "test", batch_size: int = 64,
                        device: str | torch.device = "cpu", amp: bool = False,
                        frechet: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whole-set metrics of ``model`` on the ``part`` split of ``split_file``; writes ``metrics.json``,
    ``confusion_matrix.png`` and ``classes.json`` in ``output_dir`` and returns the report."""
    split = load_datalist(split_file)
    items = split.get(part) or []
    if not items:
        raise ValueError(f"{split_file} has no '{part}' items to evaluate on")
    classes = split["classes"]
    y_true, y_pred, _ = predict(model, items, image_size, batch_size, device, amp)
    report = classification_report(y_true, y_pred, classes)
    report["evaluated_on"] = {"split_file": str(split_file), "part": part, "count": len(items)}
    if frechet is not None:
        report["frechet"] = frechet
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report_json(report, out / "metrics.json")
    plot_confusion_matrix(report["confusion_matrix"], classes, out / "confusion_matrix.png")
    save_class_map(classes, out)
    return report
