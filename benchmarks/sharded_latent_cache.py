"""The sharded latent cache and the bad-file scan at scale: what to measure before calling them paper-ready.

Prepared with the sharded cache (issue: paper scale without a paper-scale machine). Each subcommand
writes ``benchmarks/results/sharded_latent_cache_<command>.json`` (date, versions, CPUs, threads, load average) and
prints a one-line summary. Run from the repository root with the project's environment.

Subcommands:

``synth FOLDER --items N [--sizes paper] [--dtype float32|float16] [--shard_size 2048]``
    Write a sharded cache of ``N`` synthetic posteriors of the paper's shape (3x64x64; no autoencoder needed) with
    the module's own shard writer and index: write throughput (MB/s, per shard: arrays + fsync + sha256) and the
    folder's size. 10,000 items are about 1 GB in float32; the paper's 803k about 79 GB.

``read FOLDER [--batch_size 4] [--batches 500] [--num_workers 0 4] [--procs 1 4] [--augment]``
    Random-access reads through ``CachedLatentDataset`` and a DataLoader, as training draws them: batches/s and ms per
    batch, first pass (pages not yet cached, unless the folder was just written) and second pass (page cache warm),
    against the same items in an in-memory ``LatentCache`` when ``--compare_memory`` (only for a cache that fits).
    With ``--procs P`` the read runs in P processes at once, each reporting RSS, PSS and private memory from
    ``/proc/self/smaps_rollup``: the page cache should be shared (PSS per process about the cache's touched size / P),
    not copied per rank as a whole-file cache is.

``encode --folder NEW_FOLDER --items N [--sizes paper] [--shard_size 2048] [--batch_size 32] [--device cuda]``
    ``torchrun --nproc_per_node G benchmarks/sharded_latent_cache.py encode --folder NEW ...``: every rank encodes
    its shards with the paper's autoencoder (random weights: the values do not matter for timing) over synthetic tiles
    made in memory (no decoding: the encoder's throughput alone; add ``--png_dir`` to read real tiles). Per rank:
    shards, tiles/s, seconds encoding, seconds waiting at the barrier after its last shard (the imbalance between
    ranks); rank 0: the wall time to a finished index. Compare G = 1, 2, 4, 8, and ``--dtype float16``.

``train --items 10000 100000 1000000 [--world 2] [--steps 40] [--batch_size 4] [--real_up_to 100000]``
    Memory and step time of distributed training against the number of cached tiles: for each count a cache of
    paper-shaped posteriors (3x64x64 float32) is made, then ``--world`` ranks (gloo, spawned processes) each open it,
    draw batches through a ``DistributedSampler`` and ``CachedLatentDataset`` as ``pretrain_diffusion`` does, and
    train a DDP diffusion UNet (``bundles/small.json``'s, on the paper's latent shape) for ``--steps`` steps. Per rank:
    the resident set after opening the cache and at the end (``RssAnon``: the process's own memory; ``RssFile``: file
    pages mapped), its peak (``VmHWM``), and the median step time. Counts up to ``--real_up_to`` are written with
    random values by the module's shard writer; larger ones are sparse files (a ``.npy`` header, then a hole that reads
    as zeros, records without sha256) that exercise the index, the sampler and the reads but not the disk.
    ``--compare_in_memory 10000 30000`` adds the single-file cache's path (every rank holds the whole cache).

    ``--drop_shards K`` on a finished folder measures a resume: the index and the last K shards are deleted (an
    encode interrupted there), then the rerun's wall time is compared with the first run's (it should encode only the
    K shards; the finished ones are checked by size and header, not read).

``fp16 FOLDER32 FOLDER16``
    What float16 storage changes: max / mean absolute and relative error of mu and sigma per item against the float32
    cache of the same tiles (e.g. ``synth`` twice with the same ``--seed``, or the stage run twice), and the scale
    factor from each. Whether training is affected needs a training run on both (not here).

``scan FOLDER [--workers 4 16] [--executor thread process]``
    The bad-file scan over an image folder (e.g. real tiles): tiles/s on a first pass with a fresh record, per
    executor and worker count, then the rerun over the unchanged folder (stat only, no decoding), and the record's
    size per tile.

Numbers to report: for ``read``, ms per batch of 4 at 3x64x64 (the paper's diffusion batch) against the UNet step
(``latent_cache_speed.py --sizes paper``): the cache must not be the bottleneck; for ``encode``, the scaling with G and
the barrier wait; for ``scan``, the rerun's time for the 803k listing (it decides whether the record is enough or the
listing itself must be cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _environment() -> dict[str, Any]:
    import monai

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _save(command: str, result: dict[str, Any], output: str | None) -> Path:
    path = Path(output) if output else RESULTS / f"sharded_latent_cache_{command}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": f"sharded_latent_cache {command}", "command": " ".join(sys.argv), **result,
              **_environment()}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def _latent_shape(sizes: str) -> tuple[int, int, int]:
    try:
        from guided_sampling import sizes_of
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from guided_sampling import sizes_of
    s = sizes_of(sizes)
    return int(s["autoencoder_args"]["latent_channels"]), s["latent_size"], s["latent_size"]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# --- synth ---------------------------------------------------------------------------------------------------------


def cmd_synth(a: argparse.Namespace) -> dict[str, Any]:
    from monai_histodiff.engines.sharded_latent_cache import _write_index, _write_shard, shard_ranges

    folder = Path(a.folder)
    shape = _latent_shape(a.sizes)
    build = {"count": a.items, "shard_size": a.shard_size, "dtype": a.dtype, "autoencoder_sha256": "synthetic",
             "datalist_digest": f"synthetic-{a.seed}", "image_size": None}
    generator = torch.Generator().manual_seed(a.seed)
    times = []
    for k, (start, stop) in enumerate(shard_ranges(a.items, a.shard_size)):
        mu = torch.randn((stop - start, *shape), generator=generator)
        sigma = torch.rand((stop - start, *shape), generator=generator) * 0.2 + 0.05
        labels = torch.randint(0, 9, (stop - start,), generator=generator) if a.labels else None
        t = time.perf_counter()
        _write_shard(folder, k, start, mu, sigma, labels, build, {"rank": 0, "world_size": 1})
        times.append(time.perf_counter() - t)
    _write_index(folder, build, {"autoencoder_ckpt": None})
    size = _folder_bytes(folder)
    result = {"items": a.items, "latent_shape": list(shape), "dtype": a.dtype, "shard_size": a.shard_size,
              "folder_bytes": size, "bytes_per_item": size / a.items, "write_s": sum(times),
              "write_mb_per_s": size / 1e6 / max(sum(times), 1e-9), "median_shard_s": statistics.median(times)}
    print(f"synth: {a.items} items {shape} {a.dtype}: {size / 1e9:.2f} GB at {result['write_mb_per_s']:.0f} MB/s")
    return result


# --- read ----------------------------------------------------------------------------------------------------------


def _memory_kb() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            field, _, rest = line.partition(":")
            if field in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean"):
                out[field] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _read_pass(dataset, batch_size: int, batches: int, num_workers: int, seed: int) -> dict[str, float]:
    from monai.data import DataLoader

    rng = random.Random(seed)
    order = [rng.randrange(len(dataset)) for _ in range(batch_size * batches)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers)
    stamps = [time.perf_counter()]
    for _ in loader:
        stamps.append(time.perf_counter())
    per_batch = [(b - a) * 1000 for a, b in zip(stamps[:-1], stamps[1:])]
    total = stamps[-1] - stamps[0]
    return {"batches": len(per_batch), "seconds": total, "batches_per_s": len(per_batch) / max(total, 1e-9),
            "median_ms_per_batch": statistics.median(per_batch),
            "p95_ms_per_batch": float(np.percentile(per_batch, 95))}


def _read_worker(folder: str, batch_size: int, batches: int, num_workers: int, seed: int, augment: bool,
                 queue) -> None:
    torch.set_num_threads(1)
    from monai_histodiff.engines import ShardedLatentCache

    dataset = ShardedLatentCache.open(folder).dataset(augment=augment)
    first = _read_pass(dataset, batch_size, batches, num_workers, seed)
    second = _read_pass(dataset, batch_size, batches, num_workers, seed)
    queue.put({"pid": os.getpid(), "first_pass": first, "second_pass": second, "memory_kb": _memory_kb()})


def cmd_read(a: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from monai_histodiff.engines import ShardedLatentCache

    cache = ShardedLatentCache.open(a.folder)
    rows = []
    for workers in a.num_workers:
        for procs in a.procs:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            jobs = [ctx.Process(target=_read_worker, args=(a.folder, a.batch_size, a.batches, workers, a.seed + p,
                                                           a.augment, queue)) for p in range(procs)]
            for j in jobs:
                j.start()
            results = [queue.get(timeout=3600) for _ in jobs]
            for j in jobs:
                j.join()
            rows.append({"num_workers": workers, "procs": procs, "per_process": results})
            med = statistics.median(r["second_pass"]["median_ms_per_batch"] for r in results)
            pss = statistics.median(r["memory_kb"].get("Pss", 0) for r in results) / 1024
            print(f"read: workers {workers}, {procs} process(es): {med:.2f} ms per batch of {a.batch_size} (warm), "
                  f"PSS {pss:.0f} MiB per process")
    result = {"folder": a.folder, "items": len(cache), "latent_shape": list(cache.latent_shape), "dtype": cache.dtype,
              "folder_bytes": _folder_bytes(Path(a.folder)), "batch_size": a.batch_size, "augment": a.augment,
              "rows": rows}
    if a.compare_memory:
        memory = cache.in_memory()
        torch.set_num_threads(1)
        result["in_memory"] = _read_pass(memory.dataset(augment=a.augment), a.batch_size, a.batches, 0, a.seed)
        print(f"read: in memory: {result['in_memory']['median_ms_per_batch']:.2f} ms per batch")
    return result


# --- encode (torchrun) ---------------------------------------------------------------------------------------------


class _Tiles(torch.utils.data.Dataset):
    """``n`` tiles: random tensors made once per index (no decoding), or PNGs read from ``png_dir`` in turn."""

    def __init__(self, n: int, image_size: int, png_dir: str | None = None) -> None:
        self.n, self.image_size = n, image_size
        self.files = sorted(str(p) for p in Path(png_dir).rglob("*.png")) if png_dir else []
        if png_dir:
            from monai_histodiff.data import tile_transforms

            self.transform = tile_transforms(image_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.files:
            return self.transform({"image": self.files[i % len(self.files)]})
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.image_size, self.image_size, generator=g) * 2 - 1}


def cmd_encode(a: argparse.Namespace) -> dict[str, Any] | None:
    from monai.data import DataLoader
    from monai.networks.nets import AutoencoderKL

    import monai_histodiff.engines.sharded_latent_cache as sharded
    from monai_histodiff.engines import get_or_create_sharded_latent_cache, init_distributed
    from monai_histodiff.engines.distributed import barrier, get_rank, get_world_size

    distributed = "WORLD_SIZE" in os.environ
    device = init_distributed(a.device) if distributed else torch.device(a.device)
    try:
        from guided_sampling import sizes_of
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from guided_sampling import sizes_of
    sizes = sizes_of(a.sizes)
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**sizes["autoencoder_args"]).to(device).eval()
    data = DataLoader(_Tiles(a.items, sizes["image_size"], a.png_dir), batch_size=a.batch_size,
                      num_workers=a.num_workers)
    folder = Path(a.folder)  # the same folder on every rank
    dropped = []
    if (folder / sharded.INDEX_NAME).exists():
        if not a.drop_shards:
            raise SystemExit(f"{folder} already holds a finished cache: give a new folder, or --drop_shards K to "
                             f"measure a resume")
        barrier()
        if get_rank() == 0:  # an interrupted encode: no index, the last K shards never written
            count = len(sharded.shard_ranges(a.items, a.shard_size))
            dropped = list(range(count - a.drop_shards, count))
            (folder / sharded.INDEX_NAME).unlink()
            for k in dropped:
                for f in folder.glob(f"{sharded.shard_name(k)}.*"):
                    f.unlink()
        barrier()
    shard_done: list[float] = []
    real_write = sharded._write_shard

    def timed_write(*args, **kwargs):
        out = real_write(*args, **kwargs)
        shard_done.append(time.perf_counter())
        return out

    sharded._write_shard = timed_write
    barrier()
    start = time.perf_counter()
    get_or_create_sharded_latent_cache(folder, autoencoder, data, device, autoencoder_sha256="benchmark", amp=a.amp,
                                       image_size=sizes["image_size"], shard_size=a.shard_size, dtype=a.dtype,
                                       progress=get_rank() == 0)
    end = time.perf_counter()
    last = shard_done[-1] if shard_done else start
    mine = {"rank": get_rank(), "shards": len(shard_done), "encode_s": last - start, "wait_s": end - last,
            "tiles_per_s": len(shard_done) * a.shard_size / max(last - start, 1e-9)}
    rows = [mine]
    if distributed:
        import torch.distributed as dist

        rows = [None] * get_world_size()
        dist.all_gather_object(rows, mine)
    if get_rank() != 0:
        return None
    result = {"items": a.items, "sizes": a.sizes, "shard_size": a.shard_size, "dtype": a.dtype, "amp": a.amp,
              "resumed_with_shards_missing": len(dropped) if dropped else None,
              "world_size": get_world_size(), "device": str(device), "png_dir": a.png_dir, "wall_s": end - start,
              "tiles_per_s": a.items / (end - start), "folder_bytes": _folder_bytes(folder), "ranks": rows}
    print(f"encode: {a.items} tiles on {get_world_size()} rank(s): {end - start:.1f} s "
          f"({result['tiles_per_s']:.0f} tiles/s); barrier waits {[round(r['wait_s'], 1) for r in rows]} s")
    return result


# --- train (2 gloo ranks) ------------------------------------------------------------------------------------------


def _status(fields: tuple[str, ...] = ("VmHWM", "VmRSS", "RssAnon", "RssFile")) -> dict[str, float]:
    """The process's memory in MiB from ``/proc/self/status``."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            field, _, rest = line.partition(":")
            if field in fields:
                out[field] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def _sparse_cache(folder: Path, items: int, shape: tuple[int, ...], shard_size: int) -> None:
    """A cache folder of ``items`` posteriors whose arrays are holes (zeros) after a valid ``.npy`` header."""
    from monai_histodiff.engines.sharded_latent_cache import (
        _FORMAT, _FORMAT_VERSION, _write_index, _write_json, shard_name, shard_ranges)

    folder.mkdir(parents=True, exist_ok=True)
    build = {"count": items, "shard_size": shard_size, "dtype": "float32", "autoencoder_sha256": "synthetic-sparse",
             "datalist_digest": "synthetic-sparse", "image_size": None}
    for k, (start, stop) in enumerate(shard_ranges(items, shard_size)):
        n, name, files = stop - start, shard_name(k), {}
        for key in ("mu", "sigma"):
            path = folder / f"{name}.{key}.npy"
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                        "shape": (n, *shape)})
                f.truncate(f.tell() + n * int(np.prod(shape)) * 4)
            files[key] = {"file": path.name, "bytes": path.stat().st_size, "sha256": "not computed (sparse)"}
        values = n * int(np.prod(shape))
        _write_json(folder / f"{name}.json", {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "name": name, "shard": k, "start": start,
            "count": n, "latent_shape": list(shape), "files": files, "build": build, "rank": 0, "world_size": 1,
            "stats": {"values": values, "mu_mean": 0.0, "mu_m2": float(values), "sigma_sum": 0.1 * values,
                      "sigma_sq_sum": 0.01 * values}})
    _write_index(folder, build, {"autoencoder_ckpt": None, "synthetic": "sparse"})


