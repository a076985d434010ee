#!/usr/bin/env bash
# Issue 15, next session: does --answer-weight make a dense model retrieve at 16K within ~7 min of H200?
# Two dense runs of the long-context preset (task mix 1.0), W = 300 and 1000, ~900 steps each (one call
# each, 600 s limit), then eval passkey at 16K, depths 0 / 0.5 / 1, n = 20. Copy this to _gpu/ in the repo.
set -u
export PYTHONPATH=$PWD
W=${1:-300}
mkdir -p $OUT/lc
timeout -s TERM -k 40 420 python3 experiments/train_lm.py --preset long-context --attention dense --task-mix 1.0 --answer-weight $W --run-dir runs/lc_w$W --eval-every 200 --ckpt-every 200 --keep 2 > $OUT/lc/train_w$W.txt 2>&1
tail -c 300 $OUT/lc/train_w$W.txt
timeout 100 python3 experiments/eval_retrieval.py runs/lc_w$W --tasks passkey,multikey --lengths 16384 --depths 0,0.5,1 --n 20 --batch-size 10 --val-batches 1 --no-selection --out $OUT/lc/eval_w$W > $OUT/lc/eval_w$W.txt 2>&1
grep -A6 "exact match\|share of" $OUT/lc/eval_w$W.txt
cp runs/lc_w$W/metrics.jsonl $OUT/lc/metrics_w$W.jsonl; cp runs/lc_w$W/config.json $OUT/lc/config_w$W.json; cd $OUT && tar czf lc_w$W.tgz lc && rm -rf lc
