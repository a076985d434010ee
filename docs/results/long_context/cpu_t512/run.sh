#!/usr/bin/env bash
# The CPU recipe at T = 512 (../cpu_seeds/'s 0.43M-parameter model), to put the 16K GPU study's regime on the CPU:
# 32 blocks of 16 with top_k 4 read 12.5% of the blocks, as 16 of 128 do at 16K (at T = 128, ../cpu_ablations/
# read 2 of 8, 25%). Like the GPU study (a 2K stage, then 16K), a T = 128 dense parent of ../cpu_seeds/ (seeds 1
# and 2, step 8000) is trained on at T = 512: dense for 2000 steps (the dense model), then converted to MSA for
# 1000 steps (200 dense warmup), beside the same 1000 steps dense (the equal-budget dense control). Parent 2 lost
# its retrieval in that stage (0.00 at T = 512; kept as a record), so every arm continues parent 1 four times,
# with seeds 1, 11, 21, 31 (the index branch's initialisation and the data order), paired across arms; base,
# dense and index lr x10 (ilr10) four times more (MORE). Every model is evaluated on the same 200 pass-key
# examples per length (40 per depth) at 512 and 1024 (2x the training length).
# Idempotent: a finished run is skipped, an interrupted one resumes. Run from the repository root with the
# project's Python on PATH. SHORT_LENGTHS=1 also evaluates dense and ilr10 (eight pairs) at T = 128 and 256. Subsets: ARMS="base" (ARMS=" ": no arm), STAGE_SEEDS="1", FROM_PARENT_SEEDS="11",
# FROM_PARENT_RUNS="20-ilr10", SCRATCH_SEEDS="21" and CONTROL_SEEDS="11" (an empty STAGE_SEEDS, FROM_PARENT_SEEDS,
# SCRATCH_SEEDS or CONTROL_SEEDS: none of those runs).
set -eu
R=${RUNS:-runs/cpu_t512}
P=${PARENTS:-runs/cpu_seeds}
O=docs/results/long_context/cpu_t512
COMMON="--preset tiny --task-mix 1.0 --task-mix-tasks passkey --seq-len 512 --batch-size 4 --d-model 128 --n-layers 2 \
  --head-dim 32 --d-ff 384 --log-every 100"
