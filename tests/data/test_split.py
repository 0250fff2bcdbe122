from __future__ import annotations

import json
import logging
import os

import pytest

from monai_histodiff.data.datalist import class_counts, load_datalist, scan_class_folders
from monai_histodiff.data.prepare import ensure_split, prepare_labeled_split
from monai_histodiff.data.split import check_groups_disjoint, make_split, stratified_sample, write_split


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


# --- groups: tiles of one group (patient, slide, original image, identical files) stay on one side ---------------


def _grouped_items():
    """3 classes; each group holds 1-4 tiles of one class (like rotations / flips of one original)."""
    items = []
    for c in range(3):
        for g in range(40):
            for t in range(1 + (g * 7 + c) % 4):
                items.append({"image": f"/d/c{c}/g{g:02d}_{t}.png", "label": c, "group": f"c{c}-g{g:02d}"})
    return items


def _parts_of_groups(split):
    where: dict[str, set[str]] = {}
    for part in ("training", "validation", "test", "pool"):
        for it in split[part]:
            where.setdefault(it["group"], set()).add(part)
    return where


def test_groups_stay_on_one_side_with_counts_in_tiles():
    items = _grouped_items()
    per_class_tiles = class_counts(items, 3)
    for seed in range(5):
        split = make_split(items, ["a", "b", "c"], fraction=0.3, val_fraction=0.25, seed=seed)
        assert all(len(parts) == 1 for parts in _parts_of_groups(split).values())
        assert check_groups_disjoint(split) == 120
        labeled = [t + v for t, v in zip(split["counts"]["training"], split["counts"]["validation"])]
        assert all(abs(n - round(0.3 * total)) <= 1 for n, total in zip(labeled, per_class_tiles)), labeled
        assert all(c > 0 for c in split["counts"]["training"]) and all(c > 0 for c in split["counts"]["validation"])
        assert all("group" in it for part in ("training", "validation", "test") for it in split[part])
    chosen, _ = stratified_sample(items, 3, per_class=10, seed=0)
    assert all(abs(n - 10) <= 1 for n in class_counts(chosen, 3))
    # a class whose groups are all bigger than the request still gets one whole group, never a part of one
    big = [{"image": f"/b/{g}_{t}.png", "label": 0, "group": f"b{g}"} for g in range(5) for t in range(3)]
    chosen, rest = stratified_sample(big, 1, per_class=1, seed=0)
    assert len(chosen) == 3 and len({it["group"] for it in chosen}) == 1


def test_groups_are_input_order_independent_and_seeded():
    items = _grouped_items()
    a = make_split(items, ["a", "b", "c"], fraction=0.2, seed=7)
    b = make_split(list(reversed(items)), ["a", "b", "c"], fraction=0.2, seed=7)
    assert a == b
    c = make_split(items, ["a", "b", "c"], fraction=0.2, seed=8)
    assert {it["group"] for it in c["training"]} != {it["group"] for it in a["training"]}


def test_singleton_groups_give_the_same_split_as_no_groups():
    items = _items()
    with_groups = [dict(it, group=f"own-{it['image']}") for it in items]
    plain = make_split(items, ["a", "b", "c"], fraction=0.2, val_fraction=0.3, seed=2)
    grouped = make_split(with_groups, ["a", "b", "c"], fraction=0.2, val_fraction=0.3, seed=2)
    for part in ("training", "validation", "test"):
        assert [it["image"] for it in grouped[part]] == [it["image"] for it in plain[part]]
        assert all("group" not in it for it in plain[part])


def test_validation_give_back_moves_a_whole_group():
    # class 1 has one group of 3 tiles in the subset: validation must not take it away from training piecemeal
    items = [{"image": f"/d/a{i}.png", "label": 0} for i in range(20)]
    items += [{"image": f"/d/b{t}.png", "label": 1, "group": "B"} for t in range(3)]
    split = make_split(items, ["a", "b"], per_class=3, val_fraction=0.9, seed=0)
    assert split["counts"]["training"][1] == 3 and split["counts"]["validation"][1] == 0
    check_groups_disjoint(split)


def test_mixed_class_group_is_an_error_naming_it():
    items = _items((5, 5, 5))
    items[0]["group"] = items[7]["group"] = "patient-17"
    with pytest.raises(ValueError, match="patient-17.*mixes classes"):
        make_split(items, ["a", "b", "c"], fraction=0.5, seed=0)


def test_check_groups_disjoint_names_the_group():
    split = {
        "training": [{"image": "/a.png", "label": 0, "group": "g1"}, {"image": "/b.png", "label": 0}],
        "validation": [{"image": "/c.png", "label": 0, "group": "g2"}],
        "test": [{"image": "/d.png", "label": 0, "group": "g1"}, {"image": "/b.png", "label": 0}],
    }
    with pytest.raises(ValueError, match=r"'g1'.*'training' \(/a.png\).*'test' \(/d.png\)"):
        check_groups_disjoint(split)
    del split["test"][0]
    assert check_groups_disjoint(split) == 2


def test_separate_test_set_sharing_a_group_is_an_error():
    items = _grouped_items()
    test = [{"image": "/t/x.png", "label": 0, "group": "c0-g00"}]
    with pytest.raises(ValueError, match="c0-g00"):
        make_split(items, ["a", "b", "c"], fraction=1.0, seed=0, test_items=test)


