"""Stage 3 bundles at the small size: guided generation (counts, manifest, kill and resume) and selection."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from monai_histodiff.data import load_datalist
from tests.bundles.conftest import REPO, SMALL, run_bundle


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_counts_from_ratio_and_manifest(toy_labeled_site):
    site = toy_labeled_site
    run_bundle(["bundles/generate.json", *SMALL], output_dir=str(site), ratio=1.0, num_inference_steps=5,
               batch_size=8, dataset_dir=str(site / "labeled"), guidance_check_per_class=0)
    out = site / "generate"
    rows = _rows(out / "manifest.jsonl")
    split = load_datalist(site / "split.json")
    real = Counter(split["classes"][it["label"]] for it in split["training"])
    assert Counter(r["class"] for r in rows) == real  # ratio 1.0: as many synthetic as real tiles per class
    assert all((out / r["file"]).is_file() and r["file"].startswith(r["class"] + "/") for r in rows)
    assert {"seed", "guidance_scale", "steps", "scheduler", "checkpoint_hashes", "confidence"} <= set(rows[0])
    assert set(rows[0]["checkpoint_hashes"]) == {"autoencoder", "decoder", "diffusion", "latent_classifier"}
    assert rows[0]["steps"] == 5 and 0.0 <= rows[0]["confidence"] <= 1.0
    assert all((out / "grids" / f"{c}.png").is_file() for c in split["classes"])

    # selection on that pool: selective and random modes write all outputs
    for mode in ("selective", "random"):
        sel_dir = site / f"select_{mode}"
        run_bundle(["bundles/select.json", *SMALL], output_dir=str(site), selection_dir=str(sel_dir), ratio=0.5,
                   mode=mode)
        aug = load_datalist(sel_dir / "augmented_datalist.json")
        synth = [it for it in aug["training"] if it.get("synthetic")]
        with open(sel_dir / "decisions.csv") as f:
            decisions = list(csv.DictReader(f))
        assert len(decisions) == len(rows) and sum(d["kept"] == "True" for d in decisions) == len(synth)
        assert len(aug["training"]) == len(split["training"]) + len(synth)
        report = json.loads((sel_dir / "selection_report.json").read_text())
        assert report["settings"]["mode"] == mode
        assert (sel_dir / "distance_histograms.png").stat().st_size > 0
        if mode == "random":  # same quotas, no filtering: round(0.5 x real count) per class
            quota = {split["classes"].index(c): round(0.5 * n) for c, n in real.items()}
            assert Counter(it["label"] for it in synth) == quota


def test_generate_killed_then_resumed_completes_exactly(toy_labeled_site, tmp_path):
    site = toy_labeled_site
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "['bundles/common.json','bundles/generate.json','bundles/small.json']", "--output_dir", str(site),
           "--synthetic_dir", str(out),
           "--counts", "[2, 2, 2, 2]", "--num_inference_steps", "60", "--batch_size", "1",
           "--guidance_check_per_class", "0"]  # the check has its own tests; here only the pool is killed and resumed
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    manifest = out / "manifest.rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "generation finished before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["file"]: (out / r["file"]).read_bytes() for r in _rows(manifest)}
    assert 3 <= len(done_before) < 8
    run_bundle(["bundles/generate.json", *SMALL], output_dir=str(site), synthetic_dir=str(out),
               counts=[2, 2, 2, 2], num_inference_steps=60, batch_size=1, guidance_check_per_class=0)
    rows = _rows(out / "manifest.jsonl")
    files = [r["file"] for r in rows]
    assert len(files) == 8 and len(set(files)) == 8  # exact count, no duplicate
    tiles = [p.relative_to(out).as_posix() for p in out.glob("*/*.png") if p.parent.name != "grids"]
    assert sorted(tiles) == sorted(files)
    assert not list(out.rglob("*.tmp*"))  # no half-written file left
    assert all((out / f).read_bytes() == b for f, b in done_before.items())  # finished tiles untouched