CONT="--lr 1e-3 --eval-every 500 --ckpt-every 250 --keep 1 --no-plot"  # every arm: 1000 steps on from dense512_p1
MSA="--attention msa --n-dense-layers 1 --index-dim 32"
EVAL="--tasks passkey --lengths 512,1024 --n 40 --batch-size 40 --no-selection --val-batches 64"
# arm: its flags; the MSA arms read 64 keys per query (8 blocks of 8, 4 of 16 or 2 of 32) except the top_k arms
# (block 16 x top 2: 32 keys, x top 8: 128), which change the budget as 16K's top_k 8 / 32 do
declare -A ARM=(
  [dense]="--attention dense --steps 1000"
  [base]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 200 --steps 1000"
  [index-nope]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 200 --steps 1000 --no-index-rope"
  [block32-top2]="$MSA --block-size 32 --top-k 2 --msa-warmup-steps 200 --steps 1000"
  [block8-top8]="$MSA --block-size 8 --top-k 8 --msa-warmup-steps 200 --steps 1000"
  [warmup-0]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 0 --steps 1000"
  [warmup-50]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 50 --steps 1000"  # 5%, as the 16K conversion's 50 of 150
  [top2]="$MSA --block-size 16 --top-k 2 --msa-warmup-steps 200 --steps 1000"
  [top8]="$MSA --block-size 16 --top-k 8 --msa-warmup-steps 200 --steps 1000"
  # the index branch's learning rate x10 (fifth session): can a faster index stand in for a longer warmup (50 steps),
  # what does it change with base's 200, and can it stand in for any warmup at all?
  [warmup-50-ilr10]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 50 --index-lr-scale 10 --steps 1000"
  [ilr10]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 200 --index-lr-scale 10 --steps 1000"
  [warmup-0-ilr10]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 0 --index-lr-scale 10 --steps 1000"
  # sixth session: the dose between 1x and x10 with the 50-step warmup
  [warmup-50-ilr3]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 50 --index-lr-scale 3 --steps 1000"
  # ninth session: the RoPE-free index's bits/byte cost (+1.7%, its score recall 0.81): is it the nearby blocks
  # a position-blind index stops choosing? The block before the local one forced in (2 of the 4 then chosen);
  # and the context's first block forced, as the H100's 16K index-nope-sink1 run (one of the 3 choices spent)
  [index-nope-local2]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 200 --steps 1000 --no-index-rope --local-blocks 2"
  [index-nope-sink1]="$MSA --block-size 16 --top-k 4 --msa-warmup-steps 200 --steps 1000 --no-index-rope --sink-blocks 1"
)
# base and dense first (four pairs each), then four more pairs of the two (the headline's interval), then the
# ablations, which pair with the first four
ORDER="base dense index-nope base+ dense+ block8-top8 block32-top2 warmup-0 top8 top2 warmup-50 warmup-50-ilr10 ilr10 warmup-0-ilr10 ilr10+ warmup-50-ilr3 index-nope-local2 index-nope-sink1 index-nope-local2+"
PAIRS=${PAIRS:-"1:1 1:11 1:21 1:31"}  # parent seed : conversion seed (a subset: runs the arms on it only)
MORE="1:41 1:51 1:61 1:71"  # "arm+": the same arm with these four pairs
eval_once() {  # eval_once RUN: the shared evaluation, then the committed copies
  local x=$1
  [ -f $R/eval_$x/results.json ] || python experiments/eval_retrieval.py $R/$x $EVAL --out $R/eval_$x
  mkdir -p $O/eval_$x && cp $R/eval_$x/results.{json,md} $O/eval_$x/
  awk '!/"kind": "train"/ || /"step": [0-9]*[05]0,/' $R/$x/metrics.jsonl > $O/metrics_$x.jsonl
}
for s in ${STAGE_SEEDS-1 2}; do  # the dense models at T = 512, from the T = 128 parents
  d=$R/dense512_p$s
  [ -e $d/DONE ] || { python experiments/train_lm.py $COMMON --attention dense --keep 2 --seed $s --steps 2000 \
    --eval-every 500 --ckpt-every 500 --init-from $P/dense_seed$s --init-step 8000 --run-dir $d && touch $d/DONE; }
  eval_once dense512_p$s
done
# MSA through the T = 512 stage itself, as the H200's MSA from the 2K dense stage (../h200_dense_bar/): from the
# T = 128 parent, the same 2000 steps and seed as dense512_p1, which must first learn to retrieve at 512 (its
# training probe: 0.75 at step 200, 1.00 from 300); the dense warmup ends before (20 steps) or after (400) that.
# Seeds 11 and 21 (fourth session; the stage's data order and the index's initialisation, parent 1 each time)
# repeat the three with a dense run of their own seed: three pairs. Seed 1's runs keep their names (no _sN).
# 20-ilr10 (fifth session): the 20-step warmup with the index's learning rate x10, three seeds: does a faster
# index let MSA learn the skill while sparse? FROM_PARENT_RUNS: a subset of these runs.
FROM_PARENT_SEEDS=${FROM_PARENT_SEEDS-1 11 21}
for sd in $FROM_PARENT_SEEDS; do
  sfx=; [ $sd = 1 ] || sfx=s$sd
  for w in ${FROM_PARENT_RUNS:-dense 20 400 20-ilr10}; do
    if [ $w = dense ]; then x=dense512_p1$sfx flags="--attention dense"
    else x=msa512_w${w}_p1$sfx flags="$MSA --block-size 16 --top-k 4 --msa-warmup-steps ${w%-ilr10}"
      [ $w = ${w%-ilr10} ] || flags="$flags --index-lr-scale 10"; fi
    [ -e $R/$x/DONE ] || { python experiments/train_lm.py $COMMON $flags --keep 2 --seed $sd --steps 2000 \
      --eval-every 500 --ckpt-every 500 --init-from $P/dense_seed1 --init-step 8000 --run-dir $R/$x && touch $R/$x/DONE; }
    eval_once $x
  done
