"""Time MSA prefill (index top-k + sparse main branch) against dense causal GQA attention.

For each sequence length: check every backend against the oracle on a small slice (fresh random
inputs), then time, with the dense baseline (cuDNN on a GPU) measured in the same process.
FLOPs follow MSA_SPEC eq. 12; ratios are quoted against the dense time of the same run.

    python experiments/bench_attention.py                       # CPU-sized smoke run
    python experiments/bench_attention.py --preset paper        # H_q 64 / H_kv 4 / D 128, T 8K..128K (GPU)

Writes runs/bench_attention/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import ops

PRESETS = {
    "cpu": dict(batch=1, heads=8, kv_heads=2, head_dim=64, index_dim=64, block_size=64, top_k=4, seq_lens=[1024, 2048]),
    "paper": dict(batch=1, heads=64, kv_heads=4, head_dim=128, index_dim=128, block_size=128, top_k=16,
                  seq_lens=[8192, 32768, 131072]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="head config and lengths")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override the preset's lengths")
    p.add_argument("--impls", nargs="+", default=list(ops.IMPLS), help="MSA backends to time")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--out", default="runs/bench_attention", help="output folder")
    return p.parse_args(argv)


def _inputs(key, cfg, T, dtype):
    B, Hq, R, D, Di = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["index_dim"]
    ks = jax.random.split(key, 5)
    shapes = [(B, T, Hq, D), (B, T, R, D), (B, T, R, D), (B, T, R, Di), (B, T, Di)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes)]


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _check(cfg, impl, dtype):
    """Max |impl - reference| of the MSA output on a small problem (fresh inputs)."""
    small = dict(cfg, batch=1)
    q, k, v, iq, ik = _inputs(jax.random.key(int(time.time())), small, 4 * cfg["block_size"] + 3, jnp.float32)
    kw = dict(block_size=cfg["block_size"], top_k=2)
    ref, idx = ops.msa_attention(q, k, v, iq, ik, impl="reference", **kw)
    out = ops.sparse_attention(q, k, v, idx, block_size=cfg["block_size"], impl=impl)
    return float(jnp.abs(out - ref).max())


def flops(cfg, T):
    Hq, R, D, Di, B, k = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["index_dim"], cfg["block_size"], cfg["top_k"]
    dense = 2 * Hq * D * T * T
    msa = R * Di * T * T + 4 * Hq * D * T * min(k * B, T)
    return cfg["batch"] * dense, cfg["batch"] * msa


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.seq_lens:
        cfg["seq_lens"] = args.seq_lens
    args.dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0].device_kind
    print(f"device: {device} | jax {jax.__version__} | {args.dtype} | {cfg}")
    kw = dict(block_size=cfg["block_size"], top_k=cfg["top_k"])
    rows = []
    for T in cfg["seq_lens"]:
        q, k, v, iq, ik = _inputs(jax.random.key(T), cfg, T, dtype)
        f_dense, f_msa = flops(cfg, T)
        dense_t = _time(jax.jit(lambda q, k, v: ops.dense_attention(q, k, v)), q, k, v, reps=args.reps)
        row = dict(T=T, dense_ms=dense_t * 1e3, dense_tflops=f_dense / dense_t / 1e12, flop_ratio=f_dense / f_msa)
        for impl in args.impls:
            err = _check(cfg, impl, dtype)
            msa = jax.jit(lambda q, k, v, iq, ik, impl=impl: ops.msa_attention(q, k, v, iq, ik, impl=impl, **kw)[0])
            sel = jax.jit(lambda iq, ik, impl=impl: ops.select_blocks(iq, ik, impl=impl, **kw))
            t_msa = _time(msa, q, k, v, iq, ik, reps=args.reps)
            t_sel = _time(sel, iq, ik, reps=args.reps)
            row[impl] = dict(max_err=err, msa_ms=t_msa * 1e3, select_ms=t_sel * 1e3, speedup=dense_t / t_msa)
        rows.append(row)
        print(json.dumps(row))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(device=device, jax=jax.__version__, dtype=args.dtype, config=cfg, rows=rows)
    (out / "results.json").write_text(json.dumps(result, indent=2))

    print(f"\n{'T':>8} {'dense ms':>10} {'TFLOP/s':>8} {'bound':>6}", end="")
    for impl in args.impls:
        print(f" | {impl + ' ms':>10} {'select':>8} {'vs dense':>8} {'err':>8}", end="")
    print()
    for r in rows:
        print(f"{r['T']:>8} {r['dense_ms']:>10.2f} {r['dense_tflops']:>8.1f} {r['flop_ratio']:>5.1f}x", end="")
        for impl in args.impls:
            m = r[impl]
            print(f" | {m['msa_ms']:>10.2f} {m['select_ms']:>8.2f} {m['speedup']:>7.2f}x {m['max_err']:>8.1e}", end="")
        print()
    print(f"results: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
