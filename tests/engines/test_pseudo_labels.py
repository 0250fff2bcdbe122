"""Pseudo-labels of unlabeled tiles: what the auxiliary classifier is confident about is kept with its class; training
and validation tiles and every tile of their groups are held out; the record says what was done."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.engines import pseudo_labels as module


class _Redness(torch.nn.Module):
    """Logits from the mean red minus the mean blue of a tile: red tiles are class 0, blue tiles class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = 20 * (x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2)))
        return torch.stack([d, -d], dim=1)


def _tiles(tmp_path):
    colours = {"red": (230, 20, 20), "blue": (20, 20, 230), "grey": (120, 120, 120)}
    items = []
    for i, name in enumerate(["red", "red", "blue", "blue", "grey", "red"]):  # groups g0, g0, g1, g1, g2, g2
        path = tmp_path / f"{name}{i}.png"
        Image.fromarray(np.full((16, 16, 3), colours[name], dtype=np.uint8)).save(path)
        items.append({"image": str(path), "group": f"g{i // 2}", "label": 1})  # the stored label must be ignored
    return items


def test_confident_tiles_are_kept_with_their_class_and_held_out_groups_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(module, "load_image_classifier", lambda path, device="cpu": _Redness())
    ckpt = tmp_path / "aux_classifier.pt"
    ckpt.write_bytes(b"weights")
    items = _tiles(tmp_path)
    validation = [{"image": str(tmp_path / "elsewhere.png"), "group": "g2", "label": 0}]  # group g2: tiles 4 and 5
    kept = module.pseudo_label(ckpt, items, image_size=16, exclude=validation, min_confidence=0.9,
                               record=tmp_path / "pseudo_labels.json", classes=["RED", "BLUE"])
    assert [(k["image"].rsplit("/", 1)[-1], k["label"]) for k in kept] == [
        ("red0.png", 0), ("red1.png", 0), ("blue2.png", 1), ("blue3.png", 1)]
    assert all(k["confidence"] >= 0.9 and k["group"] in ("g0", "g1") for k in kept)
    record = json.loads((tmp_path / "pseudo_labels.json").read_text())
    assert (record["given"], record["held_out"], record["labeled"], record["kept"]) == (6, 2, 4, 4)
    assert record["kept_per_class"] == {"RED": 2, "BLUE": 2} and record["min_confidence"] == 0.9
    # the grey tile (no colour: probability 0.5) is labeled but not kept; a held-out image by path, not group
    kept = module.pseudo_label(ckpt, items, image_size=16, exclude=[{"image": items[0]["image"]}], min_confidence=0.9)
    assert [k["image"].rsplit("/", 1)[-1] for k in kept] == ["red1.png", "blue2.png", "blue3.png", "red5.png"]
    with pytest.raises(ValueError, match="no unlabeled tile to pseudo-label"):
        module.pseudo_label(ckpt, items[:2], image_size=16, exclude=items[:2])
    with pytest.raises(ValueError, match="pseudo_label_confidence"):
        module.pseudo_label(ckpt, items, image_size=16, min_confidence=1.5)
