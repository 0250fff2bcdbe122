"""Learning-rate warm-up for diffusion training, picklable so it resumes from a checkpoint."""

from __future__ import annotations

__all__ = ["LinearWarmup"]


class LinearWarmup:
    """LambdaLR factor rising linearly from ``1 / steps`` to 1 over ``steps`` iterations, then constant.

    Use with ``torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=LinearWarmup(steps))`` and MONAI's
    ``LrScheduleHandler(epoch_level=False)``.
    """

    def __init__(self, steps: int = 0) -> None:
        self.steps = int(steps)

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.steps)
