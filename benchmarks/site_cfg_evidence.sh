#!/usr/bin/env bash
# The classifier-free guidance route of docs/results.md ("A second route: the class-conditional fine-tune"), at the
# CPU size (64 px), on the same lung split as site_pretraining_evidence.sh (2% labeled, groups kept on one side, 600
# test tiles per class), with its pre-training (the site's own unlabeled tiles, v-prediction, small.json's default):
#  1. pre-training, adaptation and HistoDiffusion's Table 1 rows (selective 200%, 5 seeds, paired 95% intervals),
#     the classifier-guidance sweep g = 0 / 1 / 4 (judged);
#  2. in the same folder (every finished stage and row reused): the diffusion model fine-tuned with the class as a
#     condition (finetune_conditional, the site's unlabeled tiles as the null class), its pool at w = 2, its rows,
#     its guidance check and the judged sweep w = 0 / 1 / 2 / 3.
#   bash benchmarks/site_cfg_evidence.sh [OUT] [HISTOLOGY]      (from the repository root, after `make install`)
set -euo pipefail
OUT=${1:-runs/lung_site}
H=${2:-../shared/data/histology}
PY=${PY:-.venv/bin/python}
START=$(date +%s)
COMMON=(--dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 --test_per_class 600 --seeds 0 1 2 3 4
        --generation_steps 50 --pretraining site --ratios 2.0 --random_ratio 0
        --set pretrain_autoencoder.max_epochs=3 --set pretrain_autoencoder.adv_start=250
        --set pretrain_autoencoder.adv_weight=0.05 --set pretrain_diffusion.max_epochs=20
        --set pretrain_diffusion.warmup_steps=50 --set pretrain_diffusion.sample_interval=5
        --set pretrain_diffusion.grid_inference_steps=25)
$PY -m monai_histodiff experiment --output_dir "$OUT" "${COMMON[@]}" --generator histodiffusion
echo "[evidence] pre-training, adaptation and HistoDiffusion rows after $(( $(date +%s) - START )) s"
$PY -m monai_histodiff experiment --output_dir "$OUT" "${COMMON[@]}" --generator histodiffusion conditional \
    --cfg_scale 2 --sweep_cfg_scales 0 1 2 3 --sweep_scales 0 1 4 --sweep_steps 50
echo "[evidence] the classifier-free guidance route after $(( $(date +%s) - START )) s"
