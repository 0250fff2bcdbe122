# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Classifier-guided latent sampling vs MONAI's stock unguided ``LatentDiffusionInferer.sample``: speed and memory.

Variants (same UNet weights, autoencoder, scheduler, noise, batch and number of steps, ``bundles/small.json`` sizes:
64 px tiles, 16x16x3 latents; DDIM, T=1000, scaled_linear_beta 0.0015..0.0155, 50 steps, batch 50; every variant
decodes its latents with the same small ``AutoencoderKL`` at the end):

- ``stock``: MONAI's ``LatentDiffusionInferer.sample`` (unguided, plain ``DDIMScheduler``), eager;
- ``guided``: :class:`~monai_histodiff.inferers.ClassifierGuidedLatentDiffusionInferer` with the small
  ``TimeConditionedLatentClassifier`` (guidance scale 1 on every step), classifier gradient in one batch;
- ``guided_mb<K>``: the same with ``classifier_batch_size=K`` (``--classifier_batch_size``, default 10);
- ``stage`` (``--stage``): what ``bundles/generate.json`` runs, end to end from the loaded networks:
  :class:`~monai_histodiff.engines.generation.GuidedTileGenerator` ``.run()`` into a fresh folder, the tiles spread
  over the classes in one batch, with everything the stage adds around the sampler (per-tile seeds and per-sample
  noise, the classifier's confidence at t = 0, PNG tiles written whole, the manifest, the class grids, the lock);
- ``stage_every<K>`` (``--stage --guidance_interval K``): the same with the classifier gradient computed on every
  K-th step and reused in between (the ``generate`` bundle's ``guidance_interval``);
- ``<stage variant>+sync_writes`` (``--sync_writes``): the stage writing each batch's PNG tiles and manifest rows
  before it samples the next batch (``background_writer=False``) instead of in a background thread while it does;
  measure it with ``--batches`` > 1, since a one-batch run has nothing to overlap;
- with ``--compile`` / ``--channels_last`` / ``--amp``: ``stock+<opts>`` and ``guided+<opts>`` as well, where the
  options are applied *in this script* (``torch.compile(unet)``, ``torch.compile(classifier)``,
  ``module.to(memory_format=torch.channels_last)`` and channels-last noise; AMP is the inferer's ``amp=True``
  for ``guided`` and a ``torch.autocast`` around the stock call). The inferer needs no new option for these: compiled
  modules are plain callables to it, and its element-wise scheduler arithmetic keeps the channels-last layout of
  the noise. AMP is bfloat16 autocast on every device (the stage's ``amp_dtype="bfloat16"``; the guidance gradient
  and the scheduler stay float32); on CPU it is *slower* than float32 on CPUs without AMX/AVX512-BF16 (most CPUs):
  it is there for GPUs.

Timing. Each variant lives in its own worker process (on Linux a fork of this script's process, which imported torch,
MONAI and the package once and has run no torch operation; elsewhere a spawned process; each waits for its turn to
warm up), which builds
the networks, warms up (one sampling run of ``--warmup_steps`` steps: same shapes, so it also triggers and excludes
``torch.compile``'s compilation), then waits. The parent then asks the workers for one full timed sampling run each,
in turn, for ``--reps`` rounds (the order rotated every round), so that machine load hits all variants alike; only
one worker computes at a time. Reported: the median over the rounds (and all the times). With ``--batches N`` every
timed run makes N batches (the stage N x ``--batch_size`` tiles in one run, the samplers N calls), so tiles/s counts
N x batch tiles. ``--variants`` names the variants to time instead of the ones the flags add.

Peak memory. ``tracemalloc`` does not see torch's allocations, and ``ru_maxrss`` is a whole-process high-water mark
that would mix phases and variants. So (1) every variant and every ``--paper_scale`` setting runs in a fresh process,
and (2) right before its timed runs each worker resets the kernel's peak-RSS counter of its own process (writing
``5`` to ``/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` from ``/proc/self/status`` afterwards: the peak
RSS of the timed sampling runs alone, excluding imports' transient peaks, model construction and, importantly,
``torch.compile``'s compiler memory. ``peak_rss_mb`` is that value (it includes the resident weights, torch and
MONAI, which are ``rss_before_mb``); ``sampling_rss_mb = peak_rss_mb - rss_before_mb`` is what sampling added.
The process's ``ru_maxrss`` (lifetime, including warm-up and compilation) is reported too. Where ``clear_refs``
cannot be written, ``peak_rss_mb`` falls back to ``ru_maxrss``. On CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` is reported as well (``peak_cuda_mb``).

``--paper_scale`` measures only the classifier-gradient step (``classifier_gradient``, forward + backward to the
input) of the paper-size latent classifier (channels 128/256/512, 2 residual blocks per level, 8 heads, 64x64x3
latents) at batch ``--batch_size`` for micro-batch sizes ``--paper_micro_batches`` (default 50, 10, 2): on CPU one
fresh process per setting (peak RSS as above), on CUDA ``max_memory_allocated`` per setting. That is the memory the
``classifier_batch_size`` argument of ``sample`` bounds. Run::

    python benchmarks/guided_sampling.py                                  # -> results/guided_sampling.json
    python benchmarks/guided_sampling.py --compile --channels_last        # -> results/guided_sampling_compiled.json
    python benchmarks/guided_sampling.py --paper_scale                    # -> results/guided_sampling_paper_scale.json

Prints a markdown table (variant, tiles/s, ms per tile, peak RSS MB, time ratio vs ``stock``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MARK = "@@GS@@ "  # prefix of the protocol lines a worker writes to stdout

SCHEDULER_ARGS = dict(
    num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0155,
    prediction_type="epsilon", clip_sample=False,
)  # fmt: skip
NUM_CLASSES = 9


def sizes_of(name: str) -> dict[str, Any]:
    """The networks' arguments at ``small`` (``bundles/small.json``: 64 px, 16x16x3 latents) or ``paper`` (the
    bundles' defaults: 256 px, LDM-4 64x64x3 latents, the paper's UNet and latent classifier), read from the installed
    bundle configs so the benchmark measures what the stages build."""
    from monai.bundle import ConfigParser

    from monai_histodiff.bundle.configs import config_files

    if name not in ("small", "paper"):
        raise ValueError(f"--sizes must be small or paper, got {name!r}")
    parser = ConfigParser()
    parser.read_config(config_files("pretrain_diffusion", small=name == "small"))
    image_size = int(parser.get_parsed_content("image_size"))
    ae = dict(parser.get_parsed_content("autoencoder_args"))
    return {
        "autoencoder_args": ae,
        "diffusion_args": dict(parser.get_parsed_content("diffusion_args")),
        "classifier_args": dict(parser.get_parsed_content("latent_classifier_args")),
        "latent_size": image_size // 2 ** (len(ae["channels"]) - 1),
        "image_size": image_size,
    }


# ---------------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """``VmHWM`` (peak RSS since the last reset), else the lifetime ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else maxrss_mb()


def maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------- worker
def parse_variant(variant: str) -> dict[str, Any]:
    """``stock`` / ``guided`` / ``guided_mb10`` / ``stage`` / ``stage_every<K>``, optionally ``+compile``,
    ``+channels_last``, ``+amp`` and, for a stage variant, ``+sync_writes``."""
    base, *opts = variant.split("+")
    unknown = set(opts) - {"compile", "channels_last", "amp", "sync_writes"}
    if unknown:
        raise ValueError(f"unknown options {unknown} in variant {variant!r}")
    micro_batch, interval = None, 1
    if base.startswith("stage_every"):
        interval, base = int(base[len("stage_every") :]), "stage"
    if base.startswith("guided_mb"):
        micro_batch, base = int(base[len("guided_mb") :]), "guided"
    if base not in ("stock", "guided", "stage"):
        raise ValueError(f"unknown variant {variant!r}")
    if "sync_writes" in opts and base != "stage":
        raise ValueError(f"sync_writes is an option of the stage variants, not of {variant!r}")
    return {
        "guided": base in ("guided", "stage"),
        "stage": base == "stage",
        "guidance_interval": interval,
        "classifier_batch_size": micro_batch,
        "compile": "compile" in opts,
        "channels_last": "channels_last" in opts,
        "amp": "amp" in opts,
        "sync_writes": "sync_writes" in opts,
    }


def build(device: torch.device, spec: dict[str, Any], batch_size: int, seed: int = 0, sizes: str = "small"):
    """Networks (identical weights in every worker), noise and labels, with the variant's options applied."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from monai_histodiff.networks import TimeConditionedLatentClassifier

    size = sizes_of(sizes)
    latent = size["latent_size"]
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL(**size["autoencoder_args"]).to(device).eval()
    unet = DiffusionModelUNet(**size["diffusion_args"]).to(device).eval()
    classifier = TimeConditionedLatentClassifier(
        num_classes=NUM_CLASSES, latent_size=latent, **size["classifier_args"]
    ).to(device).eval()
    for net in (autoencoder, unet, classifier):
        net.requires_grad_(False)  # guidance needs d/dz only, not parameter gradients
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(batch_size, 3, latent, latent, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)
    if spec["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
        classifier = classifier.to(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    if spec["compile"]:
        unet = torch.compile(unet)
        classifier = torch.compile(classifier)
    return autoencoder, unet, classifier, noise, labels


def make_sampler(device: torch.device, spec: dict[str, Any], batch_size: int, amp_dtype: torch.dtype | None,
                 sizes: str = "small", batches: int = 1):
    """Return ``run(num_steps) -> images`` for the variant (``batches`` batches per call)."""
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer

    autoencoder, unet, classifier, noise, labels = build(device, spec, batch_size, sizes=sizes)
    if spec.get("stage"):
        return _stage_runner(device, spec, batch_size, amp_dtype, autoencoder, unet, classifier,
                             latent_size=noise.shape[-1], batches=batches)

    def run(num_steps: int) -> torch.Tensor:
        for _ in range(batches - 1):
            run_one(num_steps)
        return run_one(num_steps)

    def run_one(num_steps: int) -> torch.Tensor:
        scheduler = DDIMScheduler(**SCHEDULER_ARGS)
        scheduler.set_timesteps(num_steps)
        if spec["guided"]:
            inferer = ClassifierGuidedLatentDiffusionInferer(scheduler, scale_factor=1.0)
            return inferer.sample(
                noise, autoencoder, unet, classifier, labels, guidance_scale=1.0,
                classifier_batch_size=spec["classifier_batch_size"], verbose=False, amp=spec["amp"],
                amp_dtype=amp_dtype,
            )  # fmt: skip
        inferer = LatentDiffusionInferer(scheduler, scale_factor=1.0)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=spec["amp"]):
            return inferer.sample(noise, autoencoder, unet, verbose=False)

    return run


def spread(total: int, num_classes: int) -> list[int]:
    """``total`` tiles over ``num_classes`` classes, as even as possible (the first classes get the remainder)."""
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]


def _stage_runner(device: torch.device, spec: dict[str, Any], batch_size: int, amp_dtype: torch.dtype | None,
                  autoencoder: torch.nn.Module, unet: torch.nn.Module, classifier: torch.nn.Module,
                  latent_size: int, batches: int = 1):
    """``run(num_steps)``: the generate stage's engine writing ``batches`` x ``batch_size`` tiles (spread over the
    classes, ``batch_size`` per batch) into a fresh folder; returns the first tile read back."""
    import tempfile

    import numpy as np
    from monai.networks.schedulers import DDIMScheduler
    from PIL import Image

    from monai_histodiff.engines.generation import GuidedTileGenerator
    from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer

    total = batch_size * batches
    counts = spread(total, NUM_CLASSES)

    def run(num_steps: int) -> torch.Tensor:
        scheduler = DDIMScheduler(**SCHEDULER_ARGS)
        with tempfile.TemporaryDirectory() as out:
            generator = GuidedTileGenerator(
                inferer=ClassifierGuidedLatentDiffusionInferer(scheduler, scale_factor=1.0), autoencoder=autoencoder,
                diffusion_model=unet, classifier=classifier, scheduler=scheduler, num_inference_steps=num_steps,
                class_names=[f"C{c}" for c in range(NUM_CLASSES)], counts=counts,
                latent_shape=(3, latent_size, latent_size), output_dir=out, guidance_scale=1.0,
                batch_size=batch_size, device=device, amp=spec["amp"], progress=False,
                guidance_interval=spec["guidance_interval"], background_writer=not spec["sync_writes"],
                amp_dtype=amp_dtype,
            )  # fmt: skip
            summary = generator.run()
            if summary["generated"] != total:
                raise RuntimeError(f"stage wrote {summary['generated']} tiles, expected {total}")
            first = Path(out) / "C0" / "C0_000000.png"
            return torch.from_numpy(np.asarray(Image.open(first), dtype=np.float32))

    return run


def worker(args: argparse.Namespace, variant: str, conn: Connection) -> None:
    """Wait for ``go``, then build, warm up, and serve ``run`` / ``exit`` messages received on ``conn``."""
    if args.threads > 0:  # here, not in the parent: the parent forks, and must not have started a thread pool
        torch.set_num_threads(args.threads)
    if conn.recv() != "go":
        return
    device = torch.device(args.device)
    spec = parse_variant(variant)
    amp_dtype = torch.bfloat16  # the stage's amp_dtype "bfloat16" (on GPUs with bf16; float32 guidance math)
    run = make_sampler(device, spec, args.batch_size, amp_dtype, sizes=args.sizes, batches=args.batches)
    t0 = time.perf_counter()
    with torch.no_grad():
        run(args.warmup_steps)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    rss_before = rss_mb()
    reset_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    conn.send({"ready": True, "warmup_s": warmup_s})
    times = []
    while (cmd := conn.recv()) == "run":
        _sync(device)
        t0 = time.perf_counter()
        images = run(args.steps)
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        if not torch.isfinite(images).all():
            raise RuntimeError(f"{variant}: non-finite samples")
        conn.send({"seconds": dt})
    out = {
        "variant": variant,
        "spec": spec,
        "warmup_s": round(warmup_s, 2),
        "rss_before_mb": None if rss_before is None else round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb() if reset_ok else maxrss_mb(), 1),
        "peak_rss_method": "VmHWM after clear_refs reset (timed runs only)" if reset_ok else "ru_maxrss (lifetime)",
        "ru_maxrss_mb": round(maxrss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    conn.send(out)


#: what a worker needs imported; the parent imports it once before it forks the workers
WORKER_IMPORTS = ("monai.networks.nets", "monai.networks.schedulers", "monai.inferers", "PIL.Image",
                  "monai_histodiff.networks", "monai_histodiff.inferers", "monai_histodiff.engines.generation")


def _context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux (the workers start without importing anything) unless CUDA was initialized here, which a fork
    cannot inherit; else ``spawn``."""
    fork = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    return multiprocessing.get_context("fork" if fork else "spawn")


class Worker:
    """A worker process (a fork of this one, made before any torch operation or CUDA call here) driven over a pipe."""

    def __init__(self, variant: str, args: argparse.Namespace) -> None:
        self.variant = variant
        context = _context()
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=worker, args=(args, variant, child), name=f"worker-{variant}")
        self.proc.start()
        child.close()

    def send(self, cmd: str) -> dict:
        try:
            self.conn.send(cmd)
            return self.conn.recv()
        except (EOFError, BrokenPipeError) as e:
            self.proc.join()
            raise RuntimeError(f"worker {self.variant} ended (exit code {self.proc.exitcode})") from e

    def close(self) -> dict:
        info = self.send("exit")
        self.proc.join()
        return info


def sampling_benchmark(args: argparse.Namespace) -> dict:
    opts = [o for o, on in (("compile", args.compile), ("channels_last", args.channels_last), ("amp", args.amp)) if on]
    variants = ["stock", "guided"]
    if args.classifier_batch_size:
        variants.append(f"guided_mb{args.classifier_batch_size}")
    stages = []
    if args.stage:
        stages = ["stage"] + ([f"stage_every{args.guidance_interval}"] if args.guidance_interval > 1 else [])
    variants += stages
    if opts:
        variants += ["stock+" + "+".join(opts), "guided+" + "+".join(opts)]
        variants += [v + "+" + "+".join(opts) for v in stages]
    if args.sync_writes:
        variants += [v + "+sync_writes" for v in variants if v.startswith("stage")]
    if args.variants:
        variants = list(args.variants)
        for v in variants:
            parse_variant(v)
        if "stock" not in variants:
            raise ValueError("--variants must include stock (the ratios are to it)")
    for name in WORKER_IMPORTS:  # once, here: the workers are forks of this process
        importlib.import_module(name)
    workers = [Worker(v, args) for v in variants]  # each waits for "go"
    for w in workers:  # warm up one at a time, so compilations (and GPU memory) do not compete
        ready = w.send("go")
        print(f"{w.variant}: warm-up {ready['warmup_s']:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.reps):
        k = r % len(workers)
        for w in workers[k:] + workers[:k]:
            times[w.variant].append(w.send("run")["seconds"])
        done = ", ".join(f"{v} {t[-1]:.2f} s" for v, t in times.items())
        print(f"round {r + 1}/{args.reps}: {done}", file=sys.stderr, flush=True)
    infos = {w.variant: w.close() for w in workers}
    stock_s = statistics.median(times["stock"])
    rows = []
    for v in variants:
        med = statistics.median(times[v])
        info = infos[v]
        before = info["rss_before_mb"]
        rows.append({
            "variant": v,
            "median_s": round(med, 3),
            "times_s": [round(t, 3) for t in times[v]],
            "tiles_per_s": round(args.batches * args.batch_size / med, 2),
            "ms_per_tile": round(1000 * med / (args.batches * args.batch_size), 2),
            "ratio_vs_stock": round(med / stock_s, 3),
            "sampling_rss_mb": None if before is None else round(info["peak_rss_mb"] - before, 1),
            **{k: info[k] for k in info if k not in ("variant",)},
        })  # fmt: skip
    return {"variants": rows, "statistic": f"median of {args.reps} interleaved rounds after warm-up"}


# ---------------------------------------------------------------------------------------------------------- paper scale
def paper_worker(args: argparse.Namespace) -> None:
    """One classifier-gradient step of the paper-size classifier at one micro-batch size; emits time and memory."""
    from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer
    from monai_histodiff.networks import TimeConditionedLatentClassifier

    device = torch.device(args.device)
    micro_batch = args.paper_worker
    torch.manual_seed(0)
    paper = sizes_of("paper")["classifier_args"]
    net = TimeConditionedLatentClassifier(num_classes=NUM_CLASSES, latent_size=64, **paper)
    net = net.to(device).eval().requires_grad_(False)
    z = torch.randn(args.batch_size, 3, 64, 64, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    _sync(device)
    rss_before = rss_mb()
    reset_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    grad = ClassifierGuidedLatentDiffusionInferer.classifier_gradient(net, z, t, y, micro_batch)
    _sync(device)
    dt = time.perf_counter() - t0
    assert grad.shape == z.shape and torch.isfinite(grad).all()
    out = {
        "classifier_batch_size": micro_batch,
        "seconds": round(dt, 2),
        "rss_before_mb": None if rss_before is None else round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb() if reset_ok else maxrss_mb(), 1),
        "peak_rss_method": "VmHWM after clear_refs reset (gradient step only)" if reset_ok else "ru_maxrss (lifetime)",
        "ru_maxrss_mb": round(maxrss_mb(), 1),
        "num_parameters": sum(p.numel() for p in net.parameters()),
    }
    if out["rss_before_mb"] is not None:
        out["step_rss_mb"] = round(out["peak_rss_mb"] - out["rss_before_mb"], 1)
    if device.type == "cuda":
        out["peak_cuda_mb"] = round((torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20, 1)
    _emit(out)


def paper_benchmark(args: argparse.Namespace) -> dict:
    rows = []
    for mb in args.paper_micro_batches:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--paper_worker", str(mb), "--device", args.device,
            "--threads", str(args.threads), "--batch_size", str(args.batch_size),
        ]  # fmt: skip
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        row = next(json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK))
        print(f"classifier_batch_size {mb}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return {
        "paper_scale": rows,
        "classifier_args": {**sizes_of("paper")["classifier_args"], "num_classes": NUM_CLASSES, "latent_size": 64,
                            "in_channels": 3},
        "measured": "one classifier_gradient call (forward + backward to z_t) per fresh process",
    }


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="DDIM inference steps of each timed run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (median reported)")
    parser.add_argument("--warmup_steps", type=int, default=5, help="steps of each worker's warm-up run")
    parser.add_argument("--classifier_batch_size", type=int, default=10, help="micro-batch variant; 0 to skip")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd UNet + classifier")
    parser.add_argument("--channels_last", action="store_true", help="also time channels-last networks and latents")
    parser.add_argument("--amp", action="store_true", help="also time autocast (bf16 on CPU: usually slower)")
    parser.add_argument("--stage", action="store_true", help="also time the generate stage's engine end to end")
    parser.add_argument("--guidance_interval", type=int, default=1,
                        help="with --stage, also time the stage guiding with a gradient every K steps")
    parser.add_argument("--sync_writes", action="store_true",
                        help="with --stage, also time each stage variant writing its tiles before the next batch")
    parser.add_argument("--batches", type=int, default=1, help="batches per timed run (tiles/s counts them all)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="time exactly these variants (e.g. stock stage_every4+compile+channels_last)")
    parser.add_argument("--paper_scale", action="store_true", help="paper-size classifier-gradient memory only")
    parser.add_argument("--paper_micro_batches", type=int, nargs="+", default=[50, 10, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="small", choices=["small", "paper"],
                        help="network sizes: bundles/small.json's (CPU) or the paper's (GPU; see paper_scale_gpu.sh)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--output", default=None, help="result JSON (default: results/guided_sampling*.json)")
    parser.add_argument("--paper_worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paper_worker is not None:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        paper_worker(args)
        return None
    if args.reps < 1 or args.warmup_steps < 1 or args.batches < 1:
        parser.error("--reps, --warmup_steps and --batches must be at least 1")

    import monai

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.paper_scale:
        name = "guided_sampling_paper_scale"
        result: dict[str, Any] = {"benchmark": name, **paper_benchmark(args)}
    else:
        suffix = "".join(f"_{o}" for o, on in (("compiled", args.compile), ("amp", args.amp)) if on)
        if args.channels_last and not args.compile:
            suffix += "_channels_last"
        if args.stage:
            suffix += "_stage"
        if args.sizes == "paper":
            suffix += "_paper_sizes"
        name = "guided_sampling" + suffix
        result = {"benchmark": name, **sampling_benchmark(args)}
        size = sizes_of(args.sizes)
        result.update({
            "steps": args.steps, "warmup_steps": args.warmup_steps, "reps": args.reps, "batches": args.batches,
            "guidance_scale": 1.0, "scheduler": "DDIMScheduler", "scheduler_args": SCHEDULER_ARGS,
            "sizes": args.sizes, "latent_shape": [3, size["latent_size"], size["latent_size"]],
            "image_size": size["image_size"], "autoencoder_args": size["autoencoder_args"],
            "diffusion_args": size["diffusion_args"],
            "latent_classifier_args": {**size["classifier_args"], "num_classes": NUM_CLASSES,
                                       "latent_size": size["latent_size"]},
            "stock_path": "monai.inferers.LatentDiffusionInferer.sample (DDIMScheduler, no guidance) + decode",
            "guided_path": "ClassifierGuidedLatentDiffusionInferer.sample (guidance_scale=1 on every step) + decode",
            "stage_path": "GuidedTileGenerator.run: per-tile seeds and noise, confidence, PNG tiles, manifest, grids",
        })  # fmt: skip
    result.update({
        "batch_size": args.batch_size,
        "device": args.device,
        "date": started,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    })  # fmt: skip
    out = Path(args.output) if args.output else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    if args.paper_scale:
        print("| classifier_batch_size | batch | step s | peak RSS MB | step RSS MB | peak CUDA MB |")
        print("|---|---|---|---|---|---|")
        for r in result["paper_scale"]:
            print(
                f"| {r['classifier_batch_size']} | {args.batch_size} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {r.get('step_rss_mb', float('nan')):.0f} | {r.get('peak_cuda_mb', '-')} |"
            )
    else:
        print(f"batch {args.batch_size} x {args.batches}, {args.steps} DDIM steps, {args.device}, "
              f"{result['statistic']}")
        print("| variant | tiles/s | ms per tile | peak RSS MB | sampling RSS MB | ratio vs stock |")
        print("|---|---|---|---|---|---|")
        for r in result["variants"]:
            print(
                f"| {r['variant']} | {r['tiles_per_s']:.2f} | {r['ms_per_tile']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {r['sampling_rss_mb']} | {r['ratio_vs_stock']:.2f}x |"
            )
    return result


if __name__ == "__main__":
    main()
