#!/usr/bin/env bash
# The paper-scale generation comparison on one GPU, in well under 10 minutes: MONAI's stock unguided sampler, the
# guided sampler and the generate stage end to end (also guiding every 4th step), eager and under autocast, with the
# paper's networks (256 px tiles, LDM-4 64x64x3 latents, the UNet and latent classifier of bundles/common.json) at
# 200 DDIM steps, batch 16, three interleaved rounds after a full-length warm-up.
#   bash benchmarks/paper_scale_gpu.sh                  # -> benchmarks/results/guided_sampling_paper_scale_gpu.json
#   STEPS=2 REPS=1 BATCH=2 DEVICE=cpu bash benchmarks/paper_scale_gpu.sh /tmp/x.json   # a dry run anywhere
# Floor to compare with (from the UNet, classifier and decoder FLOPs per tile): about 16 tiles/s on one H200.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-results/guided_sampling_paper_scale_gpu.json}
timeout "${TIMEOUT:-570}" python guided_sampling.py --sizes "${SIZES:-paper}" --device "${DEVICE:-cuda}" --stage \
    --guidance_interval 4 --amp --classifier_batch_size 0 --batch_size "${BATCH:-16}" --steps "${STEPS:-200}" \
    --warmup_steps "${STEPS:-200}" --reps "${REPS:-3}" --output "$OUT"
