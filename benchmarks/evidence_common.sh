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
