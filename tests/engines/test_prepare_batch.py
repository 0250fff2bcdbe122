"""Tests of the latent prepare-batch callables with MONAI's SupervisedTrainer."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from monai_histodiff.engines import (
    CachedLatentDataset,
    LatentCache,
    LatentDiffusionPrepareBatch,
    NoisyLatentClassificationPrepareBatch,
    encode_posteriors,
    resolve_scale_factor,
)
from tests.tiny import tiny_autoencoder, tiny_unet




@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    labels = torch.arange(8) % 2
    ae = tiny_autoencoder()
    image_batches = [{"image": images[i : i + 4], "label": labels[i : i + 4]} for i in (0, 4)]
    cache = LatentCache.from_posteriors(encode_posteriors(ae, image_batches, progress=False))
    return ae, images, labels, cache


class _Value:
    value = 0.5


def test_resolve_scale_factor():
    assert resolve_scale_factor(2) == 2.0
    assert resolve_scale_factor(lambda: 0.25) == 0.25
    assert resolve_scale_factor(_Value()) == 0.5
    assert resolve_scale_factor(torch.tensor(3.0)) == 3.0
    with pytest.raises(TypeError):
        resolve_scale_factor("x")


def test_latent_diffusion_prepare_batch_both_paths(data):
    ae, images, _, cache = data
    cached = next(iter(DataLoader(CachedLatentDataset(cache), batch_size=4)))
    for batch, pb in (
        (cached, LatentDiffusionPrepareBatch(1000, scale_factor=lambda: 0.5)),
        ({"image": images[:4]}, LatentDiffusionPrepareBatch(1000, scale_factor=_Value(), autoencoder=ae)),
    ):
        inputs, target, args, kwargs = pb(batch, torch.device("cpu"))
        assert inputs.shape == (4, 3, 8, 8) and inputs.dtype == torch.float32
        assert args == () and set(kwargs) == {"noise", "timesteps"}
        assert target is kwargs["noise"] and target.shape == inputs.shape
        assert kwargs["timesteps"].shape == (4,) and kwargs["timesteps"].dtype == torch.long
        assert 0 <= int(kwargs["timesteps"].min()) and int(kwargs["timesteps"].max()) < 1000
    with pytest.raises(ValueError, match="no autoencoder"):
        LatentDiffusionPrepareBatch(10)({"image": images[:2]})
    with pytest.raises(KeyError, match="latent_mu"):
        LatentDiffusionPrepareBatch(10)({"other": images[:2]})
    # scale factor is applied and timesteps cover the whole range
    pb = LatentDiffusionPrepareBatch(5, scale_factor=0.0)
    ts = torch.cat([pb(cached)[3]["timesteps"] for _ in range(50)])
    assert set(ts.tolist()) == set(range(5))
    assert torch.count_nonzero(pb(cached)[0]) == 0


def test_v_prediction_and_sample_targets(data):
    """The target follows the scheduler's prediction_type: the velocity for v_prediction (checked against its
    definition), z_0 for sample, eps by default; an unknown type is refused."""
    from monai.networks.schedulers import DDPMScheduler

    _, _, _, cache = data
    cached = next(iter(DataLoader(CachedLatentDataset(cache), batch_size=4)))
    sched = DDPMScheduler(1000, prediction_type="v_prediction")
    inputs, target, _, kwargs = LatentDiffusionPrepareBatch(1000, scale_factor=0.5, scheduler=sched)(cached)
    abar = sched.alphas_cumprod[kwargs["timesteps"]].view(-1, 1, 1, 1)
    assert torch.allclose(target, abar.sqrt() * kwargs["noise"] - (1 - abar).sqrt() * inputs, atol=1e-6)
    x0 = LatentDiffusionPrepareBatch(1000, scheduler=DDPMScheduler(1000, prediction_type="sample"))(cached)
    assert torch.equal(x0[1], x0[0])
    with pytest.raises(ValueError, match="prediction_type"):
        LatentDiffusionPrepareBatch(1000, scheduler=type("S", (), {"prediction_type": "flow"})())


def test_cached_latents_match_encoder_distribution(data):
    ae, images, _, cache = data
    draws = 300  # one batch holding each image 300 times: 300 independent posterior samples per image
    rep = (draws, 1, 1, 1)
    batch_cached = {"latent_mu": cache.mu[:4].repeat(rep), "latent_sigma": cache.sigma[:4].repeat(rep)}
    batch_images = {"image": images[:4].repeat(rep)}
    pb_cached = LatentDiffusionPrepareBatch(1000, scale_factor=0.7)
    pb_image = LatentDiffusionPrepareBatch(1000, scale_factor=0.7, autoencoder=ae)
    torch.manual_seed(2)
    zc = pb_cached(batch_cached)[0].reshape(draws, 4, 3, 8, 8)
    ze = pb_image(batch_images)[0].reshape(draws, 4, 3, 8, 8)
    expected_std = 0.7 * cache.sigma[:4]
    # per-element mean and std over draws agree with each other and with 0.7 * (mu, sigma)
    torch.testing.assert_close(zc.mean(0), ze.mean(0), atol=0.35 * float(expected_std.max()), rtol=0)
    torch.testing.assert_close(zc.mean(0), 0.7 * cache.mu[:4], atol=0.3 * float(expected_std.max()), rtol=0)
    torch.testing.assert_close(zc.std(0), ze.std(0), rtol=0.25, atol=0)
    torch.testing.assert_close(ze.std(0), expected_std, rtol=0.25, atol=0)
    # and globally, tightly
    assert abs(float(zc.mean() - ze.mean())) < 0.02
    assert abs(float(zc.std() / ze.std()) - 1) < 0.02


def _trainer(loader, network, prepare_batch, inferer=None, loss=None):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=3,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=loss or torch.nn.MSELoss(),
        inferer=inferer,
        prepare_batch=prepare_batch,
        decollate=False,
    )


@pytest.mark.parametrize("path", ["cached", "image"])
def test_supervised_trainer_diffusion(data, path):
    ae, images, _, cache = data
    torch.manual_seed(0)
    if path == "cached":
        loader = DataLoader(CachedLatentDataset(cache, augment=True), batch_size=2, shuffle=True)
        pb = LatentDiffusionPrepareBatch(1000, scale_factor=1.3)
    else:
        loader = DataLoader([{"image": im} for im in images], batch_size=2, shuffle=True)
        pb = LatentDiffusionPrepareBatch(1000, scale_factor=1.3, autoencoder=ae)
    unet = tiny_unet()
    before = [p.detach().clone() for p in unet.parameters()]
    ae_before = [p.detach().clone() for p in ae.parameters()]
    trainer = _trainer(loader, unet, pb, inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=1000)))
    trainer.run()
    assert trainer.state.iteration == 3
    assert trainer.state.output["pred"].shape == (2, 3, 8, 8)
    assert torch.isfinite(trainer.state.output["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ae_before, ae.parameters())), "the autoencoder stays frozen"


class DummyLatentClassifier(torch.nn.Module):
    """Stand-in for phi(z_t, t): records the timesteps it is called with."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t)
        return self.head(x.mean((2, 3))) + 0.001 * t.float()[:, None]


