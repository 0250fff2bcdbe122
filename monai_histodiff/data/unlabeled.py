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

__all__ = ["PRETRAINING_SETTINGS", "sources_in", "unlabeled_datalist", "site_unlabeled_datalist",
           "pretraining_datalist", "format_source_counts", "source_counts"]

#: What a site pre-trains on: ``sources`` (the paper's setting: public sources that exclude the target set), ``site``
#: (the site's own unlabeled tiles, labels dropped, never a test group) or ``site+sources`` (both, with source weights).
PRETRAINING_SETTINGS = ("sources", "site", "site+sources")
SITE_PARTS = ("pool", "training", "validation")


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


def site_unlabeled_datalist(split: Mapping[str, Any], parts: Sequence[str] = SITE_PARTS,
                            source: str = "site") -> dict[str, Any]:
    """The site's own tiles as one unlabeled source: every tile of ``parts`` of its split, labels dropped.

    This is what a hospital has besides its few labels (Fig. 1 of the paper: the diffusion model learns from all its
    tiles, a GAN only from the labeled ones). The test part is never listed, and
    :func:`~monai_histodiff.data.split.check_outside_test` proves that no tile of a test group is (the run stops
    naming the group otherwise). Each tile keeps its ``group``.

    Args:
        split: the split datalist (:func:`~monai_histodiff.data.split.make_split`).
        parts: the parts listed; ``"test"`` is refused.
        source: the source's name in the listing and in the checkpoints' records.

    Returns:
        ``{"unlabeled": [{"image", "source", "sample_weight", ["group"]}], "sources": {source: {...}}}``, the form of
        :func:`unlabeled_datalist`.
    """
    from monai_histodiff.data.split import check_outside_test

    if "test" in parts:
        raise ValueError("the test part of a split is never pre-training data")
    items = [{"image": str(it["image"]), "source": source, "sample_weight": 1.0,
              **({"group": it["group"]} if it.get("group") not in (None, "") else {})}
             for part in parts for it in split.get(part) or []]
    if not items:
        raise ValueError(f"the split has no tiles in {list(parts)} to pre-train on")
    check_outside_test(items, split, "pre-training")
    return {"unlabeled": items, "sources": {source: {"folder": f"split parts {'+'.join(parts)}", "count": len(items),
                                                     "weight": None}}}


def pretraining_datalist(setting: str, split: Mapping[str, Any] | None = None,
                         sources: Mapping[str, str] | Sequence[str] | str | None = None,
                         site_weight: float = 0.5) -> dict[str, Any]:
    """The unlabeled listing of one pre-training setting (:data:`PRETRAINING_SETTINGS`), checked against the split.

    Args:
        setting: ``"sources"``, ``"site"`` or ``"site+sources"``.
        split: the site's split (needed by the site settings, and for the test-group check of every setting).
        sources: public source folders (:func:`unlabeled_datalist`'s ``sources``) for the settings that use them.
        site_weight: with ``"site+sources"``, the share of draws that go to the site's tiles (the rest to the sources,
            each of their tiles equally often).

    Returns:
        the listing (``unlabeled`` items with ``sample_weight``, ``sources``) plus ``"setting"``.

    Raises:
        ValueError: for an unknown setting, a missing input, a weight outside (0, 1), or a tile of a test group in
            the listing (:func:`~monai_histodiff.data.split.check_outside_test`; the group is named).
    """
    from monai_histodiff.data.split import check_outside_test

    if setting not in PRETRAINING_SETTINGS:
        raise ValueError(f"pre-training setting must be one of {list(PRETRAINING_SETTINGS)}, got {setting!r}")
    if setting != "sources" and split is None:
        raise ValueError(f"pre-training setting {setting!r} lists the site's tiles: give the split")
    if setting != "site" and not sources:
        raise ValueError(f"pre-training setting {setting!r} needs public source folders (unlabeled_dir)")
    if setting == "site":
        listing = site_unlabeled_datalist(split)
    elif setting == "sources":
        listing = unlabeled_datalist(sources, "size")
    else:
        if not 0.0 < site_weight < 1.0:
            raise ValueError(f"site_weight must be in (0, 1), got {site_weight}")
        site, public = site_unlabeled_datalist(split), unlabeled_datalist(sources, "size")
        n_site, n_public = len(site["unlabeled"]), len(public["unlabeled"])
        for it in site["unlabeled"]:
            it["sample_weight"] = site_weight / n_site
        for it in public["unlabeled"]:
            it["sample_weight"] = (1.0 - site_weight) / n_public
        info = {name: {**i, "weight": site_weight if name == "site" else (1.0 - site_weight) * i["count"] / n_public}
                for name, i in {**site["sources"], **public["sources"]}.items()}
        listing = {"unlabeled": site["unlabeled"] + public["unlabeled"], "sources": info}
    if split is not None:
        check_outside_test(listing["unlabeled"], split, "pre-training")
    return {**listing, "setting": setting}


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
