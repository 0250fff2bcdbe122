#!/usr/bin/env bash
# The sharded latent cache at scale on this machine (benchmarks/README.md, "sharded_latent_cache.py"):
#  1. training with 2 gloo ranks on caches of 10k, 100k and 1M paper-shaped posteriors (3x64x64; 1M as sparse
#     files), against the single-file path (every rank holds the whole cache) at 10k and 30k: peak and anonymous
#     resident memory per rank, step time; a plot;
#  2. encoding with 1 and 2 ranks (the CPU-size autoencoder, 64 px tiles made in memory), then a resume after an
#     encode interrupted with 4 of its 16 shards unwritten;
#  3. float16 storage: the rounding it does against float32 of the same posteriors.
#   bash benchmarks/sharded_cache_scaling.sh [SCRATCH]     (from the repository root, after `make install`; SCRATCH
#   needs about 13 GB free and is emptied at the end)
set -euo pipefail
SCRATCH=${1:-/tmp/histodiff_cache_bench}
PY=${PY:-.venv/bin/python}
R=benchmarks/results
B=benchmarks/sharded_latent_cache.py
START=$(date +%s)
mkdir -p "$SCRATCH"
$PY $B --output $R/sharded_latent_cache_train.json train --scratch "$SCRATCH" --items 10000 100000 1000000 \
    --compare_in_memory 10000 30000 --steps 40 --warmup 5 --cleanup --keep_up_to 30000 \
    --plot docs/benchmark_sharded_cache_train.png
echo "[scaling] training runs after $(( $(date +%s) - START )) s"
for n in 1 2; do
    $PY -m torch.distributed.run --nproc_per_node $n $B --output $R/sharded_latent_cache_encode_${n}rank.json encode \
        --folder "$SCRATCH/enc$n" --items 4096 --sizes small --shard_size 256 --batch_size 64 --num_workers 0 \
        --device cpu
done
$PY -m torch.distributed.run --nproc_per_node 2 $B --output $R/sharded_latent_cache_encode_resume.json encode \
    --folder "$SCRATCH/enc2" --items 4096 --sizes small --shard_size 256 --batch_size 64 --num_workers 0 \
    --device cpu --drop_shards 4
echo "[scaling] encoding after $(( $(date +%s) - START )) s"
$PY $B --output $R/sharded_latent_cache_synth_f32.json synth "$SCRATCH/f32" --items 4096 --seed 3
$PY $B --output $R/sharded_latent_cache_synth_f16.json synth "$SCRATCH/f16" --items 4096 --seed 3 --dtype float16
$PY $B --output $R/sharded_latent_cache_fp16.json fp16 "$SCRATCH/f32" "$SCRATCH/f16"
rm -rf "$SCRATCH"
echo "[scaling] done in $(( $(date +%s) - START )) s"
