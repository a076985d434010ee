#!/usr/bin/env bash
# Kernel call (~6 min): the pingpong Mosaic GPU forward (deadlock fixed 2026-12-03) against the default at 128K,
# then bench_prefill at 128K with pingpong as the default (via _gpu/prefill_pingpong.py) and without (same process
# order: default first), so that the dense cuDNN baseline is in both.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/k
timeout 170 python3 experiments/bench_mgpu_fwd.py --seq-len 131072 --tiles-per-program 16 --q-slots 2 --pingpong --smoke-timeout 90 \
  --reps 5 --budget 3 --out $OUT/k/mgpu_fwd_pingpong > $OUT/k/mgpu_fwd_pingpong.txt 2>&1; echo "bench_mgpu_fwd rc $?"; grep -v -i warn $OUT/k/mgpu_fwd_pingpong.txt | tail -12
if grep -q "pingpong.*ms" $OUT/k/mgpu_fwd_pingpong.txt; then
  timeout 150 python3 _gpu/prefill_pingpong.py --preset paper --seq-lens 131072 --reps 5 --time-budget 4 --xla-max-T 8192 \
    --out $OUT/k/prefill_pingpong > $OUT/k/prefill_pingpong.txt 2>&1; echo "prefill pingpong rc $?"; grep -v -i warn $OUT/k/prefill_pingpong.txt | tail -8
fi
cd $OUT && tar czf k$(date +%s).tgz k && rm -rf k