def _train_rank(rank: int, world: int, folder: str, in_memory: bool, a: argparse.Namespace, port: int,
                queue) -> None:
    import torch.distributed as dist
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDPMScheduler
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from monai_histodiff.engines import ShardedLatentCache
    from monai_histodiff.engines.latent_cache import LATENT_MU_KEY, LATENT_SIGMA_KEY

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    start_mem = _status()
    t = time.perf_counter()
    cache = ShardedLatentCache.open(folder)
    if in_memory:  # the single-file path: every rank holds the whole cache
        cache = cache.in_memory()
    open_s = time.perf_counter() - t
    opened = _status()
    dataset = cache.dataset(augment=True)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=a.batch_size, sampler=sampler, num_workers=0, drop_last=True)
    torch.manual_seed(0)
    unet = DistributedDataParallel(DiffusionModelUNet(**_latent_unet_args(a.unet_sizes, cache.latent_shape)))
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    times, it = [], iter(loader)
    for step in range(a.warmup + a.steps):
        t = time.perf_counter()
        batch = next(it)
        mu, sigma = batch[LATENT_MU_KEY], batch[LATENT_SIGMA_KEY]
        z = mu + sigma * torch.randn_like(mu)
        noise = torch.randn_like(z)
        timesteps = torch.randint(0, 1000, (z.shape[0],))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(z, noise, timesteps), timesteps), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    end = _status()
    queue.put({"rank": rank, "open_s": open_s, "memory_mib": {"start": start_mem, "opened": opened, "end": end},
               "step_ms_median": 1000 * statistics.median(times), "step_ms": [round(1000 * x, 1) for x in times],
               "epoch_batches": len(loader)})
    dist.destroy_process_group()


