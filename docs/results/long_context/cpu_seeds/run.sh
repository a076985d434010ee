#!/usr/bin/env bash
# Seeds of the CPU smoke study's T = 128 recipe (../cpu_smoke/): a dense model that learns pass-key retrieval,
# and MSA converted from it, three times each with seeds 1-3 (the smoke study's run was seed 0, with the
# same two-command schedule), evaluated on the same 200 examples per model (per-example outcomes stored),
# then compared pair by pair (each MSA run continues its own dense run). Idempotent: a finished step is
# skipped, an interrupted run resumes. Run from the repository root with the project's Python on PATH.
set -eu
R=${RUNS:-runs/cpu_seeds}
O=docs/results/long_context/cpu_seeds
COMMON="--preset tiny --task-mix 1.0 --task-mix-tasks passkey --seq-len 128 --batch-size 16 --d-model 128 --n-layers 2 \
  --head-dim 32 --d-ff 384 --keep 3 --log-every 100"
MSA="--attention msa --n-dense-layers 1 --block-size 16 --top-k 2 --index-dim 32 --msa-warmup-steps 200 --steps 1000 --lr 1e-3 \
  --eval-every 500 --ckpt-every 250"
# 200 pass-key examples per model (40 per depth, the same for every model); bits/byte over 64 x 16 windows of
# 128 bytes of unseen packages (the preset's 2 windows are too few to compare runs by)
EVAL="--tasks passkey --lengths 128 --n 40 --batch-size 40 --no-selection --val-batches 64"
done_at() { [ -e $1/DONE_$2 ]; }  # train STEPS done (a marker this script writes)
for s in ${SEEDS:-1 2 3}; do
  d=$R/dense_seed$s m=$R/msa_cpt_seed$s
  # the smoke study's schedule: 4000 steps, then the same command with --steps 8000 (the cosine LR restarts)
  for n in 4000 8000; do
    done_at $d $n || { python experiments/train_lm.py $COMMON --attention dense --seed $s --steps $n --eval-every 2000 \
      --ckpt-every 1000 --run-dir $d && touch $d/DONE_$n; }
  done
  done_at $m 1000 || { python experiments/train_lm.py $COMMON $MSA --seed $s --init-from $d --init-step 8000 --run-dir $m \
    && touch $m/DONE_1000; }
  for x in $d $m; do
    [ -f $R/eval_$(basename $x)/results.json ] || python experiments/eval_retrieval.py $x $EVAL --out $R/eval_$(basename $x)
  done
done
# the committed copies: every evaluation's results and every run's training metrics
for s in ${SEEDS:-1 2 3}; do
  for x in dense_seed$s msa_cpt_seed$s; do
    mkdir -p $O/eval_$x && cp $R/eval_$x/results.json $R/eval_$x/results.md $O/eval_$x/
    # every 50th training step and every evaluation (the full log has a row per step)
    awk '!/"kind": "train"/ || /"step": [0-9]*[05]0,/' $R/$x/metrics.jsonl > $O/metrics_$x.jsonl
  done
done
R=$O
# MSA - dense per seed (paired on the same examples), the seeds' spread, and MSA against dense pair by pair
# (each MSA run continues its own dense run)
for s in ${SEEDS:-1 2 3}; do
  python experiments/compare_retrieval.py $R/eval_dense_seed$s $R/eval_msa_cpt_seed$s --out $O/seed$s > /dev/null
done
python experiments/compare_retrieval.py $(for s in ${SEEDS:-1 2 3}; do echo $R/eval_dense_seed$s $R/eval_msa_cpt_seed$s; done) \
  --spread dense_seed1,dense_seed2,dense_seed3 --spread msa_cpt_seed1,msa_cpt_seed2,msa_cpt_seed3 \
  --recipe dense=dense_seed1,dense_seed2,dense_seed3 --recipe msa=msa_cpt_seed1,msa_cpt_seed2,msa_cpt_seed3 \
  --paired-recipes --out $O/recipes
