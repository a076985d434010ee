#!/usr/bin/env bash
# Issue 15 probe: does the dense long-context model learn retrieval at T = 2048 (64 rows x 2K: the
# preset's tokens per step, 8x the examples) within ~3.5 minutes? Answer accuracy is logged per eval.
set -u
export PYTHONPATH=$PWD
mkdir -p $OUT/lc2k
timeout -s TERM -k 30 200 python3 experiments/train_lm.py --preset long-context --attention dense --seq-len 2048 --batch-size 64 --steps 600 --task-mix 1.0 --run-dir runs/lc2k --eval-every 50 --eval-batches 2 --ckpt-every 0 > $OUT/lc2k/train.txt 2>&1
tail -c 400 $OUT/lc2k/train.txt
cp runs/lc2k/metrics.jsonl runs/lc2k/config.json $OUT/lc2k/ 2>/dev/null
grep '"eval"' runs/lc2k/metrics.jsonl | python3 -c "import sys,json; [print(r['step'], round(r['val_bpb'],3), r.get('val_answer_bytes'), r.get('val_answer_exact')) for r in map(json.loads, sys.stdin)]"
cd $OUT && tar czf lc2k.tgz lc2k && rm -rf lc2k
