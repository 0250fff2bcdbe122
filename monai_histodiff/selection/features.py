"""Feature extraction for centroid-based selective augmentation.

The selective augmentation of HistoDiffusion (after Xue et al., HistoGAN, MedIA 2021) compares synthetic tiles with
real tiles in the feature space of a trained classifier, and (Xue et al.) can also require that classifier to be
confident of the target class. This module turns a model and a stream of batches into one ``[N, D]`` matrix of
L2-normalised float32 features (plus the labels, when the batches carry them) and, with
:func:`extract_features_and_probs`, the classifier's softmax from the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["l2_normalize", "extract_features", "extract_features_and_probs"]


def l2_normalize(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row of a feature matrix to unit Euclidean norm.

    Args:
        features: ``[N, D]`` features (any float dtype; other shapes are flattened to ``[N, -1]``).
        eps: floor on the norm so an all-zero row stays zero instead of becoming NaN.

    Returns:
        ``[N, D]`` float32 tensor whose non-zero rows have norm 1.
    """
    features = torch.as_tensor(features).float()
    if features.ndim == 1:
        features = features.unsqueeze(0)
    features = features.reshape(features.shape[0], -1)
    return features / features.norm(p=2, dim=1, keepdim=True).clamp_min(eps)


def _split_batch(batch: Any, image_key: str, label_key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(images, labels or None)`` from a tensor, an ``(x, y, ...)`` sequence or a MONAI-style dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"batch dict has no image key {image_key!r}; keys: {sorted(batch)}.")
        return batch[image_key], batch.get(label_key)
    if isinstance(batch, Sequence) and len(batch) > 0:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"unsupported batch type {type(batch).__name__}; expected a tensor, a (x, y) sequence or a dict.")


def _default_feature_fn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call ``model.features(x)`` when the model defines it, otherwise the model's output."""
    features = getattr(model, "features", None)
    return features(x) if callable(features) else model(x)


def _default_logits_fn(model: torch.nn.Module, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Class logits: ``model.classify(features)`` when the model defines it (one pass, e.g. ``TileClassifier``),
    otherwise ``model(x)``."""
    classify = getattr(model, "classify", None)
    return classify(features) if callable(classify) else model(x)


def _run(
    model: torch.nn.Module,
    loader_or_batches: Iterable[Any],
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None,
    logits_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    device: str | torch.device | None,
    amp: bool,
    image_key: str,
    label_key: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Shared loop of :func:`extract_features` and :func:`extract_features_and_probs` (probs only with logits_fn)."""
    fn = feature_fn if feature_fn is not None else _default_feature_fn
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    feats: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=amp):
            for batch in loader_or_batches:
                x, y = _split_batch(batch, image_key, label_key)
                x = torch.as_tensor(x).to(device)
                out = fn(model, x)
                feats.append(out.detach().float().reshape(out.shape[0], -1).cpu())
                if logits_fn is not None:
                    logits = logits_fn(model, x, out).detach().float()
                    if logits.ndim != 2 or logits.shape[0] != out.shape[0]:
                        raise ValueError(f"class logits must be [B, K], got shape {tuple(logits.shape)}.")
                    probs.append(torch.softmax(logits, dim=1).cpu())
                if y is not None:
                    y = torch.as_tensor(y).detach().cpu()
                    y = y.argmax(dim=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1)
                    y = y.long()
                labels.append(y)
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("no batches to extract features from.")
    features = l2_normalize(torch.cat(feats, dim=0))
    all_probs = torch.cat(probs, dim=0) if logits_fn is not None else None
    with_labels = [y is not None for y in labels]
    if not any(with_labels):
        return features, None, all_probs
    if not all(with_labels):
        raise ValueError("some batches carry labels and some do not.")
    return features, torch.cat([y for y in labels if y is not None], dim=0), all_probs


def extract_features(
    model: torch.nn.Module,
    loader_or_batches: Iterable[Any],
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embed every image of a loader with a trained model, for centroid distances.

    The model is run in eval mode under ``torch.no_grad()``; its previous train/eval mode is restored afterwards.

    Args:
        model: the feature network (typically the trained tissue classifier).
        loader_or_batches: a ``DataLoader`` or any iterable of batches; a batch is an image tensor, an ``(x, y, ...)``
            sequence or a dict with ``image_key`` (and optionally ``label_key``).
        feature_fn: ``feature_fn(model, x) -> [B, ...]``; defaults to ``model.features(x)`` when that exists, else
            ``model(x)``. Outputs with more than two dims are flattened per sample.
        device: where to run the model; defaults to the device of the model's first parameter (CPU if none).
        amp: run under ``torch.autocast`` on that device; features are cast back to float32.
        image_key: image key for dict batches.
        label_key: label key for dict batches.

    Returns:
        ``(features, labels)``: ``[N, D]`` float32 L2-normalised features on CPU and ``[N]`` int64 labels on CPU, or
        ``None`` for labels when the batches carry none. Labels given one-hot (``[B, K]``) are converted by argmax.

    Raises:
        ValueError: when the iterable is empty, or only some batches carry labels.
    """
    features, labels, _ = _run(model, loader_or_batches, feature_fn, None, device, amp, image_key, label_key)
    return features, labels


def extract_features_and_probs(
    model: torch.nn.Module,
    loader_or_batches: Iterable[Any],
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    logits_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Like :func:`extract_features`, plus the classifier's class probabilities computed in the same loop.

    Selective augmentation (Xue et al. 2021) also asks the classifier trained on REAL tiles how confident it is of a
    synthetic tile's target class; this gives that softmax without a second pass over the data.

    Args:
        model: a classifier trained on real tiles.
        loader_or_batches: as for :func:`extract_features`.
        feature_fn: as for :func:`extract_features`.
        logits_fn: ``logits_fn(model, x, raw_features) -> [B, K]`` class logits; defaults to
            ``model.classify(raw_features)`` when the model defines ``classify`` (no second forward pass), otherwise
            ``model(x)``. ``raw_features`` is ``feature_fn``'s output before normalisation.
        device: as for :func:`extract_features`.
        amp: as for :func:`extract_features`; probabilities are computed in float32.
        image_key: image key for dict batches.
        label_key: label key for dict batches.

    Returns:
        ``(features, labels, probs)``: as :func:`extract_features`, plus ``[N, K]`` float32 softmax probabilities on
        CPU.

    Raises:
        ValueError: as :func:`extract_features`, or when the logits are not ``[B, K]``.
    """
    fn = logits_fn if logits_fn is not None else _default_logits_fn
    features, labels, probs = _run(model, loader_or_batches, feature_fn, fn, device, amp, image_key, label_key)
    assert probs is not None
    return features, labels, probs
