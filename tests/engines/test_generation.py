"""Tests of the guided tile generation engine: layout, manifest, determinism, sharding and resume."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from monai_histodiff.data.manifest import MANIFEST_FIELDS, read_manifest, tile_filename
from monai_histodiff.engines.generation import GuidedTileGenerator, merge_manifests, tile_seed
from monai_histodiff.inferers.guided import ClassifierGuidedLatentDiffusionInferer
from monai_histodiff.networks.latent_classifier import TimeConditionedLatentClassifier
from monai_histodiff.schedulers.per_sample import per_sample_sampler
from tests.tiny import tiny_autoencoder, tiny_unet

CLASSES = ["TUM", "STR"]


class _PerSampleNet(nn.Module):
    """Runs the wrapped network one sample at a time, which makes it batch-invariant bit for bit.

    CPU kernels (oneDNN convolutions, GEMM vs GEMV in ``nn.Linear``) round differently for different batch sizes, in
    the last float bits; the engine can only guarantee identical *inputs* per tile, so the byte-identity tests
    isolate that guarantee with these wrappers (and a separate test bounds the float difference without them).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[i : i + 1], timesteps[i : i + 1]) for i in range(x.shape[0])])


class _PerSampleDecoder(nn.Module):
    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.autoencoder.decode_stage_2_outputs(z[i : i + 1]) for i in range(z.shape[0])])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    autoencoder = tiny_autoencoder(seed=0)
    unet = tiny_unet()
    classifier = TimeConditionedLatentClassifier(
        num_classes=2, latent_size=8, channels=(8, 16), norm_num_groups=8, num_heads=2, num_res_blocks=1
    )
    # break the zero-initialised output layers so that every network depends on its inputs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (unet, classifier):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for net in (autoencoder, unet, classifier):
        net.eval()
    return {
        "autoencoder": autoencoder,
        "diffusion_model": unet,
        "classifier": classifier,
        "ps_autoencoder": _PerSampleDecoder(autoencoder),
        "ps_diffusion_model": _PerSampleNet(unet),
        "ps_classifier": _PerSampleNet(classifier),
    }


def _make(nets, out, per_sample: bool = True, scheduler: str = "ddim", **kwargs) -> GuidedTileGenerator:
    p = "ps_" if per_sample else ""
    sched = DDIMScheduler(num_train_timesteps=1000) if scheduler == "ddim" else DDPMScheduler(num_train_timesteps=1000)
    args = dict(
        inferer=ClassifierGuidedLatentDiffusionInferer(sched, scale_factor=1.0),
        autoencoder=nets[p + "autoencoder"],
        diffusion_model=nets[p + "diffusion_model"],
        classifier=nets[p + "classifier"],
        scheduler=sched,
        num_inference_steps=5,
        class_names=CLASSES,
        counts={"TUM": 4, "STR": 3},
        latent_shape=[3, 8, 8],
        output_dir=out,
        guidance_scale=3.0,
        batch_size=3,
        seed=7,
        device="cpu",
        progress=False,
        checkpoint_hashes={"ldm": "abc", "latent_clf": "def", "decoder_ft": "123"},
    )
    args.update(kwargs)
    return GuidedTileGenerator(**args)


def _tiles(out) -> dict[str, bytes]:
    return {os.path.relpath(p, out): Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(out, "*", "*_*.png")))}


def _rows(out) -> list[dict]:
    return read_manifest(os.path.join(out, "manifest.jsonl"))


def test_helpers():
    assert GuidedTileGenerator.counts_from_ratio([10, 3, 0], 0.5) == [5, 2, 0]
    assert GuidedTileGenerator.counts_from_ratio([10, 3], 3.0) == [30, 9]
    assert tile_filename("TUM", 12) == "TUM/TUM_000012.png"
    seeds = {tile_seed(0, c, i) for c in range(3) for i in range(20000)}
    assert len(seeds) == 60000 and all(0 <= s < 2**63 for s in seeds)
    assert tile_seed(5, 1, 2) == tile_seed(5, 1, 2) != tile_seed(6, 1, 2)
    with pytest.raises(ValueError):
        _make({"ps_autoencoder": None, "ps_diffusion_model": None, "ps_classifier": None}, "x", counts={"ADI": 1})


