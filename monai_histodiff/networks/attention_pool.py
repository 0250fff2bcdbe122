"""CLIP-style attention pooling, the layer HistoDiffusion adds before the output layer of its classifiers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep

__all__ = ["AttentionPool2d"]


class AttentionPool2d(nn.Module):
    """
    CLIP-style attention pooling of a 2D feature map into one vector (Radford et al., "Learning Transferable Visual
    Models From Natural Language Supervision", ICML 2021, the reference [25] of HistoDiffusion).

    HistoDiffusion (Ye et al., MICCAI 2023, Sec. 3 "Model Implementation") builds both the time-dependent latent
    classifier and the auxiliary image classifier as "the encoder architecture of the LAE and an additional attention
    pooling layer added before the output layer"; this module is that layer. MONAI has no equivalent block, so it is
    written here.

    The feature map ``(B, C, H, W)`` is flattened into ``H * W`` tokens, the mean token is prepended, a learned
    positional embedding of length ``H * W + 1`` is added, and one multi-head attention step
    (:class:`torch.nn.MultiheadAttention`) is run with the mean token as the only query and all tokens as keys and
    values. The attended mean token is the pooled feature (:meth:`forward_features`), which a final linear layer
    projects to ``output_dim`` (:meth:`forward`).

    Input sizes other than ``spatial_size``: the positional embedding is learned on a ``spatial_size`` grid. When the
    input map has another spatial size, the grid part of the embedding is resampled to the input's size with bicubic
    interpolation (the mean-token entry is kept as is), so one network can be applied to tiles or latents of several
    sizes. The stored parameter is never changed; results at a size far from the training size are, as for any
    interpolated positional embedding, only as good as the network's tolerance to that resampling.

    Args:
        spatial_size: spatial size ``(H, W)`` of the input feature map the positional embedding is created for; an
            int means a square map.
        embed_dim: number of channels ``C`` of the input feature map, also the attention width.
        num_heads: number of attention heads; ``embed_dim`` must be divisible by it.
        output_dim: size of the output vector (for a classifier, the number of classes). Defaults to ``embed_dim``.

    Example::

        pool = AttentionPool2d(spatial_size=16, embed_dim=128, num_heads=4, output_dim=9)
        logits = pool(torch.randn(2, 128, 16, 16))  # (2, 9)
        feats = pool.forward_features(torch.randn(2, 128, 8, 8))  # (2, 128), positional embedding interpolated
    """

    def __init__(
        self, spatial_size: int | Sequence[int], embed_dim: int, num_heads: int, output_dim: int | None = None
    ) -> None:
        super().__init__()
        size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, 2))
        if len(size) != 2 or any(s < 1 for s in size):
            raise ValueError(
                f"spatial_size must be a positive int or a sequence of 2 positive ints, got {spatial_size}."
            )
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads}) in AttentionPool2d."
            )
        self.spatial_size: tuple[int, int] = (size[0], size[1])
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.output_dim = embed_dim if output_dim is None else output_dim

        # same initialisation as CLIP's ModifiedResNet attention pool
        self.positional_embedding = nn.Parameter(torch.randn(size[0] * size[1] + 1, embed_dim) / embed_dim**0.5)
        self.attention = nn.MultiheadAttention(embed_dim=embed_dim, num_heads=num_heads, batch_first=True)
        self.c_proj = nn.Linear(embed_dim, self.output_dim)

    def get_positional_embedding(self, spatial_size: Sequence[int]) -> torch.Tensor:
        """
        Positional embedding ``(H * W + 1, embed_dim)`` for an input map of spatial size ``(H, W)``, bicubically
        resampled from the learned ``spatial_size`` grid when the sizes differ (the mean-token entry is unchanged).

        Args:
            spatial_size: spatial size ``(H, W)`` of the input feature map.
        """
        h, w = int(spatial_size[0]), int(spatial_size[1])
        if (h, w) == self.spatial_size:
            return self.positional_embedding
        mean_pos, grid_pos = self.positional_embedding[:1], self.positional_embedding[1:]
        grid_pos = grid_pos.reshape(1, self.spatial_size[0], self.spatial_size[1], self.embed_dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(h * w, self.embed_dim)
        return torch.cat([mean_pos, grid_pos], dim=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """
        Pooled features before the output projection, i.e. the attended mean token.

        Args:
            x: feature map of shape ``(B, embed_dim, H, W)``.

        Returns:
            tensor of shape ``(B, embed_dim)``.
        """
        if x.ndim != 4 or x.shape[1] != self.embed_dim:
            raise ValueError(
                f"AttentionPool2d expects an input of shape (B, {self.embed_dim}, H, W), got {tuple(x.shape)}."
            )
        tokens = x.flatten(start_dim=2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, HW + 1, C)
        tokens = tokens + self.get_positional_embedding(x.shape[2:]).to(dtype=tokens.dtype)[None]
        pooled, _ = self.attention(query=tokens[:, :1], key=tokens, value=tokens, need_weights=False)
        return pooled[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: feature map of shape ``(B, embed_dim, H, W)``.

        Returns:
            tensor of shape ``(B, output_dim)``.
        """
        out: torch.Tensor = self.c_proj(self.forward_features(x))
        return out
