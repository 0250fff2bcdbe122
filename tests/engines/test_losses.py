from __future__ import annotations

import pytest
import torch

from monai_histodiff.engines import build_perceptual_loss, diffusion_loss


def test_perceptual_loss_off_by_default_and_never_downloads(tmp_path):
    assert build_perceptual_loss(0.0) is None
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path"):
        build_perceptual_loss(0.1, "resnet50", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="perceptual_cache_dir"):
        build_perceptual_loss(0.1, "radimagenet_resnet50", cache_dir=None)
    with pytest.raises(ValueError, match="not supported offline"):
        build_perceptual_loss(0.1, "alex")


def test_diffusion_loss_kinds():
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    assert float(diffusion_loss("l2")(a, b)) == 4.0 and float(diffusion_loss("l1")(a, b)) == 2.0
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        diffusion_loss("huber")