def test_layout_manifest_and_grids(nets, tmp_path):
    out = str(tmp_path / "gen")
    summary = _make(nets, out).run()
    assert summary["generated"] == 7 and summary["skipped_existing"] == 0
    assert summary["per_class"] == {"TUM": 4, "STR": 3} and summary["seconds"] > 0
    tiles = _tiles(out)
    assert sorted(tiles) == [tile_filename("STR", i) for i in range(3)] + [tile_filename("TUM", i) for i in range(4)]
    rows = _rows(out)
    assert [(r["class"], r["index"]) for r in rows] == [("STR", i) for i in range(3)] + [("TUM", i) for i in range(4)]
    for r in rows:
        assert set(MANIFEST_FIELDS) <= set(r)
        assert os.path.isfile(os.path.join(out, r["file"]))
        assert r["class_index"] == CLASSES.index(r["class"])
        assert r["seed"] == tile_seed(7, r["class_index"], r["index"])
        assert (r["steps"], r["scheduler"], r["eta"], r["guidance_scale"]) == (5, "DDIMScheduler", 0.0, 3.0)
        assert r["checkpoint_hashes"] == {"ldm": "abc", "latent_clf": "def", "decoder_ft": "123"}
        assert 0.0 <= r["confidence"] <= 1.0
    assert read_manifest(os.path.join(out, "manifest.rank0.jsonl")) != []
    for name in CLASSES:
        assert os.path.isfile(os.path.join(out, "grids", f"{name}.png"))
    assert not glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)
    again = _make(nets, out).run()  # nothing left to do
    assert again["generated"] == 0 and again["skipped_existing"] == 7


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 1.0)])
def test_tiles_independent_of_batch_size(nets, tmp_path, scheduler, eta):
    outputs = []
    for batch_size in (1, 3, 8) if scheduler == "ddim" and eta == 0 else (1, 4):
        out = str(tmp_path / f"bs{batch_size}")
        _make(nets, out, scheduler=scheduler, eta=eta, batch_size=batch_size).run()
        outputs.append((_tiles(out), _rows(out)))
    assert len(outputs[0][0]) == 7
    for tiles, rows in outputs[1:]:
        assert tiles == outputs[0][0] and rows == outputs[0][1]


def test_background_writer_writes_what_the_foreground_writes(nets, tmp_path, monkeypatch):
    """Written in a thread while the next batch is sampled, the tiles and rows are the same, and a batch's rows
    never reach the manifest before its tiles are on disk."""
    real, seen = GuidedTileGenerator._write_tile, []

    def spy(self, image, path):
        rows = read_manifest(self.manifest_path, missing_ok=True)
        assert all(os.path.isfile(os.path.join(self.output_dir, r["file"])) for r in rows)
        seen.append(len(rows))
        real(self, image, path)

    monkeypatch.setattr(GuidedTileGenerator, "_write_tile", spy)
    outputs = {}
    for background in (True, False):
        out = str(tmp_path / f"bg{background}")
        seen.clear()
        _make(nets, out, batch_size=2, background_writer=background).run()
        outputs[background] = (_tiles(out), _rows(out))
        assert seen == [0, 0, 2, 2, 4, 4, 6]  # batches of 2, 2, 2, 1: each one's rows after its tiles
    assert len(outputs[True][0]) == 7 and outputs[True] == outputs[False]


def test_amp_dtype_reaches_the_sampler(nets, tmp_path):
    import numpy as np
    from PIL import Image

    def pixels(name, **kwargs):
        out = str(tmp_path / name)
        _make(nets, out, grid_size=0, **kwargs).run()
        return {p: np.asarray(Image.open(os.path.join(out, p)), dtype=np.int16) for p in _tiles(out)}

    ref = pixels("fp32")
    bf16 = pixels("bf16", amp=True, amp_dtype="bfloat16")
    diff = np.concatenate([np.abs(bf16[p] - ref[p]).ravel() for p in ref])
    assert sorted(bf16) == sorted(ref) and 0 < diff.mean() < 8  # bfloat16 rounding, not another image
    with pytest.raises(ValueError, match="amp_dtype"):
        _make(nets, str(tmp_path / "bad"), amp=True, amp_dtype="int8")


