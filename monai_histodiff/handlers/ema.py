"""EMA of the diffusion model with the LDM / diffusers warm-up, and a record of how far it has moved from its start.

ignite's :class:`~ignite.handlers.EMAHandler` keeps ``ema = (1 - m) * ema + m * model`` with a constant momentum
``m`` (its optional warm-up is linear in ``m``). At the paper's decay 0.9999 (``m = 1e-4``) the EMA of a short run is
still mostly its random initialisation: after N updates that start keeps the weight ``prod(1 - m_t) = (1 - m)^N``,
0.76 after 2,700 updates, and samples drawn from it are noise. LDM (``LitEma``) and diffusers (``EMAModel``) warm the
decay up instead: ``decay_t = min(decay, (1 + t) / (10 + t))`` for the t-th update (t = 0, 1, ...), i.e.
``m_t = max(m, 9 / (10 + t))``, so the initialisation's share is ``1 / C(N + 9, 9)`` (below 1e-10 after 50 updates)
and the EMA reaches the constant decay after about ``9 / m`` updates.

:class:`WarmupEMAHandler` is ignite's handler with that schedule (the momentum it writes to ``engine.state`` before
each update follows the engine's iteration count, so a resumed run continues the schedule), and
:meth:`WarmupEMAHandler.summary` is the record kept in the diffusion checkpoint's ``meta["ema"]``.
:func:`warn_if_unconverged` is what every stage sampling from an EMA calls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events  # a requirement of the package (setup.py), and the base class below
from ignite.handlers import EMAHandler

__all__ = ["ema_momentum", "ema_initial_weight", "ema_summary_from_checkpoint", "warn_if_unconverged",
           "WarmupEMAHandler", "EMA_WARN_INITIAL_WEIGHT"]

EMA_WARN_INITIAL_WEIGHT = 0.1
"""Share of the random initialisation above which sampling from an EMA warns."""

_LEGACY_MOMENTUM = 1e-4  # the only EMA momentum bundles/pretrain_diffusion.json had before the warm-up (no record)


def ema_momentum(step: int, momentum: float, warmup: bool = True) -> float:
    """Momentum of the ``step``-th EMA update (0-based): ``max(momentum, 9 / (10 + step))`` with warm-up (LDM's
    ``decay_t = min(decay, (1 + t) / (10 + t))``), else ``momentum``."""
    return max(float(momentum), 9.0 / (10.0 + step)) if warmup else float(momentum)


def ema_initial_weight(num_updates: int, momentum: float, warmup: bool = True) -> float:
    """Weight the EMA still gives its initial (random) weights after ``num_updates`` updates: ``prod(1 - m_t)``."""
    n = max(0, int(num_updates))
    if not warmup:
        return (1.0 - float(momentum)) ** n
    # warm-up phase: prod_{t<k} (1 + t) / (10 + t) = 1 / C(k + 9, 9), then (1 - m) per update
    k = n if momentum <= 0 else min(n, max(0, math.ceil(9.0 / float(momentum) - 10.0)))
    log_share = -(math.lgamma(k + 10) - math.lgamma(k + 1) - math.lgamma(10))
    return math.exp(log_share) * (1.0 - float(momentum)) ** (n - k)


class WarmupEMAHandler(EMAHandler):
    """ignite ``EMAHandler`` whose momentum follows the LDM / diffusers warm-up ``max(momentum, 9 / (10 + t))``.

    Attach it to the trainer like ignite's handler (one update per iteration). Before each update it sets
    ``engine.state.<name>`` from the engine's iteration count (t = iteration - 1), then ignite's handler averages
    with it; after a resume the schedule continues where it stopped. ``warmup=False`` keeps ignite's constant
    momentum. :meth:`summary` gives the record saved in the checkpoint's ``meta["ema"]``.

    Args:
        model: the online model (DDP is unwrapped by ignite).
        momentum: the momentum after warm-up, ``1 - decay`` (LDM / the paper: 1e-4).
        warmup: use the warm-up.
        handle_buffers: as in ignite's ``EMAHandler``.
    """

    def __init__(self, model: torch.nn.Module, momentum: float = 1e-4, warmup: bool = True,
                 handle_buffers: str = "copy") -> None:
        super().__init__(model, momentum=momentum, handle_buffers=handle_buffers)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def attach(self, engine: Engine, name: str = "ema_momentum", warn_if_exists: bool = True,
               event: Any = None) -> None:
        event = Events.ITERATION_COMPLETED if event is None else event
        engine.add_event_handler(event, self._set_momentum, name)  # registered first: runs before the update
        super().attach(engine, name=name, warn_if_exists=warn_if_exists, event=event)

    def _set_momentum(self, engine: Engine, name: str) -> None:
        self.num_updates = int(engine.state.iteration)
        setattr(engine.state, name, ema_momentum(self.num_updates - 1, self.momentum, self.warmup))

    def summary(self) -> dict[str, Any]:
        """``{"num_updates", "momentum", "warmup", "initial_weight"}``: how converged the EMA is."""
        return {"num_updates": self.num_updates, "momentum": float(self.momentum), "warmup": self.warmup,
                "initial_weight": ema_initial_weight(self.num_updates, self.momentum, self.warmup)}


def ema_summary_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The EMA record of a diffusion checkpoint: ``meta["ema"]``, or for checkpoints written before it existed, an
    estimate from the saved iteration count at the former constant momentum 1e-4 without warm-up (None when the
    checkpoint holds no EMA or no iteration count)."""
    if "ema" not in ckpt.get("state", {}):
        return None
    record = ckpt.get("meta", {}).get("ema")
    if record:
        return dict(record)
    iteration = ckpt.get("engine", {}).get("iteration")
    if iteration is None:
        return None
    momentum = float(ckpt.get("meta", {}).get("config", {}).get("ema_momentum", _LEGACY_MOMENTUM))
    return {"num_updates": int(iteration), "momentum": momentum, "warmup": False, "estimated": True,
            "initial_weight": ema_initial_weight(int(iteration), momentum, warmup=False)}


def warn_if_unconverged(summary: Mapping[str, Any] | None, source: str,
                        threshold: float = EMA_WARN_INITIAL_WEIGHT) -> bool:
    """Warn (``UserWarning``) when an EMA still holds more than ``threshold`` of its random initialisation.

    Args:
        summary: an EMA record (:meth:`WarmupEMAHandler.summary` or :func:`ema_summary_from_checkpoint`), or None.
        source: what the EMA belongs to, for the message (a checkpoint path, "the EMA being trained").
        threshold: the share of the initialisation above which to warn.

    Returns:
        whether it warned.
    """
    if not summary or float(summary.get("initial_weight", 0.0)) <= threshold:
        return False
    share = float(summary["initial_weight"])
    how = " (estimated from the iteration count; no EMA warm-up)" if summary.get("estimated") else ""
    warnings.warn(f"the EMA of {source} still holds {100 * share:.0f}% of its random initialisation after "
                  f"{summary.get('num_updates')} updates{how}: sample with --use_ema False or train longer",
                  UserWarning, stacklevel=2)
    return True
