#!/usr/bin/env bash
# main + kl-fused + mgpu forward wired in (fwd_kernel auto): GPU tests of the forward paths, then
# prefill and training attention at 32K/128K and whole-model train steps (gpu preset).
set -u
export PYTHONPATH=$PWD
mkdir -p $OUT/e
T0=$(date +%s)
timeout 130 python3 -m pytest -q -n 8 --dist loadfile -p no:cacheprovider tests/test_pallas_sparse_attention.py tests/test_mgpu_sparse_attention.py tests/test_ops_cached.py > $OUT/e/pytest.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 ))s"; tail -3 $OUT/e/pytest.txt; grep -E "^FAILED" $OUT/e/pytest.txt | head
timeout 120 python3 experiments/bench_prefill.py --preset paper --seq-lens 32768 131072 --reps 5 --time-budget 4 --xla-max-T 8192 --out $OUT/e/prefill > $OUT/e/prefill.txt 2>&1
echo "prefill rc $? after $(( $(date +%s) - T0 ))s"; grep -a -E "speedup|T=131072" $OUT/e/prefill.txt | tail -3
timeout 300 python3 experiments/bench_train.py --preset paper --seq-lens 32768 131072 --reps 3 --time-budget 6 --xla-max-T 8192 --train-model gpu --train-T 32768 131072 --out $OUT/e/train > $OUT/e/train.txt 2>&1
echo "train rc $? after $(( $(date +%s) - T0 ))s"; grep -a -E "train step|tokens/s" $OUT/e/train.txt | tail -6
cd $OUT && tar czf e.tgz e && rm -rf e
