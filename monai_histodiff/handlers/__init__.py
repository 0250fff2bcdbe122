"""Ignite handlers: checkpoints with metadata, NaN guard, image grids, timestep accuracy, centroid selection."""

from __future__ import annotations

from monai_histodiff.handlers.checkpoint import (
    BestMetricCheckpoint,
    CheckpointMismatchError,
    StageCheckpointHandler,
    UnsafeCheckpointError,
    checkpoint_meta,
    convert_checkpoint,
    file_sha256,
    load_checkpoint,
    safe_torch_load,
    save_checkpoint,
    to_plain,
    state_digest,
    verify_parent,
)
from monai_histodiff.handlers.image_grid import ImageGridHandler, SampleGridHandler, make_grid, save_grid
from monai_histodiff.handlers.nan_guard import NaNGuard, check_finite, loss_terms
from monai_histodiff.handlers.scalars import LearningRateLogger

__all__ = [
    "BestMetricCheckpoint",
    "CheckpointMismatchError",
    "StageCheckpointHandler",
    "UnsafeCheckpointError",
    "checkpoint_meta",
    "convert_checkpoint",
    "file_sha256",
    "load_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "to_plain",
    "state_digest",
    "verify_parent",
    "ImageGridHandler",
    "SampleGridHandler",
    "make_grid",
    "save_grid",
    "NaNGuard",
    "check_finite",
    "loss_terms",
    "LearningRateLogger",
]

# --- latent classifier accuracy per timestep bucket ---
from monai_histodiff.handlers.timestep_accuracy import TimestepBucketAccuracy, plot_timestep_accuracy  # noqa: E402

__all__ += ["TimestepBucketAccuracy", "plot_timestep_accuracy"]
# --- end latent classifier accuracy per timestep bucket ---

# --- centroid-based selective augmentation ---
from monai_histodiff.handlers.selection import CentroidSelectionHandler  # noqa: E402

__all__ += ["CentroidSelectionHandler"]
# --- end centroid-based selective augmentation ---

# --- EMA with warm-up and its convergence record ---
from monai_histodiff.handlers.ema import (  # noqa: E402
    EMA_WARN_INITIAL_WEIGHT,
    WarmupEMAHandler,
    ema_initial_weight,
    ema_momentum,
    ema_summary_from_checkpoint,
    warn_if_unconverged,
)

__all__ += ["EMA_WARN_INITIAL_WEIGHT", "WarmupEMAHandler", "ema_initial_weight", "ema_momentum",
            "ema_summary_from_checkpoint", "warn_if_unconverged"]
# --- end EMA with warm-up ---

# --- the unconditional model against its training latents, at the end of pre-training ---
from monai_histodiff.handlers.sample_check import UnconditionalSampleCheck  # noqa: E402

__all__ += ["UnconditionalSampleCheck"]
# --- end unconditional sample check ---
