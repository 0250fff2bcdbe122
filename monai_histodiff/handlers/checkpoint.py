"""Self-describing checkpoints: periodic and final saves that resume, carry their config and their parents' hashes.

A checkpoint file is a dict ``{"state": {name: state_dict}, "engine": ignite engine state, "meta": {...}}`` where
``meta`` holds the stage, the settings it was trained with, class names, the latent scale factor (diffusion), the
sha256 of every checkpoint it was built on, and package / MONAI / torch versions. Every later stage loads its inputs
through :func:`load_checkpoint` and :func:`verify_parent`, so a diffusion model is never silently paired with the
wrong autoencoder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "file_sha256",
    "checkpoint_meta",
    "save_checkpoint",
    "load_checkpoint",
    "verify_parent",
    "StageCheckpointHandler",
    "BestMetricCheckpoint",
    "CheckpointMismatchError",
]


class CheckpointMismatchError(ValueError):
    """A checkpoint was built on a different parent checkpoint than the one given."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
        "config": dict(config or {}),
        "parents": {k: {"path": str(p), "sha256": file_sha256(p)} for k, p in (parents or {}).items()},
        "versions": {"monai_histodiff": monai_histodiff.__version__, "monai": monai.__version__,
                     "torch": torch.__version__},
    }
    meta.update(extra)
    return meta


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else obj


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], meta: Mapping[str, Any],
                    engine_state: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temporary file then rename): an interrupted save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state": {k: _unwrap(v).state_dict() if hasattr(_unwrap(v), "state_dict") else v for k, v in state.items()},
        "meta": dict(meta),
    }
    if engine_state is not None:
        payload["engine"] = dict(engine_state)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, stage: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; with ``stage``, check it came from that stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (f" (expected the output of stage '{stage}')"
                                                                    if stage else ""))
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "state" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path} is not a monai_histodiff checkpoint (no 'state'/'meta')")
    if stage is not None and ckpt["meta"].get("stage") != stage:
        raise ValueError(f"{path} was written by stage '{ckpt['meta'].get('stage')}', expected '{stage}'")
    ckpt["meta"]["path"] = str(path)
    return ckpt


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
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class StageCheckpointHandler:
    """Ignite handler: periodic and final checkpoints of a stage, resume with one flag, nothing lost on interrupt.

    Writes ``<save_dir>/last.pt`` every ``save_interval`` iterations and at every epoch end, ``<save_dir>/<final_name>``
    when training completes, and ``last.pt`` again when the run is interrupted (KeyboardInterrupt or another error,
    except a non-finite loss: weights that produced NaN are not saved over good ones). With ``resume=True`` the
    objects and the engine's epoch/iteration counters are restored from ``last.pt`` when the run starts, so training
    continues the iteration count instead of restarting. Only rank 0 writes files.

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

    @property
    def last_path(self) -> Path:
        return self.save_dir / "last.pt"

    def _meta(self) -> dict[str, Any]:
        m = self.meta() if callable(self.meta) else self.meta
        return dict(m or {})

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save_last)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._mark_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_final)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.on_exception)

    def load(self, engine: Engine) -> None:
        if not self.last_path.is_file():
            raise FileNotFoundError(f"resume=True but there is no checkpoint to resume from: {self.last_path}")
        ckpt = load_checkpoint(self.last_path)
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
        if not isinstance(e, FloatingPointError) and self._completed > 0:
            self._save(engine, self.last_path, iteration=self._completed)
            if _is_main_process():
                engine.logger.warning(f"run interrupted ({type(e).__name__}); progress saved to {self.last_path}")
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
            self.best = float(load_checkpoint(self.save_path)["meta"].get("best_metric", {}).get("value", self.best))

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
