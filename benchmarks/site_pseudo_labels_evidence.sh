#!/usr/bin/env bash
# HistoDiffusion at the paper's g = 1 with the latent classifier also trained on pseudo-labels (an option, not the
# paper's method): the auxiliary classifier labels the site's own pre-training tiles (outside the test groups, never a
# training or validation tile or their groups) it gives >= 0.9, and the latent classifier learns from them beside the
# 144 labeled tiles (half the draws each). Runs in a copy of site_seeds_evidence.sh's folder sharing pre-training,
# decoder fine-tuning, auxiliary classifier, judge and the baseline rows: only the latent classifier, the pool, the
# guidance check, the judged sweep g = 0 / 1 / 4 and HistoDiffusion's rows (seeds 0-14) are new.
#   bash benchmarks/site_pseudo_labels_evidence.sh [OUT] [HISTOLOGY]   (after site_seeds_evidence.sh, same OUT)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, share_run
P="${OUT}_pseudo"
share_run "$OUT" "$P" split.json classes.json pretraining.json judge pretrain_autoencoder pretrain_diffusion \
    train_aux_classifier finetune ceiling.png
$PY -m monai_histodiff experiment --output_dir "$P" --dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 \
    --test_per_class 600 --seeds 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 --generation_steps 50 --pretraining site \
    --ratios 2.0 --random_ratio 0 --generator histodiffusion --pseudo_labels --sweep_scales 0 1 4 --sweep_steps 50
echo "[evidence] pseudo-labels, g = 1 after $(( $(date +%s) - START )) s"