done
# The H200's "scratch" recipe (a 2K MSA stage, whose 128 x 16 covers every block, before 16K) on the CPU (sixth session):
# the T = 128 parent 1000 steps on as MSA with top 8 of its 8 blocks (dense attention, the index trained by the full
# KL; msa128_full_p1), then the T = 512 stage from it as msa512_w20 (sparse from step 20, same seeds): does an index
# trained beforehand let MSA learn to retrieve at 512 while sparse, where a fresh one (msa512_w20) never did?
short_then_512() {  # short_then_512 NAME128 NAME512 SEEDS FLAGS128...: the parent 1000 steps on at T = 128 with FLAGS128
  # (seed 1), then the T = 512 stage from it as msa512_w20 (sparse from step 20) with each seed, evaluated
  local x128=$1 x512=$2 seeds=$3 sd sfx x; shift 3
  [ -n "$seeds" ] || return 0
  [ -e $R/$x128/DONE ] || { python experiments/train_lm.py ${COMMON/--seq-len 512 --batch-size 4/--seq-len 128 --batch-size 16} \
    "$@" --steps 1000 --lr 1e-3 --eval-every 500 --ckpt-every 250 --keep 1 --seed 1 --init-from $P/dense_seed1 \
    --init-step 8000 --run-dir $R/$x128 && touch $R/$x128/DONE; }
  awk '!/"kind": "train"/ || /"step": [0-9]*[05]0,/' $R/$x128/metrics.jsonl > $O/metrics_$x128.jsonl
  for sd in $seeds; do
    sfx=; [ $sd = 1 ] || sfx=s$sd
    x=${x512}_p1$sfx
    [ -e $R/$x/DONE ] || { python experiments/train_lm.py $COMMON $MSA --block-size 16 --top-k 4 --msa-warmup-steps 20 \
      --keep 2 --seed $sd --steps 2000 --eval-every 500 --ckpt-every 500 --init-from $R/$x128 --init-step 1000 \
      --run-dir $R/$x && touch $R/$x/DONE; }
    eval_once $x
  done
}
short_then_512 msa128_full_p1 msa512_w20-scratch "${SCRATCH_SEEDS-1 11 21}" $MSA --block-size 16 --top-k 8 --msa-warmup-steps 0
# Its control: the same 1000 steps at T = 128 dense (dense128_more_p1), then msa512_w20 from it with a fresh index:
# is it the trained index or the backbone's 1000 more steps?
short_then_512 dense128_more_p1 msa512_w20-more "${CONTROL_SEEDS-1 11}" --attention dense
for a in ${ARMS:-$ORDER}; do
  pcs=$PAIRS; [ "${a%+}" = "$a" ] || { a=${a%+}; pcs=$MORE; }
  for pc in $pcs; do
    s=${pc%:*} c=${pc#*:} x=${a}_p${s}c$c
    [ -e $R/$x/DONE ] || { python experiments/train_lm.py $COMMON $CONT ${ARM[$a]} --seed $c \
      --init-from $R/dense512_p$s --init-step 2000 --run-dir $R/$x && touch $R/$x/DONE; }
    eval_once $x
  done
done
# the needle through the index branch at the near, middle and far depths: the weakest base run, and the runs of
# the same seed that choose more (block 8 x 8) and fewer (block 32 x 2) blocks for the same 64 keys
for x in base_p1c11 block8-top8_p1c11 block32-top2_p1c11; do
  [ -e $R/$x/DONE ] || continue
  [ -f $R/trace_$x/results.json ] || python experiments/eval_retrieval.py $R/$x --tasks passkey --lengths 512 --n 40 \
    --batch-size 40 --val-batches 64 --selection-depths 0,0.5,1 --selection-examples 40 --out $R/trace_$x
  mkdir -p $O/trace_$x && cp $R/trace_$x/*.md $R/trace_$x/*.json $R/trace_$x/*.png $O/trace_$x/
done
# every MSA arm against the dense arm (same parent, seeds and steps: the i-th runs are paired), and against the base
# arm; then the 1000 steps on against the parent they started from (the parent four times: one per conversion seed)
runs() { for pc in ${2:-$PAIRS}; do echo -n "$O/eval_$1_p${pc%:*}c${pc#*:} "; done; }
labels() { for pc in ${2:-$PAIRS}; do echo -n "$1_p${pc%:*}c${pc#*:},"; done | sed 's/,$//'; }
done4() { for pc in ${2:-$PAIRS}; do [ -f $O/eval_$1_p${pc%:*}c${pc#*:}/results.json ] || return 1; done; }
DONE_ARMS=$(for a in $ORDER; do [ "${a%+}" = "$a" ] && done4 $a && echo $a; done || true)
recipes() { for a in "$@"; do echo --recipe $a=$(labels $a); done; }
MSA_ARMS=$(echo $DONE_ARMS | tr ' ' '\n' | grep -vx dense || true)
if echo "$DONE_ARMS" | grep -qw dense && [ -n "$MSA_ARMS" ]; then
  python experiments/compare_retrieval.py $(runs dense) $(for a in $MSA_ARMS; do runs $a; done) $(recipes dense $MSA_ARMS) \
    --paired-recipes --out $O/against_dense > /dev/null
fi
if [ $(echo $MSA_ARMS | wc -w) -gt 1 ]; then
  python experiments/compare_retrieval.py $(for a in $MSA_ARMS; do runs $a; done) $(recipes $MSA_ARMS) --paired-recipes \
    --out $O/arms > /dev/null
fi
# base against dense on all eight pairs
if done4 base "$MORE" && done4 dense "$MORE"; then
  python experiments/compare_retrieval.py $(runs dense "$PAIRS $MORE") $(runs base "$PAIRS $MORE") \
    --recipe dense=$(labels dense "$PAIRS $MORE") --recipe base=$(labels base "$PAIRS $MORE") --paired-recipes \
    --out $O/base_eight_pairs > /dev/null
fi
# index lr x10 on all eight pairs too (fifth session): against dense, and against base
if done4 ilr10 "$MORE" && done4 dense "$MORE" && done4 base "$MORE"; then
  python experiments/compare_retrieval.py $(runs dense "$PAIRS $MORE") $(runs ilr10 "$PAIRS $MORE") \
    --recipe dense=$(labels dense "$PAIRS $MORE") --recipe ilr10=$(labels ilr10 "$PAIRS $MORE") --paired-recipes \
    --out $O/ilr10_eight_pairs > /dev/null
  python experiments/compare_retrieval.py $(runs base "$PAIRS $MORE") $(runs ilr10 "$PAIRS $MORE") \
    --recipe base=$(labels base "$PAIRS $MORE") --recipe ilr10=$(labels ilr10 "$PAIRS $MORE") --paired-recipes \
    --out $O/ilr10_against_base > /dev/null
fi
# the RoPE-free index with the previous block forced on all eight pairs too (2026-12-06): against dense
if done4 index-nope-local2 "$MORE" && done4 dense "$MORE"; then
  python experiments/compare_retrieval.py $(runs dense "$PAIRS $MORE") $(runs index-nope-local2 "$PAIRS $MORE") \
    --recipe dense=$(labels dense "$PAIRS $MORE") --recipe index-nope-local2=$(labels index-nope-local2 "$PAIRS $MORE") \
    --paired-recipes --out $O/index-nope-local2_eight_pairs > /dev/null
fi
# the same dense warmups with the index's learning rate at 1x and x10, pair by pair
for w in 50 0; do
  if done4 warmup-$w && done4 warmup-$w-ilr10; then
    python experiments/compare_retrieval.py $(runs warmup-$w) $(runs warmup-$w-ilr10) --recipe warmup-$w=$(labels warmup-$w) \
      --recipe warmup-$w-ilr10=$(labels warmup-$w-ilr10) --paired-recipes --out $O/warmup$w-ilr10_against_1x > /dev/null
  fi
done
# the dose with the 50-step warmup (sixth session): 1x, x3 and x10, pair by pair
if done4 warmup-50 && done4 warmup-50-ilr3 && done4 warmup-50-ilr10; then
  python experiments/compare_retrieval.py $(runs warmup-50) $(runs warmup-50-ilr3) $(runs warmup-50-ilr10) \
    $(recipes warmup-50 warmup-50-ilr3 warmup-50-ilr10) --paired-recipes --out $O/warmup50_dose > /dev/null
fi
# MSA through the T = 512 stage (both dense-warmup lengths) against dense from the same parent, seed and steps: pair
# by pair over the seeds whose three runs are evaluated ("-" stands for seed 1's empty suffix)
fp_done=$(for sd in $FROM_PARENT_SEEDS; do sfx=; [ $sd = 1 ] || sfx=s$sd
  [ -f $O/eval_dense512_p1$sfx/results.json ] && [ -f $O/eval_msa512_w20_p1$sfx/results.json ] \
    && [ -f $O/eval_msa512_w400_p1$sfx/results.json ] && echo -n "${sfx:--} "; done || true)
if [ $(echo $fp_done | wc -w) -gt 0 ]; then
  fp_runs=; fp_recipes=; fp_ilr10=msa512_w20-ilr10  # the trained index's runs: trained_index/, below
  for s in $fp_done; do [ -f $O/eval_msa512_w20-ilr10_p1${s#-}/results.json ] || fp_ilr10=; done
  for pre in dense512 msa512_w20 msa512_w400 $fp_ilr10; do
    labs=
    for s in $fp_done; do x=${pre}_p1${s#-}; fp_runs="$fp_runs $x=$O/eval_$x"; labs="$labs,$x"; done
    fp_recipes="$fp_recipes --recipe $pre=${labs#,}"
  done
  if [ $(echo $fp_done | wc -w) -gt 1 ]; then fp_recipes="$fp_recipes --paired-recipes"; else fp_recipes=; fi
  python experiments/compare_retrieval.py $fp_runs $fp_recipes --out $O/from_parent > /dev/null
fi
# the trained index's runs (sixth session) against dense and MSA with a fresh index, pair by pair over the seeds that
# have them (trained_index/), and the control against them over the control's seeds (trained_index_control/)
compare_seeds() {  # compare_seeds OUT RECIPE...: the recipes' runs on every seed where all of them are evaluated
  local out=$1 sd sfx pre ok rs= recs= labs; shift
  local seeds=$(for sd in 1 11 21; do sfx=; [ $sd = 1 ] || sfx=s$sd; ok=1
    for pre in "$@"; do [ -f $O/eval_${pre}_p1$sfx/results.json ] || ok=; done; [ -n "$ok" ] && echo -n "$sfx- "; done || true)
  [ $(echo $seeds | wc -w) -gt 1 ] || return 0
  for pre in "$@"; do
    labs=; for sfx in $seeds; do x=${pre}_p1${sfx%-}; rs="$rs $x=$O/eval_$x"; labs="$labs,$x"; done
    recs="$recs --recipe $pre=${labs#,}"
  done
  python experiments/compare_retrieval.py $rs $recs --paired-recipes --out $O/$out > /dev/null
}
compare_seeds trained_index dense512 msa512_w20 msa512_w20-scratch
compare_seeds trained_index_control dense512 msa512_w20-more msa512_w20-scratch
# the index lr x10 recipe and dense at the shorter lengths too (seventh session; the issue's "every length up to the
# training length"): the same eight pairs evaluated at T = 128 and 256, paired on the same examples
SHORT="--tasks passkey --lengths 128,256 --n 40 --batch-size 40 --no-selection --val-batches 64"
if [ -n "${SHORT_LENGTHS:-}" ]; then
  for a in dense ilr10; do for pc in $PAIRS $MORE; do
    x=${a}_p${pc%:*}c${pc#*:}
    [ -e $R/$x/DONE ] || continue
    [ -f $R/short_$x/results.json ] || python experiments/eval_retrieval.py $R/$x $SHORT --out $R/short_$x
    mkdir -p $O/short_$x && cp $R/short_$x/results.{json,md} $O/short_$x/
  done; done
  if [ $(ls -d $O/short_dense_p* $O/short_ilr10_p* 2>/dev/null | wc -l) = 16 ]; then
    python experiments/compare_retrieval.py $(runs dense "$PAIRS $MORE" | sed "s#/eval_#/short_#g") \
      $(runs ilr10 "$PAIRS $MORE" | sed "s#/eval_#/short_#g") --recipe dense=$(labels dense "$PAIRS $MORE") \
      --recipe ilr10=$(labels ilr10 "$PAIRS $MORE") --paired-recipes --out $O/ilr10_short_lengths > /dev/null
  fi
fi
if [ -n "$DONE_ARMS" ]; then
  python experiments/compare_retrieval.py p1a=$O/eval_dense512_p1 p1b=$O/eval_dense512_p1 p1c=$O/eval_dense512_p1 \
    p1d=$O/eval_dense512_p1 $(for a in $DONE_ARMS; do runs $a; done) --recipe parent=p1a,p1b,p1c,p1d $(recipes $DONE_ARMS) \
    --paired-recipes --out $O/against_parent > /dev/null
fi
exit 0
