"""Self-describing checkpoints: periodic and final saves that resume, carry their config and their parents' hashes.

A checkpoint file is a dict ``{"state": {name: state_dict}, "engine": ignite engine state, "meta": {...}}`` where
``meta`` holds the stage, the settings it was trained with, class names, the latent scale factor (diffusion), the
sha256 of every checkpoint it was built on, and package / MONAI / torch versions. Every later stage loads its inputs
through :func:`load_checkpoint` and :func:`verify_parent`, so a diffusion model is never silently paired with the
wrong autoencoder.

Checkpoints travel between sites, so they are data, never code: files are written with tensors and plain values only
(:func:`to_plain`, checked after each write) and read with ``torch.load(..., weights_only=True)``
(:func:`safe_torch_load`). A file that would need arbitrary unpickling is refused before anything in it runs
(:class:`UnsafeCheckpointError`); :func:`convert_checkpoint` rewrites a trusted one as a plain file. A truncated or
corrupt file (a copy cut short) raises :class:`~monai_histodiff.data.validation.CorruptFileError` naming it and the
stage to rerun, and a save that runs out of disk space names the file and keeps the previous one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.utils import min_version, optional_import

from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.validation import REMEDY_RERUN, CorruptFileError

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "file_sha256",
    "to_plain",
    "checkpoint_meta",
    "save_checkpoint",
    "safe_torch_load",
    "load_checkpoint",
    "convert_checkpoint",
    "verify_parent",
    "StageCheckpointHandler",
    "BestMetricCheckpoint",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "state_digest",
]

CONVERT_COMMAND = "python -m monai_histodiff convert-checkpoint"


class CheckpointMismatchError(ValueError):
    """A checkpoint was built on a different parent checkpoint than the one given."""


class UnsafeCheckpointError(ValueError):
    """A file holds objects that only arbitrary unpickling (which can run code from the file) would rebuild."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def to_plain(value: Any, key: str = "value") -> Any:
    """``value`` as tensors and plain values only (numbers, strings, lists, tuples, dicts, None), which
    ``torch.load(..., weights_only=True)`` reads back without running code.

    ``Path`` becomes ``str``, numpy scalars and arrays Python numbers and lists, ``torch.dtype`` / ``torch.device``
    their names, subclasses of plain types (enums, ``OrderedDict``) the plain type; an ``OrderedDict`` is kept (it
    is safe and carries a module state dict's ``_metadata``).

    Args:
        value: the object to convert.
        key: its name, used in errors (nested keys are appended, e.g. ``meta['config']['lr']``).

    Raises:
        TypeError: naming the key, for anything else (a class instance, a function, a set, ...).
    """
    if value is None or type(value) in (bool, int, float, str, bytes) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):  # e.g. a MONAI StrEnum member: its plain value
        return str.__str__(value)
    if isinstance(value, float):  # also numpy.float64
        return float(value)
    if isinstance(value, int):  # e.g. an IntEnum member
        return int(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, Mapping):
        items = {}
        for k, v in value.items():
            if k is not None and type(k) not in (bool, int, float, str):
                raise TypeError(f"{key} has a key of type {type(k).__name__} ({k!r}): checkpoints hold only plain "
                                f"keys (str, int, float, bool)")
            items[k] = to_plain(v, f"{key}[{k!r}]")
        if isinstance(value, OrderedDict):
            out = OrderedDict(items)
            if hasattr(value, "_metadata"):
                out._metadata = to_plain(value._metadata, f"{key}._metadata")  # type: ignore[attr-defined]
            return out
        return items
    if isinstance(value, (list, tuple)):  # a namedtuple becomes a plain tuple
        items = [to_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{key} is a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}): checkpoints "
                    f"hold only tensors and plain values (numbers, strings, lists, tuples, dicts, None), so that "
                    f"another site can load them without running code; convert it to one of those")


