"""Where an unconditional latent diffusion model goes wrong: its denoising per timestep, and its samples' spread.

    python benchmarks/denoising_by_timestep.py runs/lung_site > benchmarks/results/denoising_by_timestep.json

For the ``pretrain_diffusion/diffusion.pt`` of a run folder (and the latent cache it trained on): 256 training
latents (``scale_factor * (mu + sigma * eps)``) noised to fixed timesteps and denoised in one step by the model
(EMA weights): the mean squared error of its implied noise, the spread and mean squared error of the z_0 it implies,
against the data's spread; then the sample check of :func:`~monai_histodiff.metrics.check_unconditional_latents`
(64 latents from noise against the training latents) with MONAI's DDIM at 25 steps (the grid sampler's) and the
project's respaced DDIM at 50 and DDPM at 100 steps, EMA and raw weights. Works for any ``prediction_type``.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import time

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from monai_histodiff.engines.latent_cache import load_latent_cache
from monai_histodiff.engines.loading import diffusion_meta, load_diffusion
from monai_histodiff.metrics.latent_check import check_unconditional_latents
from monai_histodiff.schedulers.respaced import RespacedDDIMScheduler, RespacedDDPMScheduler


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder with pretrain_diffusion/diffusion.pt and its latent cache")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 50, 100, 200, 400, 600, 800, 950])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = f"{a.run}/pretrain_diffusion/diffusion.pt"
    meta = diffusion_meta(ckpt)
    args = dict(meta["config"]["scheduler_args"])
    cache = load_latent_cache(sorted(glob.glob(f"{a.run}/pretrain_diffusion/latent_cache_*"))[0])  # folder or .pt
    z0 = cache.sample_latents(256, meta["scale_factor"], seed=3)
    train = DDPMScheduler(**args)
    unet = load_diffusion(ckpt, use_ema=True)[0].eval()
    rows, g = [], torch.Generator().manual_seed(0)
    for t0 in a.timesteps:
        t = torch.full((len(z0),), t0, dtype=torch.long)
        eps = torch.randn(z0.shape, generator=g)
        zt = train.add_noise(z0, eps, t)
        with torch.no_grad():
            out = unet(zt, t)
        abar = train.alphas_cumprod[t0]
        if args.get("prediction_type") == "v_prediction":
            x0 = abar.sqrt() * zt - (1 - abar).sqrt() * out
            e = (zt - abar.sqrt() * x0) / (1 - abar).sqrt()
        else:
            e = out
            x0 = (zt - (1 - abar).sqrt() * e) / abar.sqrt()
        rows.append({"t": t0, "eps_mse": round(float(((e - eps) ** 2).mean()), 4),
                     "z0_std": round(float(x0.std()), 3), "z0_mse": round(float(((x0 - z0) ** 2).mean()), 4)})
    data = cache.sample_latents(256, meta["scale_factor"])
    no_variance = {k: v for k, v in args.items() if k != "variance_type"}
    samplers = [("MONAI DDIM", lambda: DDIMScheduler(**no_variance), 25),
                ("respaced DDIM", lambda: RespacedDDIMScheduler(**no_variance), 50),
                ("respaced DDPM", lambda: RespacedDDPMScheduler(**args), 100)]
    checks = []
    for use_ema in (True, False):
        model = load_diffusion(ckpt, use_ema=use_ema)[0].eval()
        for name, make, n in samplers:
            sched = make()
            sched.set_timesteps(n)
            noise = torch.randn((64, *meta["latent_shape"]), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                z = DiffusionInferer(sched).sample(noise, model, sched, verbose=False)
            r = check_unconditional_latents(z, data)
            checks.append({"weights": "EMA" if use_ema else "raw", "sampler": name, "steps": n,
                           "sampled_std": [round(x, 2) for x in r["sampled"]["std"]],
                           "data_std": [round(x, 2) for x in r["data"]["std"]], "fd_pooled": round(r["fd_pooled"], 3),
                           "fd_pooled_reference": round(r["fd_pooled_reference"], 3)})
    result = {"command": "python benchmarks/denoising_by_timestep.py " + " ".join(argv or []),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
              "checkpoint": ckpt, "prediction_type": args.get("prediction_type"),
              "data_std": round(float(z0.std()), 3), "denoising": rows, "sample_checks": checks}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
