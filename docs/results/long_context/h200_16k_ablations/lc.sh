#!/usr/bin/env bash
# Issue 15 at 16K on one H200, idempotent: every run resumes where the last call's deadline stopped it
# (SIGTERM = checkpoint and exit) while the machine stays warm (runs/ survives), and a done run is
# skipped. Base stages at 2K (RoPE base 500,000), then 16K runs of 300 steps from them, each evaluated at
# 16K (50 examples per cell, 8-example needle trace) as soon as it is trained, before the next named run.
# Usage: bash lc.sh SECONDS RUN...   RUN: one of the names below, with optional suffixes (_sN: N steps at
# 16K, _seedN: seed N; see args_of). Bases are trained as needed, a 16K run's base too (cpt trains dense
# first). EVAL overrides the evaluation's flags (e.g. the 4K / 16K / 32K one).
# PACK_CACHE=1: also return the compilation cache (jax_cache.tgz.NN under $OUT) for the next session: copy the
# pieces into _gpu/ (git-ignored) and name in the device call's carry those that fit (e.g. _gpu/jax_cache.tgz.00).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# JAX's persistent compilation cache: a resumed run, or another run or evaluation of the same shapes and
# config, loads its compiled programs instead of compiling them again (~15-30 s per program at 16K)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}
DEADLINE=$((SECONDS + ${1:-540})); shift
mkdir -p $OUT/a runs
# ... also across sessions: a cache packed by an earlier session's PACK_CACHE=1 (below), fetched and carried
# in as _gpu/jax_cache.tgz.NN, is unpacked on a fresh machine (the 2K stages and the evaluations of a model
# shape compile the same programs every session; a program whose code changed simply misses)
# Each piece is a whole archive, so any subset of them can be carried (the carry's 64 MiB limit).
if [ ! -d $JAX_COMPILATION_CACHE_DIR ] && ls _gpu/jax_cache.tgz.* > /dev/null 2>&1; then
  mkdir -p $JAX_COMPILATION_CACHE_DIR
  for f in _gpu/jax_cache.tgz.*; do tar xzf $f -C $JAX_COMPILATION_CACHE_DIR || echo "$f: not unpacked"; done
  echo "compilation cache carried in: $(find $JAX_COMPILATION_CACHE_DIR -type f | wc -l) files"
fi
left() { echo $((DEADLINE - SECONDS)); }
# Once per machine, before any training: MSA's dense-warmup steps take the teacher's LSE from cuDNN's float32
# softmax statistics (jax's private cuDNN wrapper, since 2026-12-05): check them against an independent LSE (one test)
if [ ! -e runs/lse_checked ]; then
  if python3 -m pytest -q -p no:cacheprovider "tests/test_ops.py::test_dense_attention_return_lse[auto]" > $OUT/a/lse_check.txt 2>&1
  then touch runs/lse_checked
  else echo "the dense LSE check failed ($OUT/a/lse_check.txt): no training on this machine"; tail -20 $OUT/a/lse_check.txt
       cd $OUT && tar czf a$(date +%s).tgz a && rm -rf a; exit 2; fi
fi
# (a CPU dry run of this script: LC_EXTRA="<small model flags>" B2K=... S16=... EVAL=... bash _gpu/lc.sh ...)
LC="--preset long-context --task-mix 1.0 --rope-theta 500000 --eval-batches 2 ${LC_EXTRA:-}"
B2K=${B2K:-"--seq-len 2048 --batch-size 64 --steps 600 --eval-every 100 --ckpt-every 200"}
S16=${S16:-"--steps 300 --eval-every 100 --ckpt-every 50"}
EVAL=${EVAL:-"--lengths 16384 --n 50 --batch-size 8 --selection-depths 0,0.25,0.5"}  # the runs up to kl-off traced depth 0.5 only
declare -A BASE=( [lc_2k]="--attention dense $B2K"
                  [lc_2k_msa]="--attention msa $B2K"   # at 2K, 128 x 16 sees every block: dense + full KL
                  [lc_2k_msa_nope]="--attention msa --no-index-rope $B2K" )
