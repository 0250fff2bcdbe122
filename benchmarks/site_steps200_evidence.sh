#!/usr/bin/env bash
# HistoDiffusion at the paper's g = 1 sampled with the paper's 200 DDIM steps instead of the CPU size's 50: pool, judged
# sweep g = 0 / 1 / 4 at 200 steps and the rows (seeds 0-14), in a copy of site_seeds_evidence.sh's folder sharing
# everything up to the latent classifier, the judge and the baseline rows.
#   bash benchmarks/site_steps200_evidence.sh [OUT] [HISTOLOGY]   (after site_seeds_evidence.sh, same OUT)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, share_run
D="${OUT}_steps200"
share_run "$OUT" "$D" split.json classes.json pretraining.json judge pretrain_autoencoder pretrain_diffusion \
    train_aux_classifier finetune train_latent_classifier ceiling.png
$PY -m monai_histodiff experiment --output_dir "$D" --dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 \
    --test_per_class 600 --seeds 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 --generation_steps 200 --pretraining site \
    --ratios 2.0 --random_ratio 0 --generator histodiffusion --sweep_scales 0 1 4 --sweep_steps 200
echo "[evidence] 200 DDIM steps, g = 1 after $(( $(date +%s) - START )) s"