def _save_plain(obj: Any, path: Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, refusing (and removing) a file that ``weights_only`` loading
    could not read."""
    def write(tmp: Path) -> None:
        torch.save(obj, tmp)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"not writing {path}: it would hold {sorted(unsafe)}, which another site could only load "
                            f"by running code from the file; save tensors and plain values only")

    return atomic_write(path, write)


def safe_torch_load(path: str | os.PathLike, reader: str, map_location: Any = "cpu", remedy: str = REMEDY_RERUN) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain values only, nothing in the file runs.

    Args:
        path: the file.
        reader: what is reading it (the stage or step), named in the error.
        map_location: as for ``torch.load``.
        remedy: what to do when the file is truncated or corrupt, named in the error.

    Raises:
        UnsafeCheckpointError: naming the file and ``reader``, when the file holds objects that only arbitrary
            unpickling would rebuild (a class instance, a ``__reduce__`` payload, a TorchScript archive, ...).
        CorruptFileError: naming the file, ``reader`` and ``remedy``, when the file is truncated, empty or not a torch
            file at all (torch reports these as ``EOFError``, ``OSError``, ``KeyError``, archive ``RuntimeError``...).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e)
        if not _UNSAFE.search(reason):  # e.g. "Unsupported operand 92": bytes that are no pickle stream
            found = re.search(r"WeightsUnpickler error:\s*(.+)", reason)
            raise CorruptFileError(path, reader, remedy, found.group(1) if found else reason) from None
    except RuntimeError as e:
        if "weights_only" not in str(e):
            if _ARCHIVE_ERROR.search(str(e)):
                raise CorruptFileError(path, reader, remedy, f"{type(e).__name__}: {e}") from None
            raise
        reason = str(e)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (EOFError, OSError, KeyError, ValueError, IndexError, struct.error) as e:
        raise CorruptFileError(path, reader, remedy, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) \
            from None
    found = re.search(r"GLOBAL (\S+) was not an allowed global", reason)
    detail = f"it refers to {found.group(1)}" if found else (reason.strip().splitlines() or [""])[0][:200]
    raise UnsafeCheckpointError(
        f"refused to load {path} (read by {reader}): it holds objects that only full unpickling can rebuild, and "
        f"full unpickling can run code from the file ({detail}). monai_histodiff reads checkpoints, caches and "
        f"state files with weights_only=True. If the file comes from a source you trust (e.g. written by an older "
        f"version), convert it once: {CONVERT_COMMAND} {path} <converted.pt> --trust-source-and-run-its-code"
    ) from None


#: torch's words for a file that needs code to rebuild (as opposed to one that is broken).
_UNSAFE = re.compile(r"allowed global|Unsupported global|Unsupported class|TorchScript")
#: torch's words for a broken zip archive (truncated, or not a torch file).
_ARCHIVE_ERROR = re.compile(r"PytorchStreamReader|zip archive|central directory|inline_container|corrupted")


def checkpoint_meta(stage: str, config: Mapping[str, Any] | None = None, parents: Mapping[str, str] | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The ``meta`` block of a checkpoint.

    Args:
        stage: the stage that wrote it (``pretrain_autoencoder``, ``pretrain_diffusion``, ...).
        config: the settings the stage ran with (network arguments, image size, ...), plain JSON-like values.
        parents: ``{name: path}`` of the checkpoints this one was built on; their sha256 is recorded.
        extra: anything else (``classes``, ``scale_factor``, ...).
    """
    import monai

    import monai_histodiff

    meta: dict[str, Any] = {
        "stage": stage,
        "config": to_plain(dict(config or {}), "meta['config']"),
        "parents": {k: {"path": str(p), "sha256": file_sha256(p)} for k, p in (parents or {}).items()},
        "versions": {"monai_histodiff": monai_histodiff.__version__, "monai": monai.__version__,
                     "torch": torch.__version__},
    }
    meta.update(to_plain(extra, "meta"))
    return meta


def _unwrap(obj: Any) -> Any:
    from monai_histodiff.engines.distributed import unwrap_model  # not at import: engines imports handlers

    return unwrap_model(obj)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], meta: Mapping[str, Any],
                    engine_state: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temporary file then rename): an interrupted save never leaves a broken file.

    ``meta`` and ``engine_state`` go through :func:`to_plain`; the written file is checked to load with
    ``weights_only=True`` (a ``TypeError`` naming the key or the offending type otherwise, and no file written).
    """
    payload = {
        "state": {k: _unwrap(v).state_dict() if hasattr(_unwrap(v), "state_dict") else v for k, v in state.items()},
        "meta": to_plain(dict(meta), "meta"),
    }
    if engine_state is not None:
        payload["engine"] = to_plain(dict(engine_state), "engine state")
    return _save_plain(payload, Path(path))


def load_checkpoint(path: str | os.PathLike, stage: str | None = None, map_location: Any = "cpu",
                    reader: str | None = None, remedy: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; with ``stage``, check it came from that stage.

    The file is read with ``weights_only=True``: one that would need arbitrary unpickling raises
    :class:`UnsafeCheckpointError` (naming the file and ``reader``) before anything in it runs; a truncated or
    corrupt one raises :class:`CorruptFileError` naming the file and the stage to rerun.

    Args:
        path: the checkpoint.
        stage: the stage expected to have written it.
        map_location: as for ``torch.load``.
        reader: the stage or step reading it, named in errors (with ``stage``).
        remedy: what to do when the file is corrupt; default: delete it and rerun ``stage`` (or the stage that
            writes it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (f" (expected the output of stage '{stage}')"
                                                                    if stage else ""))
    reader = ", ".join([reader or "load_checkpoint", *([f"expecting the output of stage '{stage}'"] if stage else [])])
    if remedy is None:
        remedy = f"delete it and rerun stage '{stage}', which writes it (or copy it again, if it came from elsewhere)" \
            if stage else REMEDY_RERUN
    ckpt = safe_torch_load(path, reader, map_location=map_location, remedy=remedy)
    if not isinstance(ckpt, dict) or "state" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path} is not a monai_histodiff checkpoint (no 'state'/'meta')")
    if stage is not None and ckpt["meta"].get("stage") != stage:
        raise ValueError(f"{path} was written by stage '{ckpt['meta'].get('stage')}', expected '{stage}'")
    ckpt["meta"]["path"] = str(path)
    return ckpt


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, trust_source: bool = False) -> Path:
    """Rewrite ``src`` as ``dst`` holding tensors and plain values only, so that it loads with ``weights_only=True``.

    For a file written by an older version or another tool. A file that already loads safely is read safely. One
    that does not is read with full unpickling only when ``trust_source`` is true, after a warning: that runs any
    code the file holds, so do it only for a file whose origin you trust. ``src`` is never modified.

    Args:
        src: the file to convert.
        dst: the converted file to write (not ``src``).
        trust_source: allow full unpickling (``weights_only=False``) of ``src``.

    Raises:
        UnsafeCheckpointError: ``src`` needs full unpickling and ``trust_source`` is false.
        TypeError: naming the key, when ``src`` holds a value :func:`to_plain` cannot convert.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no file to convert: {src}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"convert {src} into another file: the original is kept until the converted one is checked")
    try:
        obj = safe_torch_load(src, "convert-checkpoint")
    except UnsafeCheckpointError:
        if not trust_source:
            raise UnsafeCheckpointError(
                f"{src} can only be read with full unpickling, which runs code from the file: convert-checkpoint does "
                f"that only when asked ({CONVERT_COMMAND} {src} {dst} --trust-source-and-run-its-code, or "
                f"trust_source=True), and only for a file from a source you trust"
            ) from None
        warnings.warn(f"loading {src} with full unpickling (weights_only=False): this runs any code the file holds",
                      stacklevel=2)
        obj = torch.load(src, map_location="cpu", weights_only=False)
    return _save_plain(to_plain(obj, src.name), dst)


