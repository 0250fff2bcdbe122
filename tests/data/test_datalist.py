from __future__ import annotations

import json

import pytest

from monai_histodiff.data.datalist import (
    class_counts,
    load_datalist,
    read_labeled_list,
    save_class_map,
    scan_class_folders,
    write_datalist,
)

NCT_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


def test_scan_real_class_folders(nct_crc_dir):
    items, classes = scan_class_folders(nct_crc_dir)
    assert classes == NCT_CLASSES
    assert len(items) == 62
    counts = class_counts(items, 9)
    assert all(3 <= c <= 8 for c in counts)
    assert all(it["class"] == classes[it["label"]] and f"/{it['class']}/" in it["image"] for it in items)


def test_class_names_from_config(toy_dir):
    items, classes = scan_class_folders(toy_dir, class_names=["TUM_TOY", "ADI_TOY"])
    assert classes == ["TUM_TOY", "ADI_TOY"] and {it["label"] for it in items} == {0, 1}
    with pytest.raises(ValueError, match="NOPE"):
        scan_class_folders(toy_dir, class_names=["NOPE"])


def test_csv_datalist_with_names_and_relative_paths(toy_dir, tmp_path):
    items, classes = scan_class_folders(toy_dir)
    csv = tmp_path / "list.csv"
    rows = ["image,label"] + [f"{it['image']},{it['class']}" for it in items[:5]]
    csv.write_text("\n".join(rows) + "\n")
    got, got_classes = read_labeled_list(csv, class_names=classes)
    assert [g["label"] for g in got] == [it["label"] for it in items[:5]]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nx.png,UNKNOWN\n")
    with pytest.raises(ValueError, match="row 2"):
        read_labeled_list(bad, class_names=classes)


def test_datalist_roundtrip_is_relative(toy_dir, tmp_path):
    items, classes = scan_class_folders(toy_dir)
    path = write_datalist({"classes": classes, "training": items[:3]}, tmp_path / "sub" / "dl.json")
    raw = json.loads(path.read_text())
    assert not raw["training"][0]["image"].startswith("/")
    loaded = load_datalist(path)
    assert [it["image"] for it in loaded["training"]] == [it["image"] for it in items[:3]]
    cm = json.loads(save_class_map(classes, tmp_path).read_text())
    assert cm["class_to_index"][classes[2]] == 2


@pytest.mark.parametrize("content", ['{"classes": ["A", "B"], "training": [{"image": "a.png", "la', "", "[1, 2]",
                                     '{"training": [{"label": 0}]}', b"\xff\xfe\x00garbage"],
                         ids=["cut", "empty", "not_an_object", "item_without_image", "binary"])
def test_corrupt_split_file_names_file_and_what_to_do(tmp_path, content):
    import re

    from monai_histodiff.data.validation import CorruptFileError

    path = tmp_path / "split.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(path))} \(read by load_datalist\) is truncated or "
                                               r"corrupt .*delete it and rerun the stage that writes it") as e:
        load_datalist(path)
    assert isinstance(e.value, ValueError)


def test_csv_label_outside_the_class_list_is_refused(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label\na.png,TUM\nb.png,STROMA\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels\.csv, row 3: label 'STROMA' is not one of \['TUM', 'STR'\]"):
        read_labeled_list(tmp_path / "labels.csv", ["TUM", "STR"])
    (tmp_path / "index.csv").write_text("image,label\na.png,0\nb.png,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"index\.csv, row 3: label '2' is not one of"):
        read_labeled_list(tmp_path / "index.csv", ["TUM", "STR"])
