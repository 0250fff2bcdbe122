"""The numeric settings a user can pass to a stage, each with its allowed range, checked before the stage does any work.

Every bundle calls :func:`check_settings` as the first entry of its ``initialize`` list with the numeric settings it
reads (``--ratio``, ``--num_inference_steps``, ``--lr``, ...). A bad value -- negative, zero where a count is needed,
a fraction above 1, a float where an integer is needed, a string -- stops the stage before it writes a split, reads a
checkpoint or opens an output folder, with every bad setting named beside its allowed range::

    generate: 2 settings outside their allowed range
      --guidance_scale=-1.0: a real number >= 0
      --num_inference_steps=0: an integer >= 1

One rule per setting name, the same in every stage (``batch_size`` means the same thing in all of them); the table
:data:`SETTING_RULES` is the one place to add a setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SettingRule", "SETTING_RULES", "InvalidSettingError", "check_settings"]


@dataclass(frozen=True)
class SettingRule:
    """The allowed values of one numeric setting.

    Args:
        low: smallest allowed value (None: unbounded).
        high: largest allowed value (None: unbounded).
        integer: whether only whole numbers are allowed.
        optional: whether None is allowed (the setting's "off" or "automatic" value).
        low_open: whether ``low`` itself is excluded.
        high_open: whether ``high`` itself is excluded.
        note: what the setting's None or bounds mean, appended to the message.
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    optional: bool = False
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and float(value) != int(value)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """The allowed range in words: ``an integer in [1, 100]``, ``a real number > 0``, ``None or ...``."""
        low, high = self.low, self.high
        kind = "an integer" if self.integer else "a real number"
        fmt = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        if low is not None and high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{fmt(low)}, {fmt(high)}{')' if self.high_open else ']'}"
        elif low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {fmt(low)}"
        elif high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {fmt(high)}"
        else:
            text = f"{kind}"
        text = f"None or {text}" if self.optional else text
        return f"{text} ({self.note})" if self.note else text


def _count(low: int = 1, optional: bool = False, note: str = "") -> SettingRule:
    return SettingRule(low=low, integer=True, optional=optional, note=note)


def _positive(optional: bool = False, note: str = "") -> SettingRule:
    return SettingRule(low=0, low_open=True, optional=optional, note=note)


def _non_negative(optional: bool = False, note: str = "") -> SettingRule:
    return SettingRule(low=0, optional=optional, note=note)


def _fraction(low_open: bool = False, high_open: bool = False, optional: bool = False, note: str = "") -> SettingRule:
    return SettingRule(low=0, high=1, low_open=low_open, high_open=high_open, optional=optional, note=note)


SETTING_RULES: dict[str, SettingRule] = {
    # data and splits
    "seed": _count(low=0),
    "image_size": _count(low=8),
    "latent_channels": _count(),
    "num_train_timesteps": _count(low=2, note="the diffusion schedule's T"),
    "label_fraction": _fraction(low_open=True),
    "label_per_class": _count(optional=True, note="None: use label_fraction"),
    "val_fraction": _fraction(high_open=True),
    "num_workers": _count(low=0),
    "latent_cache_shard_size": _count(note="tiles per latent cache shard"),
    # training length and logging
    "max_epochs": _count(),
    "epoch_length": _count(optional=True, note="None: one pass over the data"),
    "batch_size": _count(),
    "classifier_batch_size": _count(optional=True, note="None: batch_size"),
    "val_interval": _count(),
    "save_interval": _count(),
    "grid_interval": _count(),
    "sample_interval": _count(),
    "num_grid_samples": _count(),
    "num_check_samples": _count(low=0, note="0: no end-of-training check of the unconditional samples"),
    "grid_inference_steps": _count(),
    "num_buckets": _count(),
    # optimisation
    "lr": _positive(),
    "weight_decay": _non_negative(),
    "color_jitter": _fraction(note="per-channel scale and shift of the augmentation; 0: none"),
    "warmup_steps": _count(low=0),
    "ema_momentum": _fraction(low_open=True, note="1 - the EMA decay"),
    "scale_factor_batches": _count(),
    # loss weights
    "kl_weight": _non_negative(),
    "adv_weight": _non_negative(),
    "adv_start": _count(low=0),
    "perceptual_weight": _non_negative(),
    "ce_weight": _non_negative(),
    # generation (paper Eq. 7-8)
    "ratio": _positive(note="synthetic tiles per real tile of each class"),
    "num_inference_steps": _count(),
    "guidance_scale": _non_negative(note="0: no guidance"),
    "guidance_interval": _count(note="1: the guidance gradient at every guided step (the paper's)"),
    "eta": _fraction(note="0: DDIM, 1: DDPM-like noise"),
    "guidance_check_per_class": _count(low=0, note="0: no guidance check before the pool"),
    "cfg_scale": _non_negative(optional=True, note="classifier-free guidance w; 0: the null class, 1: the class as is"),
    "p_uncond": _fraction(note="share of labeled draws trained as the null class"),
    "labeled_share": _fraction(low_open=True, note="share of draws that are labeled tiles"),
    # the StyleGAN2 baseline (bundles/train_stylegan2.json, bundles/generate_stylegan2.json)
    "z_dim": _count(),
    "w_dim": _count(),
    "channel_base": _count(note="channels of resolution r: min(channel_base // r, channel_max)"),
    "channel_max": _count(),
    "mapping_layers": _count(),
    "r1_gamma": _non_negative(note="0: no R1 penalty"),
    "r1_interval": _count(note="iterations between R1 penalties"),
    "truncation_psi": _non_negative(note="1: no truncation, 0: the class-mean image"),
    # selection
    "percentile": SettingRule(low=0, high=100, low_open=True),
    "min_confidence": _fraction(optional=True, note="None: no confidence rule"),
    "pseudo_label_confidence": _fraction(note="the auxiliary classifier's probability a pseudo-label needs"),
    "min_fill": _fraction(),
    # evaluation
    "fd_num_samples": _count(low=2),
    # the Table 1 runner (python -m monai_histodiff experiment)
    "test_per_class": _count(optional=True, note="None: every labeled tile outside training and validation"),
    "generation_steps": _count(optional=True, note="None: the generate bundle's"),
    "downstream_steps": _count(optional=True, note="None: downstream_epochs over the baseline's training set"),
    "downstream_epochs": _count(optional=True, note="None: the bundle's"),
    "judge_epochs": _count(),
    "judge_steps": _count(),
    "sweep_per_class": _count(),
    "min_latent_margin": SettingRule(low=-1, high=1, high_open=True, note="-1: the check never stops the run"),
}


class InvalidSettingError(ValueError):
    """A stage setting outside its allowed range; the message names each such setting, its value and the range."""


def _check_counts(value: Any) -> str | None:
    """``counts``: None, a list of tile counts per class, or a ``{class name: count}`` mapping; each an integer >= 0."""
    if value is None:
        return None
    values = list(value.values()) if isinstance(value, Mapping) else value
    rule = _count(low=0)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(map(rule.accepts, values)):
        return "None, a list of integers >= 0 (one per class) or a {class: integer >= 0} mapping"
    return None


def _check_window(value: Any) -> str | None:
    """``guidance_window``: None or ``[t_min, t_max]``, integers with ``0 <= t_min <= t_max``."""
    if value is None:
        return None
    allowed = "None or [t_min, t_max], integers with 0 <= t_min <= t_max (timesteps of the diffusion schedule)"
    rule = SettingRule(low=0, integer=True)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        return allowed
    if not all(map(rule.accepts, value)) or value[0] > value[1]:
        return allowed
    return None


def check_settings(stage: str, **settings: Any) -> None:
    """Raise :class:`InvalidSettingError` naming every setting of ``stage`` outside its allowed range.

    Called first in each bundle's ``initialize``, so nothing is written before the check passes.

    Args:
        stage: the stage's name, for the message.
        settings: ``name=value`` for each numeric setting the stage reads; names must be in :data:`SETTING_RULES`
            (or be ``counts`` / ``guidance_window``).

    Raises:
        InvalidSettingError: one line per bad setting: ``--name=value: allowed range``.
        KeyError: a name with no rule (a bug in the bundle, not a user error).
    """
    problems = []
    for name, value in settings.items():
        if name == "counts":
            allowed = _check_counts(value)
        elif name == "guidance_window":
            allowed = _check_window(value)
        else:
            if name not in SETTING_RULES:
                raise KeyError(f"check_settings: no rule for setting {name!r}; add it to SETTING_RULES")
            rule = SETTING_RULES[name]
            allowed = None if rule.accepts(value) else rule.describe()
        if allowed is not None:
            problems.append(f"  --{name}={value!r}: {allowed}")
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise InvalidSettingError(f"{stage}: {len(problems)} setting{plural} outside the allowed range{plural}; "
                                  "nothing was run\n" + "\n".join(problems))
