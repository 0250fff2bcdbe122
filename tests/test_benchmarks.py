"""The sampling benchmark's scripts at the CPU size with two steps: the paper-scale GPU comparison (what it would run on
a GPU, end to end) and the options the stage comparisons use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_paper_scale_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, SIZES="small", DEVICE="cpu", STEPS="2", REPS="1", BATCH="2", OMP_NUM_THREADS="2",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(["bash", str(REPO / "benchmarks" / "paper_scale_gpu.sh"), str(out)], env=env, check=True,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert [v["variant"] for v in result["variants"]] == [
        "stock", "guided", "stage", "stage_every4", "stock+amp", "guided+amp", "stage+amp", "stage_every4+amp"]
    assert all(v["tiles_per_s"] > 0 and len(v["times_s"]) == 1 for v in result["variants"])
    assert result["steps"] == 2 and result["sizes"] == "small" and result["latent_shape"] == [3, 16, 16]
    assert result["versions"]["torch"] and result["device"] == "cpu"


def test_paper_sizes_are_the_bundles_defaults():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from guided_sampling import sizes_of
    finally:
        sys.path.pop(0)
    paper = sizes_of("paper")
    assert (paper["image_size"], paper["latent_size"]) == (256, 64)
    assert paper["diffusion_args"]["channels"] == [192, 384, 384, 768, 768]
    assert paper["autoencoder_args"]["channels"] == [128, 256, 512] and paper["classifier_args"]["num_heads"] == 8


def test_guided_sampling_named_variants_over_several_batches(tmp_path):
    """``--variants`` times exactly the named ones; ``--batches`` makes every timed run write that many batches."""
    out = tmp_path / "stage.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "guided_sampling.py"), "--variants", "stock",
           "stage_every2+sync_writes", "--batches", "2", "--batch_size", "3", "--steps", "2", "--warmup_steps", "2",
           "--reps", "1", "--output", str(out)]
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="2"), check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = {v["variant"]: v for v in result["variants"]}
    assert list(rows) == ["stock", "stage_every2+sync_writes"] and result["batches"] == 2
    spec = rows["stage_every2+sync_writes"]["spec"]
    assert spec["sync_writes"] and spec["guidance_interval"] == 2 and spec["stage"]
    for row in rows.values():  # tiles/s counts both batches of 3
        assert abs(row["tiles_per_s"] * row["median_s"] - 6) < 0.05
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from guided_sampling import parse_variant
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="sync_writes"):
        parse_variant("stock+sync_writes")


def _results_csv(folder: Path, rows: dict[str, list[float]]) -> None:
    folder.mkdir(parents=True)
    lines = ["row,mode,seed,accuracy"]
    for name, values in rows.items():
        mode = "baseline" if name == "baseline" else "selective"
        lines += [f"{name},{mode},{seed},{v}" for seed, v in enumerate(values)]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")


def test_rows_of_another_folder_are_paired_only_on_the_same_baseline(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from results_tables import between_rows_table
    finally:
        sys.path.pop(0)
    _results_csv(tmp_path / "sources", {"baseline": [0.8, 0.9, 0.7], "selective 200%": [0.82, 0.93, 0.71]})
    _results_csv(tmp_path / "site", {"baseline": [0.8, 0.9, 0.7], "selective 200%": [0.81, 0.91, 0.75]})
    lines = between_rows_table(tmp_path / "sources", against={"site": tmp_path / "site"})
    assert len(lines) == 3 and lines[2].startswith("| selective 200% | site: selective 200% | 3 | -0.003 [")
    assert lines[2].endswith("| 2 of 3 |")
    _results_csv(tmp_path / "other", {"baseline": [0.8, 0.9, 0.6], "selective 200%": [0.8, 0.9, 0.6]})
    with pytest.raises(ValueError, match="baseline rows differ"):
        between_rows_table(tmp_path / "sources", against={"other": tmp_path / "other"})


def test_guidance_forecast_shares_are_importance_weighted_class_shares():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from guidance_forecast import expected_confidence, forecast, guided_class_shares
    finally:
        sys.path.pop(0)
    import torch

    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    classes = torch.tensor([0, 1, 1])
    # g = 0: every request draws the sample as it is (one tile of class 0 in three)
    assert torch.allclose(guided_class_shares(probs, classes, 0.0), torch.tensor([[1 / 3, 2 / 3]] * 2).double())
    # g = 1: weights p(y | z_i); g = 2: their squares
    shares = guided_class_shares(probs, classes, 1.0)
    assert shares[0, 0].item() == pytest.approx(0.9 / 1.5) and shares[1, 1].item() == pytest.approx(1.4 / 1.5)
    assert guided_class_shares(probs, classes, 2.0)[0, 0].item() == pytest.approx(0.81 / (0.81 + 0.16 + 0.04))
    # a sample weight doubles a tile's share of the draws
    weighted = guided_class_shares(probs, classes, 0.0, torch.tensor([2.0, 1.0, 1.0]))
    assert weighted[0, 0].item() == pytest.approx(0.5)
    # a classifier that knows every tile forecasts pure pools; one that knows nothing, the class shares at any g
    onehot = torch.nn.functional.one_hot(classes, 2).float()
    assert torch.equal(guided_class_shares(onehot * 0.98 + 0.01, classes, 8.0).argmax(1), torch.tensor([0, 1]))
    assert forecast(torch.full((3, 2), 0.5), classes, classes, [4.0])["4.0"]["true"] == pytest.approx([1 / 3, 2 / 3])
    # the judged forecast reads the judge's classes, not the labels
    judged = torch.tensor([1, 1, 1])
    assert forecast(probs, classes, judged, [1.0])["1.0"]["judged"] == pytest.approx([0.0, 1.0])
    # the confidence exact guidance gives on average: sum p^(g+1) / sum p^g per requested class
    assert expected_confidence(probs, 1.0)[0] == pytest.approx((0.81 + 0.16 + 0.04) / 1.5)
    assert expected_confidence(probs, 0.0)[1] == pytest.approx(1.5 / 3)
