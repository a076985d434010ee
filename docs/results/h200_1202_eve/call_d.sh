#!/usr/bin/env bash
# Branch gpu-combo (main + kl-fused + mgpu-fwd): KL + mgpu tests on the GPU, fused vs two-pass KL,
# the Mosaic GPU forward vs Triton, then training attention at 32K/128K with the fused KL.
set -u
export PYTHONPATH=$PWD
mkdir -p $OUT/d
T0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/d/smi.txt
timeout 120 python3 -m pytest -q -n 8 --dist loadfile -p no:cacheprovider tests/test_pallas_index_kl.py tests/test_mgpu_sparse_attention.py > $OUT/d/pytest.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 ))s"; tail -3 $OUT/d/pytest.txt
for T in 32768 131072; do timeout 85 python3 docs/results/h200_1202_eve/kl_fused_probe.py $T 2>&1 | grep -v Warn | tail -5 | tee -a $OUT/d/klprobe.txt; done
echo "probe done after $(( $(date +%s) - T0 ))s"
timeout 150 python3 experiments/bench_mgpu_fwd.py --out $OUT/d/mgpu > $OUT/d/mgpu.txt 2>&1
echo "mgpu rc $? after $(( $(date +%s) - T0 ))s"; grep -v Warn $OUT/d/mgpu.txt | tail -14
timeout 140 python3 experiments/bench_train.py --preset paper --seq-lens 32768 131072 --reps 3 --time-budget 6 --xla-max-T 8192 --no-train-step --out $OUT/d/train > $OUT/d/train.txt 2>&1
echo "train rc $? after $(( $(date +%s) - T0 ))s"; grep -a -E "T=|grad|speedup" $OUT/d/train.txt | tail -8
cd $OUT && tar czf d.tgz d && rm -rf d
