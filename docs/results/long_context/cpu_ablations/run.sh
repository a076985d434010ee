#!/usr/bin/env bash
# The ablations on the CPU smoke recipe's scale (T = 128, 0.43M parameters; ../cpu_seeds/), paired:
# every arm converts the same dense parents to MSA (layer 1 of 2; 1000 steps, 200 of them dense warmup,
# unless the arm changes that) with the same conversion seeds, and is evaluated on the same 200 pass-key
# examples, so each arm is compared pair by pair with the base recipe (block 16 x top 2, KL on, RoPE index).
# Parents: ../cpu_seeds/'s dense seeds 1 and 2 (seed 3 never learned to retrieve), each converted twice
# (conversion seeds s and s + 10): 4 pairs per arm. Idempotent: a finished run is skipped, an interrupted one
# resumes. Run from the repository root with the project's Python on PATH; ARMS="base w0" runs a subset.
set -eu
R=${RUNS:-runs/cpu_ablations}
P=${PARENTS:-runs/cpu_seeds}
O=docs/results/long_context/cpu_ablations
COMMON="--preset tiny --task-mix 1.0 --task-mix-tasks passkey --seq-len 128 --batch-size 16 --d-model 128 --n-layers 2 \
  --head-dim 32 --d-ff 384 --log-every 100"
MSA="--attention msa --n-dense-layers 1 --index-dim 32 --lr 1e-3 --eval-every 500 --ckpt-every 250 --keep 1 --no-plot"
EVAL="--tasks passkey --lengths 128 --n 40 --batch-size 40 --no-selection --val-batches 64"  # as ../cpu_seeds/
# arm: its flags (sparse steps are 800 in every arm: a longer warmup adds steps, as in ../h200_16k_ablations/)
declare -A ARM=(
  [base]="--block-size 16 --top-k 2 --msa-warmup-steps 200 --steps 1000"
  [warmup-0]="--block-size 16 --top-k 2 --msa-warmup-steps 0 --steps 800"
  [top4]="--block-size 16 --top-k 4 --msa-warmup-steps 200 --steps 1000"
  [kl-off]="--block-size 16 --top-k 2 --msa-warmup-steps 200 --steps 1000 --kl-weight 0"
  [block8-top4]="--block-size 8 --top-k 4 --msa-warmup-steps 200 --steps 1000"
  [index-nope]="--block-size 16 --top-k 2 --msa-warmup-steps 200 --steps 1000 --no-index-rope"
  [warmup-600]="--block-size 16 --top-k 2 --msa-warmup-steps 600 --steps 1400"
  [block8-top2]="--block-size 8 --top-k 2 --msa-warmup-steps 200 --steps 1000"
  [block8-top8]="--block-size 8 --top-k 8 --msa-warmup-steps 200 --steps 1000"
  [top3]="--block-size 16 --top-k 3 --msa-warmup-steps 200 --steps 1000"
  [block32-top2]="--block-size 32 --top-k 2 --msa-warmup-steps 200 --steps 1000"
)
ORDER="base warmup-0 top4 kl-off block8-top4 index-nope warmup-600 block8-top2 block8-top8 top3 block32-top2"  # most
# wanted first; the last two were added to test "blocks chosen (top_k - 1), not keys read, set exact match" (it failed)
PAIRS="1:1 1:11 2:2 2:12"  # parent seed : conversion seed
for s in 1 2; do  # the parents: ../cpu_seeds/run.sh's dense command (4000 steps, then --steps 8000)
  for n in 4000 8000; do
    [ -e $P/dense_seed$s/DONE_$n ] || { python experiments/train_lm.py $COMMON --keep 3 --attention dense --seed $s \
      --steps $n --eval-every 2000 --ckpt-every 1000 --run-dir $P/dense_seed$s && touch $P/dense_seed$s/DONE_$n; }
  done
done
for a in ${ARMS:-$ORDER}; do
  for pc in $PAIRS; do
    s=${pc%:*} c=${pc#*:} d=$R/${a}_p${s}c$c
    [ -e $d/DONE ] || { python experiments/train_lm.py $COMMON $MSA ${ARM[$a]} --seed $c --init-from $P/dense_seed$s \
      --init-step 8000 --run-dir $d && touch $d/DONE; }
    [ -f $R/eval_${a}_p${s}c$c/results.json ] || python experiments/eval_retrieval.py $d $EVAL --out $R/eval_${a}_p${s}c$c
    mkdir -p $O/eval_${a}_p${s}c$c && cp $R/eval_${a}_p${s}c$c/results.{json,md} $O/eval_${a}_p${s}c$c/
    awk '!/"kind": "train"/ || /"step": [0-9]*[05]0,/' $d/metrics.jsonl > $O/metrics_${a}_p${s}c$c.jsonl
  done
done
# the needle trace (index selection against the needle's block, per layer) for the base recipe's weakest run and
# block 8 x top 4 and block 32 x top 2 from the same parent and conversion seed: where the base recipe's misses are
for x in base_p1c11 block8-top4_p1c11 block32-top2_p1c11; do
  [ -e $R/$x/DONE ] || continue  # an arm not (yet) run with ARMS=...
  [ -f $R/trace_$x/results.json ] || python experiments/eval_retrieval.py $R/$x --tasks passkey --lengths 128 --n 40 \
    --batch-size 40 --val-batches 64 --selection-depths 0.75,1 --selection-examples 40 --out $R/trace_$x
  mkdir -p $O/trace_$x && cp $R/trace_$x/*.md $R/trace_$x/*.json $R/trace_$x/*.png $O/trace_$x/
done
# every arm against the base recipe, pair by pair (the i-th run of every arm shares the base's i-th parent and
# conversion seed), and every recipe against the dense parents (each MSA run against its own parent)
runs() { for pc in $PAIRS; do echo -n "$O/eval_$1_p${pc%:*}c${pc#*:} "; done; }
labels() { for pc in $PAIRS; do echo -n "$1_p${pc%:*}c${pc#*:},"; done | sed 's/,$//'; }
DONE_ARMS=$(for a in $ORDER; do [ $(ls -d $O/eval_${a}_p* 2>/dev/null | wc -l) = 4 ] && echo $a; done)
python experiments/compare_retrieval.py $(for a in $DONE_ARMS; do runs $a; done) \
  $(for a in $DONE_ARMS; do echo --recipe $a=$(labels $a); done) --paired-recipes --out $O/arms > /dev/null
D=docs/results/long_context/cpu_seeds
python experiments/compare_retrieval.py p1a=$D/eval_dense_seed1 p1b=$D/eval_dense_seed1 p2a=$D/eval_dense_seed2 \
  p2b=$D/eval_dense_seed2 $(for a in $DONE_ARMS; do runs $a; done) --recipe dense=p1a,p1b,p2a,p2b \
  $(for a in $DONE_ARMS; do echo --recipe $a=$(labels $a); done) --paired-recipes --out $O/against_dense > /dev/null
python $O/figures.py
