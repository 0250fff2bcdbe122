#!/usr/bin/env bash
# The in-domain evidence of docs/results.md ("Pre-training on the site's own tiles"), at the CPU size (64 px): the
# autoencoder and the diffusion model pre-trained on the lung site's own unlabeled tiles (every LC25000 lung tile
# outside the test groups, labels dropped: --pretraining site), then the Table 1 protocol on the same split as
# real_data_evidence.sh (2% labeled, groups kept on one side, 600 test tiles per class) with the judge, the
# guidance sweep, HistoDiffusion and the StyleGAN2 baseline, 5 seeds, paired 95% intervals.
#   bash benchmarks/site_pretraining_evidence.sh [OUT] [HISTOLOGY]      (from the repository root, after `make install`)
set -euo pipefail
OUT=${1:-runs/lung_site}
H=${2:-../shared/data/histology}
PY=${PY:-.venv/bin/python}
START=$(date +%s)
$PY -m monai_histodiff experiment --output_dir "$OUT" --dataset_dir "$H/lc25000_lung" --fraction 0.02 \
    --val_fraction 0.2 --test_per_class 600 --seeds 0 1 2 3 4 --generation_steps 50 --pretraining site \
    --generator both --ratios 2.0 --random_ratio 0 --sweep_scales 0 1 2 4 --sweep_steps 50 \
    --set pretrain_autoencoder.max_epochs=3 --set pretrain_autoencoder.adv_start=250 \
    --set pretrain_autoencoder.adv_weight=0.05 --set pretrain_diffusion.max_epochs=20 \
    --set pretrain_diffusion.warmup_steps=50 --set pretrain_diffusion.sample_interval=5 \
    --set pretrain_diffusion.grid_inference_steps=25 \
    --set train_stylegan2.max_epochs=200 --set train_stylegan2.sample_interval=20
echo "[evidence] site pre-training and Table 1 after $(( $(date +%s) - START )) s"
