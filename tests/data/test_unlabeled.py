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