def test_pool_holds_what_the_test_cap_left_out_by_whole_groups(tmp_path):
    items = _grouped_items()
    for seed in range(3):
        split = make_split(items, ["a", "b", "c"], fraction=0.1, val_fraction=0.25, seed=seed, test_per_class=20)
        assert all(abs(n - 20) <= 3 for n in split["counts"]["test"]), split["counts"]["test"]
        parts = ("training", "validation", "test", "pool")
        images = [it["image"] for p in parts for it in split[p]]
        assert sorted(images) == sorted(it["image"] for it in items)  # every tile in exactly one part
        assert split["counts"]["pool"] == class_counts(split["pool"], 3) and sum(split["counts"]["pool"]) > 100
        assert all(len(where) == 1 for where in _parts_of_groups(split).values())  # whole groups, pool included
        assert check_groups_disjoint(split) == 120
    # without a cap the rest is the test set and the pool is empty; the pool is written and read back like the rest
    assert make_split(items, ["a", "b", "c"], fraction=0.1, seed=0)["pool"] == []
    write_split(split, tmp_path / "split.json")
    assert load_datalist(tmp_path / "split.json")["pool"] == split["pool"]
    assert not json.loads((tmp_path / "split.json").read_text())["pool"][0]["image"].startswith("/")


def test_pool_with_a_separate_test_set_is_the_unlabeled_rest():
    test = [{"image": f"/t/{i}.png", "label": i % 3, "group": f"t{i}"} for i in range(30)]
    split = make_split(_grouped_items(), ["a", "b", "c"], fraction=0.1, seed=0, test_items=test, test_per_class=5)
    assert split["counts"]["test"] == [5, 5, 5]
    assert len(split["pool"]) == len(_grouped_items()) - len(split["training"]) - len(split["validation"])
    assert not any(it["image"].startswith("/t/") for it in split["pool"])  # test-set tiles never join the pool


def test_check_groups_disjoint_covers_the_pool():
    split = {"training": [{"image": "/a.png", "label": 0, "group": "g1"}],
             "test": [{"image": "/b.png", "label": 0, "group": "g2"}],
             "pool": [{"image": "/c.png", "label": 0, "group": "g2"}]}
    with pytest.raises(ValueError, match=r"'g2'.*'test' \(/b.png\).*'pool' \(/c.png\)"):
        check_groups_disjoint(split)


def test_ensure_split_threads_test_per_class(toy_dir, tmp_path):
    split = ensure_split(tmp_path / "split.json", toy_dir, per_class=4, val_fraction=0.25, test_per_class=3)
    assert split["counts"]["test"] == [3, 3, 3, 3] and split["counts"]["pool"] == [5, 5, 5, 5]
    assert len(split["pool"]) == 20 and all(os.path.isabs(it["image"]) for it in split["pool"])


def test_real_lung_tiles_split_by_groups(lc25000_dir, caplog):
    with caplog.at_level(logging.INFO, logger="monai_histodiff.data.datalist"):
        items, classes = scan_class_folders(lc25000_dir)  # groups.csv at the root is found and used
    assert "groups.csv" in caplog.text
    assert classes == ["lung_aca", "lung_n", "lung_scc"] and len(items) == 9000
    groups = {it["image"]: it["group"] for it in items}
    assert len(groups) == 9000 and len(set(groups.values())) < 9000  # rotations / flips share a group
    split = make_split(items, classes, fraction=0.05, val_fraction=0.2, seed=0)
    assert all(len(parts) == 1 for parts in _parts_of_groups(split).values())
    check_groups_disjoint(split)
    labeled = [t + v for t, v in zip(split["counts"]["training"], split["counts"]["validation"])]
    assert all(abs(n - 150) <= 3 for n in labeled), labeled  # 5% of 3,000 tiles per class, counted in tiles
    assert all(abs(v - 30) <= 3 for v in split["counts"]["validation"]), split["counts"]
    assert sum(len(split[p]) for p in ("training", "validation", "test")) == 9000
    assert make_split(list(reversed(items)), classes, fraction=0.05, seed=0) == split
    other = make_split(items, classes, fraction=0.05, seed=1)
    assert {it["image"] for it in other["training"]} != {it["image"] for it in split["training"]}
    # without the groups the same draw puts copies of one original on both sides: the groups are needed
    plain = make_split([{k: v for k, v in it.items() if k != "group"} for it in items], classes, fraction=0.05, seed=0)
    sides: dict[str, set[str]] = {}
    for part in ("training", "validation", "test"):
        for it in plain[part]:
            sides.setdefault(groups[it["image"]], set()).add(part)
    assert any(len(s) > 1 for s in sides.values())
    # capped test set: the rest is the judge's pool, whole groups only
    capped = make_split(items, classes, fraction=0.02, val_fraction=0.2, seed=0, test_per_class=1000)
    assert all(abs(n - 1000) <= 3 for n in capped["counts"]["test"]), capped["counts"]
    assert sum(len(capped[p]) for p in ("training", "validation", "test", "pool")) == 9000
    assert all(len(parts) == 1 for parts in _parts_of_groups(capped).values())