def test_batch_size_changes_only_float_rounding(nets, tmp_path):
    """With the raw networks a batch and its single-tile runs differ at most in float rounding."""
    gen = _make(nets, str(tmp_path), per_sample=False)
    pairs = [(0, 0), (1, 2), (0, 3)]
    images, conf = gen.generate_batch(pairs)
    singles = [gen.generate_batch([p]) for p in pairs]
    torch.testing.assert_close(images, torch.cat([s[0] for s in singles]), atol=1e-3, rtol=0)
    torch.testing.assert_close(conf, torch.cat([s[1] for s in singles]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheduler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_per_sample_noise_matches_inferer_generator(nets, tmp_path, scheduler, eta):
    """One tile through the engine equals the inferer's own path fed from that tile's generator."""
    gen = _make(nets, str(tmp_path), scheduler=scheduler, eta=eta)
    image, _ = gen.generate_batch([(1, 2)])
    g = torch.Generator().manual_seed(tile_seed(7, 1, 2))
    noise = torch.randn((1, 3, 8, 8), generator=g)
    gen.scheduler.set_timesteps(5)
    plain = per_sample_sampler(gen.scheduler)  # without per-sample generators: the respaced parent's behaviour
    expected = gen.inferer.sample(
        noise, nets["ps_autoencoder"], nets["ps_diffusion_model"], nets["ps_classifier"], torch.tensor([1]),
        scheduler=plain, guidance_scale=3.0, eta=eta, verbose=False, generator=g,
    )
    assert torch.equal(image, expected)


def test_two_ranks_equal_one_rank(nets, tmp_path):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    _make(nets, single).run()
    s0 = _make(nets, sharded, rank=0, world_size=2).run()
    s1 = _make(nets, sharded, rank=1, world_size=2).run()
    assert (s0["assigned"], s1["assigned"]) == (4, 3) and s0["generated"] + s1["generated"] == 7
    rank1 = read_manifest(os.path.join(sharded, "manifest.rank1.jsonl"))
    assert sorted((r["class"], r["index"]) for r in rank1) == [("STR", 1), ("TUM", 1), ("TUM", 3)]
    merge_manifests(sharded)
    assert _tiles(sharded) == _tiles(single)
    assert _rows(sharded) == _rows(single)


@pytest.mark.parametrize("background_writer", [True, False])
def test_resume_after_kill(nets, tmp_path, monkeypatch, background_writer):
    out = str(tmp_path / "gen")
    gen = _make(nets, out, batch_size=2, background_writer=background_writer)
    calls = {"n": 0}
    real = GuidedTileGenerator.generate_batch

    def dying(self, pairs, sampler=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, pairs, sampler)

    monkeypatch.setattr(GuidedTileGenerator, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        gen.run()
    monkeypatch.setattr(GuidedTileGenerator, "generate_batch", real)

    manifest = os.path.join(out, "manifest.rank0.jsonl")
    done = [r["file"] for r in read_manifest(manifest)]
    assert len(done) == 4  # two batches of 2 (the background writer's pending one too)
    os.remove(os.path.join(out, done[0]))  # a row without its PNG: must be regenerated
    with open(manifest, "a") as f:
        f.write('{"file": "STR/STR_000002.png", "class": "ST')  # killed mid-row
    kept = {p: (os.stat(os.path.join(out, p)).st_mtime_ns, Path(out, p).read_bytes()) for p in done[1:]}

    summary = _make(nets, out, batch_size=2).run()
    assert summary["generated"] == 7 - 3 and summary["skipped_existing"] == 3
    rows = _rows(out)
    assert len(rows) == 7 and len({(r["class"], r["index"]) for r in rows}) == 7
    assert all(os.path.isfile(os.path.join(out, r["file"])) for r in rows)
    assert len(read_manifest(manifest)) == 7  # own manifest compacted: no duplicate, no broken line
    for p, (mtime, data) in kept.items():
        assert os.stat(os.path.join(out, p)).st_mtime_ns == mtime and Path(out, p).read_bytes() == data
    reference = str(tmp_path / "reference")
    _make(nets, reference).run()
    assert _tiles(out) == _tiles(reference)


def test_orphan_png_is_regenerated(nets, tmp_path):
    out = str(tmp_path / "gen")
    _make(nets, out).run()
    manifest = os.path.join(out, "manifest.rank0.jsonl")
    rows = read_manifest(manifest)
    orphan = tile_filename("TUM", 2)
    with open(manifest, "w") as f:  # killed after the PNG was written, before its row
        f.writelines(json.dumps(r) + "\n" for r in rows if r["file"] != orphan)
    os.remove(os.path.join(out, "manifest.jsonl"))
    before = Path(out, orphan).read_bytes()
    os.utime(os.path.join(out, orphan), ns=(1, 1))

    summary = _make(nets, out).run()
    assert summary["generated"] == 1 and summary["per_class"] == {"TUM": 1, "STR": 0}
    assert os.stat(os.path.join(out, orphan)).st_mtime_ns != 1
    assert Path(out, orphan).read_bytes() == before
    assert [r["file"] for r in _rows(out)].count(orphan) == 1
    assert [r["file"] for r in read_manifest(manifest)].count(orphan) == 1


# --- faults: a cut manifest, a second run on the same folder, a full disk ---------------------------------------


def test_cut_merged_manifest_and_missing_tile_are_redone_once(nets, tmp_path):
    out = str(tmp_path / "gen")
    _make(nets, out).run()
    reference = _tiles(out)
    merged = Path(out, "manifest.jsonl")
    lines = merged.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])["file"]
    merged.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last line cut by a kill
    os.remove(os.path.join(out, "manifest.rank0.jsonl"))
    lost = json.loads(lines[0])["file"]
    os.remove(os.path.join(out, lost))  # a row whose tile is gone

    summary = _make(nets, out).run()
    assert summary["generated"] == 2 and summary["skipped_existing"] == 5
    rows = _rows(out)
    assert sorted(r["file"] for r in rows) == sorted(reference) and len(rows) == 7  # one row per tile, no duplicate
    assert {last, lost} <= {r["file"] for r in read_manifest(os.path.join(out, "manifest.rank0.jsonl"))}
    assert _tiles(out) == reference


def test_second_run_on_the_same_folder_is_refused(nets, tmp_path):
    import socket
    import subprocess

    from monai_histodiff.engines.locking import OutputLockedError

    out = tmp_path / "gen"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(OutputLockedError, match=rf"in use by process {holder.pid} .*generate \(rank 0\) refuses"):
            _make(nets, str(out)).run()
        assert _tiles(str(out)) == {} and not (out / "manifest.rank0.jsonl").exists()
        _make(nets, str(out), rank=1, world_size=2).run()  # another shard of the same run takes its own lock
        assert (out / ".lock").read_text().split()[0] == str(holder.pid)
        assert not (out / ".lock.rank1").exists() and len(read_manifest(out / "manifest.rank1.jsonl")) == 3
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=rf"stale lock .*process {holder.pid}"):  # the holder was killed
        summary = _make(nets, str(out)).run()
    assert summary["generated"] == 4 and len(_rows(str(out))) == 7 and not (out / ".lock").exists()


