"""Stage 2 bundles at the small size: auxiliary classifier, decoder-only fine-tuning, time-dependent latent
classifier, on generated toy tiles and on the real NCT-CRC-HE tiles."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from monai_histodiff.engines import load_autoencoder, load_image_classifier, load_latent_classifier
from monai_histodiff.data import load_datalist
from monai_histodiff.handlers import file_sha256, load_checkpoint
from tests.bundles.conftest import FAST, SMALL, run_bundle


@pytest.fixture(scope="module")
def toy_labeled(tmp_path_factory):
    from monai_histodiff.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy_labeled")
    make_toy_dataset(root, num_per_class=14, image_size=64, num_classes=4, seed=3)
    return root


def _site(tmp_path, pretrained):
    """A new site: the downloaded pre-trained checkpoints copied into its output folder."""
    for stage in ("pretrain_autoencoder", "pretrain_diffusion"):
        (tmp_path / stage).mkdir(parents=True)
        name = "autoencoder.pt" if stage == "pretrain_autoencoder" else "diffusion.pt"
        shutil.copy(pretrained / stage / name, tmp_path / stage / name)
    return tmp_path


def _adapt(site, dataset_dir, per_class, val_fraction, epochs=2, latent_epochs=2, lr=1e-3):
    common = dict(dataset_dir=str(dataset_dir), output_dir=str(site), label_per_class=per_class,
                  val_fraction=val_fraction, lr=lr, **FAST)
    run_bundle(["bundles/train_aux_classifier.json", *SMALL], max_epochs=epochs, batch_size=8, **common)
    run_bundle(["bundles/finetune.json", *SMALL], max_epochs=epochs, batch_size=4, **common)
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], max_epochs=latent_epochs, batch_size=8, **common)


def test_adaptation_on_real_tiles(pretrained, nct_crc_dir, unlabeled_dir, tmp_path):
    site = _site(tmp_path, pretrained)
    ae_path = site / "pretrain_autoencoder" / "autoencoder.pt"
    ae_hash = file_sha256(ae_path)
    _adapt(site, nct_crc_dir, per_class=2, val_fraction=0.5)
    split = json.loads((site / "split.json").read_text())
    assert split["classes"][0] == "ADI" and len(split["classes"]) == 9
    aux = load_checkpoint(site / "train_aux_classifier" / "aux_classifier.pt")
    assert aux["meta"]["classes"] == split["classes"] and "best_metric" in aux["meta"]
    assert load_image_classifier(site / "train_aux_classifier" / "aux_classifier.pt")(
        torch.zeros(1, 3, 64, 64)).shape == (1, 9)
    # the pre-trained autoencoder file is never modified; the fine-tuned decoder is its own checkpoint
    assert file_sha256(ae_path) == ae_hash
    dec = load_checkpoint(site / "finetune" / "decoder_ft.pt", stage="finetune")
    assert dec["state"]["decoder"] and all(k.split(".")[0] in ("decoder", "post_quant_conv") for k in dec["state"]["decoder"])
    assert dec["meta"]["parents"]["autoencoder"]["sha256"] == ae_hash
    pre = load_autoencoder(ae_path)
    ft = load_autoencoder(ae_path, decoder_path=site / "finetune" / "decoder_ft.pt")
    pre_sd, ft_sd = pre.state_dict(), ft.state_dict()
    encoder_keys = [k for k in pre_sd if k.split(".")[0] not in ("decoder", "post_quant_conv")]
    assert encoder_keys and all(torch.equal(pre_sd[k], ft_sd[k]) for k in encoder_keys)  # encoder bit-identical
    assert any(not torch.equal(pre_sd[k], ft_sd[k]) for k in dec["state"]["decoder"])  # decoder trained
    assert len(list((site / "finetune" / "grids").glob("x_vs_pretrained_vs_finetuned_epoch*.png"))) == 2
    # latent classifier: scheduler and scale factor read from the diffusion checkpoint, per-bucket accuracy file
    lat = load_checkpoint(site / "train_latent_classifier" / "latent_classifier.pt")
    diff = load_checkpoint(site / "pretrain_diffusion" / "diffusion.pt")
    assert lat["meta"]["scale_factor"] == diff["meta"]["scale_factor"]
    acc = json.loads((site / "train_latent_classifier" / "timestep_accuracy.json").read_text())
    assert len(acc["buckets"]) == 10 and acc["buckets"][-1]["t_max"] == 999
    assert (site / "train_latent_classifier" / "timestep_accuracy.png").stat().st_size > 0
    clf = load_latent_classifier(site / "train_latent_classifier" / "latent_classifier.pt",
                                 diffusion_path=site / "pretrain_diffusion" / "diffusion.pt")
    assert clf(torch.zeros(2, 3, 16, 16), torch.tensor([0, 999])).shape == (2, 9)

    # with pseudo-labels (an option): unlabeled tiles labeled by the auxiliary classifier; the site's training and
    # validation tiles among them are held out, and the classifier trains on both sets
    split = load_datalist(site / "split.json")  # image paths made absolute
    others = sorted(p for p in unlabeled_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:12]
    unlabeled = [{"image": it["image"]} for it in split["training"] + split["validation"]]
    unlabeled += [{"image": str(p)} for p in others]
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], dataset_dir=str(nct_crc_dir), output_dir=str(site),
               max_epochs=1, batch_size=8, pseudo_labels=True, pseudo_label_datalist=unlabeled,
               pseudo_label_confidence=0.0, **FAST)
    record = json.loads((site / "train_latent_classifier" / "pseudo_labels.json").read_text())
    assert record["given"] == len(unlabeled) and record["held_out"] == len(split["training"]) + len(split["validation"])
    assert record["kept"] == len(others) == 12 and sum(record["kept_per_class"].values()) == record["kept"]
    lat = load_checkpoint(site / "train_latent_classifier" / "latent_classifier.pt")
    assert lat["meta"]["config"]["pseudo_labeled_tiles"] == record["kept"]
    assert lat["meta"]["config"]["labeled_share"] == 0.5
    assert len(list((site / "train_latent_classifier").glob("latent_cache_pseudo_*"))) == 1


def test_latent_classifier_learns_separable_toy_classes(pretrained, toy_labeled, tmp_path):
    site = _site(tmp_path, pretrained)
    run_bundle(["bundles/train_latent_classifier.json", *SMALL], dataset_dir=str(toy_labeled), output_dir=str(site),
               label_per_class=12, val_fraction=0.25, max_epochs=10, val_interval=10, batch_size=36, lr=2e-3,
               **FAST)  # 200 steps (small.json: 20 per epoch)
    acc = json.loads((site / "train_latent_classifier" / "timestep_accuracy.json").read_text())
    clean = acc["buckets"][0]["accuracy"]
    assert acc["chance"] == 0.25 and clean >= 0.6, acc["buckets"]  # clearly above chance on (nearly) clean latents
    assert acc["buckets"][-1]["accuracy"] <= clean
