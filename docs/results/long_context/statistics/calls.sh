#!/usr/bin/env bash
# The comparisons of this folder, from the study's committed evaluations (CPU, seconds; run from the
# repository root with the project's Python first on PATH). Every eval_retrieval.py run here scored the
# same examples (seed 0, 50 per cell, the same validation packages), but these evaluations predate
# per-example outcomes, so every interval between two runs is unpaired (conservative when two models
# tend to get the same examples right).
set -eu
D=docs/results/long_context
O=$D/statistics
F=$D/h200_final_eval
S=$D/h200_16k_study
A=$D/h200_16k_ablations
C="python experiments/compare_retrieval.py"
# the final protocol: MSA against dense at 4K / 16K / 32K, one run each (evaluation sampling only)
$C dense=$F/eval_dense scratch=$F/eval_scratch cpt=$F/eval_cpt index-nope=$F/eval_index-nope \
  --out $O/final_eval --title "h200_final_eval: MSA - dense, one run each (shaded: +-2 points)"
# the 16K study: MSA from the 2K dense stage and converted from 16K dense, against its dense model
$C $S/eval_4k_16k cpt=$S/eval_cpt_16k --baseline lc_16k_dense --out $O/16k_study \
  --title "h200_16k_study: MSA - dense, one run each"
# the same commands run again (each with its own 2K stage): the scratch recipe three times, dense twice;
# their spread, and the two recipes compared with it as the noise
$C scratch=$A/eval_scratch_16k rerun=$A/eval_scratch_rerun_16k scratch-final=$F/eval_scratch \
  $S/eval_4k_16k dense-final=$F/eval_dense --runs rerun,scratch-final \
  --spread scratch,rerun,scratch-final --spread lc_16k_dense,dense-final \
  --recipe dense=lc_16k_dense,dense-final --recipe scratch=scratch,rerun,scratch-final --out $O/reruns \
  --title "the scratch recipe run again - its first run"
# the ablations (one run each) against the first scratch run (evaluation sampling only), and against the
# scratch recipe's three runs (their spread as the noise)
$C scratch=$A/eval_scratch_16k index-lr-x10=$A/eval_index-lr-x10_16k top8=$A/eval_top8_16k \
  block64-top32=$A/eval_block64-top32_16k warmup-200=$A/eval_warmup-200_16k \
  block256-top8=$A/eval_block256-top8_16k index-nope=$F/eval_index-nope \
  rerun=$A/eval_scratch_rerun_16k scratch-final=$F/eval_scratch \
  --runs index-lr-x10,top8,block64-top32,warmup-200,block256-top8,index-nope \
  --recipe scratch=scratch,rerun,scratch-final --recipe index-lr-x10=index-lr-x10 --recipe top8=top8 \
  --recipe block64-top32=block64-top32 --recipe warmup-200=warmup-200 --recipe block256-top8=block256-top8 \
  --recipe index-nope=index-nope --out $O/ablations --title "ablations - the first scratch run"
# KL off against its own control (MSA from the 2K dense stage, KL on)
$C $S/eval_4k_16k kl-off=$A/eval_kl-off_16k --baseline lc_16k_msa --runs kl-off --out $O/kl_off \
  --title "KL off - KL on (both from the 2K dense stage)"