@pytest.mark.parametrize("path", ["cached", "image"])
def test_noisy_latent_classification_trainer(data, path):
    ae, images, labels, cache = data
    scheduler = DDPMScheduler(num_train_timesteps=100)
    if path == "cached":
        loader = DataLoader(CachedLatentDataset(cache), batch_size=4, shuffle=True)
        pb = NoisyLatentClassificationPrepareBatch(scheduler, scale_factor=0.8)
    else:
        loader = DataLoader([{"image": im, "label": int(y)} for im, y in zip(images, labels)], batch_size=4)
        pb = NoisyLatentClassificationPrepareBatch(scheduler, scale_factor=0.8, autoencoder=ae)
    z_t, y, args, kwargs = pb(next(iter(loader)), torch.device("cpu"))
    assert z_t.shape == (4, 3, 8, 8) and z_t.dtype == torch.float32
    assert y.dtype == torch.long and y.shape == (4,)
    assert len(args) == 1 and args[0].shape == (4,) and kwargs == {}
    assert pb.num_train_timesteps == 100 and int(args[0].max()) < 100

    clf = DummyLatentClassifier()
    trainer = _trainer(loader, clf, pb, loss=torch.nn.CrossEntropyLoss())
    trainer.run()
    assert trainer.state.iteration == 3 and torch.isfinite(trainer.state.output["loss"])
    assert len(clf.seen) == 3 and all(t.shape == (4,) for t in clf.seen)


def test_noisy_latents_follow_scheduler(data):
    _, _, _, cache = data
    scheduler = DDPMScheduler(num_train_timesteps=100)
    batch = {"latent_mu": cache.mu[:4], "latent_sigma": torch.zeros_like(cache.sigma[:4]), "label": torch.ones(4)}
    z_t, _, (t,), _ = NoisyLatentClassificationPrepareBatch(scheduler, 2.0, fixed_timesteps=0)(batch)
    assert t.tolist() == [0] * 4
    abar = float(scheduler.alphas_cumprod[0])
    # z_0 = 2 * mu exactly (sigma 0); z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps
    eps = (z_t - abar**0.5 * 2.0 * cache.mu[:4]) / (1 - abar) ** 0.5
    assert 0.8 < float(eps.std()) < 1.2
    z_t, _, (t,), _ = NoisyLatentClassificationPrepareBatch(scheduler, 2.0, fixed_timesteps=99)(batch)
    assert t.tolist() == [99] * 4
    with pytest.raises(ValueError, match="fixed_timesteps"):
        NoisyLatentClassificationPrepareBatch(scheduler, fixed_timesteps=100)
    with pytest.raises(KeyError, match="label"):
        NoisyLatentClassificationPrepareBatch(scheduler)({"latent_mu": cache.mu[:2], "latent_sigma": cache.sigma[:2]})
