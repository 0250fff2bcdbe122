from __future__ import annotations

import csv
import json
import shutil
import warnings

import pytest

from monai_histodiff.__main__ import main
from monai_histodiff.data.datalist import class_counts, load_datalist, read_labeled_list, scan_class_folders
from monai_histodiff.data.prepare import ensure_split, prepare_labeled_split
from monai_histodiff.data.split import check_groups_disjoint
from monai_histodiff.data.toy import make_toy_dataset


def _sides(split):
    return {it["image"]: part for part in ("training", "validation", "test") for it in split[part]}


@pytest.fixture()
def toy_copy(tmp_path):
    """Seeded toy tiles (4 classes x 10) written to tmp_path, free to modify."""
    make_toy_dataset(tmp_path / "toy", num_per_class=10, image_size=16, num_classes=4, seed=0)
    return tmp_path / "toy"


def test_csv_datalist_with_group_column_real_lung(lc25000_dir, lc25000_groups, tmp_path):
    names = sorted({r["group"] for r in lc25000_groups})
    keep = set(names[::12])  # whole groups, about 800 tiles
    rows = [r for r in lc25000_groups if r["group"] in keep]
    listing = tmp_path / "lung.csv"
    with open(listing, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "group"])
        w.writerows([str(lc25000_dir / r["image"]), r["label"], r["group"]] for r in rows)
    items, classes = read_labeled_list(listing)
    assert classes == ["lung_aca", "lung_n", "lung_scc"] and {it["group"] for it in items} == keep
    split = prepare_labeled_split(listing, tmp_path / "out" / "split.json", fraction=0.05, val_fraction=0.2, seed=0)
    assert split["groups_file"] is None and split["duplicate_sets"] == 0
    loaded = load_datalist(tmp_path / "out" / "split.json")
    group_of = {str(lc25000_dir / r["image"]): r["group"] for r in rows}
    assert all(it["group"] == group_of[it["image"]] for p in ("training", "validation", "test") for it in loaded[p])
    where: dict[str, set[str]] = {}
    for part in ("training", "validation", "test"):
        for it in loaded[part]:
            where.setdefault(it["group"], set()).add(part)
    assert len(where) == len(keep) and all(len(p) == 1 for p in where.values())
    per_class = class_counts(items, 3)
    labeled = [t + v for t, v in zip(split["counts"]["training"], split["counts"]["validation"])]
    assert all(abs(n - round(0.05 * total)) <= 2 for n, total in zip(labeled, per_class)), (labeled, per_class)


def test_groups_file_paths_relative_to_it_or_to_the_root(toy_copy, tmp_path):
    items, classes = scan_class_folders(toy_copy)
    rel = [it["image"][len(str(toy_copy)) + 1:] for it in items]  # "ADI_TOY/ADI_TOY_0000.png"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "by_root.csv").write_text("image,group\n" + "".join(f"{r},p{i // 3}\n" for i, r in enumerate(rel)))
    (meta / "by_file.csv").write_text("image,group\n" + "".join(f"../toy/{r},p{i // 3}\n" for i, r in enumerate(rel)))
    for name in ("by_root.csv", "by_file.csv"):
        got, _ = scan_class_folders(toy_copy, groups_file=meta / name)
        assert [it["group"] for it in got] == [f"p{i // 3}" for i in range(len(rel))]
    # "p3" holds tiles 9 (class 0) and 10, 11 (class 1): a mixed-class group, named in the error
    with pytest.raises(ValueError, match="'p3' mixes classes"):
        prepare_labeled_split(toy_copy, tmp_path / "out" / "split.json", fraction=0.5, groups_file=meta / "by_root.csv")
    (meta / "wrong.csv").write_text("image,group\nnot/there.png,g\n")
    with pytest.raises(ValueError, match="names none of the 40 images"):
        scan_class_folders(toy_copy, groups_file=meta / "wrong.csv")
    (meta / "label.csv").write_text(f"image,label,group\n{rel[0]},TUM_TOY,g\n")
    with pytest.raises(ValueError, match="has label 'TUM_TOY' there"):
        scan_class_folders(toy_copy, groups_file=meta / "label.csv")
    with pytest.raises(FileNotFoundError, match="groups_file"):
        scan_class_folders(toy_copy, groups_file=meta / "absent.csv")


