"""The paper-scale configs (256 px, LDM-4) build as configured and take one training step at reduced input size."""

from __future__ import annotations

import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer

from monai_histodiff.bundle.configs import config_files
from monai_histodiff.engines import AutoencoderKLTrainer, LatentDiffusionPrepareBatch


def _parser(stage: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(stage))
    parser["output_dir"] = "/tmp/unused"  # nothing is written: only definitions are parsed
    return parser


def test_paper_autoencoder_and_one_adversarial_step():
    p = _parser("pretrain_autoencoder")
    assert p.get_parsed_content("image_size") == 256
    ae = p.get_parsed_content("network_def")
    disc = p.get_parsed_content("discriminator_def")
    assert list(ae.encoder.channels) == [128, 256, 512] and ae.encoder.num_res_blocks == (2, 2, 2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # reduced input size, same networks
    assert ae.encode_stage_2_inputs(x).shape == (1, 3, 8, 8)  # f = 4, 3 latent channels
    trainer = AutoencoderKLTrainer(device="cpu", max_epochs=1, train_data_loader=[{"image": x}], autoencoder=ae,
                                   g_optimizer=torch.optim.Adam(ae.parameters(), 1e-5), discriminator=disc,
                                   d_optimizer=torch.optim.Adam(disc.parameters(), 1e-5), adv_start=0)
    trainer.run()
    out = trainer.state.output
    assert {"rec", "kl", "adv_g", "adv_d"} <= set(out) and all(torch.isfinite(torch.tensor(out[k])) for k in out
                                                              if isinstance(out[k], float))


def test_paper_diffusion_unet_and_one_step():
    p = _parser("pretrain_diffusion")
    unet = p.get_parsed_content("network_def")
    args = p.get_parsed_content("diffusion_args")
    assert args["channels"] == [192, 384, 384, 768, 768] and args["attention_levels"] == [True, True, True, True, False]
    assert [c // h for c, h in zip(args["channels"], args["num_head_channels"])] == [8] * 5  # 8 heads per level
    sched = p.get_parsed_content("noise_scheduler")
    assert sched.num_train_timesteps == 1000
    ref = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000) ** 2  # LDM "linear" = scaled_linear_beta
    torch.testing.assert_close(sched.betas, ref)
    batch = [{"latent_mu": torch.randn(1, 3, 16, 16), "latent_sigma": torch.full((1, 3, 16, 16), 0.1)}]
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=batch, network=unet,
                                optimizer=torch.optim.AdamW(unet.parameters(), 5e-5), loss_function=torch.nn.MSELoss(),
                                inferer=DiffusionInferer(sched), prepare_batch=LatentDiffusionPrepareBatch(1000, 1.0),
                                decollate=False)
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


def test_paper_stylegan2_and_one_step():
    """The GAN baseline at the paper's scale: 256 px, StyleGAN2's 512-d latents and channels, batch 64, lr 2e-4,
    100 epochs; one training iteration (discriminator with R1, generator) of batch 2 runs and changes both."""
    from monai_histodiff.engines import StyleGAN2Trainer

    p = _parser("train_stylegan2")
    p["num_classes"] = 9  # the paper's NCT-CRC classes (the split is not read)
    assert [p.get_parsed_content(k) for k in ("image_size", "batch_size", "lr", "max_epochs")] == [256, 64, 2e-4, 100]
    G, D = p.get_parsed_content("network_def"), p.get_parsed_content("discriminator_def")
    assert (G.z_dim, G.w_dim, G.image_size) == (512, 512, 256)
    g0 = [q.detach().clone() for q in G.parameters()]
    d0 = [q.detach().clone() for q in D.parameters()]
    trainer = StyleGAN2Trainer(
        device="cpu", max_epochs=1,
        train_data_loader=[{"image": torch.rand(2, 3, 256, 256) * 2 - 1, "label": torch.tensor([0, 8])}],
        generator=G, discriminator=D, g_optimizer=torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.99)),
        d_optimizer=torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.99)),
        r1_gamma=p.get_parsed_content("r1_gamma"), r1_interval=p.get_parsed_content("r1_interval"))
    trainer.run()
    out = trainer.state.output
    assert out["r1"] > 0 and all(torch.isfinite(torch.tensor(out[k])) for k in ("loss_g", "loss_d", "r1"))
    assert any(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
