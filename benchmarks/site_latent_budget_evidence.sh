#!/usr/bin/env bash
# HistoDiffusion at the paper's g = 1 with a latent classifier trained 4x longer (4,000 steps of 32 dihedral-augmented
# latents instead of small.json's 1,000): does a classifier trained longer on the same 144 labels steer more at g = 1?
# Runs in a copy of site_seeds_evidence.sh's folder sharing pre-training, decoder fine-tuning, auxiliary classifier,
# judge and the baseline rows: only the latent classifier, the pool, the guidance check, the judged sweep g = 0 / 1 / 4
# and HistoDiffusion's rows (seeds 0-14) are new.
#   bash benchmarks/site_latent_budget_evidence.sh [OUT] [HISTOLOGY]   (after site_seeds_evidence.sh, same OUT)
set -euo pipefail
OUT=${1:-runs/lung_seeds}
H=${2:-../shared/data/histology}
source "$(dirname "$0")/evidence_common.sh"  # PY, START, site_variant
site_variant "$OUT" latent4k --set train_latent_classifier.max_epochs=200
echo "[evidence] latent classifier 4,000 steps, g = 1 after $(( $(date +%s) - START )) s"
