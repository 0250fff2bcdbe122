"""Argument checks shared by the two classifiers built on the autoencoder's encoder architecture."""

from __future__ import annotations

from collections.abc import Sequence

from monai.utils import ensure_tuple_rep

__all__ = ["check_encoder_args"]


def check_encoder_args(
    name: str,
    spatial_dims: int,
    num_classes: int,
    channels: Sequence[int],
    norm_num_groups: int,
    attention_levels: Sequence[bool] | None,
    num_res_blocks: int | Sequence[int],
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
    """Validate an encoder-style classifier's arguments; return ``(channels, attention_levels, num_res_blocks)`` as
    tuples with one entry per level. Errors name the class and the argument at fault."""
    if spatial_dims != 2:
        raise ValueError(f"{name} supports spatial_dims=2 only (AttentionPool2d), got {spatial_dims}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes}.")
    channels = tuple(channels)
    if len(channels) == 0:
        raise ValueError("channels must contain at least one level.")
    if any(c % norm_num_groups != 0 for c in channels):
        raise ValueError(f"every entry of channels {channels} must be divisible by norm_num_groups ({norm_num_groups}).")
    attention = (False,) * len(channels) if attention_levels is None else tuple(attention_levels)
    if len(attention) != len(channels):
        raise ValueError(f"attention_levels {attention} must have one entry per level of channels {channels}.")
    blocks = tuple(ensure_tuple_rep(num_res_blocks, len(channels)))
    if len(blocks) != len(channels):
        raise ValueError(f"num_res_blocks {blocks} must be an int or have one entry per level of channels.")
    return channels, attention, blocks
