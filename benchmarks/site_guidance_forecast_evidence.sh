#!/usr/bin/env bash
# Where HistoDiffusion's pool at the paper's g = 1 loses the requested class (issue 21), on the site-pre-trained lung
# chain of site_seeds_evidence.sh (its folder OUT after part 1, or the same experiment with --seeds 0):
#  1. latent classifiers besides the run's own (144 labeled tiles, 1,000 steps): the same trained 4x longer, and an
#     "oracle" trained 4,000 steps on every site tile outside the test groups with its true label (7,164 tiles, nearly
#     the judge's own data; a measurement of what labels can buy, never a product setting);
#  2. pools of 144 tiles per class at g = 1 with each, and one at g = 0 (the unconditional model's class balance, EMA
#     weights and raw weights), judged; with the 4x classifier also at g = 1 sampled stochastically (the paper's Eq. 8:
#     DDPM, 50 respaced steps; and DDIM with eta = 1);
#  3. the forecast of exact guidance read on the 1,800 test tiles (guidance_forecast.py) beside the judged pools;
#  4. the diffusion model trained twice as long (resumed from the run's 20 epochs to 40, constant learning rate) in
#     OUT_d40, a 4x latent classifier trained against it, its g = 0 and g = 1 pools judged, and its forecast;
#  5. the same for a diffusion UNet twice as wide (channels 64 / 128 / 128 instead of 32 / 64 / 64), trained from
#     scratch for the run's 20 epochs in OUT_wide.
# Every step is skipped when its output exists, so the script resumes where it stopped.
#   bash benchmarks/site_guidance_forecast_evidence.sh [OUT] [HISTOLOGY]
# (from the repository root, after `make install`)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START
BUNDLE=(-m monai.bundle run --config_file)
SPLIT=(--dataset_dir "$H/lc25000_lung" --val_fraction 0.2 --label_fraction 0.02)

# latent_classifier RUN NAME SPLIT_FILE: 4,000 steps into RUN/NAME/latent_classifier.pt
latent_classifier() {
    [ -f "$1/$2/latent_classifier.pt" ] && return
    $PY "${BUNDLE[@]}" "['bundles/common.json','bundles/train_latent_classifier.json','bundles/small.json']" \
        --output_dir "$1" "${SPLIT[@]}" --split_file "$3" --latent_classifier_ckpt "$1/$2/latent_classifier.pt" \
        --max_epochs 200 > "$1/$2.log" 2>&1
}

# pool RUN NAME SPLIT_FILE G [OVERRIDES...]: 144 tiles per class at g with RUN/NAME's classifier, judged
pool() {
    local run=$1 name=$2 split=$3 g=$4 dir
    shift 4
    dir="$run/$name/gen_g$g${TAG:-}"
    if [ ! -f "$run/$name/judged_g$g${TAG:-}.json" ]; then
        $PY "${BUNDLE[@]}" "['bundles/common.json','bundles/generate.json','bundles/small.json']" --output_dir "$run" \
            --counts "[144, 144, 144]" --synthetic_dir "$dir" --use_finetuned_decoder True --num_inference_steps 50 \
            "${SPLIT[@]}" --split_file "$split" --guidance_scale "$g" \
            --latent_classifier_ckpt "$run/$name/latent_classifier.pt" "$@" > "$dir.log" 2>&1
        $PY -m monai_histodiff judge --judge_ckpt "$run/judge/classifier.pt" --split "$run/split.json" \
            --synthetic_dir "$dir" --output "$run/$name/judged_g$g${TAG:-}.json"
    fi
}

# 1. the classifiers (the oracle's split: every pool tile moved to training; the pool is emptied)
latent_classifier "$OUT" lc4k "$OUT/split.json"
$PY - "$OUT" <<'EOF'
import json, sys
split = json.load(open(f"{sys.argv[1]}/split.json"))
split["training"], split["pool"] = split["training"] + split["pool"], []
json.dump(split, open(f"{sys.argv[1]}/split_oracle.json", "w"))
EOF
latent_classifier "$OUT" oracle "$OUT/split_oracle.json"
echo "[evidence] classifiers after $(( $(date +%s) - START )) s"

