#!/usr/bin/env bash
# Kernel call (<= 8.5 min): the dense-warmup KL kernel (pallas/index_kl_full.py) on the card (its tests, its
# time against dense cuDNN and the every-block path it replaced: warmprobe.py),
# then the pingpong schedule of the Mosaic GPU forward (MGPUConfig(pingpong=True)) against the default
# at 128K, then bench_train with the Mosaic GPU backward as default: paper heads at 128K (training
# attention vs dense cuDNN in the same process, target >= 8x at 128K; the gpu preset's whole train
# step, 3.16x at 128K in the third run, is not rerun).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/k
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_pallas_index_kl_full.py > $OUT/k/pytest_kl_full.txt 2>&1
echo "pytest index_kl_full rc $?"; tail -2 $OUT/k/pytest_kl_full.txt; grep -E "^FAILED|^ERROR" $OUT/k/pytest_kl_full.txt | head -5
timeout 90 python3 docs/results/train_h200_1203/warmprobe.py $OUT/k/warm_lc.json 16384 > $OUT/k/warm_lc.txt 2>&1; grep -v -i warn $OUT/k/warm_lc.txt | tail -8
timeout 150 python3 experiments/bench_mgpu_fwd.py --seq-len 131072 --tiles-per-program 16 --q-slots 2 --pingpong --smoke-timeout 60 \
  --reps 5 --budget 3 --out $OUT/k/mgpu_fwd_pingpong > $OUT/k/mgpu_fwd_pingpong.txt 2>&1; echo "bench_mgpu_fwd rc $?"; grep -v -i warn $OUT/k/mgpu_fwd_pingpong.txt | tail -8
timeout 170 python3 experiments/bench_train.py --preset paper --seq-lens 131072 --reps 3 --time-budget 6 \
  --xla-max-T 8192 --no-train-step --out $OUT/k/train_128k.json > $OUT/k/bench_train.txt 2>&1
echo "bench_train rc $?"; grep -v -i warn $OUT/k/bench_train.txt | tail -25
cd $OUT && tar czf k$(date +%s).tgz k && rm -rf k
