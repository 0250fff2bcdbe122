"""Run pipeline stages the way users do, ``python -m monai.bundle run --config_file ...``, from Python.

The demo and the experiment runner chain stages through these calls, so what they run is exactly the documented
command line (printed before each stage), its output shown live and kept in a log file per stage.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.apps.launcher import run_command
from monai_histodiff.bundle.configs import config_files
from monai_histodiff.errors import PREFIX

__all__ = ["bundle_command", "override_value", "run_stage", "StageError"]


class StageError(RuntimeError):
    """A stage's bundle run failed; the message names the stage, the command and its log file."""


def _literal(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)  # fire reads Python literals


def override_value(text: str) -> Any:
    """A command-line override's value: a Python literal where it parses (``1e-3``, ``True``, ``[1, 2]``), else the
    string itself (a path, a ``$`` expression)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def bundle_command(stage: str, small: bool = True, extra_configs: Sequence[str] = (), nproc_per_node: int = 0,
                   **overrides: Any) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``stage`` with ``--key value`` overrides: the installed configs
    (:func:`~monai_histodiff.bundle.configs.config_files`) in MONAI's list form, so it runs from any folder.

    With ``nproc_per_node`` > 0 the command is torchrun's (``python -m torch.distributed.run --nproc_per_node=N -m
    monai.bundle run``) and ``multi_gpu.json`` is merged after the stage config (and ``small.json``), model-zoo style.
    """
    configs = config_files(stage, small, extra_configs, multi_gpu=nproc_per_node > 0)
    config_arg = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    launcher = [sys.executable, "-m", "monai.bundle"] if nproc_per_node <= 0 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={int(nproc_per_node)}", "-m", "monai.bundle"]
    cmd = [*launcher, "run", "--config_file", config_arg]
    for key, value in overrides.items():
        if value is not None:
            cmd += [f"--{key}", _literal(value)]
    return cmd


def run_stage(stage: str, log_dir: str | os.PathLike, small: bool = True, extra_configs: Sequence[str] = (),
              quiet: bool = False, nproc_per_node: int = 0, **overrides: Any) -> float:
    """Run one stage in the current folder (relative paths in ``overrides`` are the caller's), showing its output
    live and keeping it in ``<log_dir>/<stage>.log``. The command is the documented one; on Linux it is started
    from the package's fork server (:mod:`monai_histodiff.apps.launcher`: no import time per stage).

    Returns the wall time in seconds; raises :class:`StageError` when the stage fails.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = overrides.pop("log_name", stage)
    log_path = log_dir / f"{tag}.log"
    cmd = bundle_command(stage, small, extra_configs, nproc_per_node, **overrides)
    shown = " ".join(c if " " not in c and "[" not in c else f'"{c}"' for c in cmd[1:])
    print(f"\n[{tag}] python {shown}", flush=True)
    start = time.time()
    shown_bytes = 0

    def show() -> None:  # the log's new bytes, live
        nonlocal shown_bytes
        if quiet or not log_path.is_file():
            return
        with open(log_path, "rb") as log:
            log.seek(shown_bytes)
            chunk = log.read()
        if chunk:
            shown_bytes += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    code = run_command(cmd, log_path, env=dict(os.environ, PYTHONUNBUFFERED="1"), on_wait=show)
    seconds = time.time() - start
    if code != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        summary = [ln for ln in lines if ln.startswith(PREFIX)]  # the stage's own one-line error (errors.py)
        tail = [ln for ln in lines[-15:] if not ln.startswith(PREFIX)]
        raise StageError(f"stage '{tag}' failed (exit {code}) after {seconds:.0f} s; full log: {log_path}; its "
                         f"last lines:\n  " + "\n  ".join(tail) + ("\n" + summary[-1] if summary else ""))
    print(f"[{tag}] done in {seconds:.0f} s (log: {log_path})", flush=True)
    return seconds