# 2. pools
pool "$OUT" oracle "$OUT/split_oracle.json" 1
pool "$OUT" lc4k "$OUT/split.json" 1
pool "$OUT" lc4k "$OUT/split.json" 0
TAG=_noema pool "$OUT" lc4k "$OUT/split.json" 0 --use_ema False
TAG=_ddpm50 pool "$OUT" lc4k "$OUT/split.json" 1 --scheduler ddpm
TAG=_eta1 pool "$OUT" lc4k "$OUT/split.json" 1 --eta 1.0
echo "[evidence] pools after $(( $(date +%s) - START )) s"

# 3. the forecast
$PY benchmarks/guidance_forecast.py "$OUT" --balance "$OUT/lc4k/judged_g0.json" --output "$OUT/guidance_forecast.json" \
    --classifier "144 labels, 1,000 steps=$OUT/train_latent_classifier/latent_classifier.pt" \
    "144 labels, 4,000 steps=$OUT/lc4k/latent_classifier.pt" "7,164 labels (oracle)=$OUT/oracle/latent_classifier.pt" \
    --pool "144 labels, 1,000 steps=$OUT/generate" "144 labels, 4,000 steps=$OUT/lc4k/gen_g1" \
    "7,164 labels (oracle)=$OUT/oracle/gen_g1"

# 4. the diffusion model trained twice as long
D=${OUT}_d40
if [ ! -f "$D/pretrain_diffusion/diffusion.pt" ] || [ ! -f "$D/lc4k/latent_classifier.pt" ]; then
    mkdir -p "$D"
    for p in split.json classes.json pretraining.json judge pretrain_autoencoder train_aux_classifier finetune; do
        [ -e "$D/$p" ] || cp -a "$OUT/$p" "$D/"
    done
    [ -e "$D/pretrain_diffusion" ] || cp -a "$OUT/pretrain_diffusion" "$D/"
    $PY "${BUNDLE[@]}" "['bundles/common.json','bundles/pretrain_diffusion.json','bundles/small.json']" \
        --output_dir "$D" --datalist "\$monai_histodiff.data.load_datalist('$D/pretraining.json')['unlabeled']" \
        --max_epochs 40 --warmup_steps 50 --sample_interval 5 --grid_inference_steps 25 --resume True \
        > "$D/pretrain_diffusion.log" 2>&1
fi
latent_classifier "$D" lc4k "$D/split.json"
pool "$D" lc4k "$D/split.json" 0
pool "$D" lc4k "$D/split.json" 1
$PY benchmarks/guidance_forecast.py "$D" --balance "$D/lc4k/judged_g0.json" --output "$D/guidance_forecast.json" \
    --classifier "144 labels, 4,000 steps, diffusion 40 epochs=$D/lc4k/latent_classifier.pt" \
    --pool "144 labels, 4,000 steps, diffusion 40 epochs=$D/lc4k/gen_g1"
echo "[evidence] twice the diffusion training after $(( $(date +%s) - START )) s"

# 5. a diffusion UNet twice as wide
W=${OUT}_wide
if [ ! -f "$W/pretrain_diffusion/diffusion.pt" ]; then
    mkdir -p "$W"
    for p in split.json classes.json pretraining.json judge pretrain_autoencoder train_aux_classifier finetune; do
        [ -e "$W/$p" ] || cp -a "$OUT/$p" "$W/"
    done
    $PY "${BUNDLE[@]}" "['bundles/common.json','bundles/pretrain_diffusion.json','bundles/small.json']" \
        --output_dir "$W" --datalist "\$monai_histodiff.data.load_datalist('$W/pretraining.json')['unlabeled']" \
        --max_epochs 20 --warmup_steps 50 --sample_interval 5 --grid_inference_steps 25 \
        --diffusion_args#channels "[64, 128, 128]" > "$W/pretrain_diffusion.log" 2>&1
fi
latent_classifier "$W" lc4k "$W/split.json"
pool "$W" lc4k "$W/split.json" 0
pool "$W" lc4k "$W/split.json" 1
$PY benchmarks/guidance_forecast.py "$W" --balance "$W/lc4k/judged_g0.json" --output "$W/guidance_forecast.json" \
    --classifier "144 labels, 4,000 steps, UNet twice as wide=$W/lc4k/latent_classifier.pt" \
    --pool "144 labels, 4,000 steps, UNet twice as wide=$W/lc4k/gen_g1"
echo "[evidence] the wider diffusion UNet after $(( $(date +%s) - START )) s"
