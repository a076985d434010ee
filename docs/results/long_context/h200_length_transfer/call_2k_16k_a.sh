#!/usr/bin/env bash
# Issue 15, next session: the length curriculum. Stage 1 dense at 2K (64 rows, 600 steps, ~3.5 min:
# retrieval appears at ~step 350), then dense at 16K from it for ~6 min; eval passkey / multikey at
# 16K (depths 0 / 0.5 / 1). Usage: lc_stage.sh STEPS16K  (then MSA: --attention msa --init-from runs/lc_2k)
set -u
export PYTHONPATH=$PWD
S=${1:-600}
mkdir -p $OUT/lcs
timeout -s TERM -k 30 230 python3 experiments/train_lm.py --preset long-context --attention dense --seq-len 2048 --batch-size 64 --steps 600 --task-mix 1.0 --run-dir runs/lc_2k --eval-every 100 --eval-batches 2 --ckpt-every 0 > $OUT/lcs/train_2k.txt 2>&1
tail -c 300 $OUT/lcs/train_2k.txt
timeout -s TERM -k 30 330 python3 experiments/train_lm.py --preset long-context --attention dense --init-from runs/lc_2k --steps $S --task-mix 1.0 --run-dir runs/lc_dense --eval-every 100 --eval-batches 2 --ckpt-every 100 --keep 2 > $OUT/lcs/train_16k.txt 2>&1
tail -c 300 $OUT/lcs/train_16k.txt
cp runs/lc_2k/metrics.jsonl $OUT/lcs/metrics_2k.jsonl; cp runs/lc_dense/metrics.jsonl $OUT/lcs/metrics_16k.jsonl
cd $OUT && tar czf lcs.tgz lcs && rm -rf lcs
