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

from monai_histodiff.data.datalist import load_datalist, write_datalist
from monai_histodiff.data.prepare import prepare_labeled_split
from monai_histodiff.data.toy import make_toy_dataset
from monai_histodiff.handlers import CentroidSelectionHandler
from monai_histodiff.handlers.selection import SelectionShortError
from monai_histodiff.selection import DECISION_COLUMNS

SIZE = 16
GOOD_PER_CLASS = 8


class ColourStats(torch.nn.Module):
    """Fixed feature extractor: per-channel mean and std of the tile, which separates the toy classes by colour."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ColourClassifier(ColourStats):
    """ColourStats features plus a fixed head: softmax [0.8, 0.1, 0.1] for every tile, whatever its colour, so the
    extractor is confident of class 0 only (the manifest says 0.9 for every class-like candidate)."""

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        bias = torch.log(torch.tensor([0.8, 0.1, 0.1], device=features.device))
        return features[:, :1] * 0.0 + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


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
        over = [float(r["distance"]) for r in mine if r["reason"] in ("over_quota", "balance_trimmed")]
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
    assert report["settings"]["mode"] == "selective" and report["settings"]["balance"] == "proportional"
    # only 2 LYM_TOY candidates pass for a quota of 3, so every class keeps 2 of 3 (proportional balance)
    lym = report["per_class"]["LYM_TOY"]
    assert (lym["eligible"], lym["selected"], lym["kept"], lym["trimmed"]) == (2, 2, 2, 0)
    assert [v["kept"] for v in report["per_class"].values()] == [2, 2, 2]
    assert report["balance"]["fraction"] == pytest.approx(2 / 3)
    assert sum(report["balance"]["trimmed"].values()) == sum(r["reason"] == "balance_trimmed" for r in rows) == 2
    assert (report["status"], report["quota_total"], report["kept_total"]) == ("short", 9, 6)
    assert report["fill"] == report["min_class_fill"] == pytest.approx(2 / 3)
    assert (out / "kept_by_class.png").stat().st_size > 0


def test_low_confidence_uses_extractor_softmax(scenario, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="monai_histodiff.handlers.selection"):
        report = _handler(scenario, tmp_path, feature_extractor=ColourClassifier(), min_confidence=0.5,
                          balance="none").run()
    rows = _rows(tmp_path)
    first, others = scenario["classes"][0], scenario["classes"][1:]
    for r in rows:
        assert float(r["confidence"]) == pytest.approx(0.8 if r["class"] == first else 0.1, abs=1e-6)
        assert r["manifest_confidence"] == ("0.9" if scenario["kinds"][r["file"]] == "good" else "")
    # the manifest says 0.9, the extractor 0.1: the extractor decides
    low = [r for r in rows if r["reason"] == "low_confidence"]
    assert low and {r["class"] for r in low} == set(others)
    assert all(r["nearest_class"] == r["class"] and float(r["distance"]) <= float(r["threshold"]) for r in low)
    assert {r["class"] for r in rows if r["kept"] == "True"} == {first}
    assert report["per_class"][first]["kept"] == 3
    assert all(report["per_class"][n]["kept"] == 0 for n in others)
    assert report["settings"]["confidence_source"] == "feature_extractor_softmax"
    assert report["status"] == "short" and report["short_classes"] == list(others)
    for n in others:
        assert f"class {n} is short of its quota: kept 0 of quota 3" in caplog.text


def test_min_confidence_needs_a_classifier(scenario, tmp_path):
    with pytest.raises(ValueError, match="ColourStats gives 6 outputs"):
        _handler(scenario, tmp_path, min_confidence=0.5).run()
    _handler(scenario, tmp_path, min_confidence=0.5, mode="random").run()  # random mode does not filter
    assert {r["confidence"] for r in _rows(tmp_path)} == {""}


@pytest.fixture(scope="module")
def skewed_manifest(scenario) -> Path:
    """Class-like candidates for every class but the second (B): B gets only mislabelled and noise tiles."""
    b = scenario["classes"][1]
    rows = []
    for f, kind in scenario["kinds"].items():
        label = f.split("/")[0] if kind == "good" else None
        if kind == "good" and label == b:
            continue
        row = {"file": str(scenario["synthetic"] / f), "confidence": 0.9}
        if label is not None:
            row["class"] = label
        else:  # wrong/noise rows: recover the labelled class from the original manifest
            orig = [json.loads(line) for line in scenario["manifest"].read_text().splitlines()]
            match = next(o for o in orig if o["file"] == f)
            row.update({k: match[k] for k in ("class", "class_index") if k in match})
        rows.append(row)
    path = scenario["root"] / "skewed" / "manifest.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_skewed_proportional_keeps_the_same_fraction(scenario, skewed_manifest, tmp_path, caplog):
    a, b, c = scenario["classes"]
    with caplog.at_level(logging.WARNING, logger="monai_histodiff.handlers.selection"):
        report = _handler(scenario, tmp_path, synthetic_manifest=skewed_manifest).run()
    per = report["per_class"]
    assert per[b]["eligible"] == 0 and per[a]["eligible"] >= 3 and per[c]["eligible"] >= 3
    # B fills 0% of its quota, so A and C keep 0% too instead of 3 each
    assert [per[n]["kept"] for n in (a, b, c)] == [0, 0, 0]
    assert [per[n]["selected"] for n in (a, b, c)] == [3, 0, 3]
    assert report["balance"] == {"mode": "proportional", "fraction": 0.0, "trimmed": {a: 3, b: 0, c: 3}}
    assert (report["status"], report["quota_total"], report["kept_total"]) == ("short", 9, 0)
    assert (report["fill"], report["min_class_fill"]) == (0.0, 0.0)
    assert report["short_classes"] == [a, b, c]
    rows = _rows(tmp_path)
    assert sum(r["reason"] == "balance_trimmed" for r in rows) == 6 and not _kept_files(rows)
    assert f"class {b} is short of its quota: kept 0 of quota 3" in caplog.text
    assert f"class {a} is short" not in caplog.text  # A and C are trimmed, not short of passing tiles
    assert f"trimmed {a} by 3, {c} by 3" in caplog.text
    aug = load_datalist(tmp_path / "augmented_datalist.json")
    assert aug["selection"]["status"] == "short" and aug["selection"]["counts"]["trimmed"] == [3, 0, 3]
    assert (tmp_path / "kept_by_class.png").stat().st_size > 0


def test_skewed_none_keeps_what_passes(scenario, skewed_manifest, tmp_path):
    a, b, c = scenario["classes"]
    report = _handler(scenario, tmp_path, synthetic_manifest=skewed_manifest, balance="none").run()
    assert [report["per_class"][n]["kept"] for n in (a, b, c)] == [3, 0, 3]
    assert report["balance"]["trimmed"] == {a: 0, b: 0, c: 0} and report["balance"]["fraction"] is None
    assert (report["status"], report["short_classes"], report["min_class_fill"]) == ("short", [b], 0.0)
    assert report["fill"] == pytest.approx(6 / 9)
    assert report["settings"]["balance"] == "none"


def test_skewed_min_fill_fails_naming_the_short_class(scenario, skewed_manifest, tmp_path):
    a, b, c = scenario["classes"]
    (tmp_path / "augmented_datalist.json").write_text("{}")  # a stale datalist from an earlier run
    with pytest.raises(SelectionShortError, match=f"{b} kept 0 of quota 3"):
        _handler(scenario, tmp_path, synthetic_manifest=skewed_manifest, balance="none", min_fill=0.5).run()
    assert not (tmp_path / "augmented_datalist.json").exists()
    report = json.loads((tmp_path / "selection_report.json").read_text())
    assert report["status"] == "short" and "min_fill=0.5" in report["error"] and b in report["error"]
    assert len(_rows(tmp_path)) > 0
    # the same set with min_fill 0 (default) passes; full classes never fail
    _handler(scenario, tmp_path, synthetic_manifest=skewed_manifest, balance="none").run()
    assert (tmp_path / "augmented_datalist.json").is_file()
    with pytest.raises(ValueError, match="min_fill"):
        _handler(scenario, tmp_path, min_fill=1.5)
    with pytest.raises(ValueError, match="balance"):
        _handler(scenario, tmp_path, balance="equal")


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


def test_manifest_cut_by_a_kill_names_the_line_and_the_rerun(tmp_path):
    from monai_histodiff.data.validation import CorruptFileError
    from monai_histodiff.data.manifest import read_generation_manifest

    (tmp_path / "A").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "A" / "A_000000.png")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"file": "A/A_000000.png", "class": "A"}) + "\n" + '{"file": "A/A_0000', "utf-8")
    with pytest.raises(CorruptFileError, match=r"manifest\.jsonl \(read by read_generation_manifest, line 2\) is "
                                               r"truncated or corrupt .*rerun generate with the same output_dir"):
        read_generation_manifest(manifest, ["A", "B"])
    manifest.write_text(json.dumps({"file": "A/A_000001.png", "class": "A"}) + "\n", "utf-8")
    with pytest.raises(FileNotFoundError, match=r"A_000001\.png; rerun generate with the same output_dir"):
        read_generation_manifest(manifest, ["A", "B"])


def test_augmented_items_share_keys_so_mixed_batches_collate(scenario, tmp_path):
    """Real tiles with groups (a groups file) and synthetic tiles (a group of their own) collate in one batch."""
    from monai.data.utils import list_data_collate

    split = load_datalist(scenario["datalist"])
    for i, it in enumerate(split["training"]):
        it["group"] = f"g{i // 2}"
    write_datalist(split, tmp_path / "grouped_split.json")
    out = tmp_path / "sel"
    _handler(scenario, out, real_datalist=tmp_path / "grouped_split.json", mode="random").run()
    training = load_datalist(out / "augmented_datalist.json")["training"]
    assert any(it["synthetic"] for it in training) and len({frozenset(it) for it in training}) == 1
    batch = list_data_collate([{k: v for k, v in it.items() if k != "image"} for it in training])
    assert len(batch["group"]) == len(training)
