"""Errors a person can read: the project's own message is the last line a failed stage prints.

A stage run with ``python -m monai.bundle run`` evaluates its config's expressions; when one raises (a corrupt
checkpoint, a setting out of range, a tile in two class folders), MONAI wraps the project's exception in
``RuntimeError: Failed to evaluate ConfigExpression: ...`` and Python prints the whole chain, so the last line on the
screen is MONAI's. :func:`install_excepthook` (run when the package is imported, as every bundle config does) keeps
that full traceback (it is printed first, and so is in every stage log) and then prints one line:
``monai_histodiff: stage '<stage>' stopped: <the root cause's message>``. Set ``MONAI_HISTODIFF_DEBUG=1`` to get
Python's default output only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import TracebackType

__all__ = ["DEBUG_ENV", "PREFIX", "root_cause", "stage_from_argv", "summary_line", "install_excepthook"]

#: environment variable that turns the one-line summary off (Python's default output only)
DEBUG_ENV = "MONAI_HISTODIFF_DEBUG"
#: the prefix of the summary line (also how ``experiment`` finds it in a stage's log)
PREFIX = "monai_histodiff: "


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s ``__cause__`` / ``__context__`` chain: what actually went wrong."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def stage_from_argv(argv: Sequence[str]) -> str | None:
    """The stage of a ``python -m monai.bundle run --config_file "[..., 'bundles/<stage>.json', ...]"`` command: the
    last config file that is not a shared one (``common``, ``small``, ``multi_gpu``); None when there is none."""
    try:
        configs = argv[list(argv).index("--config_file") + 1]
    except (ValueError, IndexError):
        return None
    names = [os.path.splitext(os.path.basename(c.strip(" '\"[]")))[0] for c in configs.split(",")]
    stages = [n for n in names if n and n not in ("common", "small", "multi_gpu")]
    return stages[-1] if stages else None


def summary_line(exc: BaseException, stage: str | None = None, what: str = "stage") -> str:
    """``monai_histodiff: <what> '<stage>' stopped: <root cause type>: <its message, on one line>``."""
    cause = root_cause(exc)
    message = " ".join(str(cause).split()) or type(cause).__name__
    where = f"{what} '{stage}' stopped" if stage else "stopped"
    return f"{PREFIX}{where}: {type(cause).__name__}: {message}"


def _hook(previous):
    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        previous(kind, value, tb)
        if os.environ.get(DEBUG_ENV) or isinstance(value, KeyboardInterrupt):
            return
        try:
            print("\n" + summary_line(value, stage_from_argv(sys.argv)), file=sys.stderr, flush=True)
        except Exception:  # never hide the original error behind one of ours
            pass

    excepthook.monai_histodiff = True  # type: ignore[attr-defined]
    return excepthook


def install_excepthook() -> None:
    """Print :func:`summary_line` after the traceback of an uncaught exception in a bundle run (``python -m
    monai.bundle``); other programs keep their hook. Idempotent."""
    if getattr(sys.excepthook, "monai_histodiff", False):
        return
    if sys.argv[0].replace("\\", "/").split("/")[-3:-1] != ["monai", "bundle"]:  # python -m monai.bundle
        return
    sys.excepthook = _hook(sys.excepthook)
