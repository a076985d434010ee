#!/usr/bin/env bash
# Is retrieval lost at MSA's switch to sparse attention because the index does not route the answer to the
# needle? The first 400 steps (one run: 600, one 500) of nine ../cpu_t512/ runs again (and three new runs), each evaluated every 10 steps with the training
# probe's needle routing (val_needle_selected: the share of answer rows and KV groups whose selected blocks hold
# the needle, mean over the MSA layer(s); in the dense warmup, the choice the index would make) beside its answers
# (val_answer_exact). Same flags, seeds and parents as the committed runs: on the CPU the steps are bit-identical
# to theirs (evaluations do not touch the training state); only --eval-every, --eval-batches (8: a 32-row probe)
# and --stop-at differ.
#   conversions of the T = 512 dense model (dense512_p1) with a 50-step warmup, index lr 1x / x3 / x10 (seed 1),
#   and with the base recipe's 200 warmup steps, index lr 1x / x10 (base_p1c1, ilr10_p1c1), and x10 with a quarter
#   of the rows retrieval examples, dense throughout (ilr10-mix25_p1c1, a new run), both also with seed 11, and
#   the quarter at 1x (base-mix25_p1c1, new);
#   the T = 512 stage from the T = 128 parent, sparse from step 20: a fresh index (msa512_w20) and one trained
#   at T = 128 first (msa512_w20-scratch, from msa128_full_p1), and a fresh index with 400 warmup steps (msa512_w400,
#   to step 500).
# Idempotent (a stopped run is skipped, an interrupted one resumes). Run from the repository root with the
# project's Python on PATH, after ../cpu_t512/run.sh has made the parents (runs/cpu_t512/dense512_p1,
# runs/cpu_t512/msa128_full_p1; runs/cpu_seeds/dense_seed1). ROUTING_RUNS: a subset. Each run stops at step 400 but
# the 1x conversion at 600 (its answers return after step 400; ../cpu_t512/'s run: 0.75 at step 500).
set -eu
R=${RUNS:-runs/cpu_t512}
P=${PARENTS:-runs/cpu_seeds}
O=docs/results/long_context/cpu_routing
COMMON="--preset tiny --task-mix 1.0 --task-mix-tasks passkey --seq-len 512 --batch-size 4 --d-model 128 --n-layers 2 \
  --head-dim 32 --d-ff 384 --log-every 100"
MSA="--attention msa --n-dense-layers 1 --index-dim 32 --block-size 16 --top-k 4"
CONV="$COMMON $MSA --lr 1e-3 --ckpt-every 250 --keep 1 --no-plot --msa-warmup-steps 50 --steps 1000 --seed 1 \
  --init-from $R/dense512_p1 --init-step 2000"  # ../cpu_t512/'s warmup-50 arms, pair 1:1
STAGE="$COMMON $MSA --msa-warmup-steps 20 --keep 2 --seed 1 --steps 2000 --ckpt-every 500"  # its msa512_w20 runs
declare -A RUN=(
  [warmup-50_p1c1]="$CONV"
  [warmup-50-ilr3_p1c1]="$CONV --index-lr-scale 3"
  [warmup-50-ilr10_p1c1]="$CONV --index-lr-scale 10"
  [base_p1c1]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 200}"  # the base recipe's 200 warmup steps
  [ilr10_p1c1]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 200} --index-lr-scale 10"
  # is the warmup slow because the answer rows are few? ilr10 with a quarter of the rows retrieval examples (the
  # rest plain code windows: a quarter of the answer rows in the KL) and a warmup as long as the run (400 steps)
  [ilr10-mix25_p1c1]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 400} --index-lr-scale 10 --task-mix 0.25"
  [base-mix25_p1c1]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 400} --task-mix 0.25"  # and at 1x
  # the same pair with seed 11 (../cpu_t512/'s pair 1:11)
  [ilr10_p1c11]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 200} --index-lr-scale 10 --seed 11"
  [ilr10-mix25_p1c11]="${CONV/--msa-warmup-steps 50/--msa-warmup-steps 400} --index-lr-scale 10 --task-mix 0.25 --seed 11"
  [msa512_w20_p1]="$STAGE --init-from $P/dense_seed1 --init-step 8000"
  [msa512_w20-scratch_p1]="$STAGE --init-from $R/msa128_full_p1 --init-step 1000"
  # the fresh index with a warmup that outlasts dense's learning to retrieve at 512 (its probe: 0.75 at step 200)
  [msa512_w400_p1]="${STAGE/--msa-warmup-steps 20/--msa-warmup-steps 400} --init-from $P/dense_seed1 --init-step 8000"
)
mkdir -p $O
for x in ${ROUTING_RUNS:-warmup-50_p1c1 warmup-50-ilr3_p1c1 warmup-50-ilr10_p1c1 msa512_w20_p1 msa512_w20-scratch_p1 \
    base_p1c1 ilr10_p1c1 ilr10-mix25_p1c1 ilr10_p1c11 ilr10-mix25_p1c11 base-mix25_p1c1 msa512_w400_p1}; do
  d=$R/routing_$x STOP=400
  [ $x = warmup-50_p1c1 ] && STOP=600
  [ $x = msa512_w400_p1 ] && STOP=500
  [ -e $d/STOPPED_$STOP ] || { python experiments/train_lm.py ${RUN[$x]} --eval-every 10 --eval-batches 8 \
    --stop-at $STOP --run-dir $d && touch $d/STOPPED_$STOP; }
  awk '!/"kind": "train"/ || /"step": [0-9]*0,/' $d/metrics.jsonl > $O/metrics_$x.jsonl  # train rows: every 10th
done
python $O/figures.py
