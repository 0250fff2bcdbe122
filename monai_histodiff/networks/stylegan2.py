"""
A class-conditional StyleGAN2 in the StyleGAN2-ADA manner: the GAN comparison system, trained on the same labeled tiles
and filtered by the same selection as HistoDiffusion's synthetic tiles.

Written from the papers, in plain PyTorch (no custom CUDA ops), so that it runs on CPU as well as on GPU:

* Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2, CVPR 2020): mapping network,
  weight (de)modulation, noise inputs, output-skip generator, residual discriminator, minibatch standard deviation,
  R1 regularisation, non-saturating logistic loss.
* Karras et al., "Training Generative Adversarial Networks with Limited Data" (StyleGAN2-ADA, NeurIPS 2020): class
  conditioning through a normalised class embedding joined with ``z`` in the mapping network, and a projection
  discriminator head (Miyato & Koyama, ICLR 2018).
* Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (NeurIPS 2020): :func:`diff_augment`,
  used here instead of ADA's adaptive pipeline.

Differences from the official implementation, on purpose: resampling uses bilinear interpolation (upsampling) and a
``[1, 3, 3, 1]`` binomial blur with stride 2 (downsampling) instead of ``upfirdn2d``; there is no fp16, no activation
clamping, no lazy regularisation or path-length regularisation (training-loop matters), and the truncation centre is the
running mean of ``w`` **per class** (:class:`MappingNetwork`), so that ``truncation_psi -> 0`` keeps the class.

Images are in ``[-1, 1]`` by convention: the generator has no output ``tanh`` (as in StyleGAN2); it learns that range
from real tiles scaled to ``[-1, 1]``, and its output may slightly overshoot it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "EqualLinear",
    "EqualConv2d",
    "MappingNetwork",
    "ModulatedConv2d",
    "NoiseInjection",
    "StyledConv2d",
    "ToRGB",
    "MinibatchStdDev",
    "ConditionalStyleGAN2Generator",
    "ConditionalStyleGAN2Discriminator",
    "generator_nonsaturating_loss",
    "discriminator_nonsaturating_loss",
    "r1_penalty",
    "diff_augment",
]

NOISE_MODES = ("random", "const", "none")
DIFF_AUGMENT_OPS = ("color", "translation", "cutout")
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------------------
# argument checks and small helpers


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an int (not a bool) ``>= minimum``, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_image_size(name: str, value: object) -> int:
    """Return ``value`` if it is a power of two ``>= 8``, else raise a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value & (value - 1) != 0:
        raise ValueError(f"{name} must be a power of two >= 8, got {value!r}.")
    return int(value)


def _check_labels(labels: torch.Tensor, batch_size: int, num_classes: int) -> None:
    """Check that ``labels`` are integer class indices of shape ``(batch_size,)`` (values are checked by indexing)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor of class indices in [0, {num_classes}), got {labels!r}.")
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}.")


def _bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Add ``bias`` along dim 1, then apply ``activation``: ``'linear'`` or ``'lrelu'`` (slope 0.2, gain sqrt(2))."""
    if bias is not None:
        x = x + bias.reshape([1, -1] + [1] * (x.ndim - 2))
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
    return x


def _check_activation(activation: str) -> str:
    if activation not in ("linear", "lrelu"):
        raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}.")
    return activation


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``x`` (B, C) to unit mean square, as StyleGAN does for ``z`` and the class embedding."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _randn(
    shape: Sequence[int],
    like: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """
    Standard normal noise of ``shape`` with ``like``'s dtype and device.

    With a single generator the draw is made on the generator's device and moved; with a sequence of generators (one
    per sample, ``len == shape[0]``) sample ``b`` is drawn from ``generator[b]``, so that a tile's noise does not depend
    on the other tiles of its batch.
    """
    if generator is None:
        return torch.randn(tuple(shape), dtype=like.dtype, device=like.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), dtype=like.dtype, device=generator.device, generator=generator).to(like.device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"generator: need one torch.Generator per sample ({shape[0]}), got {len(gens)}.")
    noise = [torch.randn(tuple(shape[1:]), dtype=like.dtype, device=g.device, generator=g) for g in gens]
    return torch.stack(noise).to(like.device)


