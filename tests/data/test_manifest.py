"""The one manifest reader: what a finished folder's readers refuse is what a resuming generation stage drops."""

from __future__ import annotations

import json

import pytest

from monai_histodiff.data.manifest import read_manifest
from monai_histodiff.data.validation import CorruptFileError


def test_a_cut_or_bad_line_is_named_when_reading_and_dropped_when_resuming(tmp_path):
    path = tmp_path / "manifest.rank0.jsonl"
    good = [{"file": f"A/A_00000{i}.png", "class": "A", "index": i} for i in range(3)]
    lines = [json.dumps(good[0]), "", json.dumps({"class": "A", "index": 9}), json.dumps(good[1]),
             json.dumps(good[2])[:20]]  # an empty line, a row without 'file', and the last line cut by a kill
    path.write_text("\n".join(lines), encoding="utf-8")
    assert read_manifest(path, on_bad_line="skip") == good[:2]
    with pytest.raises(CorruptFileError, match=r"read by select, line 3\) is truncated or corrupt \(a manifest row "
                                               r"needs a 'file' entry\): rerun generate"):
        read_manifest(path, reader="select")
    path.write_text("\n".join(lines[:2] + lines[3:]), encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"line 4\) is truncated or corrupt \(not valid JSON"):
        read_manifest(path)
    assert read_manifest(tmp_path / "absent.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_manifest(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="on_bad_line"):
        read_manifest(path, on_bad_line="ignore")
