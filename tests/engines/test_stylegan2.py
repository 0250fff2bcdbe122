"""Tests of the StyleGAN2 baseline's engines: the trainer's steps, the class grid, the tile generator (layout, manifest,
per-tile determinism, resume, lock) and the generator loader. Tiny 16 px networks on CPU."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from PIL import Image

import monai_histodiff.engines.stylegan2 as sg2_engines
from monai_histodiff.engines import ClassGridSampler, GanTileGenerator, StyleGAN2Trainer, load_stylegan2_generator
from monai_histodiff.data.manifest import MANIFEST_FIELDS, read_generation_manifest, read_manifest, tile_filename
from monai_histodiff.engines.generation import tile_seed
from monai_histodiff.handlers import WarmupEMAHandler, save_checkpoint
from monai_histodiff.networks import ConditionalStyleGAN2Discriminator, ConditionalStyleGAN2Generator

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["TUM", "STR"]
G_ARGS = dict(image_size=16, num_classes=2, z_dim=16, w_dim=16, channel_base=128, channel_max=32, mapping_layers=2)
D_ARGS = dict(image_size=16, num_classes=2, channel_base=128, channel_max=32)


def _generator(seed: int = 0) -> ConditionalStyleGAN2Generator:
    """A tiny generator whose noise strengths are non-zero, so that the per-tile noise shows in the tiles."""
    torch.manual_seed(seed)
    G = ConditionalStyleGAN2Generator(**G_ARGS)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.strength"):
                p.fill_(0.5)
    return G.eval()


def _batches(n: int, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Labeled batches: class 0 bright, class 1 dark, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 2, (batch_size,), generator=g)
        level = torch.where(labels == 0, 0.8, -0.6)[:, None, None, None]
        out.append({"image": (level + 0.1 * torch.randn(batch_size, 3, 16, 16, generator=g)).clamp(-1, 1),
                    "label": labels})
    return out


def _trainer(iterations: int = 3, r1_interval: int = 2, ema: bool = True, **kwargs):
    torch.manual_seed(0)
    G = ConditionalStyleGAN2Generator(**G_ARGS)
    D = ConditionalStyleGAN2Discriminator(**D_ARGS)
    handler = WarmupEMAHandler(G, momentum=0.01) if ema else None
    trainer = StyleGAN2Trainer(
        device="cpu", max_epochs=1, train_data_loader=_batches(iterations), generator=G, discriminator=D,
        g_optimizer=torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.0, 0.99)),
        d_optimizer=torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.0, 0.99)),
        r1_gamma=1.0, r1_interval=r1_interval, ema=handler, **kwargs,
    )
    return trainer, G, D, handler


# --- trainer ----------------------------------------------------------------------------------------------------


def test_trainer_steps_both_networks_with_lazy_r1_and_ema(monkeypatch):
    calls = []
    real_r1 = sg2_engines.r1_penalty

    def counting_r1(logits, images):
        calls.append(images.requires_grad)
        return real_r1(logits, images)

    monkeypatch.setattr(sg2_engines, "r1_penalty", counting_r1)
    trainer, G, D, ema = _trainer(iterations=5, r1_interval=2)
    g0 = {k: v.clone() for k, v in G.state_dict().items()}
    d0 = {k: v.clone() for k, v in D.state_dict().items()}
    outputs, ema_seen = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ema_seen.append(ema.num_updates))
    trainer.run()

    assert trainer.state.iteration == 5 and len(calls) == 3 and all(calls)  # R1 at iterations 1, 3, 5
    for out in outputs:
        assert {"loss_g", "loss_d", "r1", "d_real", "d_fake", "lr"} <= set(out)
        assert all(isinstance(out[k], float) and np.isfinite(out[k]) for k in ("loss_g", "loss_d", "r1"))
    assert outputs[0]["r1"] > 0 and outputs[1]["r1"] == outputs[0]["r1"]  # the last penalty computed
    assert ema_seen == [1, 2, 3, 4, 5]  # the EMA was updated before any other handler saw the iteration
    assert any(not torch.equal(g0[k], v) for k, v in G.state_dict().items() if "w_avg" not in k)
    assert any(not torch.equal(d0[k], v) for k, v in D.state_dict().items())
    assert G.mapping.w_avg.abs().sum() > 0  # the generator step updated the per-class means of w
    assert torch.equal(ema.ema_model.mapping.w_avg, G.mapping.w_avg)  # shared by the EMA generator
    ema_w = ema.ema_model.mapping.layers[0].weight
    assert not torch.equal(ema_w, G.mapping.layers[0].weight) and not torch.equal(ema_w, g0["mapping.layers.0.weight"])
    assert all(p.requires_grad for p in D.parameters())


def test_r1_weight_is_gamma_over_two_times_interval(monkeypatch):
    """With the real/fake losses removed, the discriminator's first gradient is that of gamma/2 * interval * R1."""
    monkeypatch.setattr(sg2_engines, "discriminator_nonsaturating_loss", lambda r, f: 0.0 * (r.sum() + f.sum()))
    monkeypatch.setattr(sg2_engines, "r1_penalty", lambda logits, images: logits.sum() * 0 + 2.0)
    seen = {}

    def step(loss, optimizer, scaler=None, on_backward=None):
        seen.setdefault(id(optimizer), float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(sg2_engines, "optimizer_step", step)
    trainer, _, _, _ = _trainer(iterations=1, r1_interval=4, ema=False)
    trainer.run()
    assert seen[id(trainer.d_optimizer)] == pytest.approx(2.0 * 1.0 / 2 * 4)


def test_trainer_needs_labels_and_stops_on_a_non_finite_loss(monkeypatch):
    trainer, _, _, _ = _trainer(iterations=1, ema=False)
    trainer.data_loader = [{"image": torch.zeros(2, 3, 16, 16)}]
    with pytest.raises(ValueError, match="needs class labels"):
        trainer.run()

    monkeypatch.setattr(sg2_engines, "discriminator_nonsaturating_loss", lambda r, f: (r.sum() + f.sum()) * np.nan)
    trainer, _, D, _ = _trainer(iterations=1, ema=False)
    d0 = {k: v.clone() for k, v in D.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"loss term 'loss_d' is nan at iteration 1"):
        trainer.run()
    assert all(torch.equal(d0[k], v) for k, v in D.state_dict().items())
    with pytest.raises(ValueError, match="r1_interval"):
        _trainer(r1_interval=0)
    with pytest.raises(ValueError, match="unknown operation"):
        _trainer(augment_policy="color,zoom")


def test_class_grid_sampler_rows_follow_the_classes():
    G = _generator()
    rows = ClassGridSampler(lambda: G, num_classes=2, num_per_class=3, seed=1)()
    assert len(rows) == 2 and all(r.shape == (3, 3, 16, 16) for r in rows)
    assert all(r.min() >= -1 and r.max() <= 1 for r in rows)
    assert not torch.equal(rows[0], rows[1])  # same z, different class
    again = ClassGridSampler(G, num_classes=2, num_per_class=3, seed=1)()
    assert all(torch.equal(a, b) for a, b in zip(rows, again))


# --- tile generator ---------------------------------------------------------------------------------------------


def _make(out, G=None, **kwargs) -> GanTileGenerator:
    args = dict(generator=G if G is not None else _generator(), class_names=CLASSES, counts={"TUM": 4, "STR": 3},
                output_dir=str(out), batch_size=3, seed=7, device="cpu", progress=False,
                checkpoint_hashes={"stylegan2": "abc"})
    args.update(kwargs)
    return GanTileGenerator(**args)


def _tiles(out) -> dict[str, bytes]:
    return {os.path.relpath(p, out): Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(out, "*", "*_*.png")))}