def verify_parent(child: Mapping[str, Any], name: str, parent_path: str | os.PathLike) -> None:
    """Check that checkpoint ``child`` was built on the file ``parent_path`` (by sha256); raise naming both files."""
    recorded = child["meta"].get("parents", {}).get(name)
    if recorded is None:
        raise CheckpointMismatchError(f"{child['meta'].get('path', 'checkpoint')} records no parent '{name}'")
    actual = file_sha256(parent_path)
    if recorded["sha256"] != actual:
        raise CheckpointMismatchError(
            f"{child['meta'].get('path', 'checkpoint')} was built on {name} {recorded['path']} "
            f"(sha256 {recorded['sha256'][:12]}), but {parent_path} has sha256 {actual[:12]}: "
            f"use the {name} checkpoint it was trained with, or retrain it"
        )


def _is_main_process() -> bool:
    from monai_histodiff.engines.distributed import is_main_process  # not at import: engines imports handlers

    return is_main_process()


class StageCheckpointHandler:
    """Ignite handler: periodic and final checkpoints of a stage, resume with one flag, nothing lost on interrupt.

    Writes ``<save_dir>/last.pt`` every ``save_interval`` iterations and at every epoch end, ``<save_dir>/<final_name>``
    when training completes, and ``last.pt`` again when the run is interrupted (KeyboardInterrupt or another error,
    except a non-finite loss: weights that produced NaN are not saved over good ones). With ``resume=True`` the
    objects and the engine's epoch/iteration counters are restored from ``last.pt`` when the run starts, so training
    continues the iteration count instead of restarting. Only rank 0 writes files. From start to end (or failure) the
    run holds ``<save_dir>/.lock`` (:class:`~monai_histodiff.engines.locking.OutputLock`): a second run of the stage
    into the same folder stops at its start with a message naming the holder's pid, never two writers on one file.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: ``{name: object with state_dict()}`` (networks, optimizers, schedulers, EMA models, ...).
        meta: the checkpoint ``meta`` block, or a callable returning it (evaluated at save time, e.g. to include a
            scale factor computed at run start).
        final_name: file name of the final checkpoint that later stages read (e.g. ``autoencoder.pt``).
        save_interval: also save every N iterations (0: only at epoch ends).
        resume: restore from ``last.pt`` at start; an error when there is none.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        final_name: str = "final.pt",
        save_interval: int = 0,
        resume: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.meta = meta
        self.final_name = final_name
        self.save_interval = int(save_interval)
        self.resume = resume
        self._completed = 0  # last iteration whose update finished (ignite counts an iteration when it starts)
        self._lock = None

    @property
    def last_path(self) -> Path:
        return self.save_dir / "last.pt"

    def _meta(self) -> dict[str, Any]:
        m = self.meta() if callable(self.meta) else self.meta
        return dict(m or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.acquire_lock)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save_last)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._mark_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_final)
        engine.add_event_handler(Events.COMPLETED, self.release_lock)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.on_exception)

    def acquire_lock(self, engine: Engine) -> None:
        """Take ``<save_dir>/.lock`` on rank 0 (the rank that writes); raises ``OutputLockedError`` naming the pid
        of a live run holding it, takes over the lock of a run that was killed."""
        from monai_histodiff.engines.locking import OutputLock

        if _is_main_process() and self._lock is None:
            stage = self.meta.get("stage") if isinstance(self.meta, Mapping) else None
            self._lock = OutputLock(self.save_dir, owner=f"stage {stage!r}" if stage else "this training run").acquire()

    def release_lock(self, engine: Engine | None = None) -> None:
        """Give the lock back (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def load(self, engine: Engine) -> None:
        if not self.last_path.is_file():
            raise FileNotFoundError(f"resume=True but there is no checkpoint to resume from: {self.last_path}")
        stage = self.meta.get("stage") if isinstance(self.meta, Mapping) else None
        ckpt = load_checkpoint(self.last_path, reader=f"resume=True{f' of stage {stage!r}' if stage else ''} "
                                                      f"(restoring the run saved in {self.save_dir})",
                               remedy="restore it from a copy, or delete it and rerun without resume=True (the stage "
                                      "starts over)")
        for name, obj in self.save_dict.items():
            if name not in ckpt["state"]:
                raise KeyError(f"{self.last_path} has no '{name}' to resume (has {sorted(ckpt['state'])})")
            _unwrap(obj).load_state_dict(ckpt["state"][name])
        if "engine" in ckpt:
            state = {k: v for k, v in ckpt["engine"].items() if k != "epoch"}  # ignite derives it from iteration
            state["max_epochs"] = engine.state.max_epochs  # a resumed run may extend training
            engine.load_state_dict(state)
            self._completed = engine.state.iteration
        engine.logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch}, "
                           f"iteration {engine.state.iteration}")

    def _mark_completed(self, engine: Engine) -> None:
        self._completed = engine.state.iteration

    def _save(self, engine: Engine, path: Path, iteration: int | None = None) -> None:
        if _is_main_process():
            state = {**engine.state_dict(), "epoch": engine.state.epoch}
            if iteration is not None:
                state["iteration"] = iteration
                state["epoch"] = iteration // max(1, engine.state.epoch_length or 1)
            save_checkpoint(path, self.save_dict, self._meta(), state)

    def save_last(self, engine: Engine) -> None:
        self._save(engine, self.last_path)

    def save_final(self, engine: Engine) -> None:
        self._save(engine, self.last_path)
        self._save(engine, self.save_dir / self.final_name)
        if _is_main_process():
            engine.logger.info(f"final checkpoint: {self.save_dir / self.final_name}")

    def on_exception(self, engine: Engine, e: Exception) -> None:
        try:
            if not isinstance(e, FloatingPointError) and self._completed > 0:  # 0 also when the lock was refused
                self._save(engine, self.last_path, iteration=self._completed)
                if _is_main_process():
                    engine.logger.warning(f"run interrupted ({type(e).__name__}); progress saved to {self.last_path}")
        finally:
            self.release_lock()
        raise e


