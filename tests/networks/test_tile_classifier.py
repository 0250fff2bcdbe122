from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from monai_histodiff.networks import TileClassifier


def test_resnet_logits_and_features_consistent():
    torch.manual_seed(0)
    net = TileClassifier("resnet", num_classes=5, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    logits = net(x)
    assert logits.shape == (2, 5) and net.features(x).shape == (2, 128)
    torch.testing.assert_close(net.classify(net.features(x)), logits)


def test_vit_b16_matches_monai_vit_logits():
    torch.manual_seed(0)
    net = TileClassifier("vit", num_classes=9, image_size=32, backbone_args={"num_layers": 2}).eval()
    assert net.backbone.patch_embedding.n_patches == 4 and net.backbone.cls_token.shape[-1] == 768  # 32 px / 16 px patches
    x = torch.randn(2, 3, 32, 32)
    ref, _ = ViT.forward(net.backbone, x)
    torch.testing.assert_close(net(x), ref)
    assert net.features(x).shape == (2, 768)
    full = TileClassifier("vit", num_classes=9, image_size=224)
    assert len(full.backbone.blocks) == 12 and full.backbone.blocks[0].attn.num_heads == 12


def test_bad_arguments():
    with pytest.raises(ValueError, match="patch_size"):
        TileClassifier("vit", image_size=40)
    with pytest.raises(ValueError, match="backbone"):
        TileClassifier("densenet")
