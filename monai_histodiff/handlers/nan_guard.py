"""Stop a run at the first non-finite loss, naming the loss term and the iteration."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["NaNGuard", "check_finite", "loss_terms"]


def loss_terms(output: object) -> dict[str, float]:
    """The scalar entries of an engine output (``loss``, ``rec``, ``kl``, ``lr``...), for stats and TensorBoard.

    Works on our trainers' dict outputs and on MONAI's SupervisedTrainer output (``{"loss": tensor, ...}``), also
    after decollation (a list of per-item dicts: the first item carries the batch loss).
    """
    if isinstance(output, Sequence) and not isinstance(output, str) and output and isinstance(output[0], dict):
        output = output[0]
    if not isinstance(output, dict):
        return {"loss": float(output)} if isinstance(output, (int, float, torch.Tensor)) else {}
    terms = {}
    for k, v in output.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            terms[str(k)] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            terms[str(k)] = float(v.detach())
    return terms


def check_finite(terms: Mapping[str, torch.Tensor | float], stage: str, iteration: int, epoch: int | None = None,
                 stepped: bool = False) -> dict[str, float]:
    """
    The loss terms as floats, or ``FloatingPointError`` naming the first non-finite one: the one check of every
    trainer (before its optimizer step) and of :class:`NaNGuard` (after a MONAI trainer's step).

    Args:
        terms: loss terms by name (scalar tensors or numbers).
        stage: the stage, named in the message (e.g. ``pretrain_autoencoder``).
        iteration: the iteration, named in the message.
        epoch: the epoch, named in the message when given.
        stepped: whether the optimizer already stepped with this loss (the message says so when not).
    """
    values = {name: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for name, v in terms.items()}
    for name, value in values.items():
        if not math.isfinite(value):
            where = f"[{stage}] " if stage else ""
            when = f"iteration {iteration}" + (f" (epoch {epoch})" if epoch is not None else "")
            taken = "" if stepped else "no optimizer step was taken with it; "
            raise FloatingPointError(f"{where}loss term '{name}' is {value} at {when}; {taken}lower the learning rate, "
                                     f"disable AMP, or check the input data")
    return values


class NaNGuard:
    """Ignite handler raising ``FloatingPointError`` when any scalar loss term of an iteration is NaN or infinite.

    Args:
        stage: name used in the message (e.g. ``pretrain_diffusion``).
        keys: the terms to watch (default: every scalar term of the output except ``lr``).
    """

    def __init__(self, stage: str = "", keys: Sequence[str] | None = None) -> None:
        self.stage = stage
        self.keys = keys

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        terms = loss_terms(engine.state.output)
        watched = {k: terms[k] for k in self.keys or [k for k in terms if k != "lr"] if k in terms}
        check_finite(watched, self.stage, engine.state.iteration, engine.state.epoch, stepped=True)
