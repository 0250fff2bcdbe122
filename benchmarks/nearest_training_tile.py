"""Do generated tiles copy the labeled training tiles? Distances to the nearest training tile, against held-out tiles.

    python benchmarks/nearest_training_tile.py runs/lung generate generate_stylegan2 > /tmp/copies.json

A generator trained on the small labeled set (the StyleGAN2 baseline, or HistoDiffusion without pre-training) can
score well on the judge and on the Frechet distance to those very tiles by reproducing them. For each generation folder
given, and for the real test tiles of the split (held out from every stage; their groups are disjoint from the
training tiles'), this prints the distance of each tile to its nearest labeled training tile, in the judge's feature space
(cosine distance of L2-normalised features) and in pixels (RMS difference in [-1, 1]): quantiles, and the share of
generated tiles nearer to a training tile than the nearest 1% of test tiles are. Tiles that copy their training tiles
sit far below the test tiles' distances; tiles from the same distribution sit alongside them.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset

from monai_histodiff.data import load_datalist, read_generation_manifest, tile_transforms
from monai_histodiff.engines.loading import load_tile_classifier
from monai_histodiff.handlers.checkpoint import load_checkpoint
from monai_histodiff.selection.features import extract_features

def _tiles(items: list[dict], image_size: int) -> torch.Tensor:
    load = tile_transforms(image_size)
    return torch.stack([load({"image": it["image"]})["image"] for it in items])


def _nearest(query: torch.Tensor, reference: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":  # features are L2-normalised
        return (1 - query @ reference.T).min(dim=1).values
    q, r = query.flatten(1), reference.flatten(1)
    return (torch.cdist(q, r) / q.shape[1] ** 0.5).min(dim=1).values


def _summary(d: torch.Tensor, test_floor: float | None) -> dict:
    q = torch.quantile(d, torch.tensor([0.01, 0.05, 0.5])).tolist()
    out = {"count": int(d.numel()), "p01": round(q[0], 4), "p05": round(q[1], 4), "median": round(q[2], 4)}
    if test_floor is not None:
        out["share_below_test_p01"] = round(float((d < test_floor).float().mean()), 4)
    return out


def main(run: str, folders: list[str]) -> dict:
    root = Path(run)
    split = load_datalist(root / "split.json")
    judge_ckpt = root / "judge" / "classifier.pt"
    image_size = int(load_checkpoint(judge_ckpt, stage="train_downstream")["meta"]["config"]["image_size"])
    judge = load_tile_classifier(judge_ckpt)

    def feats(items: list[dict]) -> torch.Tensor:
        loader = DataLoader(Dataset(items, tile_transforms(image_size)), batch_size=64, shuffle=False)
        return extract_features(judge, loader)[0]

    training = split["training"]
    sets = {"real test tiles": split["test"]}
    for folder in folders:
        sets[folder] = read_generation_manifest(root / folder / "manifest.jsonl", split["classes"])
    ref_f, ref_x = feats(training), _tiles(training, image_size)
    out: dict = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                 "run": str(root), "training_tiles": len(training), "sets": {}}
    floors: dict[str, float] = {}
    for name, items in sets.items():
        d = {"judge_cosine": _nearest(feats(items), ref_f, "cosine"), "pixels_rms": _nearest(_tiles(items, image_size),
                                                                                            ref_x, "pixels")}
        if name == "real test tiles":
            floors = {k: float(torch.quantile(v, 0.01)) for k, v in d.items()}
        out["sets"][name] = {k: _summary(v, None if name == "real test tiles" else floors[k]) for k, v in d.items()}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:]), indent=1))
