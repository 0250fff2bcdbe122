"""CentroidSelectionHandler on a small on-disk scenario: real toy tiles, good / mislabelled / noise candidates."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.data.datalist import load_datalist
from monai_histodiff.data.prepare import prepare_labeled_split
from monai_histodiff.data.toy import make_toy_dataset
from monai_histodiff.handlers import CentroidSelectionHandler
from monai_histodiff.selection import DECISION_COLUMNS

SIZE = 16
GOOD_PER_CLASS = 8


class ColourStats(torch.nn.Module):
    """Fixed feature extractor: per-channel mean and std of the tile, which separates the toy classes by colour."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    """Split of 3 toy classes (6 training tiles each) and a manifest of good, mislabelled and noise candidates."""
    root = tmp_path_factory.mktemp("selection")
    make_toy_dataset(root / "real", num_per_class=8, image_size=SIZE, num_classes=3, seed=0)
    split = prepare_labeled_split(root / "real", root / "split" / "split.json", per_class=7, val_fraction=0.15, seed=0)
    classes = split["classes"]
    make_toy_dataset(root / "gen", num_per_class=GOOD_PER_CLASS, image_size=SIZE, num_classes=3, seed=1)
    syn = root / "synthetic"
    rows, kinds = [], {}
    for c, name in enumerate(classes):  # class-like candidates, rendered with another seed
        (syn / name).mkdir(parents=True)
        for p in sorted((root / "gen" / name).glob("*.png")):
            (syn / name / p.name).write_bytes(p.read_bytes())
            rows.append({"file": f"{name}/{p.name}", "class": name, "class_index": c, "confidence": 0.9})
            kinds[rows[-1]["file"]] = "good"
    (syn / "wrong").mkdir()
    for c, name in enumerate(classes):  # a tile of class c+1 labelled as class c
        true = classes[(c + 1) % len(classes)]
        f = f"wrong/{name}_is_{true}.png"
        (syn / f).write_bytes(sorted((root / "gen" / true).glob("*.png"))[0].read_bytes())
        rows.append({"file": f, "class_index": c})
        kinds[f] = ("mislabelled", true)
    (syn / "noise").mkdir()
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):  # uniform grey noise, one labelled as each class
        grey = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        f = f"noise/noise_{c}.png"
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(syn / f)
        rows.append({"file": f, "class": name})
        kinds[f] = "noise"
    (syn / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "root": root,
        "datalist": root / "split" / "split.json",
        "manifest": syn / "manifest.jsonl",
        "classes": classes,
        "kinds": kinds,
        "synthetic": syn,
    }


def _handler(scenario: dict, out: Path, **kwargs) -> CentroidSelectionHandler:
    args = dict(
        feature_extractor=ColourStats(),
        real_datalist=scenario["datalist"],
        synthetic_manifest=scenario["manifest"],
        output_dir=out,
        image_size=SIZE,
        ratio=0.5,
        batch_size=8,
    )
    args.update(kwargs)
    return CentroidSelectionHandler(**args)


def _rows(out: Path) -> list[dict]:
    with open(out / "decisions.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == DECISION_COLUMNS
        return list(reader)


def _kept_files(rows: list[dict]) -> set[str]:
    return {r["file"] for r in rows if r["kept"] == "True"}


@pytest.fixture(scope="module")
def selective(scenario, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("selective_out")
    report = _handler(scenario, out).run()
    return {"out": out, "report": report, "rows": _rows(out)}


def test_wrong_candidates_rejected_with_reason(scenario, selective):
    rows = {r["file"]: r for r in selective["rows"]}
    assert len(rows) == len(scenario["kinds"])
    beyond = 0
    for f, kind in scenario["kinds"].items():
        r = rows[f]
        if kind == "noise":
            assert r["kept"] == "False"
            own = r["nearest_class"] == r["class"]
            assert r["reason"] == ("beyond_distance_threshold" if own else "nearest_centroid_is_other_class")
            beyond += own
        elif kind != "good":
            assert (r["kept"], r["reason"]) == ("False", "nearest_centroid_is_other_class")
            assert r["nearest_class"] == kind[1]
    assert beyond >= 1  # one noise tile is labelled with its own nearest class and still rejected


def test_quota_filled_closest_first(scenario, selective):
    rows, report = selective["rows"], selective["report"]
    assert any(r["reason"] == "over_quota" for r in rows)
    for name in scenario["classes"]:
        mine = [r for r in rows if r["class"] == name]
        kept = [float(r["distance"]) for r in mine if r["kept"] == "True"]
        over = [float(r["distance"]) for r in mine if r["reason"] == "over_quota"]
        assert all(float(r["distance"]) <= float(r["threshold"]) for r in mine if r["kept"] == "True")
        assert not over or max(kept) <= min(over)
        info = report["per_class"][name]
        assert info["quota"] == 3 and info["real"] == 6  # round(0.5 * 6)
        assert info["kept"] == len(kept) <= 3
        assert info["shortfall"] == 3 - len(kept)
        assert all(scenario["kinds"][r["file"]] == "good" for r in mine if r["kept"] == "True")


def test_outputs_and_augmented_datalist(scenario, selective):
    out, rows = selective["out"], selective["rows"]
    for name in ("augmented_datalist.json", "decisions.csv", "selection_report.json", "distance_histograms.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert not list(out.glob(".*tmp"))
    assert json.loads((out / "classes.json").read_text())["classes"] == scenario["classes"]
    split = load_datalist(scenario["datalist"])
    aug = load_datalist(out / "augmented_datalist.json")
    n_real = len(split["training"])
    assert aug["training"][:n_real] == [dict(it, synthetic=False) for it in split["training"]]
    assert aug["validation"] == split["validation"] and aug["test"] == split["test"]
    assert aug["classes"] == scenario["classes"]
    synthetic = aug["training"][n_real:]
    assert all(it["synthetic"] is True for it in synthetic)
    base = scenario["synthetic"].resolve()
    got = {str(Path(it["image"]).relative_to(base)): scenario["classes"][it["label"]] for it in synthetic}
    assert got == {r["file"]: r["class"] for r in rows if r["kept"] == "True"}
    assert aug["selection"]["mode"] == "selective" and aug["selection"]["ratio"] == 0.5
    assert aug["selection"]["percentile"] == 95.0
    assert sum(aug["selection"]["counts"]["kept"]) == len(synthetic)
    report = json.loads((out / "selection_report.json").read_text())
    assert set(report["per_class"]) == set(scenario["classes"])
    for info in report["per_class"].values():
        assert {"candidates", "eligible", "quota", "kept", "shortfall", "threshold"} <= set(info)
    assert report["totals"]["kept"] == len(synthetic) and report["totals"]["candidates"] == len(rows)
    assert report["settings"]["mode"] == "selective"


def test_low_confidence_and_shortfall_warning(scenario, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="monai_histodiff.handlers.selection"):
        report = _handler(scenario, tmp_path, min_confidence=0.95).run()
    rows = _rows(tmp_path)
    assert not _kept_files(rows)
    assert any(r["reason"] == "low_confidence" for r in rows)
    assert all(r["reason"] != "low_confidence" or r["nearest_class"] == r["class"] for r in rows)
    assert all(v["shortfall"] == 3 for v in report["per_class"].values())
    assert "could not fill" in caplog.text and all(name in caplog.text for name in scenario["classes"])


def test_random_mode(scenario, tmp_path):
    report = _handler(scenario, tmp_path / "a", mode="random", seed=3).run()
    rows = _rows(tmp_path / "a")
    for name, info in report["per_class"].items():
        assert info["kept"] == min(3, info["candidates"]) and info["eligible"] == info["candidates"]
    assert {r["reason"] for r in rows} == {"kept_random", "over_quota"}
    _handler(scenario, tmp_path / "b", mode="random", seed=3).run()
    assert (tmp_path / "a" / "decisions.csv").read_bytes() == (tmp_path / "b" / "decisions.csv").read_bytes()
    # no filtering: a quota above the candidate count keeps mislabelled and noise tiles too
    _handler(scenario, tmp_path / "c", mode="random", ratio=3.0).run()
    assert _kept_files(_rows(tmp_path / "c")) == set(scenario["kinds"])


def test_ignite_handler_matches_run(scenario, selective, tmp_path):
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    handler = _handler(scenario, tmp_path / "engine")
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    direct, via = selective["out"], tmp_path / "engine"
    for name in ("decisions.csv", "selection_report.json", "classes.json"):
        assert (via / name).read_bytes() == (direct / name).read_bytes(), name
    aug_direct = load_datalist(direct / "augmented_datalist.json")
    assert load_datalist(via / "augmented_datalist.json") == aug_direct


def test_clear_errors(scenario, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        _handler(scenario, tmp_path, synthetic_manifest=tmp_path / "missing.jsonl").run()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _handler(scenario, tmp_path, real_datalist=tmp_path / "nope.json").run()
    bad = tmp_path / "bad_manifest.jsonl"
    tile = str(scenario["synthetic"] / "noise" / "noise_0.png")
    bad.write_text(json.dumps({"file": tile, "class": "NOT_A_CLASS"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="NOT_A_CLASS"):
        _handler(scenario, tmp_path, synthetic_manifest=bad).run()
    with pytest.raises(ValueError, match="at most one"):
        _handler(scenario, tmp_path, quotas={"ADI_TOY": 1})
    with pytest.raises(ValueError, match="NOT_A_CLASS"):
        _handler(scenario, tmp_path, ratio=None, quotas={"NOT_A_CLASS": 1}).run()


def test_explicit_quotas_by_name(scenario, tmp_path):
    report = _handler(scenario, tmp_path, ratio=None, quotas={"ADI_TOY": 1}).run()
    assert [v["quota"] for v in report["per_class"].values()] == [1, 0, 0]
    assert [v["kept"] for v in report["per_class"].values()] == [1, 0, 0]


def test_only_rank0_writes(scenario, tmp_path, monkeypatch):
    import monai_histodiff.handlers.selection as selection_module

    monkeypatch.setattr(selection_module, "_is_rank0", lambda: False)
    handler = _handler(scenario, tmp_path / "rank1")
    report = handler()
    assert report["totals"]["candidates"] == len(scenario["kinds"]) and handler.result is not None
    assert not (tmp_path / "rank1").exists()