# Ablations start from the 2K MSA stage (as scratch, their baseline) except kl-off (index branch never trained,
# against msa, which starts from the 2K dense stage with the KL on).
declare -A ARGS=(
  [dense]="--attention dense --init-from runs/lc_2k $S16"
  [dense-far]="--attention dense --init-from runs/lc_2k $S16 --task-depth-power 2"  # 3x the needles in the first 10%
  [msa]="--attention msa --init-from runs/lc_2k $S16 --msa-warmup-steps 100"
  [scratch]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100"  # keeps the 2K-trained index
  [cpt]="--attention msa --init-from runs/lc16_dense $S16 --steps ${CPT_STEPS:-150} --msa-warmup-steps 50"  # converted from 16K dense
  # cpt_far_s600 lost its retrieval at its first sparse step, the index's KL still falling fast (../h200_dense_bar/)
  [cpt-w200]="--attention msa --init-from runs/lc16_dense $S16 --steps 400 --msa-warmup-steps 200"
  # the CPU's answer at T = 512 (../cpu_t512/, warmup-50-ilr10): the index's learning rate x10 in the same 50 steps
  [cpt-ilr10]="--attention msa --init-from runs/lc16_dense $S16 --steps ${CPT_STEPS:-150} --msa-warmup-steps 50 --index-lr-scale 10"
  # the CPU's routing (../cpu_routing/): 200 warmup steps at x10 route the answers before the switch at T = 512, 50 do
  # not, and fewer answer rows in the KL (16K: 5 of 16,384) take longer: 400 here
  [cpt-w400-ilr10]="--attention msa --init-from runs/lc16_dense $S16 --steps 600 --msa-warmup-steps 400 --index-lr-scale 10"
  [warmup-200]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 200"
  [warmup-0]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 0"  # sparse from the first 16K step
  [index-lr-x10]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --index-lr-scale 10"
  [index-lr-x3]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --index-lr-scale 3"
  [msa-w400]="--attention msa --init-from runs/lc_2k $S16 --msa-warmup-steps 400"  # sparse once dense has learned to retrieve at 16K
  [kl-off]="--attention msa --init-from runs/lc_2k $S16 --msa-warmup-steps 100 --kl-weight 0"  # index never trained: vs msa
  [block64-top32]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --block-size 64 --top-k 32"
  [block256-top8]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --block-size 256 --top-k 8"
  [top8]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --top-k 8"
  [top32]="--attention msa --init-from runs/lc_2k_msa $S16 --msa-warmup-steps 100 --top-k 32"
  # with the dense bar's recipe (../h100_scratch_far/: the RoPE index routes the far needles at chance), the
  # RoPE-free index (../h100_index_nope_far/: within 11 points of dense, all of it lost in the context's first
  # block), and with that block forced (../h100_index_nope_sink1/: dense's level, one run, from another run of
  # the same 2K stage that ended 1% apart). Next, from one shared 2K stage (paired): index-nope-local2-sink1_far_s600
  # (on the CPU the previous block took the RoPE-free index's loss gap from +1.7% to +0.4%, score recall 0.81 to
  # 0.93: ../cpu_t512/) and index-nope-sink1_far_s600_seed1 (the sink run's second seed). The first of them
  # (../h100_index_nope_local2_sink1/): dense's bits/byte and pass key, variable tracking 6 points below, score
  # recall 0.885; next its second seed, index-nope-local2-sink1_far_s600_seed1
  [index-nope]="--attention msa --init-from runs/lc_2k_msa_nope $S16 --msa-warmup-steps 100 --no-index-rope"  # both stages
  [index-nope-local2]="--attention msa --init-from runs/lc_2k_msa_nope $S16 --msa-warmup-steps 100 --no-index-rope --local-blocks 2"  # 2K: every block seen anyway
  [index-nope-sink1]="--attention msa --init-from runs/lc_2k_msa_nope $S16 --msa-warmup-steps 100 --no-index-rope --sink-blocks 1"
  [index-nope-local2-sink1]="--attention msa --init-from runs/lc_2k_msa_nope $S16 --msa-warmup-steps 100 --no-index-rope --local-blocks 2 --sink-blocks 1"
)
train() {  # train RUN_DIR ARGS...: until done or the deadline; 0 when done, 1 stopped by the deadline, 2 failed
  local dir=$1; shift
  [ -e runs/$dir/DONE ] && return 0
  [ -e runs/$dir/FAILED ] && { echo "$dir: failed in an earlier call (runs/$dir/FAILED), not retried"; return 2; }
  # SIGTERM 40 s before the deadline, SIGKILL 60 s later: a stop (finish the step, save, exit) took over 30 s
  # once at 16K, and a killed run resumes from its previous checkpoint (up to ckpt-every steps lost).
  # --foreground: the signal goes to the trainer only; sent to its process group it killed a ptxas compiling
  # an evaluation's kernel (exit code 15), and the run stopped without its checkpoint (../h100_index_nope_local2_sink1/)
  local t=$(( $(left) - 40 )) t0=$SECONDS
  if [ $t -lt 90 ]; then echo "$dir: no time left ($t s)"; return 1; fi
  timeout --foreground -s TERM -k 60 $t python3 experiments/train_lm.py $LC --run-dir runs/$dir "$@" >> $OUT/a/train_$dir.txt 2>&1
  tail -c 300 $OUT/a/train_$dir.txt | tr '\r' '\n' | tail -2
  if grep -q "^done: step" $OUT/a/train_$dir.txt; then touch runs/$dir/DONE; return 0; fi
  local el=$(( SECONDS - t0 ))
  if [ $el -ge $t ]; then echo "$dir: stopped $(( el - t )) s after SIGTERM, resumes next call"
  else echo "$dir: exited after $el s without finishing (an error? $OUT/a/train_$dir.txt)"
    mkdir -p runs/$dir && touch runs/$dir/FAILED; return 2; fi
  return 1
}
# A name may carry suffixes: NAME_sN trains N steps at 16K instead of S16's, NAME_seedN uses seed N (the
# 16K stage's data order; its weights come from the base) for a rerun beside NAME, e.g. scratch_s600_seed1;
# NAME_far draws the 16K needles' depths as dense-far does (--task-depth-power 2), e.g. scratch_far_s600.
# cpt_sN converts dense_sN (and keeps its own steps), cpt_far_sN dense-far_sN; cpt-w200 likewise.
args_of() {  # args_of NAME: the flags of a named run, or nothing for an unknown name
  local name=$1 base=${1%%_*} extra="" far="" steps="" suf
  [ -n "${ARGS[$base]:-}" ] || return 0
  for suf in $(echo "${name#$base}" | tr '_' ' '); do
    case $suf in
      s[0-9]*) steps=_$suf; [ ${base%%-*} = cpt ] || extra="$extra --steps ${suf#s}";;
      seed[0-9]*) extra="$extra --seed ${suf#seed}";;
      far) far=-far; extra="$extra --task-depth-power 2";;  # as dense-far: 3x the needles in the first 10%
      *) return 0;;
    esac
  done
  # cpt converts the dense run of its own recipe: cpt_far_s600 converts dense-far_s600
  echo "${ARGS[$base]/runs\/lc16_dense /runs/lc16_dense$far$steps }$extra"
}
ensure() {  # ensure RUN_DIR: its base first (a 2K stage or another 16K run), then itself
  local dir=$1 name=${1#lc16_}
  local args=${BASE[$dir]:-$(args_of $name)}
  local base=$(echo "$args" | sed -n 's/.*--init-from runs\/\([a-z0-9_-]*\).*/\1/p')
  if [ -n "$base" ]; then ensure $base || return $?; fi
  train $dir $args
}
# Each run is evaluated as soon as it is trained (once per machine and EVAL), before the next one trains, so that
# a budget that ends mid-list loses at most the run in progress; a call that stops resumes both next time.
for name in "$@"; do
  [ -n "$(args_of $name)" ] || { echo "unknown run $name"; exit 2; }
done
for name in "$@"; do
  # a run that failed (not one the deadline stopped) does not hold up the next named one
  ensure lc16_$name; rc=$?
  [ $rc = 2 ] && { echo "lc16_$name failed: on to the next run"; continue; }
  [ $rc = 0 ] || break
  mark=runs/lc16_$name/eval_done_$(echo "$EVAL" | md5sum | cut -c1-8)
  [ -e $mark ] && continue
  if [ $(left) -lt 130 ]; then echo "eval lc16_$name: no time left"; break; fi
  timeout $(( $(left) - 10 )) python3 experiments/eval_retrieval.py runs/lc16_$name $EVAL --out $OUT/a/eval_$name \
    > $OUT/a/eval_$name.txt 2>&1 && touch $mark
  tail -c 2500 $OUT/a/eval_$name.txt
  [ -e $mark ] || break
done
for d in runs/lc_2k runs/lc_2k_msa runs/lc_2k_msa_nope runs/lc16_*; do [ -d $d ] && cp $d/metrics.jsonl $OUT/a/metrics_$(basename $d).jsonl && cp $d/config.json $OUT/a/config_$(basename $d).json; done
if [ -n "${PACK_CACHE:-}" ] && [ -d $JAX_COMPILATION_CACHE_DIR ]; then
  # for the next session's carry: up to CACHE_MB (default 40; the carry holds 64 MiB with the repository),
  # the train steps first (the programs that take longest to compile, the 2K stages' too), then the newest
  # other entries, in pieces of at most 14 MiB of files, each a whole archive (files come back up to 16 MiB
  # each, 8 in all): carry as many pieces as fit beside the repository, the first ones first
  (cd $JAX_COMPILATION_CACHE_DIR && find . -type f -printf '%T@ %s %P\n' \
     | awk '{ print ($3 ~ /train_step/ ? 1 : 0), $0 }' | sort -k1,1nr -k2,2nr | cut -d' ' -f2- \
     | awk -v max=$(( ${CACHE_MB:-40} * 1048576 )) '{ if (tot + $2 <= max) { tot += $2; print $2, $3 } }' > /tmp/cache_list \
     && rm -f /tmp/cache_part.* && awk -v piece=$(( 14 * 1048576 )) \
       '{ if (tot + $1 > piece && tot > 0) { n++; tot = 0 } tot += $1; print $2 > sprintf("/tmp/cache_part.%02d", n) }' /tmp/cache_list \
     && for f in /tmp/cache_part.*; do tar czf $OUT/jax_cache.tgz.${f##*.} -T $f; done) \
    && echo "compilation cache packed: $(wc -l < /tmp/cache_list) of $(find $JAX_COMPILATION_CACHE_DIR -type f | wc -l) files"
fi
cd $OUT && tar czf a$(date +%s).tgz a && rm -rf a
