"""A failed stage ends with the project's own one-line error (what, which file or key, what to do), after the full
traceback, whether it runs through ``python -m monai.bundle run`` or through ``experiment``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from monai_histodiff.errors import PREFIX, root_cause, stage_from_argv, summary_line
from tests.bundles.conftest import REPO, launch


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def _bundle(stage: str, *overrides: str, forked: bool = False, **env: str) -> subprocess.CompletedProcess:
    """A stage run by the user's command in a plain process, or ``forked`` from the package's launcher (the same
    status, output and last line: tests/apps/test_launcher.py; no import time)."""
    configs = f"['bundles/common.json','bundles/{stage}.json','bundles/small.json']"
    args = ["-m", "monai.bundle", "run", "--config_file", configs, *overrides]
    return launch([sys.executable, *args], timeout=300, **env) if forked else _run(args, **env)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines[-1]


def _labeled_with_a_tile_in_two_classes(root):
    rng = np.random.default_rng(0)
    for c in ("A", "B"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    (root / "B" / "copy_of_A0.png").write_bytes((root / "A" / "A0.png").read_bytes())


def test_summary_names_the_root_cause_and_the_stage():
    try:
        try:
            raise ValueError("max_epochs = -1 is not an integer >= 1")
        except ValueError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from e
    except RuntimeError as outer:
        assert isinstance(root_cause(outer), ValueError)
        line = summary_line(outer, "finetune")
    assert line == f"{PREFIX}stage 'finetune' stopped: ValueError: max_epochs = -1 is not an integer >= 1"
    argv = ["-m", "run", "--config_file", "['bundles/common.json','bundles/finetune.json','bundles/small.json']"]
    assert stage_from_argv(argv) == "finetune" and stage_from_argv(["run"]) is None


def test_a_corrupt_checkpoint_is_the_last_line_of_a_bundle_run(tmp_path):
    ckpt = tmp_path / "pretrain_autoencoder" / "autoencoder.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not a checkpoint")
    proc = _bundle("generate", "--output_dir", str(tmp_path))
    assert proc.returncode != 0
    last = _last_line(proc)
    assert last.startswith(f"{PREFIX}stage 'generate' stopped: CorruptFileError: {ckpt}")
    assert "rerun stage 'pretrain_autoencoder'" in last
    assert "Failed to evaluate ConfigExpression" in proc.stderr  # the full traceback stays available, above it
    debug = _bundle("generate", "--output_dir", str(tmp_path), forked=True, MONAI_HISTODIFF_DEBUG="1")
    assert not _last_line(debug).startswith(PREFIX)  # the debug setting: Python's own output only


def test_a_bad_override_and_a_label_conflict_are_the_last_line(tmp_path):
    labeled = tmp_path / "labeled"
    _labeled_with_a_tile_in_two_classes(labeled)
    proc = _bundle("train_aux_classifier", "--output_dir", str(tmp_path / "runs"), "--dataset_dir", str(labeled),
                   "--max_epochs", "-1", forked=True)
    assert _last_line(proc).startswith(f"{PREFIX}stage 'train_aux_classifier' stopped: InvalidSettingError")
    assert "max_epochs" in _last_line(proc)
    proc = _bundle("train_aux_classifier", "--output_dir", str(tmp_path / "runs"), "--dataset_dir", str(labeled),
                   forked=True)
    last = _last_line(proc)
    assert proc.returncode != 0 and last.startswith(f"{PREFIX}stage 'train_aux_classifier' stopped: ValueError")
    assert "more than one class" in last or "classes" in last


def test_experiment_ends_with_the_stage_error_and_no_runner_traceback(tmp_path):
    labeled = tmp_path / "labeled"
    _labeled_with_a_tile_in_two_classes(labeled)
    proc = _run(["-m", "monai_histodiff", "experiment", "--output_dir", str(tmp_path / "run"), "--dataset_dir",
                 str(labeled), "--per_class", "3"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert _last_line(proc).startswith(f"{PREFIX}command 'experiment' stopped: ValueError")
    # a stage that fails inside the runner: its own line comes last, after the stage's log tail
    run = tmp_path / "run2"
    for stage, name in (("pretrain_autoencoder", "autoencoder.pt"), ("pretrain_diffusion", "diffusion.pt"),
                        ("train_aux_classifier", "aux_classifier.pt")):
        (run / stage).mkdir(parents=True)
        (run / stage / name).write_bytes(b"garbage")
    (labeled / "B" / "copy_of_A0.png").unlink()
    proc = _run(["-m", "monai_histodiff", "experiment", "--output_dir", str(run), "--dataset_dir", str(labeled),
                 "--per_class", "3", "--val_fraction", "0.34"])
    assert proc.returncode == 1 and "Traceback (most recent call last)" not in proc.stderr.split("failed (exit")[0]
    last = _last_line(proc)
    assert last.startswith(f"{PREFIX}stage ") and "CorruptFileError" in last
