"""The stage launcher: a forked stage behaves as ``python -m monai.bundle run ...`` started as a process does (exit
status, output, working folder, environment), so does the package's own command line, a timeout kills a run, and the
launcher can be turned off. One helper serves the module's tests (a run that times out closes it; the next restarts
it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from monai_histodiff.apps import launcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")


def _config(tmp_path, name: str, run: list[str]) -> list[str]:
    (tmp_path / name).write_text(json.dumps({"x": 3, "run": run}))
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", name]


@pytest.fixture(scope="module")
def forked():
    helper = launcher.StageLauncher()
    yield helper
    helper.close()


def _both(cmd, tmp_path, env, forked):
    """(exit status, stdout, stderr) from a plain process and from a fork of the launcher."""
    plain = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    code = forked.run(cmd, tmp_path / "out.txt", tmp_path / "err.txt", cwd=tmp_path, env=env, timeout=300)
    return (plain.returncode, plain.stdout, plain.stderr), (code, (tmp_path / "out.txt").read_text(),
                                                            (tmp_path / "err.txt").read_text())


def test_a_forked_stage_runs_like_a_process(tmp_path, forked):
    cmd = _config(tmp_path, "ok.json", ["$print('x is', @x)", "$import os", "$print(os.getcwd(), os.environ['FOO'])"])
    env = dict(os.environ, FOO="bar")
    plain, fork = _both([*cmd, "--x", "7"], tmp_path, env, forked)
    assert plain[0] == fork[0] == 0
    for out in (plain[1], fork[1]):
        assert "x is 7" in out and f"{tmp_path} bar" in out


def test_the_package_command_line_runs_in_a_fork(tmp_path, forked):
    """``python -m monai_histodiff <command>``: its own argument parsing, output files, status and working folder."""
    (tmp_path / "tiles").mkdir()
    cmd = [sys.executable, "-m", "monai_histodiff", "scan", "tiles"]  # relative: resolved in the run's folder
    assert forked.run(cmd, tmp_path / "out.txt", tmp_path / "err.txt", cwd=tmp_path, timeout=300) == 0
    assert "0 readable, 0 bad of 0 image files under tiles" in (tmp_path / "out.txt").read_text()
    bad = [sys.executable, "-m", "monai_histodiff", "no-such-command"]
    assert forked.run(bad, tmp_path / "out.txt", tmp_path / "err.txt", cwd=tmp_path, timeout=300) == 2
    assert "invalid choice: 'no-such-command'" in (tmp_path / "err.txt").read_text()


def test_a_failing_stage_gives_the_same_status_and_last_line(tmp_path, forked):
    missing = tmp_path / "nowhere" / "autoencoder.pt"
    cmd = _config(tmp_path, "bad.json", ["$import monai_histodiff.handlers",
                                         f"$monai_histodiff.handlers.load_checkpoint('{missing}')"])
    plain, fork = _both(cmd, tmp_path, dict(os.environ), forked)
    assert plain[0] == fork[0] != 0
    assert plain[2].strip().splitlines()[-1] == fork[2].strip().splitlines()[-1]
    assert fork[2].strip().splitlines()[-1].startswith("monai_histodiff: stage 'bad' stopped: ")
    assert str(missing) in fork[2]


def test_a_timeout_kills_the_run(tmp_path, forked):
    cmd = _config(tmp_path, "slow.json", ["$__import__('time').sleep(60)"])
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run(cmd, tmp_path / "out.txt", cwd=tmp_path, timeout=1)
    assert time.monotonic() - start < 40
    ok = _config(tmp_path, "ok.json", ["$print('after', @x)"])  # the next run restarts the helper
    assert forked.run(ok, tmp_path / "out.txt", cwd=tmp_path, timeout=300) == 0
    assert "after 3" in (tmp_path / "out.txt").read_text()


def test_the_launcher_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(launcher.LAUNCHER_ENV, "subprocess")
    assert not launcher.launcher_enabled()
    monkeypatch.setattr(launcher, "shared_launcher", lambda: pytest.fail("the fork server was used"))
    cmd = _config(tmp_path, "ok.json", ["$print('plain', @x)"])
    assert launcher.run_command(cmd, tmp_path / "out.txt", cwd=tmp_path) == 0
    assert "plain 3" in (tmp_path / "out.txt").read_text()
    with pytest.raises(ValueError, match="monai.bundle.*monai_histodiff"):
        launcher.StageLauncher().run(["echo", "hi"], tmp_path / "out.txt")
