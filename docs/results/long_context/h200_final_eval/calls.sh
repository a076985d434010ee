#!/usr/bin/env bash
# The device calls behind this folder (one H200, 2026-12-03, fifth session of the day), each run from the
# repository root with ../h200_16k_ablations/lc.sh copied to _gpu/lc.sh:
#   E='--lengths 4096,16384,32768 --n 50 --batch-size 8 --selection-depths 0,0.25,0.5'
#   call 1: EVAL="$E" bash _gpu/lc.sh 520 dense cpt   # lc_2k, lc16_dense, lc16_cpt to step 65; that machine
#           was then released, so its runs/ was lost: its lc_2k / lc16_dense metrics are the *_repeat.jsonl files
#   call 2: EVAL="$E" bash _gpu/lc.sh 570 dense cpt   # fresh machine: lc_2k and lc16_dense again, lc16_cpt to step 117
#   call 3: EVAL="$E" bash _gpu/lc.sh 490 dense cpt   # lc16_cpt resumed at 117 to 150, then both evaluations
# MSA from scratch (sixth session of the day), with the trace at 32K too:
#   call 1: EVAL="$E --selection-lengths 16384,32768" bash _gpu/lc.sh 575 scratch   # lc_2k_msa, lc16_scratch to step 202
#   call 2: the same command                          # lc16_scratch resumed at 202 to 300, then its evaluation
#   call 3: bash _gpu/lc.sh 580 warmup-200   # fresh machine (released again): lc_2k_msa retrained
#           (metrics_lc_2k_msa_repeat.jsonl), the ablation stopped at step 158 when the device budget ran out
# lc.sh runs, in effect:
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LC="--preset long-context --task-mix 1.0 --rope-theta 500000 --eval-batches 2"
S16="--steps 300 --eval-every 100 --ckpt-every 50"
python3 experiments/train_lm.py $LC --run-dir runs/lc_2k --attention dense --seq-len 2048 --batch-size 64 --steps 600 --eval-every 100 --ckpt-every 200
python3 experiments/train_lm.py $LC --run-dir runs/lc16_dense --attention dense --init-from runs/lc_2k $S16
python3 experiments/train_lm.py $LC --run-dir runs/lc_2k_msa --attention msa --seq-len 2048 --batch-size 64 --steps 600 --eval-every 100 --ckpt-every 200
python3 experiments/train_lm.py $LC --run-dir runs/lc16_scratch --attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100
python3 experiments/train_lm.py $LC --run-dir runs/lc16_cpt --attention msa --init-from runs/lc16_dense $S16 --steps 150 --msa-warmup-steps 50
E="--lengths 4096,16384,32768 --n 50 --batch-size 8 --selection-depths 0,0.25,0.5"
python3 experiments/eval_retrieval.py runs/lc16_dense $E --out eval_dense
python3 experiments/eval_retrieval.py runs/lc16_cpt $E --out eval_cpt
python3 experiments/eval_retrieval.py runs/lc16_scratch $E --selection-lengths 16384,32768 --out eval_scratch
# figures: python3 docs/results/long_context/h200_final_eval/figures.py
# The index branch without RoPE (2026-12-04), two calls on a machine that stayed warm (lc.sh copied as above):
#   E3="$E --selection-lengths 16384,32768"
#   call 1: EVAL="$E3" bash _gpu/lc.sh 580 index-nope block64-top32   # lc_2k_msa_nope, lc16_index-nope to step 200
#   call 2: the same command with 585   # lc16_index-nope resumed at 200 to 300, its evaluation; then
#           lc_2k_msa (for ../h200_16k_ablations/'s block64-top32) to step 379
python3 experiments/train_lm.py $LC --run-dir runs/lc_2k_msa_nope --attention msa --no-index-rope --seq-len 2048 --batch-size 64 --steps 600 --eval-every 100 --ckpt-every 200
python3 experiments/train_lm.py $LC --run-dir runs/lc16_index-nope --attention msa --no-index-rope --init-from runs/lc_2k_msa_nope $S16 --msa-warmup-steps 100
python3 experiments/eval_retrieval.py runs/lc16_index-nope $E --selection-lengths 16384,32768 --out eval_index-nope
