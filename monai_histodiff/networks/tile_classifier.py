"""The downstream tissue classifier: MONAI ``ViT`` in the ViT-B/16 configuration (the paper) or a small MONAI
``ResNet`` for CPU runs, behind one interface that returns logits and exposes penultimate features.

MONAI's ``ViT`` returns ``(logits, hidden_states)``; this wrapper returns logits only, so MONAI's inferers,
post-transforms, ``verify_net_in_out`` and TorchScript export see an ordinary classifier. ``features(x)`` gives the
representation before the classification layer (the ViT class token after the final norm, the ResNet pooled
features), used by the Frechet distance and by selection when the downstream baseline is the feature extractor.
"""

from __future__ import annotations


import torch
from monai.networks.nets import ResNet, ViT
from torch import nn

__all__ = ["TileClassifier", "VIT_B16", "SMALL_RESNET"]

VIT_B16 = {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}
SMALL_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [16, 32, 64, 128]}


class TileClassifier(nn.Module):
    """Tile classifier returning logits ``[B, num_classes]`` for ``[B, 3, H, W]`` tiles in [-1, 1].

    Args:
        backbone: ``"vit"`` (MONAI ViT, ViT-B/16 by default as in the paper) or ``"resnet"`` (MONAI ResNet; a
            ResNet-10-like small network by default, for CPU runs).
        num_classes: number of tissue classes.
        image_size: tile size (ViT needs it divisible by the patch size).
        in_channels: image channels.
        dropout: dropout rate (ViT).
        backbone_args: overrides of the backbone's arguments (e.g. ``{"num_layers": 6}``).
    """

    def __init__(self, backbone: str = "vit", num_classes: int = 9, image_size: int = 224, in_channels: int = 3,
                 dropout: float = 0.0, backbone_args: dict | None = None) -> None:
        super().__init__()
        self.backbone_name = backbone
        args = dict(backbone_args or {})
        if backbone == "vit":
            cfg = {**VIT_B16, **args}
            if image_size % cfg["patch_size"]:
                raise ValueError(f"image_size {image_size} is not divisible by the ViT patch_size {cfg['patch_size']}")
            self.backbone = ViT(in_channels=in_channels, img_size=image_size, spatial_dims=2, classification=True,
                                num_classes=num_classes, dropout_rate=dropout, post_activation=None, **cfg)
        elif backbone == "resnet":
            cfg = {**SMALL_RESNET, **args}
            self.backbone = ResNet(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **cfg)
        else:
            raise ValueError(f"backbone must be 'vit' or 'resnet', got {backbone!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, D]``."""
        b = self.backbone
        if self.backbone_name == "vit":
            h = b.patch_embedding(x)
            h = torch.cat((b.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
            for blk in b.blocks:
                h = blk(h)
            return b.norm(h)[:, 0]
        h = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            h = b.maxpool(h)
        h = b.layer4(b.layer3(b.layer2(b.layer1(h))))
        return b.avgpool(h).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features`."""
        head = self.backbone.classification_head if self.backbone_name == "vit" else self.backbone.fc
        return head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
