from __future__ import annotations

import json
import sys

from monai_histodiff.__main__ import main
from tests.bundles.conftest import launch


def test_help_lists_subcommands():
    out = launch([sys.executable, "-m", "monai_histodiff", "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    for cmd in ("download", "toy-data", "split", "unlabeled", "scan", "demo"):
        assert cmd in out.stdout


def test_toy_then_split_then_scan(tmp_path, capsys):
    assert main(["toy-data", "--output", str(tmp_path / "toy"), "--num_per_class", "6", "--image_size", "32"]) == 0
    assert main(["split", "--dataset_dir", str(tmp_path / "toy"), "--output", str(tmp_path / "s" / "split.json"),
                 "--per_class", "4", "--val_fraction", "0.25"]) == 0
    split = json.loads((tmp_path / "s" / "split.json").read_text())
    assert split["counts"]["training"] == [3, 3, 3, 3] and split["counts"]["test"] == [2, 2, 2, 2]
    (tmp_path / "toy" / "ADI_TOY" / "broken.png").write_bytes(b"")
    assert main(["scan", str(tmp_path / "toy"), "--strict"]) == 1
    assert "zero-byte" in capsys.readouterr().out
