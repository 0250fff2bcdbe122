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
source "$(dirname "$0")/evidence_common.sh"  # PY, START, site_variant
site_variant "$OUT" pseudo --pseudo_labels
echo "[evidence] pseudo-labels, g = 1 after $(( $(date +%s) - START )) s"
