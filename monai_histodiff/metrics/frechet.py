"""Frechet distance between real and synthetic tile features, overall and per class.

The paper reports FID (Table 1). FID is, by definition, the Frechet distance between Gaussian fits of Inception-v3
pool features; the same formula on any other extractor's features (e.g. the trained tissue classifier, a
histology foundation model) is a valid but *different* number and must not be called FID. Every result here is
therefore labelled ``"FD (<extractor_name>)"`` and additionally ``"FID"`` only when ``extractor_name`` names an
Inception network.

The distance itself is MONAI's :class:`monai.metrics.FIDMetric` (Gaussian fit with unbiased covariance and
``scipy.linalg.sqrtm``). FD depends on the number of samples (the covariance estimate is biased in its trace term),
so ``num_samples`` fixes the count used per set by seeded subsampling, making numbers comparable between runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from monai.config import NdarrayOrTensor
from monai.metrics import FIDMetric

__all__ = ["FrechetDistanceReport", "frechet_distance", "frechet_distance_report", "is_inception_extractor"]


def _as_features(x: NdarrayOrTensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)).double()
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}.")
    return t


def is_inception_extractor(extractor_name: str) -> bool:
    """Whether a feature extractor name denotes an Inception network (the only case where FD may be called FID)."""
    return "inception" in extractor_name.lower()


def frechet_distance(real_features: NdarrayOrTensor, synth_features: NdarrayOrTensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets, via MONAI's ``FIDMetric``.

    Args:
        real_features: ``[N, D]`` features of real tiles.
        synth_features: ``[M, D]`` features of synthetic tiles (same extractor).

    Returns:
        The distance as a Python float (>= 0 up to round-off).

    Raises:
        ValueError: when a set has fewer than 2 samples, the feature dims differ, or ``D < 2`` (MONAI's covariance
            squeezes a ``1 x 1`` matrix to a scalar).
    """
    real = _as_features(real_features, "real_features")
    synth = _as_features(synth_features, "synth_features")
    if real.shape[1] != synth.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs synthetic {synth.shape[1]}.")
    if real.shape[1] < 2:
        raise ValueError("MONAI's FIDMetric needs feature dim D >= 2.")
    if min(real.shape[0], synth.shape[0]) < 2:
        raise ValueError(f"need >= 2 samples per set, got real {real.shape[0]}, synthetic {synth.shape[0]}.")
    with warnings.catch_warnings():
        # MONAI 1.6 passes scipy.linalg.sqrtm(disp=False), deprecated since SciPy 1.16 (removed in 1.18)
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated.*", category=DeprecationWarning)
        return float(FIDMetric()(synth, real))


def _subsample(x: torch.Tensor, n: int | None, rng: np.random.Generator) -> torch.Tensor:
    if n is None or x.shape[0] <= n:
        return x
    return x[torch.from_numpy(np.sort(rng.choice(x.shape[0], size=n, replace=False)))]


@dataclass
class FrechetDistanceReport:
    """Overall and per-class Frechet distance of synthetic vs real features, with honest labelling.

    Attributes:
        metric_name: ``"FD (<extractor_name>)"``.
        is_fid: True only for Inception features; then ``aliases`` contains ``"FID"``.
        extractor_name: the feature extractor.
        overall: FD over all samples.
        num_real: real samples used overall.
        num_synth: synthetic samples used overall.
        per_class: ``{class_name: {"fd": float | None, "num_real", "num_synth", "reason": str | None}}``.
        num_samples: the requested count per set (None: all).
        seed: subsampling seed.
        aliases: other names this number may be reported under.
    """

    metric_name: str
    is_fid: bool
    extractor_name: str
    overall: float
    num_real: int
    num_synth: int
    per_class: dict[str, dict[str, Any]]
    num_samples: int | None = None
    seed: int = 0
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the report."""
        return asdict(self)


def frechet_distance_report(
    real_feats: NdarrayOrTensor,
    real_labels: NdarrayOrTensor,
    synth_feats: NdarrayOrTensor,
    synth_labels: NdarrayOrTensor,
    class_names: Sequence[str],
    extractor_name: str,
    num_samples: int | None = None,
    seed: int = 0,
) -> FrechetDistanceReport:
    """Compute FD overall and per class between real and synthetic features.

    With ``num_samples`` set, each set (real, synthetic) is subsampled to exactly ``num_samples`` rows (seeded) for
    the overall number; per class, each set is subsampled to ``min(num_samples, available)`` and the counts used are
    recorded. A class with fewer than 2 samples in either set gets ``fd=None`` and a ``reason``.

    Args:
        real_feats: ``[N, D]`` real features.
        real_labels: ``[N]`` real class indices.
        synth_feats: ``[M, D]`` synthetic features.
        synth_labels: ``[M]`` class each synthetic tile was generated for.
        class_names: ``K`` class names.
        extractor_name: name of the feature network, e.g. ``"inception_v3"`` or ``"resnet18-crc"``.
        num_samples: fixed number of samples per set; None uses everything.
        seed: subsampling seed.

    Returns:
        A :class:`FrechetDistanceReport`.

    Raises:
        ValueError: when ``num_samples`` exceeds a set's size (the overall number would not be comparable), or on
            the conditions of :func:`frechet_distance`.
    """
    real = _as_features(real_feats, "real_feats")
    synth = _as_features(synth_feats, "synth_feats")
    r_lab = torch.as_tensor(np.asarray(real_labels.cpu() if isinstance(real_labels, torch.Tensor) else real_labels))
    s_lab = torch.as_tensor(np.asarray(synth_labels.cpu() if isinstance(synth_labels, torch.Tensor) else synth_labels))
    r_lab, s_lab = r_lab.reshape(-1).long(), s_lab.reshape(-1).long()
    if r_lab.numel() != real.shape[0] or s_lab.numel() != synth.shape[0]:
        raise ValueError("labels and features disagree in length.")
    if num_samples is not None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}.")
        if min(real.shape[0], synth.shape[0]) < num_samples:
            raise ValueError(
                f"num_samples={num_samples} but only {real.shape[0]} real / {synth.shape[0]} synthetic samples."
            )
    rng = np.random.default_rng(seed)
    real_o, synth_o = _subsample(real, num_samples, rng), _subsample(synth, num_samples, rng)
    overall = frechet_distance(real_o, synth_o)

    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        rc = _subsample(real[r_lab == k], num_samples, rng)
        sc = _subsample(synth[s_lab == k], num_samples, rng)
        entry: dict[str, Any] = {"fd": None, "num_real": int(rc.shape[0]), "num_synth": int(sc.shape[0])}
        entry["reason"] = None
        if min(rc.shape[0], sc.shape[0]) < 2:
            entry["reason"] = f"fewer than 2 samples (real {rc.shape[0]}, synthetic {sc.shape[0]})"
        else:
            entry["fd"] = frechet_distance(rc, sc)
        per_class[str(name)] = entry

    fid = is_inception_extractor(extractor_name)
    return FrechetDistanceReport(
        metric_name=f"FD ({extractor_name})",
        is_fid=fid,
        extractor_name=extractor_name,
        overall=overall,
        num_real=int(real_o.shape[0]),
        num_synth=int(synth_o.shape[0]),
        per_class=per_class,
        num_samples=num_samples,
        seed=seed,
        aliases=["FID"] if fid else [],
    )
