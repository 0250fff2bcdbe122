from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_histodiff.data.datalist import list_images
from monai_histodiff.data.transforms import HAS_ITK, round_to_8bit, tile_transforms, to_uint8_image


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


def _seeded_rgb(h: int = 24, w: int = 16) -> np.ndarray:
    """A tile with a clear top-left marker, so that orientation is checkable."""
    rgb = np.random.default_rng(3).integers(60, 200, (h, w, 3), dtype=np.uint8)
    rgb[:6, :4] = (250, 10, 10)
    return rgb


def test_cmyk_and_palette_tiles_become_rgb(tmp_path):
    from monai_histodiff.data.transforms import pil_to_rgb

    rgb = _seeded_rgb()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P"
        palette_colours = np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(im)]  # the lookup by hand
    with Image.open(tmp_path / "cmyk.tif") as im:
        assert im.mode == "CMYK"
    for name, expected, atol in (("cmyk.tif", rgb, 1), ("palette.png", palette_colours, 1)):
        out = tile_transforms((24, 16))({"image": str(tmp_path / name)})["image"]
        assert out.shape == (3, 24, 16)
        np.testing.assert_allclose(to_uint8_image(out).astype(int), expected.astype(int), atol=atol)
        assert pil_to_rgb(Image.open(tmp_path / name)).mode == "RGB"


@pytest.mark.parametrize("orientation, undo, k", [(6, Image.Transpose.ROTATE_90, -1),
                                                  (3, Image.Transpose.ROTATE_180, 2),
                                                  (8, Image.Transpose.ROTATE_270, 1)],
                         ids=["orientation6", "orientation3", "orientation8"])
def test_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation, undo, k):
    """A camera stores the sensor's pixels and an EXIF orientation; the tile is read the way it is shown."""
    upright = _seeded_rgb()
    stored = Image.fromarray(upright).transpose(undo)  # what the camera wrote: rotated pixels ...
    exif = Image.Exif()
    exif[0x0112] = orientation  # ... and the tag that turns them upright (k quarter turns counter-clockwise)
    stored.save(tmp_path / "tile.jpg", quality=100, subsampling=0, exif=exif)
    with Image.open(tmp_path / "tile.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))  # the stored pixels, as they are in the file
    assert decoded.shape == (16, 24, 3) if k % 2 else (24, 16, 3)
    out = to_uint8_image(tile_transforms((24, 16))({"image": str(tmp_path / "tile.jpg")})["image"])
    np.testing.assert_array_equal(out, np.rot90(decoded, k))
    assert np.abs(out.astype(int) - upright.astype(int)).mean() < 4  # JPEG loss only, not a turned tile
    assert out[:6, :4, 0].mean() > 200 and out[:6, :4, 1].mean() < 60  # the marker is back at the top left


def test_tile_far_smaller_than_image_size_is_resized(tmp_path):
    """A stage's transforms bring an 8 px tile to image_size (upsampled; its colours kept), so it trains, not fails;
    ``scan_images(min_size=...)`` reports such tiles when a site wants them out."""
    rgb = _seeded_rgb(8, 8)
    Image.fromarray(rgb).save(tmp_path / "tiny.png")
    out = tile_transforms(64)({"image": str(tmp_path / "tiny.png")})["image"]
    assert out.shape == (3, 64, 64)
    up = to_uint8_image(out)
    np.testing.assert_allclose(up[::8, ::8].astype(float), rgb.astype(float), atol=2)  # each source pixel a block


def test_round_to_8bit_reads_a_tile_as_its_png_holds_it(tmp_path):
    tile = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some values out of range
    rounded = round_to_8bit(tile)
    assert rounded.min() >= -1 and rounded.max() <= 1
    assert torch.allclose((rounded + 1) * 127.5, ((rounded + 1) * 127.5).round(), atol=1e-4)  # 256 levels
    Image.fromarray(to_uint8_image(tile[0])).save(tmp_path / "tile.png")
    torch.testing.assert_close(tile_transforms(8)({"image": str(tmp_path / "tile.png")})["image"], rounded[0],
                               atol=1e-5, rtol=0)
