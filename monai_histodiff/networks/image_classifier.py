"""The auxiliary image classifier of HistoDiffusion: the LAE encoder architecture followed by attention pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.autoencoderkl import Encoder
from monai.utils import ensure_tuple_rep

from monai_histodiff.networks.attention_pool import AttentionPool2d
from monai_histodiff.networks.encoder_args import check_encoder_args

__all__ = ["HistoImageClassifier"]


class HistoImageClassifier(nn.Module):
    """
    Auxiliary image classifier :math:`\\varphi` of HistoDiffusion (Ye et al., MICCAI 2023).

    Sec. 2 (Eq. 5) fine-tunes the LAE decoder with a cross-entropy term :math:`\\mathcal{L}_{CE}(\\varphi(\\hat{x}), y)`
    computed by an image classifier trained on the small labeled set; Sec. 3 ("Model Implementation") states that it
    has the same architecture as the latent classifier: "the encoder architecture of the LAE and an additional
    attention pooling layer added before the output layer". The penultimate features (:meth:`features`) can also
    serve the feature-centroid image selection.

    The backbone is MONAI's :class:`monai.networks.nets.autoencoderkl.Encoder` (the encoder of
    :class:`monai.networks.nets.AutoencoderKL`), built with ``out_channels=embed_dim``; its output map is pooled by
    :class:`AttentionPool2d` into ``num_classes`` logits. The encoder downsamples by ``2 ** (len(channels) - 1)``, so
    ``image_size`` must be divisible by that factor. Other input sizes divisible by it are accepted at run time (the
    pooling interpolates its positional embedding).

    Args:
        spatial_dims: number of spatial dimensions; only 2 is supported (the pooling is 2D).
        in_channels: number of input image channels (3 for RGB tiles).
        num_classes: number of output classes.
        image_size: spatial size of the training images, an int for square images or ``(H, W)``; sets the size of the
            pooling's positional embedding.
        channels: output channels of each encoder level (the paper's LAE, LDM-4 KL-f4, uses ``(128, 256, 512)``).
        num_res_blocks: number of residual blocks per level, an int or one value per level.
        attention_levels: which levels have a self-attention block after each residual block; all off by default.
        norm_num_groups: number of groups of the GroupNorm layers; every entry of ``channels`` must be divisible by it.
        norm_eps: epsilon of the GroupNorm layers.
        num_heads: number of heads of the attention pooling.
        embed_dim: channels of the encoder's output map and width of the attention pooling (the size of
            :meth:`features`); defaults to ``channels[-1]``. Must be divisible by ``num_heads``.
        with_nonlocal_attn: whether the encoder has the non-local (mid) ResBlock-attention-ResBlock stage, as
            ``AutoencoderKL`` does by default.
        include_fc: whether the encoder's attention blocks include their final linear layer.
        use_combined_linear: whether the encoder's attention blocks use one linear layer for the qkv projection.
        use_flash_attention: whether the encoder's attention blocks use PyTorch's fused attention.

    Example::

        net = HistoImageClassifier(num_classes=9, image_size=256, channels=(128, 256, 512), num_res_blocks=2)
        logits = net(torch.randn(2, 3, 256, 256))  # (2, 9)
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int,
        image_size: int | Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        num_heads: int = 4,
        embed_dim: int | None = None,
        with_nonlocal_attn: bool = True,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        channels, attention_levels, num_res_blocks = check_encoder_args(
            "HistoImageClassifier", spatial_dims, num_classes, channels, norm_num_groups, attention_levels, num_res_blocks
        )
        embed_dim = channels[-1] if embed_dim is None else embed_dim
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")

        size = tuple(int(s) for s in ensure_tuple_rep(image_size, spatial_dims))
        self.downsample_factor = 2 ** (len(channels) - 1)
        if len(size) != spatial_dims or any(s < 1 or s % self.downsample_factor != 0 for s in size):
            raise ValueError(
                f"image_size {image_size} must be positive and divisible by the encoder's total downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channels) - 1) for channels {channels})."
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = size
        self.embed_dim = embed_dim

        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=channels,
            out_channels=embed_dim,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_nonlocal_attn,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        self.pool = AttentionPool2d(
            spatial_size=tuple(s // self.downsample_factor for s in size),
            embed_dim=embed_dim,
            num_heads=num_heads,
            output_dim=num_classes,
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """
        Penultimate features: the attention-pooled encoder output before the class projection.

        Args:
            x: images of shape ``(B, in_channels, H, W)``.

        Returns:
            tensor of shape ``(B, embed_dim)``.
        """
        return self.pool.forward_features(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images of shape ``(B, in_channels, H, W)``.

        Returns:
            class logits of shape ``(B, num_classes)``.
        """
        out: torch.Tensor = self.pool(self.encoder(x))
        return out