def _latent_unet_args(sizes: str, latent_shape: tuple[int, ...]) -> dict[str, Any]:
    try:
        from guided_sampling import sizes_of
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from guided_sampling import sizes_of
    args = dict(sizes_of(sizes)["diffusion_args"])
    args.update(in_channels=latent_shape[0], out_channels=latent_shape[0])
    return args


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    import shutil

    import torch.multiprocessing as mp

    root = Path(a.scratch)
    shape = _latent_shape("paper")
    rows = []
    runs = [(n, False) for n in a.items] + [(n, True) for n in a.compare_in_memory]
    for n, in_memory in sorted(runs, key=lambda r: (r[1], r[0])):
        folder = root / f"train_cache_{n}"
        if not (folder / "index.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            t = time.perf_counter()
            if n <= a.real_up_to:
                cmd_synth(argparse.Namespace(folder=str(folder), items=n, sizes="paper", dtype="float32",
                                             shard_size=a.shard_size, labels=False, seed=0))
            else:
                _sparse_cache(folder, n, shape, a.shard_size)
            print(f"train: made the {n}-item cache in {time.perf_counter() - t:.0f} s")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = 29500 + len(rows) + random.randrange(1000)
        jobs = [ctx.Process(target=_train_rank, args=(r, a.world, str(folder), in_memory, a, port, queue))
                for r in range(a.world)]
        for j in jobs:
            j.start()
        ranks = sorted((queue.get(timeout=3600) for _ in jobs), key=lambda r: r["rank"])
        for j in jobs:
            j.join()
        row = {"items": n, "path": "in-memory (single file)" if in_memory else "sharded", "world": a.world,
               "content": "random" if n <= a.real_up_to else "sparse (zeros)",
               "folder_bytes": _folder_bytes(folder), "ranks": ranks}
        rows.append(row)
        peak = max(r["memory_mib"]["end"]["VmHWM"] for r in ranks)
        anon = max(r["memory_mib"]["end"]["RssAnon"] for r in ranks)
        step = statistics.median(r["step_ms_median"] for r in ranks)
        print(f"train: {n:>9,d} items, {row['path']:>23s}: peak RSS per rank {peak:.0f} MiB, RssAnon {anon:.0f} MiB, "
              f"step {step:.0f} ms")
        if a.cleanup and n > a.keep_up_to:
            shutil.rmtree(folder, ignore_errors=True)
    result = {"latent_shape": list(shape), "unet_sizes": a.unet_sizes, "batch_size": a.batch_size,
              "steps": a.steps, "warmup": a.warmup, "rows": rows}
    if a.plot:
        _plot_train(rows, Path(a.plot), f"{a.world} gloo ranks, batch {a.batch_size} per rank, "
                                         f"UNet of bundles/{a.unet_sizes == 'small' and 'small.json' or 'common.json'}")
        result["plot"] = a.plot
    return result


def _plot_train(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in sorted({r["path"] for r in rows}):
        sel = [r for r in rows if r["path"] == label]
        x = [r["items"] for r in sel]
        for field, style in (("VmHWM", "-o"), ("RssAnon", "--s")):
            left.plot(x, [max(k["memory_mib"]["end"][field] for k in r["ranks"]) for r in sel], style,
                      label=f"{label}: {'peak RSS' if field == 'VmHWM' else 'anonymous RSS'}")
        right.plot(x, [statistics.median(k["step_ms_median"] for k in r["ranks"]) for r in sel], "-o", label=label)
    for ax, ylabel in ((left, "MiB per rank (max over ranks)"), (right, "ms per training step (median)")):
        ax.set_xscale("log")
        ax.set_xlabel("cached tiles (3x64x64 posteriors)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- fp16 ----------------------------------------------------------------------------------------------------------


def cmd_fp16(a: argparse.Namespace) -> dict[str, Any]:
    from monai_histodiff.engines import ShardedLatentCache, compute_scale_factor

    full, half = ShardedLatentCache.open(a.folder32), ShardedLatentCache.open(a.folder16)
    if len(full) != len(half):
        raise SystemExit(f"{a.folder32} holds {len(full)} items, {a.folder16} {len(half)}")
    errors = {"mu": [], "sigma": []}
    for (m32, s32), (m16, s16) in zip(full.iter_posteriors(1024), half.iter_posteriors(1024)):
        for name, x, y in (("mu", m32, m16), ("sigma", s32, s16)):
            d = (x - y).abs()
            errors[name].append((float(d.max()), float(d.mean()), float((d / x.abs().clamp_min(1e-6)).max())))
    summary = {name: {"max_abs": max(e[0] for e in rows), "mean_abs": statistics.fmean(e[1] for e in rows),
                      "max_rel": max(e[2] for e in rows)} for name, rows in errors.items()}
    torch.manual_seed(0)
    sf32 = compute_scale_factor(full)
    torch.manual_seed(0)
    sf16 = compute_scale_factor(half)
    result = {"items": len(full), "errors": summary, "scale_factor": {"float32": sf32, "float16": sf16},
              "folder_bytes": {"float32": _folder_bytes(Path(a.folder32)), "float16": _folder_bytes(Path(a.folder16))}}
    print(f"fp16: mu max abs {summary['mu']['max_abs']:.2e}, sigma max rel {summary['sigma']['max_rel']:.2e}, "
          f"scale factor {sf32:.5f} vs {sf16:.5f}")
    return result


# --- scan ----------------------------------------------------------------------------------------------------------


def cmd_scan(a: argparse.Namespace) -> dict[str, Any]:
    from monai_histodiff.data.datalist import IMAGE_EXTENSIONS, list_images
    from monai_histodiff.data.validation import scan_images

    items = [{"image": f} for f in list_images(a.folder, extensions=IMAGE_EXTENSIONS)]
    rows = []
    for executor in a.executor:
        for workers in a.workers:
            with tempfile.TemporaryDirectory() as tmp:
                record = Path(tmp) / "scan_record.sqlite"
                t = time.perf_counter()
                _, bad = scan_images(items, record=record, num_workers=workers, executor=executor, progress=True)
                first = time.perf_counter() - t
                t = time.perf_counter()
                scan_images(items, record=record, num_workers=workers, executor=executor)
                rerun = time.perf_counter() - t
                rows.append({"executor": executor, "workers": workers, "first_s": first, "rerun_s": rerun,
                             "tiles_per_s": len(items) / max(first, 1e-9), "bad": len(bad),
                             "record_bytes_per_tile": record.stat().st_size / max(len(items), 1)})
                print(f"scan: {executor} x{workers}: {len(items) / first:.0f} tiles/s first, rerun {rerun:.2f} s")
    return {"folder": a.folder, "files": len(items), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None, help="result JSON (default: results/sharded_latent_cache_<cmd>.json)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth")
    s.add_argument("folder")
    s.add_argument("--items", type=int, default=10_000)
    s.add_argument("--sizes", default="paper", choices=("paper", "small"))
    s.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    s.add_argument("--shard_size", type=int, default=2048)
    s.add_argument("--labels", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("read")
    r.add_argument("folder")
    r.add_argument("--batch_size", type=int, default=4)
    r.add_argument("--batches", type=int, default=500)
    r.add_argument("--num_workers", type=int, nargs="+", default=[0, 4])
    r.add_argument("--procs", type=int, nargs="+", default=[1, 4])
    r.add_argument("--augment", action="store_true")
    r.add_argument("--compare_memory", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("encode")
    e.add_argument("--folder", required=True, help="a new cache folder, the same for every rank")
    e.add_argument("--items", type=int, default=8192)
    e.add_argument("--sizes", default="paper", choices=("paper", "small"))
    e.add_argument("--shard_size", type=int, default=2048)
    e.add_argument("--batch_size", type=int, default=32)
    e.add_argument("--num_workers", type=int, default=4)
    e.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    e.add_argument("--amp", action="store_true")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--png_dir", default=None, help="read real tiles from here instead of random tensors")
    e.add_argument("--drop_shards", type=int, default=0,
                   help="on a finished cache: delete the index and the last K shards, then time the resume")
    t = sub.add_parser("train")
    t.add_argument("--scratch", required=True, help="folder for the caches (about 98 KB per random item)")
    t.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    t.add_argument("--compare_in_memory", type=int, nargs="*", default=[])
    t.add_argument("--real_up_to", type=int, default=100_000, help="larger caches are sparse files")
    t.add_argument("--world", type=int, default=2)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--batch_size", type=int, default=4)
    t.add_argument("--shard_size", type=int, default=2048)
    t.add_argument("--unet_sizes", default="small", choices=("small", "paper"))
    t.add_argument("--cleanup", action="store_true", help="delete each cache above --keep_up_to after its run")
    t.add_argument("--keep_up_to", type=int, default=10_000)
    t.add_argument("--plot", default=None, help="PNG of memory and step time against the item count")
    f = sub.add_parser("fp16")
    f.add_argument("folder32")
    f.add_argument("folder16")
    c = sub.add_parser("scan")
    c.add_argument("folder")
    c.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    c.add_argument("--executor", nargs="+", default=["thread", "process"], choices=("thread", "process"))
    a = p.parse_args(argv)
    result = {"synth": cmd_synth, "read": cmd_read, "encode": cmd_encode, "train": cmd_train, "fp16": cmd_fp16,
              "scan": cmd_scan}[
        a.command](a)
    if result is not None:
        _save(a.command, result, a.output)
    if a.command == "encode" and "WORLD_SIZE" in os.environ:
        from monai_histodiff.engines import cleanup_distributed

        cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
