"""Tests of the class-conditional fine-tuning plumbing (stage finetune_conditional)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from monai_histodiff.engines import (
    ClassConditionalPrepareBatch,
    LatentCache,
    check_conditional,
    conditional_from_pretrained,
    conditional_latent_cache,
    labeled_share_weights,
    load_diffusion,
)
from monai_histodiff.handlers import CheckpointMismatchError
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint
from tests.tiny import tiny_unet

UNET_ARGS = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [8, 16],
             "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 8}


@pytest.fixture()
def pretrained(tmp_path):
    torch.manual_seed(0)
    unet, ema = tiny_unet(), tiny_unet()
    with torch.no_grad():  # trained-looking weights: MONAI starts the residual branches' last convolutions at zero
        for p in [*unet.parameters(), *ema.parameters()]:
            p.normal_(std=0.1)
    path = tmp_path / "diffusion.pt"
    save_checkpoint(path, {"diffusion": unet, "ema": ema},
                    checkpoint_meta("pretrain_diffusion", config={"diffusion_args": UNET_ARGS,
                                                                  "scheduler_args": {"num_train_timesteps": 1000}},
                                    scale_factor=0.8, latent_shape=[3, 8, 8]))
    return path, ema.eval()


def test_conditional_model_starts_as_the_pretrained_one_for_every_class(pretrained):
    path, ema = pretrained
    model = conditional_from_pretrained(path, num_classes=3).eval()
    assert model.class_embedding.num_embeddings == 4  # 3 classes + the null class
    z, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 250, 500, 999])
    with torch.no_grad():
        expected = ema(z, timesteps=t)
        for label in range(4):
            torch.testing.assert_close(model(z, timesteps=t, class_labels=torch.full((4,), label)), expected)
        model.class_embedding.weight.normal_()  # once the embedding learns, the class changes the output
        assert not torch.allclose(model(z, timesteps=t, class_labels=torch.zeros(4, dtype=torch.long)),
                                  model(z, timesteps=t, class_labels=torch.ones(4, dtype=torch.long)))


def test_a_fine_tuned_checkpoint_loads_and_is_checked_against_its_parent_and_classes(pretrained, tmp_path):
    path, _ = pretrained
    model = conditional_from_pretrained(path, num_classes=2)
    cond = tmp_path / "diffusion_conditional.pt"
    save_checkpoint(cond, {"diffusion": model, "ema": model},
                    checkpoint_meta("finetune_conditional", config={"diffusion_args": {**UNET_ARGS,
                                                                                       "num_class_embeds": 3}},
                                    parents={"diffusion": str(path)}, classes=["a", "b"], null_class=2))
    loaded, meta = load_diffusion(cond)
    assert loaded.num_class_embeds == 3 and meta["stage"] == "finetune_conditional"
    assert check_conditional(cond, path, ["a", "b"]) == {"null_class": 2, "num_classes": 2}
    with pytest.raises(ValueError, match=r"classes \['a', 'b'\].*rerun finetune_conditional"):
        check_conditional(cond, path, ["b", "a"])
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"diffusion": tiny_unet()}, checkpoint_meta("pretrain_diffusion",
                                                                        config={"diffusion_args": UNET_ARGS}))
    with pytest.raises(CheckpointMismatchError, match="other.pt"):
        check_conditional(cond, other, ["a", "b"])
    with pytest.raises(ValueError, match="already class-conditional"):
        bad = tmp_path / "cond_as_pretrained.pt"
        save_checkpoint(bad, {"diffusion": model}, checkpoint_meta(
            "pretrain_diffusion", config={"diffusion_args": {**UNET_ARGS, "num_class_embeds": 3}}))
        conditional_from_pretrained(bad, num_classes=2)


def test_latent_cache_gives_unlabeled_tiles_the_null_class_and_weights_set_the_labeled_share():
    labeled = LatentCache(torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2), torch.tensor([0, 1, 2, 1]), "abc")
    unlabeled = LatentCache(torch.ones(6, 3, 2, 2), torch.ones(6, 3, 2, 2), None, "abc")
    both = conditional_latent_cache(labeled, unlabeled, null_class=3)
    assert both.labels.tolist() == [0, 1, 2, 1, 3, 3, 3, 3, 3, 3] and len(both) == 10
    assert conditional_latent_cache(labeled, None, null_class=3) is labeled
    with pytest.raises(ValueError, match="different autoencoders"):
        conditional_latent_cache(labeled, LatentCache(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2), None, "x"), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        conditional_latent_cache(labeled, unlabeled, null_class=2)
    weights = labeled_share_weights(4, 6, 0.25)
    assert sum(weights[:4]) == pytest.approx(0.25) and sum(weights[4:]) == pytest.approx(0.75)
    assert labeled_share_weights(4, 0, 0.25) == [0.25] * 4


def test_prepare_batch_drops_classes_at_rate_p_uncond_and_keeps_the_null_class():
    scheduler = DDPMScheduler(1000)
    n = 4000
    batch = {"latent_mu": torch.zeros(n, 3, 2, 2), "latent_sigma": torch.ones(n, 3, 2, 2),
             "label": torch.tensor([0, 1, 2, 3] * (n // 4))}
    torch.manual_seed(0)
    inputs, target, _, kw = ClassConditionalPrepareBatch(1000, null_class=3, p_uncond=0.2, scheduler=scheduler)(batch)
    labels = kw["class_labels"]
    assert set(kw) == {"noise", "timesteps", "class_labels"} and inputs.shape == target.shape
    assert (labels[3::4] == 3).all()  # unlabeled tiles stay null
    for c in range(3):  # each labeled class: kept or dropped to null, dropped ~20% of the time
        kept = labels[c::4]
        assert set(kept.unique().tolist()) <= {c, 3}
        assert (kept == 3).float().mean() == pytest.approx(0.2, abs=0.04)
    _, _, _, kw = ClassConditionalPrepareBatch(1000, null_class=3, p_uncond=0.0, scheduler=scheduler)(batch)
    assert torch.equal(kw["class_labels"], batch["label"])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        ClassConditionalPrepareBatch(1000, null_class=2, p_uncond=0.0)(batch)
