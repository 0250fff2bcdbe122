"""Unlabeled multi-source datalists for pre-training (the paper's S = {S_1, ..., S_M}).

Each source is a folder searched recursively. Sources can be weighted so that one big source does not drown the
others: every item carries a ``sample_weight`` (source weight / source size) that a
``torch.utils.data.WeightedRandomSampler`` turns into draws in proportion to the source weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_histodiff.data.datalist import IMAGE_EXTENSIONS, list_images

__all__ = ["sources_in", "unlabeled_datalist", "format_source_counts", "source_counts"]


def sources_in(parent: str | os.PathLike) -> dict[str, str]:
    """Treat each sub-folder of ``parent`` as one source; a folder with images directly inside is one source."""
    parent = Path(parent)
    if not parent.is_dir():
        raise FileNotFoundError(f"unlabeled data folder not found: {parent}")
    subs = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs or list_images(parent, recursive=False):
        return {parent.name: str(parent)}
    return {p.name: str(p) for p in subs}


def unlabeled_datalist(
    sources: Mapping[str, str] | Sequence[str] | str,
    weights: Mapping[str, float] | Sequence[float] | str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> dict[str, Any]:
    """List the images of M unlabeled sources.

    Args:
        sources: ``{name: folder}``, a list of folders (named by their base names), or one parent folder whose
            sub-folders are the sources.
        weights: relative share of draws per source: a mapping or a list in source order, ``"equal"`` (every
            source drawn equally often) or None (``"size"``: every image drawn equally often, big sources dominate).
        extensions: image file endings to accept.

    Returns:
        ``{"unlabeled": [{"image", "source", "sample_weight"}], "sources": {name: {"folder", "count", "weight"}}}``.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = sources_in(sources)
    elif not isinstance(sources, Mapping):
        sources = {Path(s).name: str(s) for s in sources}
    names = list(sources)
    if weights is None or weights == "size":
        w = {n: None for n in names}
    elif weights == "equal":
        w = {n: 1.0 for n in names}
    elif isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources are {names}")
        w = {n: float(weights.get(n, 1.0)) for n in names}
    else:
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} weights for {len(names)} sources {names}")
        w = dict(zip(names, map(float, weights)))
    items: list[dict[str, Any]] = []
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        files = list_images(sources[name], recursive=True, extensions=extensions)
        share = w[name]
        per_item = 1.0 if share is None else (share / len(files) if files else 0.0)
        items.extend({"image": os.path.abspath(f), "source": name, "sample_weight": per_item} for f in files)
        info[name] = {"folder": str(sources[name]), "count": len(files), "weight": share}
    if not items:
        raise ValueError(f"no images found in any source: {dict(sources)}")
    return {"unlabeled": items, "sources": info}


def format_source_counts(datalist: Mapping[str, Any]) -> str:
    """A small table of images per source and the share of draws each gets."""
    info = datalist["sources"]
    total_w = sum(i["count"] if i["weight"] is None else i["weight"] for i in info.values() if i["count"]) or 1.0
    lines = [f"{'source':32s} {'images':>8s} {'draw share':>10s}"]
    for name, i in info.items():
        share = (i["count"] if i["weight"] is None else i["weight"]) / total_w if i["count"] else 0.0
        lines.append(f"{name:32s} {i['count']:8d} {share:10.1%}")
    lines.append(f"{'total':32s} {sum(i['count'] for i in info.values()):8d}")
    return "\n".join(lines)


def source_counts(items: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Images per source of an unlabeled list (recorded in pre-training checkpoints)."""
    counts: dict[str, int] = {}
    for it in items:
        name = str(it.get("source", "unknown"))
        counts[name] = counts.get(name, 0) + 1
    return counts