def test_layout_manifest_read_like_select(tmp_path):
    out = tmp_path / "gen"
    summary = _make(out).run()
    assert summary["generated"] == 7 and summary["per_class"] == {"TUM": 4, "STR": 3}
    tiles = _tiles(out)
    assert sorted(tiles) == [tile_filename("STR", i) for i in range(3)] + [tile_filename("TUM", i) for i in range(4)]
    for name in tiles:
        with Image.open(out / name) as img:
            assert img.mode == "RGB" and img.size == (16, 16)
    rows = read_manifest(out / "manifest.jsonl")
    assert [(r["class"], r["index"]) for r in rows] == [("STR", i) for i in range(3)] + [("TUM", i) for i in range(4)]
    for r in rows:
        assert set(MANIFEST_FIELDS) <= set(r)
        assert r["seed"] == tile_seed(7, r["class_index"], r["index"])
        assert r["checkpoint_hashes"] == {"stylegan2": "abc"}
        assert r["confidence"] is None and r["steps"] is None and r["guidance_scale"] is None
        assert (r["truncation_psi"], r["noise_mode"]) == (1.0, "random")
    items = read_generation_manifest(out / "manifest.jsonl", CLASSES)  # the reader of bundles/select.json
    assert [it["label"] for it in items] == [1, 1, 1, 0, 0, 0, 0]
    assert all(Path(it["image"]).is_file() and np.isnan(it["confidence"]) for it in items)
    assert all((out / "grids" / f"{c}.png").is_file() for c in CLASSES)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in ("manifest.jsonl",)}
    again = _make(out).run()
    assert again["generated"] == 0 and again["skipped_existing"] == 7
    # a rerun of a finished stage rewrites no manifest: what the experiment runner built on it stays current
    assert {f: os.stat(out / f).st_mtime_ns for f in stamps} == stamps


