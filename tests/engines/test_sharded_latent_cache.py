"""Tests of the sharded latent cache: written by several ranks, resumed after an interruption, read back item by item,
tied to its autoencoder, and loud about a damaged shard or index. Tiny data: 70 tiles of 8x8 px (3x4x4 latents) in
shards of 16, a seeded tiny autoencoder; the two-process tests use gloo on CPU."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from monai.data import DataLoader
from torch.utils.data import Dataset

from monai_histodiff.data.validation import CorruptFileError
from monai_histodiff.engines import (
    CachedLatentDataset,
    LatentCache,
    ShardedLatentCache,
    compute_scale_factor,
    conditional_latent_cache,
    encode_posteriors,
    get_or_create_latent_cache,
)
from monai_histodiff.engines.distributed import barrier
from monai_histodiff.handlers import file_sha256
from monai_histodiff.handlers.checkpoint import UnsafeCheckpointError
from tests.tiny import tiny_autoencoder

REPO = Path(__file__).resolve().parents[2]
SHA = "a" * 64
N, SHARD, BATCH = 70, 16, 4  # five shards: 16, 16, 16, 16, 6 items


class TileSet(Dataset):
    """``N`` seeded random tiles (``{"image", "label"}``) that record which items were read; item ``fail_at`` raises."""

    def __init__(self, n: int = N, fail_at: int | None = None, labels: bool = True) -> None:
        self.n, self.fail_at, self.labels, self.reads = n, fail_at, labels, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.reads.append(i)
        if i == self.fail_at:
            raise RuntimeError(f"tile {i} cannot be read")
        item = {"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        if self.labels:
            item["label"] = i % 3
        return item


def _make(folder, data=None, **kw) -> ShardedLatentCache:
    kw = {"autoencoder_sha256": SHA, "image_size": 8, "shard_size": SHARD, "progress": False, **kw}
    return get_or_create_latent_cache(folder, tiny_autoencoder(), DataLoader(data or TileSet(), batch_size=BATCH), **kw)


def _read_all(cache) -> tuple[torch.Tensor, torch.Tensor, list]:
    items = [cache.dataset()[i] for i in range(len(cache))]
    return (torch.stack([it["latent_mu"] for it in items]), torch.stack([it["latent_sigma"] for it in items]),
            [it.get("label") for it in items])


def _mtimes(folder: Path, pattern: str = "shard_*") -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


@pytest.fixture(scope="module")
def reference() -> LatentCache:
    """The posteriors of the N tiles encoded in one pass, in memory (the single-file cache's path)."""
    torch.set_num_threads(1)
    return LatentCache.from_posteriors(
        encode_posteriors(tiny_autoencoder(), DataLoader(TileSet(), batch_size=BATCH), progress=False), SHA, 8)


# --- two processes ----------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, folder: str, init_file: str, out_dir: str) -> None:
    """Rank 1 fails in its second shard; both ranks then resume the encode and read the whole cache back."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    folder, out = Path(folder), Path(out_dir)
    try:
        try:
            _make(folder, TileSet(fail_at=50 if rank == 1 else None))  # shard 3 (items 48..63) is rank 1's second
            first = "finished"
        except Exception as e:  # noqa: BLE001 - the error each rank sees is the test's result
            first = f"{type(e).__name__}: {e}"
        barrier()
        if rank == 0:
            state = {"mtimes": _mtimes(folder), "index": (folder / "index.json").exists()}
            (out / "interrupted.json").write_text(json.dumps(state))
        barrier()
        data = TileSet()
        cache = _make(folder, data)
        mu, sigma, labels = _read_all(cache)
        torch.save({"first": first, "reads": data.reads, "mu": mu, "sigma": sigma, "labels": labels},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_encode_resume_and_read_back_what_one_process_encodes(tmp_path, reference):
    """Two gloo ranks share the shards out; rank 1 fails in its second shard, so the first run ends with an error on
    both ranks and no index; the rerun encodes only the unfinished shard, leaves the finished ones untouched, and both
    ranks read back exactly what a single process encodes."""
    folder, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(folder), str(tmp_path / "pg"), str(out)), nprocs=2,
                                join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1]["first"].startswith("RuntimeError: tile 50 cannot be read")
    assert "another rank failed encoding the latent cache" in ranks[0]["first"]
    interrupted = json.loads((out / "interrupted.json").read_text())
    assert not interrupted["index"]
    finished = sorted(n[: len("shard_00000")] for n in interrupted["mtimes"] if n.endswith(".json"))
    assert finished == ["shard_00000", "shard_00001", "shard_00002", "shard_00004"]  # rank 0: 0, 2, 4; rank 1: 1
    # the rerun deals the one unfinished shard (3) to rank 0 and reads no other tile
    assert ranks[0]["reads"] == list(range(48, 64)) and ranks[1]["reads"] == []
    after = _mtimes(folder)
    assert {n: after[n] for n in interrupted["mtimes"]} == interrupted["mtimes"], "finished shards not rewritten"
    records = {k: json.loads((folder / f"shard_{k:05d}.json").read_text()) for k in range(5)}
    assert [records[k]["rank"] for k in range(5)] == [0, 1, 0, 0, 0] and records[3]["world_size"] == 2
    # one process encoding the same tiles gives the same shards, bit for bit, and the in-memory encode the same values
    single = _make(tmp_path / "single")
    mu1, sigma1, labels1 = _read_all(single)
    for r in ranks:
        assert torch.equal(r["mu"], mu1) and torch.equal(r["sigma"], sigma1) and r["labels"] == labels1
    torch.testing.assert_close(mu1, reference.mu)
    torch.testing.assert_close(sigma1, reference.sigma)
    assert labels1 == reference.labels.tolist() and len(single) == N
    assert not list(folder.glob(".*.tmp")), "no temporary file left behind"


# --- one process ------------------------------------------------------------------------------------------------

_KILLED = """
import os, sys, torch
torch.set_num_threads(1)
import monai_histodiff.engines.sharded_latent_cache as m
from tests.engines.test_sharded_latent_cache import _make
real = m._save_npy
def dying(path, array):  # the process dies in the middle of writing shard 2's sigma: a kill, not an exception
    if path.name.startswith(".shard_00002.sigma.npy"):
        with open(path, "wb") as f:
            f.write(b"\\x93NUMPY half a header")
        os._exit(3)
    real(path, array)
m._save_npy = dying
_make(sys.argv[1])
"""


def test_killed_encode_resumes_without_duplicating_or_losing_a_tile(tmp_path, reference):
    folder = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _KILLED, str(folder)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert not (folder / "index.json").exists()
    assert sorted(p.name for p in folder.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert (folder / "shard_00002.mu.npy").is_file() and list(folder.glob(".shard_00002.sigma.npy.*.tmp"))
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ShardedLatentCache.open(folder)
    before = _mtimes(folder, "shard_0000[01].*")
    data = TileSet()
    cache = _make(folder, data)
    assert data.reads == list(range(32, N)), "only the shards without a record are encoded, each tile once"
    assert _mtimes(folder, "shard_0000[01].*") == before
    assert not list(folder.glob(".*.tmp")), "the killed writer's temporary file is cleaned up"
    mu, sigma, labels = _read_all(cache)
    torch.testing.assert_close(mu, reference.mu)
    torch.testing.assert_close(sigma, reference.sigma)
    assert labels == reference.labels.tolist()
    again = TileSet()
    _make(folder, again)
    assert again.reads == [], "a finished cache is opened, not encoded"


def test_cache_of_another_autoencoder_is_refused_naming_both_files(tmp_path):
    ae1, ae2 = tmp_path / "ae1.pt", tmp_path / "ae2.pt"
    torch.save(tiny_autoencoder(0).state_dict(), ae1)
    torch.save(tiny_autoencoder(1).state_dict(), ae2)
    folder = tmp_path / "cache"
    _make(folder, autoencoder_sha256=None, autoencoder_ckpt=ae1)
    assert ShardedLatentCache.open(folder, file_sha256(ae1)).autoencoder_sha256 == file_sha256(ae1)
    with pytest.raises(ValueError) as refused:
        ShardedLatentCache.open(folder, file_sha256(ae2), autoencoder_path=ae2)
    message = str(refused.value)
    assert str(folder) in message and str(ae2) in message and str(ae1) in message
    assert file_sha256(ae1) in message and file_sha256(ae2) in message
    # the stage's entry point rebuilds it, saying so with both files
    with pytest.warns(UserWarning, match="rebuilding the latent cache") as warned:
        rebuilt = _make(folder, autoencoder_sha256=None, autoencoder_ckpt=ae2)
    text = " ".join(str(w.message) for w in warned)
    assert str(folder) in text and str(ae1) in text and str(ae2) in text
    assert rebuilt.autoencoder_sha256 == file_sha256(ae2)
    assert json.loads((folder / "index.json").read_text())["autoencoder_ckpt"] == str(ae2)


def test_truncated_shard_and_corrupt_index_are_named(tmp_path):
    folder = tmp_path / "cache"
    _make(folder)
    index = folder / "index.json"
    # a truncated shard: named, with what to do
    shard = folder / "shard_00001.sigma.npy"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-100])
    remedy = rf"delete {re.escape(str(folder / 'shard_00001'))}\.\* and {re.escape(str(index))}"
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(shard))} .*truncated or corrupt .*{remedy}"):
        ShardedLatentCache.open(folder)
    with pytest.raises(CorruptFileError, match=re.escape(str(shard))):
        _make(folder)
    # same size but not a .npy file
    shard.write_bytes(b"\0" * len(whole))
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(shard))} .*not a readable \.npy file"):
        ShardedLatentCache.open(folder)
    shard.write_bytes(whole)
    # an index whose item count disagrees with a shard
    record = json.loads(index.read_text())
    record["shards"][2]["count"] = 15
    index.write_text(json.dumps(record))
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(index))} .*hold items .*not the 70 items"):
        ShardedLatentCache.open(folder)
    # an index that is not JSON: named, and deleting it costs no encoding
    index.write_text('{"format": "monai_histodiff.sharded_lat')
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(index))} .*not JSON.*without encoding them again"):
        _make(folder)
    index.unlink()
    data = TileSet()
    assert len(_make(folder, data)) == N and data.reads == []
    # following a shard's remedy encodes that shard alone
    for p in folder.glob("shard_00001.*"):
        p.unlink()
    index.unlink()
    data = TileSet()
    _make(folder, data)
    assert data.reads == list(range(16, 32))
    # a shard holding Python objects is refused without unpickling it
    np.save(folder / "shard_00003.mu.npy", np.array([object()] * 3), allow_pickle=True)
    with pytest.raises((UnsafeCheckpointError, CorruptFileError), match=re.escape(str(folder / "shard_00003.mu.npy"))):
        ShardedLatentCache.open(folder)


def test_dataset_and_methods_match_the_in_memory_cache(tmp_path, reference):
    cache = _make(tmp_path / "cache")
    assert len(cache) == N and cache.latent_shape == reference.latent_shape == (3, 4, 4)
    assert torch.equal(cache.labels, reference.labels) and cache.image_size == 8
    # the same items and the same dihedral augmentation for the same random state
    for augment in (False, True):
        ours, theirs = cache.dataset(augment=augment), CachedLatentDataset(reference, augment=augment)
        torch.manual_seed(5)
        a = [ours[i] for i in range(0, N, 7)]
        torch.manual_seed(5)
        b = [theirs[i] for i in range(0, N, 7)]
        for x, y in zip(a, b):
            assert set(x) == set(y) == {"latent_mu", "latent_sigma", "label"} and x["label"] == y["label"]
            torch.testing.assert_close(x["latent_mu"], y["latent_mu"])
            torch.testing.assert_close(x["latent_sigma"], y["latent_sigma"])
    batch = next(iter(DataLoader(pickle.loads(pickle.dumps(cache.dataset())), batch_size=8)))
    assert batch["latent_mu"].shape == (8, 3, 4, 4) and batch["latent_mu"].dtype == torch.float32
    # items are read by offset: reading maps nothing (a map would keep every page it touched in the resident set)
    assert all(part._mu is None and part._sigma is None for part in cache.parts)
    chunks = list(cache.iter_posteriors(chunk=5, start=3, stop=40))
    torch.testing.assert_close(torch.cat([c[0] for c in chunks]), reference.mu[3:40])
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), reference.sigma[3:40])
    torch.testing.assert_close(cache.sample_latents(9, 0.7, seed=2), reference.sample_latents(9, 0.7, seed=2))
    assert cache.posterior_signal_to_noise() == pytest.approx(reference.posterior_signal_to_noise(), rel=1e-5)
    torch.manual_seed(0)
    ours = compute_scale_factor(cache)
    assert ours == pytest.approx(compute_scale_factor(reference), rel=0.1)
    torch.testing.assert_close(cache.in_memory().mu, reference.mu)
    # labeled + unlabeled (null class) without copying either
    unlabeled = _make(tmp_path / "unlabeled", TileSet(n=20, labels=False))
    assert unlabeled.labels is None
    both = conditional_latent_cache(cache, unlabeled, null_class=3)
    assert len(both) == N + 20 and both.labels.tolist() == reference.labels.tolist() + [3] * 20
    assert both.dataset()[N + 1]["label"] == 3
    torch.testing.assert_close(both.dataset()[N + 1]["latent_mu"], unlabeled.dataset()[1]["latent_mu"])
    # float16 storage: half the bytes, values rounded, read back as float32
    half = _make(tmp_path / "half", dtype="float16")
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.mu.npy"))  # noqa: E731
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "cache")
    mu16 = torch.stack([half.dataset()[i]["latent_mu"] for i in range(N)])
    assert mu16.dtype == torch.float32
    torch.testing.assert_close(mu16, reference.mu, rtol=2e-3, atol=2e-3)
