"""Log the learning rate to TensorBoard every iteration (MONAI's LrScheduleHandler only prints it)."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["LearningRateLogger"]


class LearningRateLogger:
    """Ignite handler writing ``<tag>/lr`` of the first parameter group to a TensorBoard ``SummaryWriter``."""

    def __init__(self, optimizer: torch.optim.Optimizer, summary_writer: Any, tag: str = "train",
                 interval: int = 1) -> None:
        self.optimizer = optimizer
        self.writer = summary_writer
        self.tag = tag
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self.writer is not None:
            self.writer.add_scalar(f"{self.tag}/lr", self.optimizer.param_groups[0]["lr"], engine.state.iteration)