def test_groups_csv_at_the_root_is_used_and_recorded(toy_copy, tmp_path, capsys):
    items, _ = scan_class_folders(toy_copy)
    rel = [it["image"][len(str(toy_copy)) + 1:] for it in items]
    # groups of 5 tiles of one class (10 tiles per class: 2 groups each); all but the last tile named
    rows = "".join(f"{r},{it['class']},{it['class']}-{(i % 10) // 5}\n" for i, (r, it) in enumerate(zip(rel, items)))
    (toy_copy / "groups.csv").write_text("image,label,group\n" + "".join(rows.splitlines(True)[:-1]))
    with pytest.warns(UserWarning, match="does not name 1 of 40 images"):
        assert main(["split", "--dataset_dir", str(toy_copy), "--output", str(tmp_path / "s" / "split.json"),
                     "--per_class", "5", "--val_fraction", "0"]) == 0
    assert "groups from" in capsys.readouterr().out
    split = load_datalist(tmp_path / "s" / "split.json")
    assert split["groups_file"] == str(toy_copy / "groups.csv")
    assert split["counts"]["training"] == [5, 5, 5, 5]
    # classes 0-2 can only meet 5 tiles with one whole group (class 3 also has a 4-tile group and a loose tile)
    assert all(len({it["group"] for it in split["training"] if it["label"] == c}) == 1 for c in range(3))
    assert sum("group" not in it for p in ("training", "test") for it in split[p]) == 1


def test_duplicate_files_are_grouped_and_named(toy_copy, tmp_path):
    folder = toy_copy / "ADI_TOY"
    shutil.copy(folder / "ADI_TOY_0003.png", folder / "ADI_TOY_copy.png")  # byte-identical, same class
    for seed in range(4):
        out = tmp_path / f"s{seed}" / "split.json"
        named = r"1 set\(s\) of byte-identical files.*ADI_TOY_0003\.png = .*ADI_TOY_copy\.png"
        with pytest.warns(UserWarning, match=named):
            split = prepare_labeled_split(toy_copy, out, fraction=0.5, val_fraction=0.5, seed=seed)
        assert split["duplicate_sets"] == 1 and split["groups_file"] is None
        loaded = load_datalist(out)
        sides = _sides(loaded)
        assert sides[str(folder / "ADI_TOY_0003.png")] == sides[str(folder / "ADI_TOY_copy.png")]
        grouped = [it for p in ("training", "validation", "test") for it in loaded[p] if "group" in it]
        assert len(grouped) == 2 and grouped[0]["group"] == grouped[1]["group"]
        assert grouped[0]["group"].startswith("sha256:")


def test_without_groups_or_duplicates_no_warning_and_no_group_keys(toy_copy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = prepare_labeled_split(toy_copy, tmp_path / "split.json", per_class=4, seed=0)
    assert split["duplicate_sets"] == 0 and split["groups_file"] is None
    raw = json.loads((tmp_path / "split.json").read_text())
    assert all(set(it) == {"image", "label"} for p in ("training", "validation", "test") for it in raw[p])


def test_ensure_split_passes_groups_file_and_checks_the_file(toy_copy, tmp_path):
    items, _ = scan_class_folders(toy_copy)
    groups = tmp_path / "g.csv"
    groups.write_text("image,group\n" + "".join(f"{it['image']},{it['class']}-{i % 5}\n" for i, it in enumerate(items)))
    split = ensure_split(tmp_path / "run" / "split.json", toy_copy, fraction=0.5, groups_file=groups)
    assert check_groups_disjoint(split) == 20
    raw = json.loads((tmp_path / "run" / "split.json").read_text())
    assert raw["groups_file"] == str(groups)
    raw["test"].append(dict(raw["training"][0]))  # a hand-edited split that puts a group on both sides
    (tmp_path / "run" / "split.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="split.json: group"):
        ensure_split(tmp_path / "run" / "split.json")