@pytest.mark.parametrize("background_writer", [True, False])
def test_disk_full_while_writing_a_tile_keeps_finished_tiles(nets, tmp_path, monkeypatch, background_writer):
    import errno

    from PIL import Image

    out = str(tmp_path / "gen")
    real_save = Image.Image.save
    calls = {"n": 0}

    def full_disk(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second tile of the second batch
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")  # the temporary file the tile is written to
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    target = os.path.join(out, tile_filename("STR", 0))  # batches of 3: TUM 0-2, then TUM 3, STR 0 (5th), ...
    with pytest.raises(OSError, match=r"No space left on device") as e:
        _make(nets, out, background_writer=background_writer).run()
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == target
    assert not glob.glob(os.path.join(out, "*", ".*tmp")) and not os.path.exists(target)
    finished = _tiles(out)
    # nothing after the failed batch is written (the background writer had the third batch queued)
    assert len(finished) == 4 and len(read_manifest(os.path.join(out, "manifest.rank0.jsonl"))) == 3
    assert not os.path.exists(os.path.join(out, ".lock"))  # released on the error

    reference = str(tmp_path / "reference")
    _make(nets, reference).run()
    assert all(data == _tiles(reference)[p] for p, data in finished.items())  # every finished tile intact
    summary = _make(nets, out).run()
    assert summary["generated"] == 4 and _tiles(out) == _tiles(reference) and len(_rows(out)) == 7


def test_disk_full_while_writing_the_manifest_names_it(nets, tmp_path, monkeypatch):
    """A manifest row that cannot be synced for lack of space stops the run with an error naming the manifest."""
    import errno

    out = str(tmp_path / "gen")
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.rank0.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device") as e:
        _make(nets, out, background_writer=False).run()
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and "manifest.rank0.jsonl" in str(e.value)


class _ByMeanColour(nn.Module):
    """An 'auxiliary classifier' reading the tile: class 0 when its mean red is above its mean blue, else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))
        return torch.stack([diff, -diff], 1)


def test_guidance_check_measures_g0_against_g_before_the_pool(nets, tmp_path, caplog):
    """The check samples the same noise at g = 0 and at the stage's g, writes guidance_check.json, touches neither
    the manifest nor the tile folders, and says so loudly when guidance changes nothing."""
    out = tmp_path / "gen"
    strong = _make(nets, out, per_sample=False, guidance_scale=200.0)
    report = strong.guidance_check(per_class=4, image_classifier=_ByMeanColour())
    assert report["unguided"]["guidance_scale"] == 0.0 and report["guided"]["guidance_scale"] == 200.0
    assert strong.guidance_scale == 200.0  # restored
    # a strong gradient of log p(y | z_t) raises the latent classifier's probability of the requested class
    assert report["guided"]["latent_probability"] > report["unguided"]["latent_probability"]
    assert report["measure"] == "aux_agreement" and sum(report["guided"]["aux_predicted_counts"].values()) == 8
    assert json.loads((out / "guidance_check.json").read_text())["gain"] == pytest.approx(report["gain"])
    # the guidance term against the model's noise estimate, per quarter of the trajectory, high noise first
    ratios = report["guidance_to_model"]
    assert len(ratios) == 4 and ratios[0]["t_min"] > ratios[-1]["t_max"] and all(r["ratio"] > 0 for r in ratios)
    assert not list(out.glob("manifest*")) and not [p for p in out.iterdir() if p.is_dir()]
    # g = 0 at the stage: the two settings are the same samples, the gain is 0, and the stage warns
    with caplog.at_level("WARNING"):
        flat = _make(nets, tmp_path / "flat", per_sample=False, guidance_scale=0.0).guidance_check(
            per_class=2, image_classifier=_ByMeanColour())
    assert flat["gain"] == 0.0 and not flat["steers"] and "guidance does nothing here" in caplog.text
    assert flat["guided"]["aux_agreement_per_class"] == flat["unguided"]["aux_agreement_per_class"]
    assert flat["guidance_to_model"] == []
    assert _make(nets, tmp_path / "none", per_sample=False).guidance_check(per_class=0) == {}
    # a resumed run reuses the check when nothing changed, and samples it again when the scale did
    again = _make(nets, out, per_sample=False, guidance_scale=200.0)
    again.generate_batch = None  # any sampling would fail
    assert again.guidance_check(per_class=4, image_classifier=_ByMeanColour())["gain"] == pytest.approx(report["gain"])
    changed = _make(nets, out, per_sample=False, guidance_scale=100.0).guidance_check(per_class=4)
    assert changed["guidance_scale"] == 100.0 and changed["measure"] == "latent_probability"
