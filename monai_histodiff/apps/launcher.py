"""Start stage runs without paying Python's and torch's import time for each one.

A chained run (``make demo``, ``experiment``, the test suite) starts dozens of ``python -m monai.bundle run ...``
processes, and each spends seconds importing torch, MONAI, ignite and this package before its first step: on a
2-core machine that is minutes per run. :class:`StageLauncher` keeps one helper process (a fork server) that has
imported them once; each stage is a fresh ``fork`` of it that runs ``python -m monai.bundle run ...`` from its command
line exactly as the interpreter would (``runpy``, the same argument parsing, the package's excepthook, the same exit
status), with its own working folder, environment and output files. The helper never runs a torch operation (no
OpenMP pool exists when it forks); the only threads it has are those of numpy's OpenBLAS pool, which OpenBLAS
re-creates after a fork, as in PyTorch's forked data-loading workers.

The package's own command line (``python -m monai_histodiff <command>``) can be started the same way. Linux only
(macOS and Windows start a plain process per stage); ``MONAI_HISTODIFF_LAUNCHER=subprocess`` turns it off. torchrun
commands always start their own processes.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["LAUNCHER_ENV", "StageLauncher", "launcher_enabled", "shared_launcher", "run_command"]

#: environment variable: ``subprocess`` starts a plain process per stage (default on Linux: the fork server)
LAUNCHER_ENV = "MONAI_HISTODIFF_LAUNCHER"
#: what the helper imports once (module names); a stage imports anything else itself
PRELOAD = ("torch", "numpy", "PIL.Image", "monai", "monai.bundle", "monai.bundle.scripts", "monai.engines",
           "monai.networks.nets", "monai.inferers", "monai.transforms", "monai.data", "ignite.engine", "fire",
           "monai_histodiff", "monai_histodiff.engines", "monai_histodiff.handlers", "monai_histodiff.inferers",
           "monai_histodiff.networks", "monai_histodiff.data", "monai_histodiff.bundle")


def launcher_enabled() -> bool:
    """Whether stages are started by forking the helper (Linux, unless ``$MONAI_HISTODIFF_LAUNCHER`` says
    ``subprocess``)."""
    return sys.platform.startswith("linux") and os.environ.get(LAUNCHER_ENV, "fork") != "subprocess"


#: the modules whose ``python -m <module> ...`` commands a fork of the helper can run
MODULES = ("monai.bundle", "monai_histodiff")


def _module_argv(cmd: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(module, argv)`` for a ``python -m <module> ...`` command of this interpreter with a module of
    :data:`MODULES`, else None."""
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m" and cmd[2] in MODULES:
        return cmd[2], [cmd[2], *cmd[3:]]
    return None


