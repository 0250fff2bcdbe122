"""Tests of the decoder-only conditional fine-tuning trainer (HistoDiffusion Eq. 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from monai_histodiff.engines import DecoderFinetuneTrainer, decoder_parameters, freeze_encoder
from monai_histodiff.networks import HistoImageClassifier
from tests.tiny import tiny_autoencoder

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def _autoencoder() -> AutoencoderKL:
    return tiny_autoencoder(seed=None).train()


def _classifier() -> HistoImageClassifier:
    return HistoImageClassifier(num_classes=2, image_size=16, channels=(8, 16), norm_num_groups=8, num_heads=2)


def _toy_batch(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two separable classes of 16 x 16 RGB tiles in [0, 1]: class 0 pink top / blue bottom, class 1 pink left / blue
    right. The class is spatial, so it survives the per-sample GroupNorm of the random (frozen) toy encoder."""
    labels = torch.arange(n) % 2
    half = (torch.arange(16) >= 8).float()
    masks = torch.stack([half[:, None].expand(16, 16), half[None, :].expand(16, 16)])[labels]  # (n, 16, 16)
    pink, blue = torch.tensor([0.85, 0.45, 0.7]), torch.tensor([0.35, 0.3, 0.8])
    images = pink[None, :, None, None] * (1 - masks[:, None]) + blue[None, :, None, None] * masks[:, None]
    images = images + 0.05 * torch.randn(n, 3, 16, 16, generator=gen)
    return {"image": images.clamp(0, 1), "label": labels}


def _loader(num_batches: int, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [_toy_batch(batch_size, gen) for _ in range(num_batches)]


def _pretrained_classifier(steps: int = 25) -> HistoImageClassifier:
    """The auxiliary classifier phi, trained briefly on the real toy tiles."""
    clf = _classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for batch in _loader(steps, seed=123):
        opt.zero_grad()
        F.cross_entropy(clf(batch["image"]), batch["label"]).backward()
        opt.step()
    with torch.no_grad():
        test = _loader(1, batch_size=32, seed=7)[0]
        assert (clf.eval()(test["image"]).argmax(1) == test["label"]).float().mean() == 1.0
    return clf.train()  # the trainer must put it in eval mode itself


def _trainer(ae, clf, loader, lr=1e-3, **kwargs) -> DecoderFinetuneTrainer:
    freeze_encoder(ae)
    opt = torch.optim.Adam(decoder_parameters(ae), lr=lr)
    return DecoderFinetuneTrainer(
        device="cpu", max_epochs=1, train_data_loader=loader, autoencoder=ae, classifier=clf, optimizer=opt, **kwargs
    )


@pytest.fixture(autouse=True)
def _seed_and_one_thread(one_thread):
    """Seeded, and single-threaded (the shared ``one_thread`` fixture)."""
    torch.manual_seed(0)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_decoder_parameters_and_freeze_encoder():
    ae = _autoencoder()
    names = {id(p): n for n, p in ae.named_parameters()}
    trainable = decoder_parameters(ae)
    assert trainable and all(names[id(p)].startswith(DECODER_PREFIXES) for p in trainable)
    assert len(trainable) == sum(1 for n, _ in ae.named_parameters() if n.startswith(DECODER_PREFIXES))
    freeze_encoder(ae)
    for n, p in ae.named_parameters():
        assert p.requires_grad == n.startswith(DECODER_PREFIXES), n
    for name in ("encoder", "quant_conv_mu", "quant_conv_log_sigma"):
        assert not getattr(ae, name).training
    assert decoder_parameters(ae) == trainable


def test_only_decoder_is_updated_encoder_and_classifier_bit_identical():
    ae, clf = _autoencoder(), _classifier()
    ae_before, clf_before = _snapshot(ae), _snapshot(clf)
    modes: list[bool] = []
    for module in (ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma, clf):
        original = module.train
        module.train = lambda mode=True, _orig=original: (modes.append(mode), _orig(mode))[1]  # type: ignore
    trainer = _trainer(ae, clf, _loader(3))
    trainer.run()

    assert True not in modes, "the trainer switched a frozen module to train mode"
    assert not any(m.training for m in (ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma, clf))
    assert ae.decoder.training and ae.post_quant_conv.training
    after = ae.state_dict()
    changed = []
    for key, value in ae_before.items():  # parameters and buffers
        if key.startswith(DECODER_PREFIXES):
            changed.append(not torch.equal(value, after[key]))
        else:
            assert torch.equal(value, after[key]), f"encoder-side {key} changed"
    assert any(changed), "decoder weights did not change"
    for key, value in clf_before.items():
        assert torch.equal(value, clf.state_dict()[key]), f"classifier {key} changed"
    for n, p in ae.named_parameters():
        if not n.startswith(DECODER_PREFIXES):
            assert p.grad is None, n
    assert all(p.grad is None for p in clf.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.decoder.parameters())

    out = trainer.state.output
    assert set(out) >= {"image", "label", "recon", "loss", "rec", "ce", "lr"}
    assert out["recon"].shape == out["image"].shape == (8, 3, 16, 16)
    assert isinstance(out["loss"], float) and out["lr"] == pytest.approx(1e-3)
    # one reconstruction function: |x_hat - x| summed per sample, batch mean; CE per pixel element (n = 3 * 16 * 16)
    assert out["rec"] == pytest.approx(float((out["recon"] - out["image"]).abs().sum() / 8), rel=1e-5)
    assert out["loss"] == pytest.approx(out["rec"] + 768 * out["ce"], rel=1e-5)


def test_latent_is_posterior_mean_by_default():
    ae, clf = _autoencoder(), _classifier()
    loader = _loader(1)
    trainer = _trainer(ae, clf, loader, lr=0.0)
    trainer.run()
    with torch.no_grad():
        expected = ae.decode(ae.encode(loader[0]["image"])[0])
    assert torch.allclose(trainer.state.output["recon"], expected, atol=1e-6)


def test_ce_term_decreases_on_toy_problem():
    ae, clf = _autoencoder(), _pretrained_classifier()
    history: list[tuple[float, float, float]] = []
    trainer = _trainer(ae, clf, _loader(30), lr=2e-3, ce_weight=1.0)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        history.append((engine.state.output["loss"], engine.state.output["rec"], engine.state.output["ce"]))

    trainer.run()
    assert len(history) == 30
    first, last = history[:5], history[-5:]

    def mean(rows, i):
        return sum(r[i] for r in rows) / len(rows)

    assert mean(last, 2) < 0.5 * mean(first, 2), history  # CE through the frozen classifier
    assert mean(last, 0) < mean(first, 0)  # total L_D (the L1 term may trade off against CE on this toy)


def test_nan_batch_raises_naming_the_term():
    ae, clf = _autoencoder(), _classifier()
    loader = _loader(2)
    loader[1]["image"][0, 0, 0, 0] = float("nan")
    trainer = _trainer(ae, clf, loader)
    with pytest.raises(FloatingPointError, match=r"'rec'.*iteration 2"):
        trainer.run()


def test_nan_in_classifier_output_names_ce():
    class NaNClassifier(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))[:, :2] * float("nan")

    ae = _autoencoder()
    before = _snapshot(ae.decoder)
    trainer = _trainer(ae, NaNClassifier(), _loader(1))
    with pytest.raises(FloatingPointError, match="'ce'"):
        trainer.run()
    assert all(torch.equal(v, ae.decoder.state_dict()[k]) for k, v in before.items()), "step taken despite NaN"


