#!/usr/bin/env bash
# The paper's setting under the protocol of site_seeds_evidence.sh: HistoDiffusion pre-trained on public H&E sources that
# exclude the target set (the shared unlabeled folders plus NCT-CRC and Kather 2016 without labels, each tile drawn
# equally often, as real_data_evidence.sh), with the optimizer steps of the site pre-training (autoencoder 3 epochs and
# diffusion model 20 epochs over the site's 7,200 tiles = 39 and 257 epochs over the sources' 561), then adaptation and
# Table 1 at the paper's g = 1 with seeds 0-14. Runs in a copy of site_seeds_evidence.sh's folder that shares the split,
# the judge, the auxiliary classifier (an image classifier: it does not depend on pre-training) and the baseline rows,
# so that its rows pair seed by seed with that folder's HistoDiffusion and StyleGAN2 rows
# (benchmarks/results_tables.py --against site=OUT).
#   bash benchmarks/site_sources_evidence.sh [OUT] [HISTOLOGY]   (after site_seeds_evidence.sh, same OUT)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, share_run
S="${OUT}_sources"
share_run "$OUT" "$S" split.json classes.json judge train_aux_classifier  # the ceiling it copies is measured again:
# the runner reuses judged/ceiling.json only while it is newer than the autoencoder, which this run trains anew
$PY -m monai_histodiff experiment --output_dir "$S" --dataset_dir "$H/lc25000_lung" --fraction 0.02 --val_fraction 0.2 \
    --test_per_class 600 --seeds 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 --generation_steps 50 --pretraining sources \
    --unlabeled_dir "$H"/unlabeled/*/ "$H/nct_crc" "$H/kather2016" --ratios 2.0 --random_ratio 0 \
    --generator histodiffusion --sweep_scales 0 1 4 --sweep_steps 50 \
    --set pretrain_autoencoder.max_epochs=39 --set pretrain_autoencoder.adv_start=250 \
    --set pretrain_autoencoder.adv_weight=0.05 --set pretrain_diffusion.max_epochs=257 \
    --set pretrain_diffusion.warmup_steps=50 --set pretrain_diffusion.sample_interval=64 \
    --set pretrain_diffusion.grid_inference_steps=25
echo "[evidence] public-source pre-training, adaptation, g = 1 after $(( $(date +%s) - START )) s"
# per class: real tiles, then HistoDiffusion pre-trained on the site's tiles (g = 1), on the public sources (g = 1) and
# StyleGAN2: each its pool, what selective 200% kept and what it rejected
$PY - "$OUT" "$S" <<'PYEOF'
import sys
from pathlib import Path
from monai_histodiff.apps.experiment import _image_size, write_side_by_side
site, sources = Path(sys.argv[1]), Path(sys.argv[2])
kept = "rows/{}/select/augmented_datalist.json"
write_side_by_side(site / "split.json", site / "generate", sources / "real_vs_settings.png", _image_size(site),
                   kept_datalist=site / kept.format("selective_200"),
                   more=[(sources / "generate", sources / kept.format("selective_200")),
                         (site / "generate_stylegan2", site / kept.format("stylegan2_selective_200"))])
print(f"[evidence] {sources / 'real_vs_settings.png'}")
PYEOF
