"""Tests of the output-folder lock: a second writer is refused naming the holder, a killed run's lock is taken over."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from monai_histodiff.engines.locking import OutputLock, OutputLockedError, pid_alive


@pytest.fixture
def live_pid():
    """The pid of a running child process (killed after the test)."""
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_lock_is_taken_and_released(tmp_path):
    with OutputLock(tmp_path / "out") as lock:
        assert lock.path == tmp_path / "out" / ".lock"
        assert lock.path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(OutputLockedError, match=rf"in use by process {os.getpid()} "):
            OutputLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out" / ".lock").exists()


def test_live_holder_is_refused_by_pid(tmp_path, live_pid):
    assert pid_alive(live_pid)
    (tmp_path / ".lock").write_text(f"{live_pid} {socket.gethostname()}\n")
    with pytest.raises(OutputLockedError, match=rf"{tmp_path} is in use by process {live_pid} \(lock file "
                                                rf"{tmp_path}/\.lock\): generate refuses .* delete {tmp_path}/\.lock"):
        OutputLock(tmp_path, owner="generate").acquire()
    assert (tmp_path / ".lock").read_text().split()[0] == str(live_pid)  # the holder's lock is left alone


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, dead_pid):
    assert not pid_alive(dead_pid)
    (tmp_path / ".lock").write_text(f"{dead_pid} {socket.gethostname()}\n")
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .*process {dead_pid} that held it no longer"):
        lock = OutputLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_from_another_host_is_respected(tmp_path, dead_pid):
    (tmp_path / ".lock").write_text(f"{dead_pid} some-other-node\n")
    with pytest.raises(OutputLockedError, match=rf"process {dead_pid} on host some-other-node"):
        OutputLock(tmp_path).acquire()
