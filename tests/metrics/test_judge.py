"""The judge: its training data never touches a test group, and its measures of generated tiles are hand-checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.__main__ import main
from monai_histodiff.data.datalist import class_counts
from monai_histodiff.data.split import make_split, write_split
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint
from monai_histodiff.metrics.judge import (JUDGE_REAL_REFERENCE, conditional_accuracy, judge_datalist, judge_generated,
                                          paired_agreement)
from monai_histodiff.networks import TileClassifier
from monai_histodiff.selection.report import write_decisions_csv

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _grouped_items(num_groups: int = 30) -> list[dict]:
    """3 classes, groups of 1-3 tiles of one class."""
    return [{"image": f"/d/c{c}/g{g:02d}_{t}.png", "label": c, "group": f"c{c}-g{g:02d}"}
            for c in range(3) for g in range(num_groups) for t in range(1 + (g + c) % 3)]


def _tile(path: Path, colour: str, rng: np.random.Generator, size: int = 16) -> str:
    """A tile of one colour with a little seeded noise (the colour's channel stays the brightest)."""
    base = np.array(COLOURS[colour], dtype=np.int16)
    arr = np.clip(base + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


class MeanColour(torch.nn.Module):
    """A hand-made judge: the predicted class is the channel with the highest mean (red, green, blue)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_judge_datalist_is_pool_training_validation_and_never_a_test_group(tmp_path):
    split = make_split(_grouped_items(), CLASSES, fraction=0.2, val_fraction=0.25, seed=0, test_per_class=10)
    assert split["pool"]
    write_split(split, tmp_path / "split.json")
    data = judge_datalist(tmp_path / "split.json", val_fraction=0.2, seed=1)  # a path works as well as the dict
    judged = data["training"] + data["validation"]
    labeled = split["pool"] + split["training"] + split["validation"]
    assert sorted(Path(it["image"]).name for it in judged) == sorted(Path(it["image"]).name for it in labeled)
    assert data["num_pool"] == len(split["pool"]) and data["classes"] == CLASSES
    test_groups = {it["group"] for it in split["test"]}
    assert not test_groups & {it["group"] for it in judged}
    # the held-out part is drawn by whole groups, about val_fraction of each class
    assert not {it["group"] for it in data["training"]} & {it["group"] for it in data["validation"]}
    totals = class_counts(judged, 3)
    assert all(abs(v - 0.2 * n) <= 3 for v, n in zip(data["counts"]["validation"], totals)), data["counts"]
    # a split whose pool holds a test group is refused, naming the group
    bad = dict(split, pool=[*split["pool"], dict(split["test"][0], image="/d/elsewhere.png")])
    with pytest.raises(ValueError, match=f"group '{split['test'][0]['group']}' of the test set"):
        judge_datalist(bad)
    # items without a group are their own unit: the same image in test and pool is refused too
    plain = {"classes": CLASSES, "training": [{"image": "/a.png", "label": 0}],
             "test": [{"image": "/b.png", "label": 1}], "pool": [{"image": "/b.png", "label": 1}]}
    with pytest.raises(ValueError, match="image '/b.png' of the test set"):
        judge_datalist(plain)


def test_conditional_accuracy_hand_computed(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    # requested class -> colours actually drawn: red 3/4, green 2/4, blue 4/4 assigned to the requested class
    drawn = {0: ["red", "red", "red", "green"], 1: ["green", "green", "blue", "blue"], 2: ["blue"] * 4}
    items = [{"image": _tile(tmp_path / f"{c}_{i}.png", colour, rng), "label": c}
             for c, colours in drawn.items() for i, colour in enumerate(colours)]
    out = conditional_accuracy(MeanColour(), items, CLASSES, image_size=16, batch_size=5)
    assert out["count"] == 12 and out["accuracy"] == pytest.approx(9 / 12)
    assert {k: v["accuracy"] for k, v in out["per_class"].items()} == {"red": 0.75, "green": 0.5, "blue": 1.0}
    assert [v["count"] for v in out["per_class"].values()] == [4, 4, 4]
    assert out["confusion"] == [[3, 1, 0], [0, 2, 2], [0, 0, 4]]
    empty = conditional_accuracy(MeanColour(), [], CLASSES, image_size=16)
    assert empty["count"] == 0 and empty["accuracy"] is None and empty["per_class"]["red"]["accuracy"] is None


@pytest.fixture()
def generated(tmp_path):
    """A split of real-looking coloured tiles, a generation folder with its manifest, and a judge checkpoint that
    always predicts 'green' (fc weights zero, bias favouring class 1)."""
    rng = np.random.default_rng(1)
    real = [{"image": _tile(tmp_path / "real" / f"{name}_{i}.png", name, rng), "label": c}
            for c, name in enumerate(CLASSES) for i in range(6)]
    split = make_split(real, CLASSES, per_class=4, val_fraction=0.25, seed=0)
    write_split(split, tmp_path / "split.json")
    gen = tmp_path / "generate"
    requested = [0, 1, 1, 2, 1, 0, 0, 2]  # tiles 0-3 kept, 4-6 rejected, 7 not in the decisions
    gen.mkdir()
    rows = []
    with open(gen / "manifest.jsonl", "w", encoding="utf-8") as f:
        for i, c in enumerate(requested):
            _tile(gen / CLASSES[c] / f"{i:03d}.png", CLASSES[c], rng)
            f.write(json.dumps({"file": f"{CLASSES[c]}/{i:03d}.png", "class_index": c}) + "\n")
            if i < 7:
                rows.append({"file": f"{CLASSES[c]}/{i:03d}.png", "class": CLASSES[c], "kept": i < 4})
    write_decisions_csv(rows, tmp_path / "decisions.csv")
    args = {"backbone": "resnet", "num_classes": 3, "image_size": 16,
            "backbone_args": {"block_inplanes": [4, 8, 8, 8]}}
    torch.manual_seed(0)
    model = TileClassifier(**args).eval()
    with torch.no_grad():
        model.backbone.fc.weight.zero_()
        model.backbone.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    ckpt = save_checkpoint(tmp_path / "judge.pt", {"classifier": model}, checkpoint_meta(
        "train_downstream", config={"network_args": args, "image_size": 16}, classes=CLASSES))
    return {"root": tmp_path, "split": tmp_path / "split.json", "gen": gen, "ckpt": ckpt}


def test_judge_generated_splits_kept_and_rejected(generated, one_thread):
    g = generated
    out = judge_generated(g["ckpt"], g["gen"], g["split"], decisions_csv=g["root"] / "decisions.csv",
                          fd_num_samples=4)
    # the judge always says 'green': the share of each part that was requested as green
    assert out["conditional_accuracy"]["count"] == 8 and out["conditional_accuracy"]["accuracy"] == 3 / 8
    assert out["kept"]["count"] == 4 and out["kept"]["accuracy"] == 2 / 4  # requested 0, 1, 1, 2
    assert out["kept"]["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert out["rejected"]["count"] == 3 and out["rejected"]["accuracy"] == pytest.approx(1 / 3)  # 1, 0, 0
    assert out["rejected"]["per_class"]["red"] == {"count": 2, "accuracy": 0.0}
    assert out["not_in_decisions"] == 1 and out["judge"]["image_size"] == 16
    assert out["frechet"]["real"] == JUDGE_REAL_REFERENCE and out["frechet"]["overall"] >= 0.0
    assert out["frechet"]["num_samples"] == 4 and out["frechet_kept"]["num_samples"] == 4
    assert "tiles" not in out
    tiles = judge_generated(g["ckpt"], g["gen"], g["split"], fd_num_samples=4, per_tile=True)["tiles"]
    assert [(t["label"], t["pred"]) for t in tiles] == [(c, 1) for c in [0, 1, 1, 2, 1, 0, 0, 2]]
    assert tiles[3]["file"] == "blue/003.png"
    # decisions of another run are refused, naming the file
    (g["root"] / "other.csv").write_text("file,class,kept\nnowhere.png,red,True\n")
    with pytest.raises(ValueError, match="nowhere.png"):
        judge_generated(g["ckpt"], g["gen"], g["split"], decisions_csv=g["root"] / "other.csv")


def test_judge_cli_writes_the_report(generated, one_thread, capsys):
    g = generated
    report = g["root"] / "judge.json"
    assert main(["judge", "--judge_ckpt", str(g["ckpt"]), "--split", str(g["split"]), "--synthetic_dir",
                 str(g["gen"] / "manifest.jsonl"), "--output", str(report), "--fd_num_samples", "4"]) == 0
    saved = json.loads(report.read_text())
    assert saved["conditional_accuracy"]["accuracy"] == 3 / 8 and "kept" not in saved
    assert "conditional accuracy" in capsys.readouterr().out


def test_paired_agreement_counts_discordant_tiles():
    def tiles(labels, preds, names=None):
        return [{"file": n, "label": y, "pred": p} for n, y, p in zip(names or range(len(labels)), labels, preds)]

    labels = [0, 0, 1, 1, 2, 2, 0, 1, 2, 0]
    ref = tiles(labels, [0, 0, 1, 1, 2, 0, 1, 1, 0, 2])    # right: 0-4, 7 (6 of 10)
    other = tiles(labels, [0, 0, 1, 2, 2, 2, 0, 1, 0, 2])  # right: 0-2, 4-7 (7 of 10); 3 lost, 5 and 6 won
    out = paired_agreement(ref, other[::-1])  # matched by file, not by order
    assert (out["n"], out["both_right"], out["both_wrong"]) == (10, 5, 2)
    assert (out["only_reference_right"], out["only_other_right"]) == (1, 2)
    assert out["diff"] == pytest.approx(0.1) and out["same_prediction"] == 7
    half = 1.96 * (3 - 1 / 10) ** 0.5 / 10
    assert out["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert paired_agreement(ref, ref)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="share no tile"):
        paired_agreement(ref, tiles(labels, labels, names=[f"x{i}" for i in range(10)]))
    with pytest.raises(ValueError, match="tile 0"):
        paired_agreement(ref, tiles([1] + labels[1:], labels))
