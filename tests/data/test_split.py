from __future__ import annotations

from monai_histodiff.data.datalist import class_counts, load_datalist, scan_class_folders
from monai_histodiff.data.prepare import prepare_labeled_split
from monai_histodiff.data.split import make_split, stratified_sample


def _items(n_per_class=(40, 60, 20)):
    return [{"image": f"/d/c{c}/{i}.png", "label": c} for c, n in enumerate(n_per_class) for i in range(n)]


def test_fraction_per_class_counts():
    chosen, rest = stratified_sample(_items(), 3, fraction=0.05, seed=0)
    assert class_counts(chosen, 3) == [2, 3, 1]
    assert len(chosen) + len(rest) == 120
    chosen, _ = stratified_sample(_items(), 3, per_class=10, seed=0)
    assert class_counts(chosen, 3) == [10, 10, 10]


def test_no_overlap_and_determinism():
    items = _items()
    split = make_split(items, ["a", "b", "c"], per_class=15, val_fraction=0.2, seed=3)
    tr, va, te = ({it["image"] for it in split[k]} for k in ("training", "validation", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr) + len(va) == 45 and len(tr | va | te) == 120
    assert split["counts"]["validation"] == [3, 3, 3]
    again = make_split(list(reversed(items)), ["a", "b", "c"], per_class=15, val_fraction=0.2, seed=3)
    assert again["training"] == split["training"] and again["validation"] == split["validation"]
    other = make_split(items, ["a", "b", "c"], per_class=15, val_fraction=0.2, seed=4)
    assert {it["image"] for it in other["training"]} != tr


def test_validation_only_from_subset_with_separate_test():
    test = [{"image": f"/t/{i}.png", "label": i % 3} for i in range(9)]
    split = make_split(_items(), ["a", "b", "c"], fraction=0.25, val_fraction=0.5, seed=0, test_items=test)
    assert [it["image"] for it in split["test"]] == [t["image"] for t in test]
    assert all(it["image"].startswith("/d/") for it in split["validation"])
    assert all(c > 0 for c in split["counts"]["training"])


def test_prepare_split_real_tiles(nct_crc_dir, tmp_path):
    split = prepare_labeled_split(nct_crc_dir, tmp_path / "split.json", per_class=2, val_fraction=0.5, seed=0)
    assert split["counts"]["training"] == [1] * 9 and split["counts"]["validation"] == [1] * 9
    loaded = load_datalist(tmp_path / "split.json")
    assert loaded["classes"][0] == "ADI" and (tmp_path / "classes.json").is_file()
    assert len(loaded["test"]) == 62 - 18
    items, _ = scan_class_folders(nct_crc_dir)
    assert {it["image"] for it in loaded["training"]} <= {it["image"] for it in items}


def test_prepare_split_skips_bad_files(toy_dir, corrupt_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy_dir, data)
    shutil.copy(corrupt_dir / "truncated.png", data / "ADI_TOY" / "zz_truncated.png")
    split = prepare_labeled_split(data, tmp_path / "out" / "split.json", per_class=4, seed=0)
    assert [b["reason"].split(":")[0] for b in split["bad_files"]] == ["unreadable or truncated"]
    assert (tmp_path / "out" / "bad_files.json").is_file()
    assert all("zz_truncated" not in it["image"] for k in ("training", "validation", "test") for it in split[k])
