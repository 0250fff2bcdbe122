"""Tests of the latent cache: encoding posteriors once, the cache file, its hash check and the cached dataset."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset

from monai_histodiff.data import scan_class_folders, tile_transforms
from monai_histodiff.engines import (
    CachedLatentDataset,
    LatentCache,
    encode_posteriors,
    get_or_create_latent_cache,
    unwrap_model,
)
from monai_histodiff.handlers import file_sha256
from tests.tiny import tiny_autoencoder


@pytest.fixture(scope="module")
def toy_loader(toy_dir):
    items, classes = scan_class_folders(toy_dir)
    ds = Dataset(items, transform=tile_transforms(32))
    return DataLoader(ds, batch_size=16, shuffle=False, num_workers=0), items, classes


def test_encode_posteriors_toy_tiles(toy_loader):
    loader, items, classes = toy_loader
    ae = tiny_autoencoder()
    ae.train()
    out = encode_posteriors(torch.nn.DataParallel(ae), loader, device="cpu", progress=False)
    assert ae.training, "the autoencoder's mode is restored"
    assert out["mu"].shape == (len(items), 3, 16, 16) and out["sigma"].shape == out["mu"].shape
    assert out["mu"].dtype == torch.float32 and out["mu"].device.type == "cpu"
    assert (out["sigma"] > 0).all()
    assert out["label"].tolist() == [it["label"] for it in items]
    assert out["class"] == [it["class"] for it in items]
    first = next(iter(loader))["image"]
    with torch.no_grad():
        mu, sigma = ae.eval().encode(first)
    torch.testing.assert_close(out["mu"][: len(first)], mu)
    torch.testing.assert_close(out["sigma"][: len(first)], sigma)


def test_unwrap_model():
    ae = tiny_autoencoder()
    assert unwrap_model(torch.nn.DataParallel(ae)) is ae and unwrap_model(ae) is ae


def test_cache_round_trip_and_hash(tmp_path, toy_loader):
    loader, items, _ = toy_loader
    ae = tiny_autoencoder()
    ae_file = tmp_path / "ae.pt"
    torch.save(ae.state_dict(), ae_file)
    sha = file_sha256(ae_file)
    cache = LatentCache.from_posteriors(encode_posteriors(ae, loader, progress=False), sha, image_size=32)
    path = cache.save(tmp_path / "cache" / "latents.pt")
    assert [p.name for p in path.parent.iterdir()] == ["latents.pt"], "no temporary file left behind"
    back = LatentCache.load(path, expected_autoencoder_sha256=sha)
    torch.testing.assert_close(back.mu, cache.mu)
    torch.testing.assert_close(back.sigma, cache.sigma)
    assert back.labels.tolist() == [it["label"] for it in items]
    assert back.autoencoder_sha256 == sha and back.image_size == 32 and len(back) == len(items)
    assert back.extras["class"] == [it["class"] for it in items]
    assert LatentCache.load(path).autoencoder_sha256 == sha  # no expectation: no check
    with pytest.raises(ValueError, match="latents.pt") as err:
        LatentCache.load(path, expected_autoencoder_sha256="0" * 64)
    assert sha in str(err.value) and "0" * 64 in str(err.value) and "delete the cache" in str(err.value)


class _Counting:
    def __init__(self, loader):
        self.loader, self.calls = loader, 0

    def __iter__(self):
        self.calls += 1
        return iter(self.loader)


def test_get_or_create_latent_cache(tmp_path, toy_loader):
    loader = _Counting(toy_loader[0])
    ae = tiny_autoencoder()
    path = tmp_path / "latents.pt"
    first = get_or_create_latent_cache(path, ae, loader, autoencoder_sha256="a" * 64, image_size=32)
    assert loader.calls == 1 and path.is_file()
    again = get_or_create_latent_cache(path, ae, loader, autoencoder_sha256="a" * 64)
    assert loader.calls == 1, "a matching cache is loaded, not rebuilt"
    torch.testing.assert_close(again.mu, first.mu)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = get_or_create_latent_cache(path, ae, loader, autoencoder_sha256="b" * 64)
    assert loader.calls == 2 and rebuilt.autoencoder_sha256 == "b" * 64
    assert LatentCache.load(path).autoencoder_sha256 == "b" * 64


def test_cached_dataset_shapes_and_aligned_augmentation():
    torch.manual_seed(0)
    mu = torch.randn(5, 3, 4, 4)
    sigma = torch.exp(mu / 2)  # sigma is a pointwise function of mu: alignment is checkable after augmentation
    cache = LatentCache(mu, sigma, labels=torch.arange(5))
    item = CachedLatentDataset(cache)[2]
    assert set(item) == {"latent_mu", "latent_sigma", "label"}
    assert item["latent_mu"].shape == (3, 4, 4) and item["label"] == 2
    torch.testing.assert_close(item["latent_mu"], mu[2])
    assert set(LatentCache(mu, sigma).dataset()[0]) == {"latent_mu", "latent_sigma"}

    ds = cache.dataset(augment=True)
    group = [torch.rot90(m, k, (-2, -1)) for m in (mu[1], mu[1].flip(-1)) for k in range(4)]
    seen = set()
    for _ in range(80):
        it = ds[1]
        torch.testing.assert_close(it["latent_sigma"], torch.exp(it["latent_mu"] / 2))
        matches = [i for i, g in enumerate(group) if torch.equal(g, it["latent_mu"])]
        assert matches, "augmentation is an element of the dihedral group"
        seen.add(matches[0])
    assert len(seen) == 8


def test_truncated_cache_is_named_and_rebuilt(tmp_path, toy_loader):
    """A cache cut short (a copy, a full disk) is reported naming the file; get_or_create encodes it again."""
    import re

    from monai_histodiff.data.validation import CorruptFileError

    loader = _Counting(toy_loader[0])
    ae = tiny_autoencoder()
    path = tmp_path / "latents.pt"
    first = get_or_create_latent_cache(path, ae, loader, autoencoder_sha256="a" * 64, image_size=32)
    path.write_bytes(path.read_bytes()[:200])
    expected = rf"{re.escape(str(path))} \(read by LatentCache\.load \(latent cache\)\) is truncated or corrupt .*delete it"
    with pytest.raises(CorruptFileError, match=expected + ": .*encodes the tiles again"):
        LatentCache.load(path, expected_autoencoder_sha256="a" * 64)
    with pytest.warns(UserWarning, match=rf"rebuilding the latent cache: {re.escape(str(path))}.*truncated"):
        rebuilt = get_or_create_latent_cache(path, ae, loader, autoencoder_sha256="a" * 64, image_size=32)
    assert loader.calls == 2
    torch.testing.assert_close(rebuilt.mu, first.mu)
    torch.testing.assert_close(LatentCache.load(path).mu, first.mu)
