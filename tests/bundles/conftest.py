"""Run bundles the way users do: ``python -m monai.bundle run --config_file "['bundles/common.json', ...]"`` from the
repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from monai_histodiff.apps.launcher import run_command

REPO = Path(__file__).resolve().parents[2]


def run_bundle(configs: list[str], timeout: int = 600, torchrun: int = 0, cwd: Path | None = None,
               **overrides) -> subprocess.CompletedProcess:
    """Run a bundle with the user's command form; overrides become ``--key value`` arguments. Raises on failure.
    The command is started by :func:`monai_histodiff.apps.launcher.run_command` (a fork of a process that has
    imported torch and MONAI once, as ``experiment`` and ``make demo`` start their stages on Linux).

    ``configs`` lists the stage config and its overrides; the shared ``bundles/common.json`` is merged first, as the
    documented command does. ``cwd``: the working folder (default the repository; elsewhere the configs are named by
    absolute path)."""
    files = [str(c) for c in configs]
    files = files if files[0] == COMMON else [COMMON, *files]
    if cwd is not None:
        files = [str(REPO / f) for f in files]
    config_arg = json.dumps(files).replace('"', "'")
    launcher = [sys.executable, "-m", "monai.bundle"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "-m", "monai.bundle"]
    cmd = [*launcher, "run", "--config_file", config_arg]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]  # fire reads Python literals: True, 1e-3, [1, 2]
    proc = launch(cmd, cwd=cwd or REPO, timeout=timeout, OMP_NUM_THREADS="2")
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def launch(cmd: list[str], cwd: Path = REPO, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ...`` or ``python -m monai_histodiff ...`` as a user's shell would, forked from the
    package's launcher on Linux (no import time per run; the same status, output and last line as a plain process:
    tests/apps/test_launcher.py), with ``env`` added to the environment. Returns the finished process, whatever its
    status."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        code = run_command(cmd, out, err, cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1", **env), timeout=timeout)
        return subprocess.CompletedProcess(cmd, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


COMMON = "bundles/common.json"
SMALL = ["bundles/small.json"]
FAST = {"num_workers": 0, "save_interval": 2, "grid_interval": 2}
# the session fixtures built with run_bundle (pre-trained and adapted small checkpoints) live in tests/conftest.py:
# defined once there, each is built once per test session for the bundle tests and the top-level tests alike
