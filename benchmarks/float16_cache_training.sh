#!/usr/bin/env bash
# What float16 latent-cache storage does to diffusion training at the CPU size: pretrain_diffusion twice from the same
# autoencoder, data, seed and budget, once with latent_cache_dtype float32 and once float16; then the paired training
# loss (same batches, noise and timesteps: only the stored posteriors differ) and each model's unconditional sample
# check (spread and pooled FD of sampled against training latents). Results: benchmarks/README.md.
#   bash benchmarks/float16_cache_training.sh AUTOENCODER.pt UNLABELED_FOLDER [OUT] [EPOCHS]
#   e.g. after `make demo`: bash benchmarks/float16_cache_training.sh \
#        demo_output/runs/pretrain_autoencoder/autoencoder.pt demo_output/data/unlabeled
set -euo pipefail
AE=$1
DATA=$2
OUT=${3:-/tmp/histodiff_fp16}
EPOCHS=${4:-40}
PY=${PY:-.venv/bin/python}
for dt in float32 float16; do
    mkdir -p "$OUT/$dt/pretrain_autoencoder"
    cp "$AE" "$OUT/$dt/pretrain_autoencoder/autoencoder.pt"
    $PY -m monai.bundle run --config_file "['bundles/common.json','bundles/pretrain_diffusion.json','bundles/small.json']" \
        --dataset_dir "$DATA" --output_dir "$OUT/$dt" --latent_cache_dtype $dt --max_epochs "$EPOCHS" \
        --epoch_length 20 --batch_size 16 --lr 2e-3 --warmup_steps 20 --sample_interval "$EPOCHS" \
        --grid_inference_steps 25 --num_workers 0 > "$OUT/$dt.log" 2>&1
done
$PY - "$OUT" "$AE" "$DATA" "$OUT" "$EPOCHS" <<'EOF'
import json, os, re, statistics, sys, time
from pathlib import Path

out = Path(sys.argv[1])
loss = {dt: [float(x) for x in re.findall(r"Iter: \d+/\d+ -- .*?loss: ([0-9.]+)", (out / f"{dt}.log").read_text())]
        for dt in ("float32", "float16")}
n = min(len(v) for v in loss.values())
diff = [b - a for a, b in zip(loss["float32"][:n], loss["float16"][:n])]
last = max(1, n // 4)
checks = {dt: json.loads((out / dt / "pretrain_diffusion" / "sample_check.json").read_text()) for dt in loss}
result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
    "command": "bash benchmarks/float16_cache_training.sh " + " ".join(sys.argv[2:]),
    "steps": n,
    "loss_last_quarter_mean": {dt: statistics.fmean(v[n - last:n]) for dt, v in loss.items()},
    "paired_loss_difference_last_quarter": {"mean": statistics.fmean(diff[-last:]),
                                            "max_abs": max(abs(d) for d in diff[-last:])},
    "paired_loss_difference_all_steps_max_abs": max(abs(d) for d in diff),
    "sample_check": {dt: {k: c[k] for k in ("std_ratio", "mean_shift", "fd_pooled", "fd_pooled_reference", "ok")}
                     for dt, c in checks.items()},
}
path = Path("benchmarks/results/float16_cache_training.json")
path.write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
EOF
