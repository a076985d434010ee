#!/usr/bin/env bash
# The device calls behind this folder (one H200, one session, the machine kept warm between calls so
# that runs/ survived; call 1 was stopped by its deadline at MSA step 101 (SIGTERM: checkpoint) and
# call 2 resumed it with the same command). Exact commands, in order:
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LC="--preset long-context --task-mix 1.0 --rope-theta 500000 --eval-batches 2"
# the 2K dense stage (3.0 min, 498K tokens/s)
python3 experiments/train_lm.py $LC --run-dir runs/lc_2k --attention dense --seq-len 2048 --batch-size 64 --steps 600 --eval-every 100 --ckpt-every 200
# MSA at 16K from the 2K model: 100 dense-warmup steps, then 200 sparse (block 128 x top 16)
python3 experiments/train_lm.py $LC --run-dir runs/lc_16k_msa --attention msa --init-from runs/lc_2k --steps 300 --msa-warmup-steps 100 --eval-every 50 --ckpt-every 50
# dense at 16K from the 2K model, same steps
python3 experiments/train_lm.py $LC --run-dir runs/lc_16k_dense --attention dense --init-from runs/lc_2k --steps 300 --eval-every 50 --ckpt-every 50
python3 experiments/eval_retrieval.py runs/lc_16k_dense runs/lc_16k_msa --lengths 4096,16384 --n 50 --batch-size 8 --out eval_4k_16k
# call 3: MSA converted from the 16K dense model (the paper's recipe: a trained dense model, then MSA)
python3 experiments/train_lm.py $LC --run-dir runs/lc_16k_cpt --attention msa --init-from runs/lc_16k_dense --steps 150 --msa-warmup-steps 50 --eval-every 50 --ckpt-every 50
python3 experiments/eval_retrieval.py runs/lc_16k_cpt --lengths 16384 --n 50 --batch-size 8 --out eval_cpt_16k
# figures: python3 docs/results/long_context/h200_16k_study/figures.py