class BestMetricCheckpoint:
    """Ignite handler for an evaluator: save the stage's artifact whenever the key metric improves.

    Attach it to the validation evaluator (``validate#handlers``); it reads ``engine.state.metrics[metric_name]`` at
    the end of each validation run and writes ``save_path`` (with the metric and epoch in ``meta``) when it is the
    best so far. Validation data come from the training subset only, so the test set never selects a model.

    Args:
        save_path: the checkpoint later stages read (e.g. ``aux_classifier.pt``).
        save_dict: ``{name: object with state_dict()}``.
        meta: the ``meta`` block or a callable returning it.
        metric_name: the key metric in the evaluator's metrics.
        resume: start from the best value recorded in an existing ``save_path``.
    """

    def __init__(self, save_path: str | os.PathLike, save_dict: Mapping[str, Any],
                 meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                 metric_name: str = "val_acc", resume: bool = False) -> None:
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.meta = meta
        self.metric_name = metric_name
        self.best = -float("inf")
        if resume and self.save_path.is_file():  # a resumed run only replaces the best file with a better one
            best = load_checkpoint(self.save_path, reader="resume=True (reading the best metric so far)")["meta"]
            self.best = float(best.get("best_metric", {}).get("value", self.best))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise KeyError(f"metric '{self.metric_name}' not computed by the evaluator (has {sorted(engine.state.metrics)})")
        value = float(engine.state.metrics[self.metric_name])
        if value <= self.best:
            return
        self.best = value
        if _is_main_process():
            meta = dict((self.meta() if callable(self.meta) else self.meta) or {})
            # MONAI's ValidationHandler runs the evaluator with the trainer's epoch
            meta["best_metric"] = {"name": self.metric_name, "value": value, "epoch": engine.state.epoch}
            save_checkpoint(self.save_path, self.save_dict, meta)
            engine.logger.info(f"new best {self.metric_name} = {value:.4f}: saved {self.save_path}")


def state_digest(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a network's parameters and buffers, in ``state_dict`` order.

    Recorded in a checkpoint's ``meta`` right after the network is built, it shows that two runs started from the same
    initial weights (the experiment runner checks it across the rows of a seed).
    """
    h = hashlib.sha256()
    for name, value in _unwrap(module).state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
