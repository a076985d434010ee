#!/usr/bin/env bash
# Issue 15: (a) dense 16K continued from runs/lc_dense (fresh optimizer, 450 steps); (b) MSA 16K from
# the 2K stage (450 steps, dense warmup 150). Both on the warm machine that holds runs/.
set -u
export PYTHONPATH=$PWD
mkdir -p $OUT/lc3
timeout -s TERM -k 20 265 python3 experiments/train_lm.py --preset long-context --attention dense --init-from runs/lc_dense --steps 450 --task-mix 1.0 --run-dir runs/lc_dense2 --eval-every 75 --eval-batches 2 --ckpt-every 0 > $OUT/lc3/dense2.txt 2>&1
tail -c 250 $OUT/lc3/dense2.txt
timeout -s TERM -k 20 265 python3 experiments/train_lm.py --preset long-context --attention msa --init-from runs/lc_2k --steps 450 --msa-warmup-steps 150 --task-mix 1.0 --run-dir runs/lc_msa --eval-every 75 --eval-batches 2 --ckpt-every 0 > $OUT/lc3/msa.txt 2>&1
tail -c 250 $OUT/lc3/msa.txt
cp runs/lc_dense2/metrics.jsonl $OUT/lc3/metrics_dense2.jsonl; cp runs/lc_msa/metrics.jsonl $OUT/lc3/metrics_msa.jsonl
cp runs/lc_dense2/config.json $OUT/lc3/config_dense2.json 2>/dev/null; cp runs/lc_msa/config.json $OUT/lc3/config_msa.json 2>/dev/null
cd $OUT && tar czf lc3.tgz lc3 && rm -rf lc3