class _PerSampleGenerator(torch.nn.Module):
    """Runs the wrapped generator one sample at a time (with that sample's own ``torch.Generator``), which makes it
    batch-invariant bit for bit.

    CPU kernels (GEMM vs GEMV in the mapping network's linear layers, grouped convolutions with another number of
    groups) round differently for different batch sizes, in the last float bits; the engine can only guarantee
    identical *inputs* per tile (its latent and its noise), so the byte-identity test isolates that guarantee with
    this wrapper, and a separate test bounds the difference of the raw network (as ``test_generation.py`` does).
    """

    def __init__(self, net: ConditionalStyleGAN2Generator) -> None:
        super().__init__()
        self.net = net
        self.z_dim, self.num_classes = net.z_dim, net.num_classes

    def forward(self, z, labels, truncation_psi=1.0, noise_mode="random", generator=None):
        return torch.cat([self.net(z[i : i + 1], labels[i : i + 1], truncation_psi=truncation_psi,
                                   noise_mode=noise_mode, generator=[generator[i]]) for i in range(z.shape[0])])


def _pixels(tiles: dict[str, bytes], out) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(Path(out) / name), dtype=np.int16) for name in tiles}


def test_tiles_identical_alone_or_in_any_batch(tmp_path):
    G = _PerSampleGenerator(_generator())
    outputs = []
    for batch_size in (1, 3, 8):
        _make(tmp_path / f"bs{batch_size}", G, batch_size=batch_size).run()
        outputs.append(_tiles(tmp_path / f"bs{batch_size}"))
    assert len(outputs[0]) == 7 and outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert len(set(outputs[0].values())) == 7  # every tile is its own draw
    one = _make(tmp_path / "x", G).generate_batch([(1, 2)])[0]
    assert torch.equal(one, _make(tmp_path / "x", G).generate_batch([(0, 0), (1, 2)])[0][1:])
    assert not torch.equal(one, _make(tmp_path / "y", G, seed=8).generate_batch([(1, 2)])[0])


def test_batch_size_changes_only_float_rounding(tmp_path):
    """With the raw generator a batch and its single-tile runs differ at most in float rounding (one uint8 level)."""
    G = _generator()
    gen = _make(tmp_path / "x", G)
    pairs = [(0, 0), (1, 2), (0, 3)]
    batch, _ = gen.generate_batch(pairs)
    torch.testing.assert_close(batch, torch.cat([gen.generate_batch([p])[0] for p in pairs]), atol=1e-4, rtol=0)
    for batch_size in (1, 8):
        _make(tmp_path / f"bs{batch_size}", G, batch_size=batch_size).run()
    single, batched = (_pixels(_tiles(tmp_path / f"bs{b}"), tmp_path / f"bs{b}") for b in (1, 8))
    assert sorted(single) == sorted(batched) and len(single) == 7
    assert all(np.abs(single[k] - batched[k]).max() <= 1 for k in single)


def test_resume_after_kill_and_one_writer(tmp_path, monkeypatch):
    import socket
    import subprocess

    from monai_histodiff.engines.locking import OutputLockedError

    out = tmp_path / "gen"
    G = _PerSampleGenerator(_generator())
    real = GanTileGenerator.generate_batch
    calls = {"n": 0}

    def dying(self, pairs, context=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, pairs, context)

    monkeypatch.setattr(GanTileGenerator, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        _make(out, G, batch_size=2).run()
    monkeypatch.setattr(GanTileGenerator, "generate_batch", real)
    done = [r["file"] for r in read_manifest(out / "manifest.rank0.jsonl")]
    assert len(done) == 2  # the first batch of 2
    kept = {f: os.stat(out / f).st_mtime_ns for f in done}

    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(OutputLockedError, match=r"generate_stylegan2 \(rank 0\) refuses"):
            _make(out, G, batch_size=2).run()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="stale lock"):
        summary = _make(out, G, batch_size=2).run()
    assert summary["generated"] == 5 and summary["skipped_existing"] == 2
    _make(tmp_path / "reference", G).run()
    assert _tiles(out) == _tiles(tmp_path / "reference")
    assert len(read_manifest(out / "manifest.jsonl")) == 7
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in kept.items())  # finished tiles are not redone


def test_generator_class_count_must_match():
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        _make("unused", class_names=["A", "B", "C"], counts=[1, 1, 1])
    with pytest.raises(ValueError, match="noise_mode"):
        _make("unused", noise_mode="fresh")


# --- loader -------------------------------------------------------------------------------------------------------


def test_load_stylegan2_generator_prefers_the_ema(tmp_path):
    from monai_histodiff.handlers import checkpoint_meta

    G, G_ema = _generator(0), _generator(1)
    path = tmp_path / "stylegan2.pt"
    meta = checkpoint_meta("train_stylegan2", config={"generator_args": G_ARGS}, classes=CLASSES,
                           ema={"num_updates": 500, "momentum": 0.01, "warmup": True, "initial_weight": 0.0})
    save_checkpoint(path, {"generator": G, "ema": G_ema}, meta)
    loaded = load_stylegan2_generator(path, image_size=16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), G_ema.state_dict().values()))
    raw = load_stylegan2_generator(path, use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), G.state_dict().values()))
    with pytest.raises(ValueError, match="image_size=32 but .* was trained at image_size=16"):
        load_stylegan2_generator(path, image_size=32)
