from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.data.datalist import list_images
from monai_histodiff.data.transforms import HAS_ITK, tile_transforms, to_uint8_image


@pytest.mark.parametrize("name", ["good_rgb.png", "rgba.png", "gray.png", "gray16.png"])
def test_any_mode_becomes_rgb_in_range(corrupt_dir, name):
    out = tile_transforms(16)({"image": str(corrupt_dir / name)})["image"]
    assert isinstance(out, torch.Tensor) and out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert -1.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_values_and_orientation_preserved(corrupt_dir):
    rgb = np.asarray(Image.open(corrupt_dir / "good_rgb.png"))
    out = tile_transforms(20)({"image": str(corrupt_dir / "good_rgb.png")})["image"]
    np.testing.assert_array_equal(to_uint8_image(out), rgb)
    gray16 = tile_transforms(20)({"image": str(corrupt_dir / "gray16.png")})["image"]
    np.testing.assert_allclose(to_uint8_image(gray16)[..., 1], rgb[..., 0], atol=1)
    rgba = tile_transforms(20)({"image": str(corrupt_dir / "rgba.png")})["image"]
    expected = np.round(rgb * (128 / 255) + 255 * (1 - 128 / 255))  # composited on white
    np.testing.assert_allclose(to_uint8_image(rgba).astype(float), expected, atol=2)


def test_real_tile_resized_and_augmented(nct_crc_dir):
    f = list_images(nct_crc_dir)[0]
    t = tile_transforms(64, augment=True)
    t.set_random_state(0)
    outs = [t({"image": f, "label": 3}) for _ in range(6)]
    assert all(o["image"].shape == (3, 64, 64) and o["label"] == 3 for o in outs)
    assert any(not torch.equal(outs[0]["image"], o["image"]) for o in outs[1:])  # augmentation acts
    plain = tile_transforms(64)({"image": f})["image"]
    # every augmented view is a flip/rotation of the plain tile: same multiset of pixel values
    assert all(torch.allclose(plain.flatten().sort().values, o["image"].flatten().sort().values) for o in outs)


@pytest.mark.skipif(not HAS_ITK, reason="ITK extra not installed (pip install 'monai-histodiff[itk]')")
def test_itk_reader_gives_same_array(nct_crc_dir):
    f = list_images(nct_crc_dir)[0]
    a = tile_transforms(64, reader="PILReader")({"image": f})["image"]
    b = tile_transforms(64, reader="ITKReader")({"image": f})["image"]
    torch.testing.assert_close(a, b)
