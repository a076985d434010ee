#!/usr/bin/env bash
# The device calls behind this folder, in order (one H200, one session, the machine kept warm between
# calls so that runs/ survived; each call wrote its logs under $OUT). Exact commands:
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# call 1: the dense 2K stage, RoPE base 500,000 from the start (3.1 min)
python3 experiments/train_lm.py --preset long-context --attention dense --task-mix 1.0 --seq-len 2048 --batch-size 64 --steps 600 --rope-theta 500000 --run-dir runs/lc_2k --eval-every 100 --eval-batches 2 --ckpt-every 0
# call 2: MSA converted from it at 2K (block 32 x top 8: 1/8 of the keys, as 128 x 16 at 16K); this
# call's timeout stopped it at step 50 (the end of the dense warmup; checkpoint saved) ...
timeout -s TERM -k 20 280 python3 experiments/train_lm.py --preset long-context --attention msa --init-from runs/lc_2k --rope-theta 500000 --task-mix 1.0 --seq-len 2048 --batch-size 64 --steps 200 --block-size 32 --top-k 8 --msa-warmup-steps 50 --run-dir runs/lc_2k_cpt --eval-every 50 --eval-batches 2 --ckpt-every 50
# ... then the dense 16K stage from the 2K model, same base (2.2 min)
python3 experiments/train_lm.py --preset long-context --attention dense --init-from runs/lc_2k --rope-theta 500000 --steps 250 --task-mix 1.0 --run-dir runs/lc_16k_rope --eval-every 50 --eval-batches 2 --ckpt-every 0
# call 3: the same MSA command again resumes at step 50 and runs the 150 sparse steps; then eval at 2K
python3 experiments/train_lm.py --preset long-context --attention msa --init-from runs/lc_2k --rope-theta 500000 --task-mix 1.0 --seq-len 2048 --batch-size 64 --steps 200 --block-size 32 --top-k 8 --msa-warmup-steps 50 --run-dir runs/lc_2k_cpt --eval-every 50 --eval-batches 2 --ckpt-every 50
python3 experiments/eval_retrieval.py runs/lc_2k runs/lc_2k_cpt --lengths 2048 --n 50 --batch-size 32 --out $OUT/eval_2k
# call 4: eval at 4K and 16K
python3 experiments/eval_retrieval.py runs/lc_16k_rope runs/lc_2k_cpt --lengths 4096,16384 --n 30 --batch-size 8 --out $OUT/eval_4k_16k
