#!/usr/bin/env bash
# The in-domain evidence of docs/results.md ("Pre-training on the site's own tiles"), at the CPU size (64 px), on the
# same lung split as real_data_evidence.sh (2% labeled, groups kept on one side, 600 test tiles per class):
#  1. the autoencoder and the diffusion model pre-trained on the site's own unlabeled tiles (every LC25000 lung tile
#     outside the test groups, labels dropped: --pretraining site), then Table 1 (selective 200%, 5 seeds, paired 95%
#     intervals) for HistoDiffusion at the paper's g = 1 and the StyleGAN2 baseline, with the judge, the ceiling, the
#     guidance check and the guidance sweep;
#  2. the same site at g = 4 (the sweep's best), in a copy sharing pre-training, adaptation, judge and baseline rows;
#  3. the diffusion model retrained with v-prediction (same budget; the CPU size's default since), in a copy sharing
#     the autoencoder and the rest;
#  4. the paper's setting's ceiling on the same split: the autoencoder pre-trained on the public sources
#     (real_data_evidence.sh's listing and budget), its decoder fine-tuned at the site.
#   bash benchmarks/site_pretraining_evidence.sh [OUT] [HISTOLOGY]      (from the repository root, after `make install`)
set -euo pipefail
OUT=${1:-runs/lung_site}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, share_run, at_g4
COMMON=(--dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 --test_per_class 600 --seeds 0 1 2 3 4
        --generation_steps 50 --pretraining site --ratios 2.0 --random_ratio 0
        --set pretrain_autoencoder.max_epochs=3 --set pretrain_autoencoder.adv_start=250
        --set pretrain_autoencoder.adv_weight=0.05 --set pretrain_diffusion.max_epochs=20
        --set pretrain_diffusion.warmup_steps=50 --set pretrain_diffusion.sample_interval=5
        --set pretrain_diffusion.grid_inference_steps=25)
# 1. (noise prediction, the paper's and, when this ran, the CPU size's default; small.json now sets v-prediction)
$PY -m monai_histodiff experiment --output_dir "$OUT" "${COMMON[@]}" --generator both --sweep_scales 0 1 2 4 \
    --sweep_steps 50 --set train_stylegan2.max_epochs=200 --set train_stylegan2.sample_interval=20 \
    --set "pretrain_diffusion.scheduler_args#prediction_type=epsilon"
echo "[evidence] site pre-training, Table 1 at g = 1 with StyleGAN2 after $(( $(date +%s) - START )) s"
# 2. g = 4
at_g4 "$OUT" "${COMMON[@]}"
echo "[evidence] g = 4 after $(( $(date +%s) - START )) s"
# 3. v-prediction
V="${OUT}_v"
mkdir -p "$V/rows"
for p in split.json classes.json pretraining.json judge pretrain_autoencoder train_aux_classifier finetune; do
    cp -a "$OUT/$p" "$V/"; done
cp -a "$OUT/rows/baseline" "$V/rows/"
$PY -m monai_histodiff experiment --output_dir "$V" "${COMMON[@]}" --generator histodiffusion --sweep_scales 0 1 2 4 \
    --sweep_steps 50 --set "pretrain_diffusion.scheduler_args#prediction_type=v_prediction"
echo "[evidence] v-prediction after $(( $(date +%s) - START )) s"
# 4. the paper's setting's ceiling
S="${OUT%/*}/lung_sources_ceiling"
mkdir -p "$S"
for p in split.json classes.json judge train_aux_classifier; do cp -a "$OUT/$p" "$S/"; done
$PY - "$S" "$H" <<'PYEOF'
import json, sys
from pathlib import Path
from monai_histodiff.data import write_datalist
from monai_histodiff.data.unlabeled import sources_in, unlabeled_datalist
from monai_histodiff.apps.experiment import ExperimentConfig, _Stages, _ceiling
out, h = Path(sys.argv[1]), Path(sys.argv[2])
sources = {**sources_in(h / "unlabeled"), "nct_crc": str(h / "nct_crc"), "kather2016": str(h / "kather2016")}
write_datalist({**unlabeled_datalist(sources, "size"), "setting": "sources"}, out / "pretraining.json")
stages = _Stages(ExperimentConfig(output_dir=str(out), stage_overrides={
    "pretrain_autoencoder": {"adv_start": 250, "adv_weight": 0.05}}), out)
if not (out / "pretrain_autoencoder" / "autoencoder.pt").is_file():
    stages("pretrain_autoencoder", datalist=f"$monai_histodiff.data.load_datalist('{out / 'pretraining.json'}')['unlabeled']")
if not (out / "finetune" / "decoder_ft.pt").is_file():
    stages("finetune", split_file=str(out / "split.json"))
print(json.dumps(_ceiling(out / "judge" / "classifier.pt", out)["accuracy"]))
PYEOF
echo "[evidence] the paper's setting's ceiling after $(( $(date +%s) - START )) s"
