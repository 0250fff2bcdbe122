"""At the end of diffusion pre-training: how far the unconditional samples are from the training latents."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_histodiff.data.atomic import atomic_write

__all__ = ["UnconditionalSampleCheck"]

logger = logging.getLogger(__name__)


class UnconditionalSampleCheck:
    """Ignite handler that, when training completes, samples latents from noise and compares them with the data.

    Writes ``output_file`` (:func:`~monai_histodiff.metrics.check_unconditional_latents`: per-channel mean and spread
    of sampled and training latents, the pooled-latent Frechet distance and its data-vs-data reference), logs the
    summary, warns with each finding when the model is far off (over-dispersed samples decode to saturated
    blotches that no guidance can steer), and adds TensorBoard scalars. Rank 0 only.

    Args:
        sampler: an object with ``latents(num_samples)`` (:class:`~monai_histodiff.engines.UnconditionalSampler`).
        data_latents: ``data_latents(num) -> [num, C, h, w]`` training latents in the same scaled space (e.g.
            ``LatentCache.sample_latents``), or None to skip the check (logged).
        output_file: the JSON file written.
        num_samples: latents sampled (the data side draws twice as many for the reference distance).
        summary_writer: optional TensorBoard writer.
        max_std_ratio: passed to :func:`~monai_histodiff.metrics.check_unconditional_latents`.
    """

    def __init__(self, sampler: Any, data_latents: Callable[[int], torch.Tensor] | None,
                 output_file: str | os.PathLike, num_samples: int = 64, summary_writer: Any = None,
                 max_std_ratio: float = 1.5) -> None:
        self.sampler = sampler
        self.data_latents = data_latents
        self.output_file = Path(output_file)
        self.num_samples = int(num_samples)
        self.writer = summary_writer
        self.max_std_ratio = max_std_ratio

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> dict[str, Any] | None:
        from monai_histodiff.engines.distributed import is_main_process  # not at import: engines imports handlers
        from monai_histodiff.metrics.latent_check import check_unconditional_latents

        if not is_main_process() or self.num_samples < 2:
            return None
        if self.data_latents is None:
            logger.info("unconditional sample check skipped: no training latents to compare with (latent cache off)")
            return None
        data = self.data_latents(2 * self.num_samples)
        num = min(self.num_samples, data.shape[0] // 2)  # a small data set: as many samples as its reference allows
        if num < 2:
            logger.info("unconditional sample check skipped: %d training latents are too few", data.shape[0])
            return None
        sampled = self.sampler.latents(num)
        result = check_unconditional_latents(sampled, data[: 2 * num], max_std_ratio=self.max_std_ratio)
        result["iteration"] = engine.state.iteration
        result["num_inference_steps"] = len(getattr(getattr(self.sampler, "scheduler", None), "timesteps", []))
        atomic_write(self.output_file, lambda p: p.write_text(json.dumps(result, indent=1)))
        spread = ", ".join(f"{a:.2f} vs {b:.2f}" for a, b in zip(result["sampled"]["std"], result["data"]["std"]))
        logger.info("unconditional samples at iteration %d: spread per channel (sampled vs data) %s; FD of pooled "
                    "latents %.3f (data vs data %.3f); %s", engine.state.iteration, spread, result["fd_pooled"],
                    result["fd_pooled_reference"], self.output_file)
        if result["warnings"]:
            logger.warning("the unconditional model is far from its training latents (%s): %s. Its samples will "
                           "decode to tiles unlike the data; train longer or check the learning rate before "
                           "adapting it.", self.output_file, "; ".join(result["warnings"]))
        if self.writer is not None:
            step = engine.state.iteration
            for c, r in enumerate(result["std_ratio"]):
                self.writer.add_scalar(f"sample_check/std_ratio_channel{c}", r, step)
            self.writer.add_scalar("sample_check/fd_pooled", result["fd_pooled"], step)
            self.writer.add_scalar("sample_check/fd_pooled_reference", result["fd_pooled_reference"], step)
        return result