def test_perceptual_and_adversarial_terms():
    ae, clf = _autoencoder(), _classifier()
    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=8, in_channels=3, out_channels=1)
    d_before = _snapshot(disc)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    outputs = []
    trainer = _trainer(
        ae,
        clf,
        _loader(3),
        perceptual_loss=lambda a, b: F.mse_loss(a, b),
        perceptual_weight=0.5,
        discriminator=disc,
        d_optimizer=d_opt,
        adv_weight=0.1,
        adv_start=1,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert all({"perceptual", "adv_g", "adv_d"} <= set(o) for o in outputs)
    assert outputs[0]["adv_g"] == 0.0 and outputs[0]["adv_d"] == 0.0  # before adv_start
    assert outputs[1]["adv_g"] > 0.0 and outputs[1]["adv_d"] > 0.0
    for o in outputs:
        expected = o["rec"] + 768 * (0.5 * o["perceptual"] + 0.1 * o["adv_g"] + o["ce"])  # per pixel element
        assert o["loss"] == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(v, disc.state_dict()[k]) for k, v in d_before.items())


def test_invalid_arguments():
    ae, clf = _autoencoder(), _classifier()
    with pytest.raises(ValueError, match="outside the decoder"):
        DecoderFinetuneTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=_loader(1),
            autoencoder=ae,
            classifier=clf,
            optimizer=torch.optim.SGD(ae.parameters(), lr=0.1),
        )
    with pytest.raises(ValueError, match="together"):
        _trainer(ae, clf, _loader(1), discriminator=nn.Conv2d(3, 1, 3), adv_weight=0.1)
    with pytest.raises(ValueError, match="labels"):
        _trainer(ae, clf, [{"image": torch.rand(2, 3, 16, 16)}]).run()