def _block_channels(image_size: int, channel_base: int, channel_max: int) -> dict[int, int]:
    """Channels per resolution ``4, 8, ..., image_size``: ``min(channel_base // r, channel_max)`` (StyleGAN2's rule,
    shared by the generator and the discriminator); raises when some block would get no channel."""
    if channel_base // image_size < 1:
        raise ValueError(
            f"channel_base ({channel_base}) must be >= image_size ({image_size}) so that every block has a channel."
        )
    return {2**i: min(channel_base // 2**i, channel_max) for i in range(2, int(math.log2(image_size)) + 1)}


def _blur_kernel(channels: int, like: torch.Tensor) -> torch.Tensor:
    """Depthwise ``[1, 3, 3, 1]`` binomial low-pass kernel of shape ``(channels, 1, 4, 4)``, normalised to sum 1."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=like.dtype, device=like.device)
    k2 = torch.outer(k, k)
    return (k2 / k2.sum()).expand(channels, 1, 4, 4)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """
    Low-pass ``x`` with the ``[1, 3, 3, 1]`` filter at the same size, padded (1, 2) with zeros, so that a following
    stride-2 convolution with padding ``k // 2`` samples the centre of each 2 x 2 input block (StyleGAN2's anti-aliased
    downsampling).
    """
    return F.conv2d(F.pad(x, [1, 2, 1, 2]), _blur_kernel(x.shape[1], x), groups=x.shape[1])


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """
    2x bilinear upsampling (``align_corners=False``). Away from the border this equals StyleGAN2's zero-insertion
    followed by the ``[1, 3, 3, 1]`` filter; at the border it repeats the edge pixel instead of padding with zeros.
    """
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# equalized learning rate layers


class EqualLinear(nn.Module):
    """
    Fully connected layer with equalized learning rate (Karras et al., ProGAN): weights are stored as ``N(0, 1) /
    lr_multiplier`` and scaled at run time by ``lr_multiplier / sqrt(in_features)``, so that Adam updates every layer at
    the same effective speed; ``lr_multiplier < 1`` slows a layer down (0.01 in the mapping network).

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
        bias_init: initial value of the effective bias (1.0 for the style affines, so that styles start around 1).
        lr_multiplier: learning-rate multiplier of the weight and bias.
        activation: ``'linear'`` or ``'lrelu'`` (leaky ReLU with slope 0.2 and gain sqrt(2)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be > 0, got {lr_multiplier}.")
        self.activation = _check_activation(activation)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, in_features)``.

        Returns:
            output of shape ``(B, out_features)``.
        """
        bias = None if self.bias is None else self.bias * self.bias_gain
        return _bias_act(F.linear(x, self.weight * self.weight_gain), bias, self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """
    2D convolution with equalized learning rate (run-time weight gain ``1 / sqrt(in_channels * k * k)``), optional
    anti-aliased 2x downsampling (``[1, 3, 3, 1]`` blur, then stride 2) and bias + activation; the discriminator's
    layer.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (padding ``kernel_size // 2`` keeps the size, or halves it with ``down``).
        bias: whether the layer has a bias.
        activation: ``'linear'`` or ``'lrelu'`` (slope 0.2, gain sqrt(2)).
        down: whether to downsample by 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        down: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels)
        self.out_channels = _check_int("out_channels", out_channels)
        if _check_int("kernel_size", kernel_size) % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.kernel_size = kernel_size
        self.activation = _check_activation(activation)
        self.down = bool(down)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, in_channels, H, W)`` (``H``, ``W`` even when ``down``).

        Returns:
            output of shape ``(B, out_channels, H, W)``, or ``(B, out_channels, H / 2, W / 2)`` with ``down``.
        """
        if self.down:
            x = _blur(x)
        x = F.conv2d(x, self.weight * self.weight_gain, stride=2 if self.down else 1, padding=self.kernel_size // 2)
        return _bias_act(x, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, down={self.down}, "
            f"activation={self.activation}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# generator


class MappingNetwork(nn.Module):
    """
    Class-conditional mapping network ``(z, y) -> w`` of StyleGAN2-ADA.

    ``z`` and a learned embedding of the class (an :class:`EqualLinear` on the one-hot label) are each normalised to
    unit second moment and concatenated, then an MLP of ``num_layers`` equalized-lr layers with leaky ReLU and learning
    rate multiplier ``lr_multiplier`` (0.01) maps them to ``w``.

    The buffer ``w_avg`` of shape ``(num_classes, w_dim)`` tracks a running mean of ``w`` **per class** (exponential
    moving average with decay ``w_avg_beta``, updated only when ``update_emas=True``, by the training loop's generator
    step), and is the truncation centre: ``w' = w_avg[y] + psi * (w - w_avg[y])``. StyleGAN2-ADA keeps a single global
    mean instead; with it, ``psi -> 0`` would give one image for every class. :meth:`estimate_w_avg` sets the means
    directly from samples (e.g. for a checkpoint trained without EMA updates).

    Args:
        z_dim: size of the latent ``z``.
        num_classes: number of classes.
        w_dim: size of the intermediate latent ``w``.
        num_layers: number of MLP layers (8 in StyleGAN2; StyleGAN2-ADA uses 2 for its small conditional setups).
        embed_features: size of the class embedding; defaults to ``w_dim``.
        layer_features: width of the hidden layers; defaults to ``w_dim``.
        lr_multiplier: learning-rate multiplier of the MLP layers.
        w_avg_beta: decay of the running mean of ``w``.
    """

    def __init__(
        self,
        z_dim: int,
        num_classes: int,
        w_dim: int,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        self.z_dim = _check_int("z_dim", z_dim)
        self.num_classes = _check_int("num_classes", num_classes)
        self.w_dim = _check_int("w_dim", w_dim)
        self.num_layers = _check_int("num_layers", num_layers)
        embed_features = w_dim if embed_features is None else _check_int("embed_features", embed_features)
        layer_features = w_dim if layer_features is None else _check_int("layer_features", layer_features)
        if not 0.0 <= w_avg_beta < 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1), got {w_avg_beta}.")
        self.w_avg_beta = float(w_avg_beta)

        self.embed = EqualLinear(num_classes, embed_features)
        widths = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        self.layers = nn.ModuleList(
            EqualLinear(widths[i], widths[i + 1], lr_multiplier=lr_multiplier, activation="lrelu")
            for i in range(num_layers)
        )
        self.register_buffer("w_avg", torch.zeros(num_classes, w_dim))
        self.w_avg: torch.Tensor

    def _check_inputs(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {shape}.")
        _check_labels(labels, z.shape[0], self.num_classes)

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, truncation_psi: float = 1.0, update_emas: bool = False
    ) -> torch.Tensor:
        """
        Args:
            z: latents of shape ``(B, z_dim)``, usually standard normal.
            labels: class indices of shape ``(B,)``.
            truncation_psi: truncation factor; 1 leaves ``w`` as it is, 0 returns the class mean ``w_avg[labels]``.
            update_emas: whether to update the running class means ``w_avg`` with this batch (before truncation).

        Returns:
            ``w`` of shape ``(B, w_dim)``.
        """
        self._check_inputs(z, labels)
        y = self.embed(F.one_hot(labels.long(), self.num_classes).to(z.dtype))
        x = torch.cat([_normalize_2nd_moment(z), _normalize_2nd_moment(y)], dim=1)
        for layer in self.layers:
            x = layer(x)
        if update_emas:
            self._update_w_avg(x.detach(), labels)
        if truncation_psi != 1.0:
            x = self.w_avg[labels].to(x.dtype).lerp(x, float(truncation_psi))
        return x

    @torch.no_grad()
    def _update_w_avg(self, w: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA update of ``w_avg[c]`` towards the batch mean of ``w`` of class ``c``, for the classes in the batch."""
        idx = labels.long()
        sums = torch.zeros_like(self.w_avg).index_add_(0, idx, w.to(self.w_avg.dtype))
        counts = torch.zeros(self.num_classes, device=w.device, dtype=self.w_avg.dtype).index_add_(
            0, idx, torch.ones_like(idx, dtype=self.w_avg.dtype)
        )
        means = sums / counts.clamp(min=1.0)[:, None]
        updated = means.lerp(self.w_avg, self.w_avg_beta)
        self.w_avg.copy_(torch.where(counts[:, None] > 0, updated, self.w_avg))

    @torch.no_grad()
    def estimate_w_avg(self, num_samples: int = 10_000, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Set ``w_avg[c]`` to the mean of ``w`` over ``num_samples`` standard normal ``z`` for every class ``c``.

        Args:
            num_samples: number of ``z`` per class.
            generator: optional generator for the ``z`` draws (drawn on its device).

        Returns:
            the new ``w_avg``, shape ``(num_classes, w_dim)``.
        """
        _check_int("num_samples", num_samples)
        like = self.w_avg
        for c in range(self.num_classes):
            z = _randn((num_samples, self.z_dim), like, generator)
            labels = torch.full((num_samples,), c, dtype=torch.long, device=like.device)
            self.w_avg[c] = self.forward(z, labels).mean(dim=0)
        return self.w_avg


class NoiseInjection(nn.Module):
    """
    Per-pixel noise input of a StyleGAN2 layer: ``x + strength * noise`` with one learned scalar ``strength``
    (initialised to 0, as in StyleGAN2-ADA) and single-channel noise broadcast over the channels.

    Noise modes: ``'random'`` draws fresh noise (from ``generator`` when given, see :meth:`forward`), ``'const'`` uses
    the fixed buffer ``noise_const`` drawn at construction, ``'none'`` adds nothing. An explicit ``noise`` overrides
    the mode.

    Args:
        resolution: spatial size of the layer's output (the size of ``noise_const``).
    """

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.resolution = _check_int("resolution", resolution)
        self.strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_const: torch.Tensor

    def forward(
        self,
        x: torch.Tensor,
        noise_mode: str = "random",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: feature map of shape ``(B, C, H, W)``.
            noise_mode: ``'random'``, ``'const'`` or ``'none'``.
            generator: for ``'random'``: a ``torch.Generator`` for the whole batch, or a sequence of one generator per
                sample (tile-wise determinism, independent of the batch); ``None`` uses the global RNG.
            noise: explicit noise of shape ``(B, 1, H, W)`` or ``(1, 1, H, W)``; overrides ``noise_mode``.

        Returns:
            the feature map with noise added, same shape as ``x``.
        """
        if noise is None:
            if noise_mode not in NOISE_MODES:
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
            if noise_mode == "none":
                return x
            if noise_mode == "const":
                noise = self.noise_const.to(x.dtype)[None, None]
            else:
                noise = _randn((x.shape[0], 1, x.shape[2], x.shape[3]), x, generator)
        return x + noise * self.strength.to(x.dtype)


class ModulatedConv2d(nn.Module):
    """
    Modulated convolution of StyleGAN2: ``w`` is mapped by a learned affine layer (bias 1) to a per-input-channel style
    ``s``; the weight is scaled per sample, ``w'_{oihw} = s_i w_{oihw}``, and, with ``demodulate``, normalised per
    output channel, ``w''_{oihw} = w'_{oihw} / sqrt(sum_{ihw} w'^2 + eps)``, which keeps the output at unit scale
    whatever the style's magnitude (replacing AdaIN's instance normalisation). The per-sample weights are applied in a
    single grouped convolution (the batch folded into the channels, ``groups = B``).

    With ``up``, the input is first upsampled 2x by bilinear interpolation (``F.interpolate``, ``align_corners=False``)
    and then convolved, instead of StyleGAN2's transposed convolution followed by a ``[1, 3, 3, 1]`` blur; away from the
    border the two resamplings use the same filter.

    No noise, bias or activation here: see :class:`StyledConv2d`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (same padding).
        w_dim: size of ``w``.
        demodulate: whether to demodulate the weights (True for the synthesis layers, False for :class:`ToRGB`).
        up: whether to upsample the input by 2 first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        up: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels)
        self.out_channels = _check_int("out_channels", out_channels)
        if _check_int("kernel_size", kernel_size) % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.kernel_size = kernel_size
        self.demodulate = bool(demodulate)
        self.up = bool(up)
        self.affine = EqualLinear(_check_int("w_dim", w_dim), in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, in_channels, H, W)``.
            w: intermediate latents of shape ``(B, w_dim)``.

        Returns:
            output of shape ``(B, out_channels, H, W)``, or ``(B, out_channels, 2H, 2W)`` with ``up``.
        """
        batch = x.shape[0]
        styles = self.affine(w)  # (B, in)
        weight = self.weight[None] * self.weight_gain * styles[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * (weight.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        if self.up:
            x = _upsample(x)
        height, width = x.shape[2], x.shape[3]
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            weight.reshape(batch * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size),
            padding=self.kernel_size // 2,
            groups=batch,
        )
        return out.reshape(batch, self.out_channels, height, width)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, demodulate={self.demodulate}, "
            f"up={self.up}"
        )


class StyledConv2d(nn.Module):
    """
    One synthesis layer of StyleGAN2: :class:`ModulatedConv2d` (3 x 3, demodulated, optionally upsampling), then
    :class:`NoiseInjection`, bias and leaky ReLU (slope 0.2, gain sqrt(2)).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        w_dim: size of ``w``.
        resolution: output resolution (for the constant noise).
        up: whether to upsample by 2.
        kernel_size: kernel size of the modulated convolution.
        demodulate: whether to demodulate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: bool = False,
        kernel_size: int = 3,
        demodulate: bool = True,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, w_dim, demodulate=demodulate, up=up)
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, in_channels, H, W)``.
            w: intermediate latents of shape ``(B, w_dim)``.
            noise_mode: see :class:`NoiseInjection`.
            generator: see :class:`NoiseInjection`.
            noise: explicit noise, see :class:`NoiseInjection`.

        Returns:
            activations of shape ``(B, out_channels, resolution, resolution)``.
        """
        x = self.noise(self.conv(x, w), noise_mode=noise_mode, generator=generator, noise=noise)
        return _bias_act(x, self.bias, "lrelu")


class ToRGB(nn.Module):
    """
    Output layer of a synthesis block: a modulated 1 x 1 convolution without demodulation, plus bias (no activation).
    In the output-skip generator each block's RGB is added to the 2x-upsampled RGB of the block before.

    Args:
        in_channels: input channels.
        w_dim: size of ``w``.
        out_channels: image channels (3 for RGB).
    """

    def __init__(self, in_channels: int, w_dim: int, out_channels: int = 3) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: features of shape ``(B, in_channels, H, W)``.
            w: intermediate latents of shape ``(B, w_dim)``.
            skip: the previous block's image at ``H / 2``; upsampled and added when given.

        Returns:
            image of shape ``(B, out_channels, H, W)``.
        """
        img = _bias_act(self.conv(x, w), self.bias, "linear")
        return img if skip is None else img + _upsample(skip)


class _SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const at 4 x 4 | upsampling conv), conv, ToRGB."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, image_channels: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.const: nn.Parameter | None = None
        self.conv0: StyledConv2d | None = None
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
        else:
            self.conv0 = StyledConv2d(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = StyledConv2d(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim, image_channels)
        self.num_conv = 1 if resolution == 4 else 2

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ws: (B, num_conv + 1, w_dim), the last for ToRGB (shared with the next block's first conv, as in StyleGAN2)
        i = 0
        if self.const is not None:
            x = self.const[None].to(ws.dtype).expand(ws.shape[0], -1, -1, -1)
        else:
            assert self.conv0 is not None and x is not None
            x = self.conv0(x, ws[:, i], noise_mode=noise_mode, generator=generator)
            i += 1
        x = self.conv1(x, ws[:, i], noise_mode=noise_mode, generator=generator)
        img = self.torgb(x, ws[:, i + 1], skip=img)
        return x, img


class ConditionalStyleGAN2Generator(nn.Module):
    """
    Class-conditional StyleGAN2 generator (StyleGAN2-ADA configuration): :class:`MappingNetwork` ``(z, y) -> w``,
    then a synthesis network that starts from a learned constant 4 x 4 input and doubles the resolution per block
    (upsampling :class:`StyledConv2d`, :class:`StyledConv2d`, :class:`ToRGB`) up to ``image_size``, with output skips:
    the image is the sum of every block's RGB output, each upsampled to the final size.

    Block ``r`` has ``min(channel_base // r, channel_max)`` channels. The synthesis network consumes
    ``num_ws = 2 * log2(image_size) - 2`` vectors ``w`` (one per convolution and one per ToRGB, the ToRGB's shared with
    the next block's first convolution); :meth:`forward` broadcasts one ``w`` to all of them, :meth:`synthesis` accepts
    different ones (style mixing).

    The output has no ``tanh``: images are meant to be in ``[-1, 1]`` (the range the real tiles are scaled to), and
    the raw output may overshoot it slightly; clamp before saving.

    Args:
        image_size: output size, a power of two >= 8.
        num_classes: number of classes.
        z_dim: size of ``z``.
        w_dim: size of ``w``.
        channel_base: channel budget; block ``r`` has ``min(channel_base // r, channel_max)`` channels (>= 1).
        channel_max: maximum channels per block.
        mapping_layers: number of mapping MLP layers.
        mapping_lr_multiplier: learning-rate multiplier of the mapping MLP.
        w_avg_beta: decay of the running class means of ``w`` (truncation centres).
        out_channels: image channels (3 for RGB).

    Example::

        G = ConditionalStyleGAN2Generator(image_size=64, num_classes=9, channel_base=8192, channel_max=256)
        images = G(torch.randn(4, 512), torch.tensor([0, 1, 2, 3]))  # (4, 3, 64, 64)
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        z_dim: int = 512,
        w_dim: int = 512,
        channel_base: int = 32768,
        channel_max: int = 512,
        mapping_layers: int = 8,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.image_size = _check_image_size("image_size", image_size)
        self.num_classes = _check_int("num_classes", num_classes)
        self.z_dim = _check_int("z_dim", z_dim)
        self.w_dim = _check_int("w_dim", w_dim)
        self.channel_base = _check_int("channel_base", channel_base)
        self.channel_max = _check_int("channel_max", channel_max)
        self.out_channels = _check_int("out_channels", out_channels)
        self.channels = _block_channels(image_size, channel_base, channel_max)
        self.resolutions = list(self.channels)
        self.num_ws = 2 * int(math.log2(image_size)) - 2

        self.mapping = MappingNetwork(
            z_dim,
            num_classes,
            w_dim,
            num_layers=mapping_layers,
            lr_multiplier=mapping_lr_multiplier,
            w_avg_beta=w_avg_beta,
        )
        self.blocks = nn.ModuleList()
        for r in self.resolutions:
            in_ch = self.channels[r // 2] if r > 4 else 0
            self.blocks.append(_SynthesisBlock(in_ch, self.channels[r], w_dim, r, out_channels))

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """
        Synthesis network: images from intermediate latents.

        Args:
            ws: ``(B, w_dim)`` (one ``w`` for every layer) or ``(B, num_ws, w_dim)``.
            noise_mode: ``'random'``, ``'const'`` or ``'none'`` (see :class:`NoiseInjection`).
            generator: for ``'random'`` noise: one ``torch.Generator`` for the batch, or one per sample (then a tile
                depends only on its own ``w`` and generator, not on its batch).

        Returns:
            images of shape ``(B, out_channels, image_size, image_size)``.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
        if ws.ndim == 2:
            ws = ws[:, None].expand(-1, self.num_ws, -1)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"ws must have shape (B, {self.w_dim}) or (B, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}."
            )
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != ws.shape[0]:
            raise ValueError(f"generator: need one torch.Generator per sample ({ws.shape[0]}), got {len(generator)}.")
        x: torch.Tensor | None = None
        img: torch.Tensor | None = None
        start = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, start : start + block.num_conv + 1], noise_mode, generator)
            start += block.num_conv
        assert img is not None
        return img

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            z: latents of shape ``(B, z_dim)``, usually standard normal.
            labels: class indices of shape ``(B,)``.
            truncation_psi: truncation towards the class mean ``w_avg[labels]`` (1: none, 0: the class-mean image).
            noise_mode: ``'random'``, ``'const'`` or ``'none'``.
            generator: generator(s) of the ``'random'`` noise, see :meth:`synthesis`.
            update_emas: whether to update the running class means of ``w`` (the training loop's generator step).

        Returns:
            images of shape ``(B, out_channels, image_size, image_size)``, roughly in ``[-1, 1]``.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
        w = self.mapping(z, labels, truncation_psi=truncation_psi, update_emas=update_emas)
        return self.synthesis(w, noise_mode=noise_mode, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# discriminator


class MinibatchStdDev(nn.Module):
    """
    Minibatch standard deviation layer (ProGAN / StyleGAN2): splits the batch into groups of ``group_size`` samples
    (samples ``n, n + B/G, ...`` form a group), computes the standard deviation of every feature over each group,
    averages it over the features (per slice of ``C / num_channels`` channels) and appends the result as
    ``num_channels`` constant feature maps. Lets the discriminator see the variety of a batch.

    The group size is ``gcd(group_size, B)``, so any batch size works (a group of 1 gives a ~0 statistic).

    Args:
        group_size: maximum number of samples per group.
        num_channels: number of appended statistic channels; must divide the input channels.
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = _check_int("group_size", group_size)
        self.num_channels = _check_int("num_channels", num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: features of shape ``(B, C, H, W)``.

        Returns:
            features of shape ``(B, C + num_channels, H, W)``.
        """
        n, c, h, w = x.shape
        if c % self.num_channels != 0:
            raise ValueError(f"num_channels ({self.num_channels}) must divide the input channels ({c}).")
        g = math.gcd(self.group_size, n)
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # (B / g, f)
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class _DiscriminatorBlock(nn.Module):
    """Residual block: 3 x 3 conv, 3 x 3 conv with 2x downsampling, plus a 1 x 1 downsampling skip; sum * sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation="lrelu")
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation="lrelu", down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class ConditionalStyleGAN2Discriminator(nn.Module):
    """
    Class-conditional StyleGAN2 discriminator with a residual architecture and a projection head.

    A 1 x 1 ``fromRGB`` convolution at ``image_size``, then one residual block per resolution (two 3 x 3 convolutions,
    the second downsampling, and a 1 x 1 downsampling skip, summed with gain ``sqrt(1/2)``) down to 4 x 4, then the
    epilogue: :class:`MinibatchStdDev`, a 3 x 3 convolution and a fully connected layer to ``C`` features ``phi(x)``
    (``C`` the 4 x 4 channels). The logit is the projection discriminator's
    ``linear(phi(x)) + sum(embed(y) * phi(x))``, with an equalized-lr class embedding (``N(0, 1)`` weights scaled by
    ``1 / sqrt(C)`` at run time).

    Note that the minibatch standard deviation makes a sample's logit depend on the other samples of its group.

    Args:
        image_size: input size, a power of two >= 8.
        num_classes: number of classes.
        in_channels: image channels (3 for RGB).
        channel_base: channel budget; resolution ``r`` has ``min(channel_base // r, channel_max)`` channels (>= 1).
        channel_max: maximum channels per resolution.
        mbstd_group_size: group size of the minibatch standard deviation.
        mbstd_num_channels: number of minibatch standard deviation channels.

    Example::

        D = ConditionalStyleGAN2Discriminator(image_size=64, num_classes=9, channel_base=8192, channel_max=256)
        logits = D(images, labels)  # (B,)
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        in_channels: int = 3,
        channel_base: int = 32768,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
    ) -> None:
        super().__init__()
        self.image_size = _check_image_size("image_size", image_size)
        self.num_classes = _check_int("num_classes", num_classes)
        self.in_channels = _check_int("in_channels", in_channels)
        self.channel_base = _check_int("channel_base", channel_base)
        self.channel_max = _check_int("channel_max", channel_max)
        self.channels = _block_channels(image_size, channel_base, channel_max)
        resolutions = sorted(self.channels, reverse=True)  # image_size, ..., 4
        c4 = self.channels[4]
        if c4 % mbstd_num_channels != 0:
            raise ValueError(f"mbstd_num_channels ({mbstd_num_channels}) must divide the 4 x 4 channels ({c4}).")

        self.from_rgb = EqualConv2d(in_channels, self.channels[image_size], 1, activation="lrelu")
        self.blocks = nn.ModuleList(
            _DiscriminatorBlock(self.channels[r], self.channels[r // 2]) for r in resolutions[:-1]
        )
        self.mbstd = MinibatchStdDev(mbstd_group_size, mbstd_num_channels)
        self.conv = EqualConv2d(c4 + mbstd_num_channels, c4, 3, activation="lrelu")
        self.fc = EqualLinear(c4 * 16, c4, activation="lrelu")
        self.out = EqualLinear(c4, 1)
        self.embed = nn.Parameter(torch.randn(num_classes, c4))
        self.embed_gain = 1.0 / math.sqrt(c4)
        self.feature_dim = c4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """
        The penultimate features ``phi(x)`` that the linear and projection terms act on.

        Args:
            x: images of shape ``(B, in_channels, image_size, image_size)``, in ``[-1, 1]``.

        Returns:
            features of shape ``(B, feature_dim)``.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")
        h = self.from_rgb(x)
        for block in self.blocks:
            h = block(h)
        h = self.conv(self.mbstd(h))
        out: torch.Tensor = self.fc(h.flatten(1))
        return out

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images of shape ``(B, in_channels, image_size, image_size)``, in ``[-1, 1]``.
            labels: class indices of shape ``(B,)``.

        Returns:
            logits of shape ``(B,)`` (real > 0 > fake under the logistic loss).
        """
        _check_labels(labels, x.shape[0], self.num_classes)
        phi = self.features(x)
        projection = (self.embed[labels.long()].to(phi.dtype) * self.embed_gain * phi).sum(dim=1)
        return self.out(phi).squeeze(1) + projection


# ----------------------------------------------------------------------------------------------------------------------
# losses and augmentation


def generator_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """
    Non-saturating generator loss of StyleGAN2: ``mean(softplus(-D(G(z))))`` = ``-mean(log sigmoid(D(G(z))))``.

    Args:
        fake_logits: discriminator logits of generated images, shape ``(B,)``.

    Returns:
        the scalar loss.
    """
    return F.softplus(-fake_logits).mean()


def discriminator_nonsaturating_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """
    Logistic discriminator loss of StyleGAN2: ``mean(softplus(D(G(z)))) + mean(softplus(-D(x)))``.

    Args:
        real_logits: discriminator logits of real images, shape ``(B,)``.
        fake_logits: discriminator logits of (detached) generated images, shape ``(B',)``.

    Returns:
        the scalar loss (the R1 term is separate: :func:`r1_penalty`).
    """
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """
    R1 gradient penalty (Mescheder et al., 2018): ``mean_b ||d D(x_b) / d x_b||^2`` over the real images, computed with
    ``torch.autograd.grad(..., create_graph=True)`` so that it can be backpropagated into the discriminator. StyleGAN2
    adds ``gamma / 2 * r1_penalty`` to the discriminator loss (on every 16th step with lazy regularisation, then scaled
    by 16).

    ``real_images`` must require grad and be the tensor fed to the discriminator (or to :func:`diff_augment` before it;
    the gradient then flows through the augmentation). Logits that do not depend on the images give 0.

    Args:
        real_logits: discriminator logits of the real images, shape ``(B,)``.
        real_images: the real images, shape ``(B, C, H, W)``, with ``requires_grad=True``.

    Returns:
        the scalar penalty.
    """
    if not real_images.requires_grad:
        raise ValueError(
            "real_images must require grad (call real_images.requires_grad_(True) before the discriminator)."
        )
    if not real_logits.requires_grad:
        return real_images.new_zeros(())
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True, allow_unused=True)
    if grad is None:
        return real_images.new_zeros(())
    return grad.square().sum(dim=list(range(1, grad.ndim))).mean()


def _rand(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws with ``like``'s dtype and device (drawn on the generator's device when given)."""
    device = like.device if generator is None else generator.device
    return torch.rand(tuple(shape), dtype=like.dtype, device=device, generator=generator).to(like.device)


def _randint(
    low: int, high: int, shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Integer draws in ``[low, high)`` on ``like``'s device (drawn on the generator's device when given)."""
    device = like.device if generator is None else generator.device
    return torch.randint(low, high, tuple(shape), device=device, generator=generator).to(like.device)


def _augment_color(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random brightness (+U[-0.5, 0.5]), saturation (x U[0, 2]) and contrast (x U[0.5, 1.5]), per sample."""
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), x, generator) * 2.0) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, generator) + 0.5) + mean


def _augment_translation(x: torch.Tensor, generator: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    """Random integer shift of up to ``ratio`` of the size along each axis, per sample, filling with zeros."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = _randint(-sh, sh + 1, (b, 1, 1), x, generator)
    tx = _randint(-sw, sw + 1, (b, 1, 1), x, generator)
    gy = (torch.arange(h, device=x.device)[None, :, None] + ty + 1).clamp(0, h + 1)  # (B, H, 1), in padded coordinates
    gx = (torch.arange(w, device=x.device)[None, None, :] + tx + 1).clamp(0, w + 1)  # (B, 1, W)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H + 2, W + 2, C); index 0 and -1 are zeros
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, gy, gx].permute(0, 3, 1, 2).contiguous()


def _augment_cutout(x: torch.Tensor, generator: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    """Zero one random square of ``ratio`` of the size per sample (it may extend past the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = _randint(0, h + (1 - ch % 2), (b, 1, 1), x, generator)
    ox = _randint(0, w + (1 - cw % 2), (b, 1, 1), x, generator)
    y0, x0 = oy - ch // 2, ox - cw // 2
    gy = torch.arange(h, device=x.device)[None, :, None]
    gx = torch.arange(w, device=x.device)[None, None, :]
    inside = (gy >= y0) & (gy < y0 + ch) & (gx >= x0) & (gx < x0 + cw)  # (B, H, W)
    return x * (~inside).to(x.dtype)[:, None]


_DIFF_AUGMENT_FNS = {"color": _augment_color, "translation": _augment_translation, "cutout": _augment_cutout}


def diff_augment(
    x: torch.Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    Differentiable augmentation (DiffAugment, Zhao et al., NeurIPS 2020) for data-efficient GAN training.

    Apply it to **every** image the discriminator sees, real and generated, in both the discriminator and the generator
    steps: the two get independent draws from the same distribution, so the discriminator cannot tell them apart by
    the augmentation, and since every operation is differentiable the generator is trained through it. Operations, in
    the order of ``policy``, each with its own per-sample random parameters:

    * ``'color'``: brightness ``+ U[-0.5, 0.5]``, saturation ``x U[0, 2]`` around the channel mean, contrast
      ``x U[0.5, 1.5]`` around the image mean;
    * ``'translation'``: integer shift by up to 1/8 of the size per axis, zero fill;
    * ``'cutout'``: one zeroed square of half the size at a random centre.

    Args:
        x: images of shape ``(B, C, H, W)``, in ``[-1, 1]``.
        policy: comma-separated operations among ``'color'``, ``'translation'``, ``'cutout'``; ``''`` is the identity.
        generator: optional ``torch.Generator``; with it the augmentation is deterministic (draws are made on the
            generator's device and moved to ``x``'s).

    Returns:
        augmented images, same shape as ``x``.
    """
    if not isinstance(policy, str):
        raise ValueError(f"policy must be a comma-separated string of {DIFF_AUGMENT_OPS}, got {policy!r}.")
    ops = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in ops if p not in _DIFF_AUGMENT_FNS]
    if unknown:
        raise ValueError(f"policy has unknown operation(s) {unknown}; choose among {DIFF_AUGMENT_OPS}.")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}.")
    for op in ops:
        x = _DIFF_AUGMENT_FNS[op](x, generator)
    return x
