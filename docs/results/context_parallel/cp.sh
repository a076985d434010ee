#!/usr/bin/env bash
# Context-parallel training of the `gpu` preset, MSA and dense, on one host's GPUs (README.md, "Long sequences").
# Usage, from the repository root on the device machine: bash cp.sh SECONDS N T...
#   For each T (ascending) and each attention (msa, dense): train_lm.py --preset gpu --seq-len T --batch-size 1
#   --mesh context=N for STEPS steps (default 10; one evaluation batch at the end). Its summary.json
#   (median tokens/s and step time, peak memory per device) and metrics.jsonl (the per-step losses) go to
#   $OUT/a/cp_<attention>_N<N>_T<T>.{json,jsonl}; a run that fails (out of memory, the deadline) leaves its log
#   as $OUT/a/cp_<attention>_N<N>_T<T>.txt, and that attention's longer lengths are skipped.
#   N = 1 is the one-GPU reference (--mesh context=1). Same seed and data for every N: the first steps' losses
#   of two N at one T must agree. Table: python docs/results/context_parallel/table.py DIR (DIR: the a/ folder).
# CPU dry run (N CPU devices for N): XLA_FLAGS=--xla_force_host_platform_device_count=2 PRESET=tiny \
#   EXTRA="--impl xla" OUT=/tmp/cp bash docs/results/context_parallel/cp.sh 600 2 512 1024
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}
DEADLINE=$((SECONDS + ${1:?SECONDS}))
N=${2:?N (devices along context)}; shift 2
# The mesh is context=N alone (batch 1), so the runs see N GPUs: the first N of the host
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((N - 1)))}
STEPS=${STEPS:-10}
mkdir -p $OUT/a runs
for attention in msa dense; do
  for T in "$@"; do
    name=cp_${attention}_N${N}_T${T}
    left=$((DEADLINE - SECONDS - 20))
    if [ $left -lt 60 ]; then echo "$name: no time left"; break 2; fi
    rm -rf runs/$name
    timeout -k 20 $left python3 experiments/train_lm.py --preset ${PRESET:-gpu} --attention $attention --seq-len $T \
      --batch-size 1 --mesh context=$N --steps $STEPS --eval-every $STEPS --eval-batches 1 --ckpt-every 0 --no-plot \
      --run-dir runs/$name ${EXTRA:-} > $OUT/a/$name.txt 2>&1
    if [ -e runs/$name/summary.json ]; then
      cp runs/$name/summary.json $OUT/a/$name.json && cp runs/$name/metrics.jsonl $OUT/a/$name.jsonl
      python3 -c "import json; s = json.load(open('runs/$name/summary.json')); print('$name', round(s['median_tokens_per_s']), 'tokens/s', round(s['median_step_s'], 3), 's/step', s['peak_memory_gib'], 'GiB')"
      rm -rf runs/$name  # its checkpoint: not needed
    else
      echo "$name: failed"; tail -c 600 $OUT/a/$name.txt; echo
      continue 2  # longer lengths of this attention would fail too
    fi
  done
done
cd $OUT && tar czf a$(date +%s).tgz a && rm -rf a
