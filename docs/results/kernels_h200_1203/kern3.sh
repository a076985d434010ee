#!/usr/bin/env bash
# Issue 13's last checks (Session C). Call 1: bash _gpu/kern3.sh suite   (~8 min: the whole suite on the card)
#                                     Call 2: bash _gpu/kern3.sh profile (~5 min: q_in_place / L2 / training profile)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/k3
case "${1:-suite}" in
suite)
  MSA_GPU_PARTS=tests timeout 560 .ci/gpu $OUT/k3/ci > $OUT/k3/ci.txt 2>&1; echo "ci rc $?"
  grep -E "passed|failed|error" $OUT/k3/ci.txt | tail -5 ;;
profile)
  timeout 170 python3 _gpu/prof_fwd.py 131072 $OUT/k3/pf.json default,rows,qc2048,qc1024 > $OUT/k3/pf.txt 2>&1
  echo "prof_fwd rc $?"; grep -v -i warn $OUT/k3/pf.txt | grep -E "^==|msa_|fusion" | head -40
  timeout 300 python3 experiments/bench_train.py --preset paper --seq-lens 131072 --reps 3 --time-budget 6 \
    --xla-max-T 8192 --no-train-step --profile --out $OUT/k3/bt > $OUT/k3/bt.txt 2>&1
  echo "bench_train rc $?"; grep -v -i warn $OUT/k3/bt.txt | tail -40 ;;
esac
cd $OUT && tar czf k3_$(date +%s).tgz k3 && rm -rf k3
