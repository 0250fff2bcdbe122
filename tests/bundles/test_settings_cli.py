"""A bad numeric override stops a stage before it writes anything, through the bundle command line (forked from the
package's launcher: the same status and output as the user's own process, tests/apps/test_launcher.py)."""

from __future__ import annotations

import sys

import pytest

from tests.bundles.conftest import SMALL, launch


@pytest.mark.parametrize("stage, overrides, named", [
    ("pretrain_autoencoder", {"batch_size": "0", "lr": "-1e-3"},
     ["--batch_size=0: an integer >= 1", "--lr=-0.001: a real number > 0"]),
    ("generate", {"ratio": "abc", "guidance_scale": "-1", "num_inference_steps": "2.5"},
     ["--ratio='abc': a real number > 0", "--guidance_scale=-1: a real number >= 0",
      "--num_inference_steps=2.5: an integer >= 1"]),
    ("select", {"percentile": "0", "min_confidence": "1.5"},
     ["--percentile=0: a real number in (0, 100]", "--min_confidence=1.5: None or a real number in [0, 1]"]),
    ("train_downstream", {"val_fraction": "1.0", "max_epochs": "0"},
     ["--val_fraction=1.0: a real number in [0, 1)", "--max_epochs=0: an integer >= 1"]),
])
def test_bad_override_is_refused_before_any_work(tmp_path, stage, overrides, named):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(["bundles/common.json", f"bundles/{stage}.json", *SMALL]), "--output_dir", str(out), "--dataset_dir",
           str(tmp_path / "none")]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    proc = launch(cmd, timeout=300, OMP_NUM_THREADS="1")
    assert proc.returncode != 0
    assert f"InvalidSettingError: {stage}: {len(named)} setting" in proc.stderr, proc.stderr[-3000:]
    for line in named:
        assert line in proc.stderr, (line, proc.stderr[-3000:])
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
