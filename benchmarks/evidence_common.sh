# Sourced by the site_*_evidence.sh scripts: what their runs share.
PY=${PY:-.venv/bin/python}  # the interpreter of `make install`
START=$(date +%s)           # the scripts print the seconds since START after each part
# share_run SRC DEST PART...: a new run folder DEST that reuses SRC's PARTs (files or stage folders), its baseline rows
# and its ceiling measurement, so that the experiment in DEST trains and measures only what differs.
share_run() {
    local src=$1 dest=$2
    shift 2
    mkdir -p "$dest/rows" "$dest/judged"
    for p in "$@"; do cp -a "$src/$p" "$dest/"; done
    cp -a "$src/rows/baseline" "$dest/rows/"
    if [ -f "$src/judged/ceiling.json" ]; then cp -a "$src/judged/ceiling.json" "$dest/judged/"; fi
}

# at_g4 SRC EXPERIMENT_ARGS...: HistoDiffusion at g = 4 in SRC_g4, sharing SRC's pre-training, adaptation, judge,
# baseline rows and ceiling (its pool, guidance check and rows are new).
at_g4() {
    local src=$1
    shift
    share_run "$src" "${src}_g4" split.json classes.json pretraining.json judge pretrain_autoencoder \
        pretrain_diffusion train_aux_classifier finetune train_latent_classifier ceiling.png
    $PY -m monai_histodiff experiment --output_dir "${src}_g4" "$@" --generator histodiffusion --guidance_scale 4
}

# site_variant SRC SUFFIX EXPERIMENT_ARGS...: HistoDiffusion's rows at the paper's g = 1 (selective 200%, seeds 0-14,
# the judged sweep g = 0 / 1 / 4) again in SRC_SUFFIX, sharing SRC's pre-training, decoder fine-tuning, auxiliary
# classifier, judge, ceiling and baseline rows; EXPERIMENT_ARGS say what differs (the latent classifier, the pool, the
# guidance check, the sweep and the rows are new). H: the histology folder.
site_variant() {
    local src=$1 dest="$1_$2"
    shift 2
    share_run "$src" "$dest" split.json classes.json pretraining.json judge pretrain_autoencoder pretrain_diffusion \
        train_aux_classifier finetune ceiling.png
    $PY -m monai_histodiff experiment --output_dir "$dest" --dataset_dir "$H/lc25000_lung" --fraction 0.02 \
        --val_fraction 0.2 --test_per_class 600 --seeds 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 --generation_steps 50 \
        --pretraining site --ratios 2.0 --random_ratio 0 --generator histodiffusion --sweep_scales 0 1 4 \
        --sweep_steps 50 "$@"
}
