from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from monai_histodiff.engines import AutoencoderKLTrainer, kl_divergence, reconstruction_loss


def _nets():
    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16), latent_channels=3,
                       num_res_blocks=1, norm_num_groups=8, attention_levels=(False, False))
    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=8, in_channels=3, out_channels=1)
    return ae, disc


def test_adversarial_terms_start_after_adv_start_and_loss_decreases():
    ae, disc = _nets()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    trainer = AutoencoderKLTrainer(device="cpu", max_epochs=30, train_data_loader=[{"image": x}], autoencoder=ae,
                                   g_optimizer=torch.optim.Adam(ae.parameters(), 3e-3), discriminator=disc,
                                   d_optimizer=torch.optim.Adam(disc.parameters(), 1e-3), adv_start=20, adv_weight=0.01)
    outs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(e.state.output))
    d_before = [p.clone() for p in disc.parameters()]
    trainer.run()
    assert all("adv_g" not in o for o in outs[:20]) and all({"adv_g", "adv_d"} <= set(o) for o in outs[20:])
    assert outs[-1]["rec"] < 0.7 * outs[0]["rec"]
    assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))


def test_nan_input_raises_naming_term():
    ae, _ = _nets()
    x = torch.full((2, 3, 16, 16), float("nan"))
    trainer = AutoencoderKLTrainer(device="cpu", max_epochs=1, train_data_loader=[{"image": x}], autoencoder=ae,
                                   g_optimizer=torch.optim.Adam(ae.parameters(), 1e-3))
    with pytest.raises(FloatingPointError, match="'loss' is nan at iteration 1"):
        trainer.run()


def test_kl_matches_closed_form():
    mu, sigma = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.5]])
    expected = 0.5 * ((0.25 + 1 - 0 - 1) + (1 + 0.25 - torch.log(torch.tensor(0.25)) - 1))
    assert float(kl_divergence(mu, sigma)) == pytest.approx(float(expected), rel=1e-5)


def test_kl_to_reconstruction_ratio_is_ldm_s():
    """LDM: nll = sum|x - x_hat| / B, kl = sum(KL elements) / B; hand-computed on a known tensor."""
    x, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    mu, sigma = torch.ones(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    rec, kl = reconstruction_loss(recon, x), kl_divergence(mu, sigma)
    assert float(rec) == pytest.approx(0.5 * 48)  # 48 elements per sample, |0.5| each
    assert float(kl) == pytest.approx(0.5 * 12)  # 12 latent elements, KL(N(1, 1) || N(0, 1)) = 0.5 each
    assert float(kl / rec) == pytest.approx(0.25)  # a per-pixel mean L1 would have made it 48x larger


def test_trainer_logs_the_ldm_terms():
    ae, _ = _nets()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    trainer = AutoencoderKLTrainer(device="cpu", max_epochs=1, train_data_loader=[{"image": x}], autoencoder=ae,
                                   g_optimizer=torch.optim.SGD(ae.parameters(), 0.0), kl_weight=1e-3)
    trainer.run()
    out = trainer.state.output
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(x)  # deterministic; the decoded z is a posterior sample, so rec is checked on recon
    assert out["rec"] == pytest.approx(float(reconstruction_loss(out["recon"], x)), rel=1e-5)
    assert out["rec"] == pytest.approx(768 * float((out["recon"] - x).abs().mean()), rel=1e-5)  # a sum, not a mean
    assert out["kl"] == pytest.approx(float(kl_divergence(z_mu, z_sigma)), rel=1e-4)
    assert out["loss"] == pytest.approx(out["rec"] + 1e-3 * out["kl"], rel=1e-5)
