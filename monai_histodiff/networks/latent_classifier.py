"""The time-dependent latent classifier of HistoDiffusion, which guides latent diffusion sampling (Eq. 6-8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets.diffusion_model_unet import get_down_block, get_mid_block, get_timestep_embedding
from monai.utils import ensure_tuple_rep

from monai_histodiff.networks.attention_pool import AttentionPool2d
from monai_histodiff.networks.encoder_args import check_encoder_args

__all__ = ["TimeConditionedLatentClassifier"]


class TimeConditionedLatentClassifier(nn.Module):
    """
    Time-dependent latent classifier :math:`\\phi(z_t, t)` of HistoDiffusion (Ye et al., MICCAI 2023).

    Sec. 2 ("Classifier-guided Conditional Synthesis") trains it with :math:`\\mathcal{L}_{CE}(\\phi(z_t), y)` (Eq. 6)
    on noisy latents :math:`z_t \\sim q(z_t|z_0)` of the labeled images, and sampling adds
    :math:`g \\Sigma \\nabla_{z_t} \\log p_\\phi(y|z_t)` to the reverse-process mean (Eq. 7). Sec. 3 ("Model
    Implementation") builds it from "the encoder architecture of the LAE and an additional attention pooling layer
    added before the output layer".

    Architecture: the level layout of the LAE encoder (:class:`monai.networks.nets.autoencoderkl.Encoder`: input
    convolution, ``num_res_blocks`` residual blocks per level with optional self-attention, a stride-2 downsampling
    between levels, a non-local ResBlock-attention-ResBlock stage, GroupNorm and an output convolution) applied to
    latents, with every residual block replaced by MONAI's timestep-conditioned
    :class:`~monai.networks.nets.diffusion_model_unet.DiffusionUNetResnetBlock` (built through MONAI's
    ``get_down_block`` / ``get_mid_block``). The timestep is embedded as in
    :class:`monai.networks.nets.DiffusionModelUNet`: sinusoidal ``get_timestep_embedding`` of width ``channels[0]``
    followed by a 2-layer MLP to ``4 * channels[0]``, added inside every residual block. The output map is pooled by
    :class:`AttentionPool2d` into ``num_classes`` logits.

    Note: as in MONAI's diffusion UNet, the second convolution of each residual block is zero-initialised, so an
    untrained network's output does not yet depend on the timestep; the dependency appears as soon as it is trained.

    The network is differentiable w.r.t. its input, as classifier guidance requires, and runs in float32 on CPU.

    Args:
        spatial_dims: number of spatial dimensions; only 2 is supported (the pooling is 2D).
        in_channels: number of latent channels (3 for the paper's LDM-4 latents of size 64 x 64 x 3).
        num_classes: number of output classes.
        latent_size: spatial size of the (square) training latents; sets the size of the pooling's positional embedding
            and must be divisible by the total downsampling factor ``2 ** (len(channels) - 1)``.
        channels: output channels of each level (the paper's LAE encoder uses ``(128, 256, 512)``).
        num_res_blocks: number of residual blocks per level, an int or one value per level.
        attention_levels: which levels have a self-attention block after each residual block; all off by default.
        norm_num_groups: number of groups of the GroupNorm layers; every entry of ``channels`` must be divisible by it.
        norm_eps: epsilon of the GroupNorm layers.
        num_heads: number of heads of the attention pooling.
        num_train_timesteps: number of diffusion training timesteps ``T`` (1000 in the paper); ``timesteps`` passed to
            :meth:`forward` are expected in ``[0, num_train_timesteps)``. Stored for documentation and checked to be
            positive; inputs are not range-checked at run time (that would force a device synchronisation per call).
        embed_dim: channels of the output map and width of the attention pooling (the size of :meth:`features`);
            defaults to ``channels[-1]``. Must be divisible by ``num_heads``.
        num_head_channels: channels per head of the self-attention blocks (levels and non-local stage); ``None`` uses
            one head per block, as the LAE encoder does.
        with_nonlocal_attn: whether to include the non-local ResBlock-attention-ResBlock stage of the LAE encoder.
        include_fc: whether the self-attention blocks include their final linear layer.
        use_combined_linear: whether the self-attention blocks use one linear layer for the qkv projection.
        use_flash_attention: whether the self-attention blocks use PyTorch's fused attention.

    Example::

        net = TimeConditionedLatentClassifier(num_classes=9, latent_size=64, channels=(128, 256, 512))
        logits = net(z_t, timesteps)  # z_t: (B, 3, 64, 64), timesteps: (B,) or a scalar
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int,
        latent_size: int,
        channels: Sequence[int] = (64, 128),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        num_heads: int = 4,
        num_train_timesteps: int = 1000,
        embed_dim: int | None = None,
        num_head_channels: int | Sequence[int] | None = None,
        with_nonlocal_attn: bool = True,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        channels, attention_levels, num_res_blocks = check_encoder_args(
            "TimeConditionedLatentClassifier", spatial_dims, num_classes, channels, norm_num_groups, attention_levels, num_res_blocks
        )
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps}.")
        head_channels = (
            channels if num_head_channels is None else tuple(ensure_tuple_rep(num_head_channels, len(channels)))
        )
        if len(head_channels) != len(channels):
            raise ValueError("num_head_channels must be an int or have one entry per level of channels.")
        embed_dim = channels[-1] if embed_dim is None else embed_dim
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.downsample_factor = 2 ** (len(channels) - 1)
        if isinstance(latent_size, (bool, Sequence)) or latent_size < 1 or latent_size % self.downsample_factor != 0:
            raise ValueError(
                f"latent_size ({latent_size}) must be a positive int divisible by the total downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channels) - 1) for channels {channels})."
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.latent_size = int(latent_size)
        self.num_train_timesteps = num_train_timesteps
        self.channels = channels
        self.embed_dim = embed_dim

        # timestep embedding, as in DiffusionModelUNet
        time_embed_dim = channels[0] * 4
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        self.conv_in = Convolution(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=channels[0],
            strides=1,
            kernel_size=3,
            padding=1,
            conv_only=True,
        )

        # levels of the LAE encoder with time-conditioned residual blocks, downsampling between levels
        self.down_blocks = nn.ModuleList()
        output_channel = channels[0]
        for i in range(len(channels)):
            input_channel, output_channel = output_channel, channels[i]
            self.down_blocks.append(
                get_down_block(
                    spatial_dims=spatial_dims,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    num_res_blocks=num_res_blocks[i],
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                    add_downsample=i < len(channels) - 1,
                    resblock_updown=False,
                    with_attn=attention_levels[i],
                    with_cross_attn=False,
                    num_head_channels=head_channels[i],
                    transformer_num_layers=1,
                    cross_attention_dim=None,
                    include_fc=include_fc,
                    use_combined_linear=use_combined_linear,
                    use_flash_attention=use_flash_attention,
                )
            )

        # non-local stage of the LAE encoder (ResBlock - attention - ResBlock), time-conditioned
        self.mid_block: nn.Module | None = None
        if with_nonlocal_attn:
            self.mid_block = get_mid_block(
                spatial_dims=spatial_dims,
                in_channels=channels[-1],
                temb_channels=time_embed_dim,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                with_conditioning=False,
                num_head_channels=head_channels[-1],
                transformer_num_layers=1,
                cross_attention_dim=None,
                include_fc=include_fc,
                use_combined_linear=use_combined_linear,
                use_flash_attention=use_flash_attention,
            )

        self.out = nn.Sequential(
            nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[-1], eps=norm_eps, affine=True),
            nn.SiLU(),
            Convolution(
                spatial_dims=spatial_dims,
                in_channels=channels[-1],
                out_channels=embed_dim,
                strides=1,
                kernel_size=3,
                padding=1,
                conv_only=True,
            ),
        )
        self.pool = AttentionPool2d(
            spatial_size=latent_size // self.downsample_factor,
            embed_dim=embed_dim,
            num_heads=num_heads,
            output_dim=num_classes,
        )

    def _timesteps_for_batch(self, timesteps: torch.Tensor | int | float, x: torch.Tensor) -> torch.Tensor:
        """Return ``timesteps`` as a 1-D tensor of length ``B`` on ``x``'s device, broadcasting one value if needed."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.numel() == 1:
            return t.reshape(1).expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"timesteps must be a scalar, a 1-element tensor or of shape (B,) with B={x.shape[0]}, "
                f"got shape {tuple(t.shape)}."
            )
        return t

    def _feature_map(self, x: torch.Tensor, timesteps: torch.Tensor | int | float) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TimeConditionedLatentClassifier expects latents of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}."
            )
        t_emb = get_timestep_embedding(self._timesteps_for_batch(timesteps, x), self.channels[0]).to(dtype=x.dtype)
        emb = self.time_embed(t_emb)
        h = self.conv_in(x)
        for down_block in self.down_blocks:
            h, _ = down_block(hidden_states=h, temb=emb)
        if self.mid_block is not None:
            h = self.mid_block(hidden_states=h, temb=emb)
        out: torch.Tensor = self.out(h)
        return out

    def features(self, x: torch.Tensor, timesteps: torch.Tensor | int | float) -> torch.Tensor:
        """
        Penultimate features: the attention-pooled output map before the class projection.

        Args:
            x: (noisy) latents of shape ``(B, in_channels, H, W)``.
            timesteps: diffusion timesteps, shape ``(B,)``, or a scalar / 1-element tensor used for the whole batch.

        Returns:
            tensor of shape ``(B, embed_dim)``.
        """
        return self.pool.forward_features(self._feature_map(x, timesteps))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (noisy) latents :math:`z_t` of shape ``(B, in_channels, H, W)``.
            timesteps: diffusion timesteps, shape ``(B,)``, or a scalar / 1-element tensor used for the whole batch.

        Returns:
            class logits of shape ``(B, num_classes)``.
        """
        out: torch.Tensor = self.pool(self._feature_map(x, timesteps))
        return out
