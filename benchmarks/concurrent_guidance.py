"""Does running the UNet's ``eps(z_t)`` and the classifier's ``grad log p(y | z_t)`` concurrently pay on CPU?

Both depend only on ``z_t``, so a guided step can compute them side by side. On CPU that means inter-op parallelism:
two Python threads (torch releases the GIL inside its ops), each with its share of the cores, instead of one after
the other with every core on each. Measured per guided step at the CPU size (``bundles/small.json`` networks read by
``guided_sampling.sizes_of``), batch ``--batch_size``, median of ``--reps`` runs of ``--steps`` steps each:

- ``sequential``: UNet then classifier gradient, torch's default thread count;
- ``concurrent``: both in a two-thread pool, ``torch.set_num_threads(threads // 2)``;
- ``sequential_unet_only``: the UNet alone (the stock sampler's per-step work), default threads.

Run::

    python benchmarks/concurrent_guidance.py      # -> results/concurrent_guidance.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guided_sampling import NUM_CLASSES, build  # noqa: E402

from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" /
                                                "concurrent_guidance.json"))
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    _, unet, clf, z, labels = build(device, {"channels_last": False, "compile": False}, args.batch_size)
    grad_fn = ClassifierGuidedLatentDiffusionInferer.classifier_gradient
    threads = torch.get_num_threads()
    ts = torch.linspace(999, 0, args.steps).long()

    def unet_step(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unet(z, timesteps=t.repeat(args.batch_size))

    def grad_step(t: torch.Tensor) -> torch.Tensor:
        return grad_fn(clf, z, t.repeat(args.batch_size), labels, None)

    def sequential() -> None:
        for t in ts:
            unet_step(t)
            grad_step(t)

    def unet_only() -> None:
        for t in ts:
            unet_step(t)

    pool = ThreadPoolExecutor(max_workers=2)

    def concurrent() -> None:
        for t in ts:
            a, b = pool.submit(unet_step, t), pool.submit(grad_step, t)
            a.result(), b.result()

    variants = {"sequential": (sequential, threads), "concurrent": (concurrent, max(1, threads // 2)),
                "sequential_unet_only": (unet_only, threads)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, (fn, n) in variants.items():  # warm-up
        torch.set_num_threads(n)
        fn()
    for _ in range(args.reps):  # interleaved rounds
        for name, (fn, n) in variants.items():
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    pool.shutdown()
    rows = {k: {"ms_per_step": round(1000 * statistics.median(v) / args.steps, 2),
                "times_s": [round(x, 3) for x in v]} for k, v in times.items()}
    seq = rows["sequential"]["ms_per_step"]
    for r in rows.values():
        r["ratio_vs_sequential"] = round(r["ms_per_step"] / seq, 3)
    import monai

    result = {
        "benchmark": "concurrent_guidance", "batch_size": args.batch_size, "steps": args.steps, "reps": args.reps,
        "num_classes": NUM_CLASSES, "default_threads": threads, "variants": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| variant | ms per step | ratio vs sequential | times (s) |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['ms_per_step']} | {r['ratio_vs_sequential']:.2f}x | {', '.join(map(str, r['times_s']))} |")
    return result


if __name__ == "__main__":
    main()
