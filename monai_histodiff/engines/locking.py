# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""One writer per output folder: a lock file that names the process holding it.

Two runs appending to the same manifest and rewriting it on start would lose each other's rows. :class:`OutputLock`
creates ``<folder>/<name>`` with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) holding
``<pid> <host>``; a second run finds it and refuses, naming the holder. A lock left by a process that no longer
exists on this host (a killed run) is taken over with a warning. A lock written on another host cannot be checked
and is always respected: the message says which file to delete when that run is known to be gone.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "OutputLock", "OutputLockedError", "pid_alive"]

LOCK_NAME = ".lock"


class OutputLockedError(RuntimeError):
    """Another live process holds the lock of the output folder."""


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """Context manager holding ``<folder>/<name>`` for the duration of a run.

    Args:
        folder: the output folder (created when missing).
        name: the lock file's name inside it.
        owner: what is running (named in the messages), e.g. ``"generate"``.

    Raises:
        OutputLockedError: on entry, when a live process (or one on another host) holds the lock; the message names
            its pid, host and the lock file.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME, owner: str = "this run") -> None:
        self.path = Path(folder) / name
        self.owner = owner
        self._held = False

    def _holder(self) -> tuple[int | None, str]:
        """``(pid, host)`` written in the lock file; ``(None, "")`` when it is empty or unreadable."""
        try:
            fields = self.path.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError):  # gone, or unreadable
            return None, ""
        pid = int(fields[0]) if fields and fields[0].isdigit() else None
        return pid, (fields[1] if len(fields) > 1 else "")

    def acquire(self) -> OutputLock:
        """Take the lock (see the class docstring); returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(3):  # a stale lock is removed and the creation retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, holder_host = self._holder()
                if pid is None or (holder_host and holder_host != host) or pid_alive(pid):
                    who = f"process {pid}" if pid is not None else "an unknown process (the lock file holds no pid)"
                    where = f" on host {holder_host}" if holder_host and holder_host != host else ""
                    raise OutputLockedError(
                        f"{self.path.parent} is in use by {who}{where} (lock file {self.path}): {self.owner} refuses "
                        f"to write into it at the same time. Wait for that run to finish or use another folder; if "
                        f"that run is known to be gone, delete {self.path}"
                    ) from None
                warnings.warn(f"taking over the stale lock {self.path}: process {pid} that held it no longer runs",
                              stacklevel=2)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {host}\n")
            self._held = True
            return self
        raise OutputLockedError(f"could not take the lock {self.path}: another process keeps re-creating it")

    def release(self) -> None:
        """Remove the lock file when this process holds it."""
        if not self._held:
            return
        self._held = False
        pid, _ = self._holder()
        if pid == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
