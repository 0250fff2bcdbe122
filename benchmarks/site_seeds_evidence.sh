#!/usr/bin/env bash
# Table 1 with 15 seeds for both generators on the site-pre-trained lung chain of docs/results.md, at the CPU size
# (64 px), on the same lung split as site_pretraining_evidence.sh (2% labeled, groups kept on one side, 600 test tiles
# per class), with its pre-training (the site's own unlabeled tiles, v-prediction: small.json's default):
#  1. pre-training, adaptation, the judge, HistoDiffusion at the paper's g = 1 and the class-conditional StyleGAN2 on
#     the same 144 labels, Table 1 (selective 200%, seeds 0-14, paired 95% intervals, flips / rotations / colour
#     jitter for every row), the judged guidance sweep g = 0 / 1 / 4;
#  2. HistoDiffusion at g = 4 in a copy sharing pre-training, adaptation, judge and the baseline rows (seeds 0-14).
# Wall time on the 2-core development machine (2026-12-07): 1 h 19 min for part 1 (StyleGAN2 training 21 min of
# it), 10 min for part 2.
#   bash benchmarks/site_seeds_evidence.sh [OUT] [HISTOLOGY]      (from the repository root, after `make install`)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, share_run, at_g4
SEEDS=(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
COMMON=(--dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 --test_per_class 600 --seeds "${SEEDS[@]}"
        --generation_steps 50 --pretraining site --ratios 2.0 --random_ratio 0
        --set pretrain_autoencoder.max_epochs=3 --set pretrain_autoencoder.adv_start=250
        --set pretrain_autoencoder.adv_weight=0.05 --set pretrain_diffusion.max_epochs=20
        --set pretrain_diffusion.warmup_steps=50 --set pretrain_diffusion.sample_interval=5
        --set pretrain_diffusion.grid_inference_steps=25)
# 1. g = 1 (the paper's) and StyleGAN2
$PY -m monai_histodiff experiment --output_dir "$OUT" "${COMMON[@]}" --generator both --sweep_scales 0 1 4 \
    --sweep_steps 50 --set train_stylegan2.max_epochs=200 --set train_stylegan2.sample_interval=20
echo "[evidence] pre-training, adaptation, g = 1 and StyleGAN2 rows after $(( $(date +%s) - START )) s"
# 2. g = 4
at_g4 "$OUT" "${COMMON[@]}"
echo "[evidence] g = 4 after $(( $(date +%s) - START )) s"
