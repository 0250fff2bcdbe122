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
"""Time per latent-diffusion training step: MONAI's stock path (encode every batch) vs the latent cache.

(a) stock: ``SupervisedTrainer`` + a ``DiffusionPrepareBatch`` + ``LatentDiffusionInferer`` bound to the autoencoder,
    which runs ``encode_stage_2_inputs`` on every batch inside the step;
(b) cached: ``SupervisedTrainer`` + :class:`~monai_histodiff.engines.LatentDiffusionPrepareBatch` +
    ``DiffusionInferer`` on batches of cached posteriors (one ``mu + sigma * eps`` per step).

Both train the same diffusion UNet (same initial weights) on the same batch, with the networks the stages build
(read from the bundle configs): ``--sizes small`` those of ``bundles/small.json`` (64 px tiles, f=4, 16x16x3
latents), ``--sizes paper`` the paper's (256 px tiles, LDM-4 64x64x3 latents, UNet channels 192/384/384/768/768).
Warm-up steps are excluded. Run::

    python benchmarks/latent_cache_speed.py [--sizes small --batch_size 8 --iters 20 --warmup 3 --device cpu]
    python benchmarks/latent_cache_speed.py --sizes paper --batch_size 2 --iters 2 --warmup 1 \
        --output benchmarks/results/latent_cache_speed_paper_sizes.json

Writes ``benchmarks/results/latent_cache_speed.json`` and prints a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from monai_histodiff.engines import LatentCache, LatentDiffusionPrepareBatch, encode_posteriors

try:  # run as ``python benchmarks/latent_cache_speed.py``: the folder is on sys.path
    from guided_sampling import sizes_of
except ImportError:  # imported from elsewhere
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from guided_sampling import sizes_of

__all__ = ["StockLatentPrepareBatch", "BoundLatentDiffusionInferer", "time_steps", "main"]

RESULT = Path(__file__).resolve().parent / "results" / "latent_cache_speed.json"


class StockLatentPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` with latent-shaped noise.

    The stock class draws ``randn_like(images)``, which is image-shaped; ``LatentDiffusionInferer`` needs noise of the
    latent's shape, so only ``get_noise`` is overridden (as its docstring invites).
    """

    def __init__(self, num_train_timesteps: int, latent_shape: tuple[int, ...]) -> None:
        super().__init__(num_train_timesteps)
        self.latent_shape = tuple(latent_shape)

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn((images.shape[0], *self.latent_shape), device=images.device, dtype=images.dtype)


class BoundLatentDiffusionInferer:
    """``LatentDiffusionInferer`` with the autoencoder bound, callable as ``SupervisedTrainer`` calls an inferer.

    ``SupervisedTrainer`` calls ``inferer(inputs, network, **kwargs)`` with the network second and positional, where
    ``LatentDiffusionInferer.__call__`` expects the autoencoder, so ``functools.partial(inferer,
    autoencoder_model=ae)`` would pass the autoencoder twice; this wrapper maps the arguments by name.
    """

    def __init__(self, inferer: LatentDiffusionInferer, autoencoder: torch.nn.Module) -> None:
        self.inferer = inferer
        self.autoencoder = autoencoder

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inferer(inputs, self.autoencoder, network, *args, **kwargs)


def time_steps(trainer: SupervisedTrainer, warmup: int, iters: int) -> tuple[float, float]:
    """Run ``warmup + iters`` steps of ``trainer``; return (median, mean) milliseconds per step after the warm-up.

    A step is timed from the end of the previous one to its own end, so it includes fetching the batch and
    ``prepare_batch`` as well as forward, backward and the optimiser step. The median is robust to load spikes.
    """
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
    trainer.run()
    if len(stamps) != warmup + iters:
        raise RuntimeError(f"expected {warmup + iters} steps, ran {len(stamps)}")
    durations = [(b - a) * 1000.0 for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:])]
    return statistics.median(durations), statistics.fmean(durations)


def _make_trainer(device, network, loader, inferer, prepare_batch, steps: int) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=device,
        max_epochs=1,
        epoch_length=steps,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-4),
        loss_function=torch.nn.MSELoss(),
        inferer=inferer,
        prepare_batch=prepare_batch,
        decollate=False,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small", choices=["small", "paper"],
                        help="networks and tile size of bundles/small.json (CPU) or the paper's")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(RESULT))
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    device = torch.device(args.device)
    torch.manual_seed(0)

    size = sizes_of(args.sizes)
    ae_args, unet_args, image_size = size["autoencoder_args"], size["diffusion_args"], size["image_size"]
    autoencoder = AutoencoderKL(**ae_args).to(device).eval()
    for p in autoencoder.parameters():
        p.requires_grad_(False)
    unet_state = DiffusionModelUNet(**unet_args).state_dict()
    steps = args.warmup + args.iters
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    images = torch.rand(args.batch_size, 3, image_size, image_size) * 2 - 1
    image_batch = {"image": images}
    cache = LatentCache.from_posteriors(encode_posteriors(autoencoder, [image_batch], device, progress=False))
    cached_batch = {"latent_mu": cache.mu, "latent_sigma": cache.sigma}
    latent_shape = cache.latent_shape

    # (a) MONAI stock: encode every batch inside the step
    unet = DiffusionModelUNet(**unet_args).to(device)
    unet.load_state_dict(unet_state)
    stock = _make_trainer(
        device, unet, [image_batch] * steps,
        BoundLatentDiffusionInferer(LatentDiffusionInferer(scheduler, scale_factor=1.0), autoencoder),
        StockLatentPrepareBatch(1000, latent_shape), steps,
    )  # fmt: skip
    stock_ms, stock_mean = time_steps(stock, args.warmup, args.iters)

    # (b) ours: cached posteriors, reparameterised per step, plain DiffusionInferer
    unet = DiffusionModelUNet(**unet_args).to(device)
    unet.load_state_dict(unet_state)
    cached = _make_trainer(
        device, unet, [cached_batch] * steps, DiffusionInferer(scheduler),
        LatentDiffusionPrepareBatch(1000, scale_factor=1.0), steps,
    )  # fmt: skip
    cached_ms, cached_mean = time_steps(cached, args.warmup, args.iters)

    result = {
        "benchmark": "latent_cache_speed",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "stock_ms_per_step": round(stock_ms, 2),
        "cached_ms_per_step": round(cached_ms, 2),
        "speedup": round(stock_ms / cached_ms, 3),
        "statistic": "median ms per step after warm-up (means below)",
        "stock_mean_ms_per_step": round(stock_mean, 2),
        "cached_mean_ms_per_step": round(cached_mean, 2),
        "speedup_of_means": round(stock_mean / cached_mean, 3),
        "sizes": args.sizes,
        "image_size": image_size,
        "latent_shape": list(latent_shape),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "autoencoder_args": ae_args,
        "diffusion_args": unet_args,
        "stock_path": "SupervisedTrainer + DiffusionPrepareBatch(latent-shaped noise) + LatentDiffusionInferer",
        "cached_path": "SupervisedTrainer + LatentDiffusionPrepareBatch(cached mu/sigma) + DiffusionInferer",
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| benchmark | size | batch | device | stock ms/step | cached ms/step | speed-up |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| latent_cache_speed | {image_size} px -> {'x'.join(map(str, latent_shape[1:]))}x{latent_shape[0]} "
        f"| {args.batch_size} | {device} | {stock_ms:.1f} | {cached_ms:.1f} | {stock_ms / cached_ms:.2f}x |"
    )
    return result


if __name__ == "__main__":
    main()
