"""Tests of the per-timestep-bucket accuracy of the time-dependent latent classifier."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.networks.schedulers import DDPMScheduler

import monai_histodiff.handlers.timestep_accuracy as ta
from monai_histodiff.handlers import TimestepBucketAccuracy, plot_timestep_accuracy
from monai_histodiff.networks import TimeConditionedLatentClassifier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _seed_and_one_thread(one_thread):
    """Seeded, and single-threaded (the shared ``one_thread`` fixture)."""
    torch.manual_seed(0)


def _ldm_scheduler() -> DDPMScheduler:
    """The LDM noise schedule: scaled-linear betas 0.0015 .. 0.0155 over T = 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0155)


def _toy_latents(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable clean latents [n, 3, 4, 4]: every element is about -1 for class 0 and +1 for class 1."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    latents = (2.0 * labels.float() - 1.0)[:, None, None, None] + 0.1 * torch.randn(n, 3, 4, 4, generator=gen)
    return latents, labels


class SignClassifier(nn.Module):
    """Closed-form phi(z_t, t): the sign of one latent element. Perfect on clean toy latents; at t ~ 999 the element
    is almost pure noise (sqrt(alpha_bar) ~ 0.03), so the accuracy falls to chance."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_t: list[torch.Tensor] = []

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen_t.append(t.clone())
        s = z_t[:, 0, 0, 0]
        return torch.stack([-s, s], dim=1)


class FakeWriter:
    """Records ``add_scalar`` calls like a TensorBoard ``SummaryWriter``."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_bucket_edges():
    latents, labels = _toy_latents(4)
    acc = TimestepBucketAccuracy(SignClassifier(), _ldm_scheduler(), latents, labels)
    assert acc.bucket_edges() == [(100 * b, 100 * b + 99) for b in range(10)]
    acc = TimestepBucketAccuracy(SignClassifier(), _ldm_scheduler(), latents, labels, num_buckets=3)
    assert acc.bucket_edges() == [(0, 332), (333, 665), (666, 999)]


def test_accuracy_near_one_at_low_t_and_chance_at_high_t():
    latents, labels = _toy_latents()
    clf = SignClassifier()
    acc = TimestepBucketAccuracy(clf, _ldm_scheduler(), latents, labels, timesteps_per_bucket=4, seed=3, batch_size=100)
    buckets = acc.compute()
    assert [b["bucket"] for b in buckets] == list(range(10))
    assert all(b["n"] == 256 * 4 for b in buckets)
    assert buckets[0]["accuracy"] > 0.95
    assert abs(buckets[-1]["accuracy"] - 0.5) < 0.08
    assert buckets[0]["accuracy"] > buckets[5]["accuracy"] > buckets[-1]["accuracy"]
    assert acc.num_classes == 2 and acc.chance == 0.5
    # every drawn timestep lies in its bucket (3 batches of <= 100 latents x 4 draws per bucket)
    for b, (t_min, t_max) in enumerate(acc.bucket_edges()):
        seen = torch.cat(clf.seen_t[b * 12 : (b + 1) * 12])
        assert seen.numel() == 256 * 4 and seen.min() >= t_min and seen.max() <= t_max
    assert TimestepBucketAccuracy(clf, _ldm_scheduler(), latents, labels, seed=3).compute() == buckets  # seeded
    # a clean-latent-perfect classifier is perfect at t = 0
    at_t0 = TimestepBucketAccuracy(clf, _ldm_scheduler(), latents, labels, num_buckets=1, num_train_timesteps=1)
    assert at_t0.compute() == [{"bucket": 0, "t_min": 0, "t_max": 0, "accuracy": 1.0, "n": 1024}]


def test_scale_factor_scales_the_latents():
    latents, labels = _toy_latents(64)
    scaled = TimestepBucketAccuracy(SignClassifier(), _ldm_scheduler(), latents, labels, num_buckets=4).compute()
    raw = TimestepBucketAccuracy(
        SignClassifier(), _ldm_scheduler(), latents / 0.25, labels, scale_factor=0.25, num_buckets=4
    ).compute()
    assert raw == scaled


def test_write_json_and_plot(tmp_path):
    latents, labels = _toy_latents(32)
    acc = TimestepBucketAccuracy(SignClassifier(), _ldm_scheduler(), latents, labels, num_buckets=5)
    acc.write_json(tmp_path / "sub" / "acc.json", epoch=7)  # computes on demand
    data = json.loads((tmp_path / "sub" / "acc.json").read_text())
    assert data["epoch"] == 7 and data["chance"] == 0.5 and len(data["buckets"]) == 5
    assert set(data["buckets"][0]) == {"bucket", "t_min", "t_max", "accuracy", "n"}
    plot_timestep_accuracy(data["buckets"], tmp_path / "plots" / "acc.png", chance=data["chance"])
    assert (tmp_path / "plots" / "acc.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_timestep_accuracy([], tmp_path / "empty.png")


def test_handler_populates_metrics_json_png_and_tensorboard(tmp_path):
    latents, labels = _toy_latents(64)
    writer = FakeWriter()
    handler = TimestepBucketAccuracy(
        SignClassifier(), _ldm_scheduler(), latents, labels, output_dir=tmp_path, summary_writer=writer, interval=2
    )
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0, 1], max_epochs=4)

    assert {f"acc_t_bucket_{i}" for i in range(10)} <= set(engine.state.metrics)
    assert engine.state.metrics["acc_t_bucket_0"] > 0.95
    data = json.loads((tmp_path / "timestep_accuracy.json").read_text())
    assert data["epoch"] == 4 and [h["epoch"] for h in data["history"]] == [2, 4]
    assert [b["accuracy"] for b in data["buckets"]] == [engine.state.metrics[f"acc_t_bucket_{i}"] for i in range(10)]
    assert (tmp_path / "timestep_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert len(writer.scalars) == 20 and {s[2] for s in writer.scalars} == {2, 4}
    assert writer.scalars[0][0] == "val/acc_t0-99" and writer.scalars[9][0] == "val/acc_t900-999"


def test_handler_writes_nothing_off_rank0(tmp_path, monkeypatch):
    monkeypatch.setattr(ta, "_is_rank0", lambda: False)
    latents, labels = _toy_latents(16)
    writer = FakeWriter()
    handler = TimestepBucketAccuracy(
        SignClassifier(), _ldm_scheduler(), latents, labels, num_buckets=2, output_dir=tmp_path, summary_writer=writer
    )
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert "acc_t_bucket_1" in engine.state.metrics
    assert not any(tmp_path.iterdir()) and not writer.scalars


def test_time_conditioned_latent_classifier_mode_restored():
    latents, labels = _toy_latents(16)
    net = TimeConditionedLatentClassifier(
        num_classes=2, latent_size=4, channels=(8, 16), num_res_blocks=1, norm_num_groups=8, num_heads=2
    ).train()
    buckets = TimestepBucketAccuracy(net, _ldm_scheduler(), latents, labels, num_buckets=2, batch_size=8).compute()
    assert net.training and len(buckets) == 2 and all(0.0 <= b["accuracy"] <= 1.0 and b["n"] == 64 for b in buckets)


def test_invalid_arguments():
    latents, labels = _toy_latents(8)
    sched = _ldm_scheduler()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        TimestepBucketAccuracy(SignClassifier(), sched, latents, labels, num_train_timesteps=2000)
    with pytest.raises(ValueError, match="num_buckets"):
        TimestepBucketAccuracy(SignClassifier(), sched, latents, labels, num_buckets=0)
    with pytest.raises(ValueError, match="same N"):
        TimestepBucketAccuracy(SignClassifier(), sched, latents, labels[:4])
    with pytest.raises(TypeError, match="add_noise"):
        TimestepBucketAccuracy(SignClassifier(), object(), latents, labels)
