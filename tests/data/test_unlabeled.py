from __future__ import annotations

import numpy as np
import pytest

from monai_histodiff.data.prepare import prepare_unlabeled
from monai_histodiff.data.unlabeled import format_source_counts, unlabeled_datalist


def test_real_sources_counted_and_weighted(unlabeled_dir, tmp_path):
    data = prepare_unlabeled(unlabeled_dir, tmp_path / "unlabeled.json", weights="equal")
    info = data["sources"]
    assert len(info) >= 10
    assert sum(i["count"] for i in info.values()) == len(data["unlabeled"])
    # equal weights: every source gets the same total sampling mass, whatever its size
    mass = {n: sum(it["sample_weight"] for it in data["unlabeled"] if it["source"] == n) for n in info}
    nonempty = [m for n, m in mass.items() if info[n]["count"]]
    assert np.allclose(nonempty, 1.0)
    assert "total" in format_source_counts(data)


def test_weights_by_name_and_size(toy_dir):
    sources = {"a": str(toy_dir / "ADI_TOY"), "b": str(toy_dir)}
    data = unlabeled_datalist(sources, weights={"a": 3.0, "b": 1.0})
    a = [it for it in data["unlabeled"] if it["source"] == "a"]
    b = [it for it in data["unlabeled"] if it["source"] == "b"]
    assert len(a) == 12 and len(b) == 48
    assert sum(i["sample_weight"] for i in a) == pytest.approx(3 * sum(i["sample_weight"] for i in b))
    by_size = unlabeled_datalist(sources, weights=None)
    assert {it["sample_weight"] for it in by_size["unlabeled"]} == {1.0}
    with pytest.raises(ValueError, match="unknown sources"):
        unlabeled_datalist(sources, weights={"zzz": 1.0})


def _site_split(root):
    """A split of 8 written tiles in 4 groups: the test part holds group g3 (two tiles, one of them a near-copy)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(8):
        path = root / f"t{i}.png"
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(path)
        items.append({"image": str(path), "label": i % 2, "group": f"g{i // 2}"})
    return {"classes": ["a", "b"], "training": items[0:2], "validation": items[2:4], "pool": items[4:6],
            "test": items[6:8]}


def test_site_pretraining_lists_every_tile_but_the_test_groups(tmp_path):
    from monai_histodiff.data.unlabeled import pretraining_datalist, site_unlabeled_datalist

    split = _site_split(tmp_path / "tiles")
    site = site_unlabeled_datalist(split)
    assert sorted(it["image"] for it in site["unlabeled"]) == sorted(
        it["image"] for part in ("training", "validation", "pool") for it in split[part])
    assert all("label" not in it and it["source"] == "site" for it in site["unlabeled"])
    with pytest.raises(ValueError, match="test part"):
        site_unlabeled_datalist(split, parts=("training", "test"))
    # mixed with public sources: the site's tiles get site_weight of the draws, each public tile the same share
    public = tmp_path / "public" / "src"
    public.mkdir(parents=True)
    for i in range(4):
        (public / f"p{i}.png").write_bytes((tmp_path / "tiles" / "t0.png").read_bytes())
    mixed = pretraining_datalist("site+sources", split, str(tmp_path / "public"), site_weight=0.75)
    mass = {}
    for it in mixed["unlabeled"]:
        mass[it["source"]] = mass.get(it["source"], 0.0) + it["sample_weight"]
    assert mass == {"site": pytest.approx(0.75), "src": pytest.approx(0.25)} and mixed["setting"] == "site+sources"
    with pytest.raises(ValueError, match="public source folders"):
        pretraining_datalist("sources", split, None)


def test_a_test_tile_in_pretraining_is_refused_naming_its_group(tmp_path):
    """The labeled folder handed over as 'public' pre-training data: its test tiles (listed without groups) inherit
    their split group by file and stop the run; so does a near-copy of a test tile listed with its group."""
    from monai_histodiff.data.split import check_outside_test
    from monai_histodiff.data.unlabeled import pretraining_datalist

    split = _site_split(tmp_path / "tiles")
    with pytest.raises(ValueError, match="group 'g3' of the test set .* is also in pre-training"):
        pretraining_datalist("sources", split, [str(tmp_path / "tiles")])
    near_copy = {"image": str(tmp_path / "elsewhere.png"), "group": "g3"}
    with pytest.raises(ValueError, match="group 'g3'"):
        check_outside_test([near_copy], split, "pre-training")
    assert check_outside_test(split["training"] + split["pool"], split, "pre-training") == 4
