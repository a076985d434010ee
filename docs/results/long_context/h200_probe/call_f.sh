#!/usr/bin/env bash
# Issue 15 probe: the long-context preset (52M, T = 16384, task mix 0.5), dense, for ~6.5 minutes:
# tokens/s, loss curve, then passkey / multi-key exact match of its last checkpoint.
set -u
export PYTHONPATH=$PWD
mkdir -p $OUT/f
T0=$(date +%s)
timeout -s TERM -k 60 390 python3 experiments/train_lm.py --preset long-context --attention dense --run-dir runs/lcp_dense --eval-every 100 --ckpt-every 100 --keep 2 > $OUT/f/train.txt 2>&1
echo "train rc $? after $(( $(date +%s) - T0 ))s"; grep -a -E "step|tok" $OUT/f/train.txt | tail -5
timeout 130 python3 experiments/eval_retrieval.py runs/lcp_dense --tasks passkey,multikey --lengths 4096,16384 --depths 0,0.5,1 --n 20 --batch-size 8 --val-batches 2 --no-selection --out $OUT/f/eval > $OUT/f/eval.txt 2>&1
echo "eval rc $? after $(( $(date +%s) - T0 ))s"; tail -20 $OUT/f/eval.txt
cp runs/lcp_dense/metrics.jsonl runs/lcp_dense/config.json runs/lcp_dense/loss.png $OUT/f/ 2>/dev/null
cd $OUT && tar czf f.tgz f && rm -rf f