class StageLauncher:
    """A fork server for ``python -m monai.bundle run ...`` (and ``python -m monai_histodiff ...``) commands (see the
    module docstring).

    Args:
        preload: modules the helper imports before its first fork.
        env: the helper's environment (default: the caller's), e.g. a ``PYTHONPATH`` that selects which installed copy
            of the package the stages import; each run still gets the environment it asks for.
    """

    def __init__(self, preload: Sequence[str] = PRELOAD, env: Mapping[str, str] | None = None) -> None:
        self.preload = tuple(preload)
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = dict(self.env if self.env is not None else os.environ, PYTHONUNBUFFERED="1")
            self._proc = subprocess.Popen([sys.executable, "-m", __name__, *self.preload], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=env, bufsize=0)
            self._buffer = b""
            ready = self._message(None)
            if ready.get("ready") is not True:
                raise RuntimeError(f"the stage launcher did not start (it said {ready!r})")
        return self._proc

    def _message(self, wait: float | None) -> dict[str, Any] | None:
        """The helper's next message, or None when none came within ``wait`` seconds (None: wait for it)."""
        fd = self._proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the stage launcher stopped (see the error above)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Stop the helper (a later run starts it again)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=30)
        self._proc = None

    def run(self, cmd: Sequence[str], stdout: str | os.PathLike, stderr: str | os.PathLike | None = None,
            cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None, on_wait: Callable[[], None] | None = None) -> int:
        """Run ``cmd`` (``python -m monai.bundle ...`` or ``python -m monai_histodiff ...``) in a fork of the helper;
        return its exit status.

        Args:
            cmd: the command as a list, ``cmd[0]`` this interpreter.
            stdout: file the run's standard output goes to (created or truncated).
            stderr: file its standard error goes to (default: the same file as ``stdout``).
            cwd: its working folder (default: the caller's).
            env: its whole environment (default: the caller's).
            timeout: seconds after which the run is killed and ``subprocess.TimeoutExpired`` raised.
            on_wait: called about every 0.2 s while the run goes on (e.g. to show its output live).
        """
        module = _module_argv(cmd)
        if module is None:
            raise ValueError(f"the stage launcher runs 'python -m <module> ...' commands of {MODULES} only, got "
                             f"{list(cmd)}")
        request = {"module": module[0], "argv": module[1], "cwd": str(cwd or os.getcwd()),
                   "env": dict(env if env is not None else os.environ), "stdout": os.path.abspath(stdout),
                   "stderr": os.path.abspath(stderr) if stderr is not None else None}  # the helper's cwd is not ours
        with self._lock:
            proc = self._start()
            proc.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
            started = self._message(None) or {}
            if "pid" not in started:
                raise RuntimeError(f"the stage launcher could not start {list(cmd)}: {started}")
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                while True:
                    done = self._message(0.2)
                    if done is not None:
                        if on_wait is not None:
                            on_wait()
                        return int(done["returncode"])
                    if on_wait is not None:
                        on_wait()
                    if deadline is not None and time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(list(cmd), timeout)  # type: ignore[arg-type]
            except BaseException as e:  # timeout, Ctrl-C: the run must not outlive its caller
                if isinstance(e, KeyboardInterrupt):  # as Ctrl-C would have reached a plain process: let it stop
                    _kill(int(started["pid"]), signal.SIGINT)
                    for _ in range(50):
                        if self._message(0.2) is not None:
                            break
                _kill(int(started["pid"]))
                self.close()
                raise


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group of a run (its own session: the stage and its data-loading workers)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_SHARED: StageLauncher | None = None


def shared_launcher() -> StageLauncher:
    """The process's one launcher (started on first use, stopped at exit)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = StageLauncher()
        atexit.register(_SHARED.close)
    return _SHARED


def run_command(cmd: Sequence[str], stdout: str | os.PathLike, stderr: str | os.PathLike | None = None,
                cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                timeout: float | None = None, on_wait: Callable[[], None] | None = None) -> int:
    """Run a command with its output in files: forked from the shared launcher when it is enabled and the command is
    ``python -m monai.bundle ...`` or ``python -m monai_histodiff ...``, else as a plain process. Returns the exit
    status."""
    if launcher_enabled() and _module_argv(cmd) is not None:
        return shared_launcher().run(cmd, stdout, stderr, cwd=cwd, env=env, timeout=timeout, on_wait=on_wait)
    with open(stdout, "wb") as out, (open(stderr, "wb") if stderr is not None else _same(out)) as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, cwd=cwd, env=dict(env) if env else None,
                                start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if on_wait is not None:
                    on_wait()
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(list(cmd), timeout)  # type: ignore[arg-type]
        except BaseException:
            _kill(proc.pid)
            proc.wait()
            raise
        return int(proc.returncode)


class _same:
    """``with`` helper: standard error into the file standard output already writes."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def __enter__(self) -> IO[bytes]:
        return self.f

    def __exit__(self, *exc: Any) -> None:
        return None


# --- the helper process ---------------------------------------------------------------------------------------------


def _child(request: Mapping[str, Any]) -> None:
    """In the fork: become the stage's process (files, folder, environment), run the module as ``python -m`` would,
    and exit with its status. Never returns."""
    import importlib.util
    import runpy
    import traceback

    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the helper ignores it; a stage does not
        os.setsid()  # its own process group: a kill reaches the stage's own workers too
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = out if request["stderr"] is None else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                            0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # OpenMP read it when the helper imported torch
            import torch

            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        sys.argv = list(request["argv"])
        sys.argv[0] = importlib.util.find_spec(f"{request['module']}.__main__").origin  # as runpy will set it
        sys.path[0] = request["cwd"]  # what ``python -m`` puts first
        from monai_histodiff.errors import install_excepthook

        install_excepthook()  # the package was imported by the helper, whose argv was not a bundle run's
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _serve(preload: Sequence[str]) -> None:
    import importlib

    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle (it forwards it to the run)
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by mistake goes to the caller's standard error, not into the protocol
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            protocol.close()
            _child(request)
        protocol.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    _serve(sys.argv[1:])
