"""Sweep the tile and compiler settings of the KV-outer main-branch kernel on the GPU.

Times `pallas.sparse_attention.sparse_attention_fwd` (the KV-outer forward) for every combination of --block-q,
--num-warps, --num-stages and --query-chunk on the paper head config with the indexer's own
selection (random inputs), and reports effective TFLOP/s (4 * H_q * D per visible selected
(query, key) pair). Writes --out/tune.json and prints the table, best first.

    python experiments/tune_sparse_attention.py --seq-len 131072
    python experiments/tune_sparse_attention.py --preset cpu --seq-len 256 --block-q 8 --reps 1   # CPU smoke (interpreted)
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from msa_jax import ops
from msa_jax.bench import inputs, support_pairs, timeit
from msa_jax.presets import BENCH_SHAPES, HelpFormatter
from pallas import kv_outer
from pallas.sparse_attention import sparse_attention_fwd


def time_parts(q, k, idx, bs):
    """ms of the XLA parts of the kernel's default query chunk (reverse index; combine), times the
    chunk count: the settings the forward resolves for these inputs (`kv_outer.KVOuterConfig`)."""
    sz = kv_outer.sizes(q, k, idx, bs)
    plan = kv_outer.KVOuterConfig().resolve("fwd", sz, f32=q.dtype == jnp.float32)
    tc, bq = plan.t_chunk, plan.block_q
    ids = kv_outer.rows(kv_outer.clean_ids(idx[:, :tc], bs), sz.H_kv)  # [B*H_kv, tc, top_k]
    rev = jax.jit(lambda i: kv_outer.reverse_index(i, n_blocks=sz.n_blocks, bq=bq, n_tiles=plan.n_tiles))
    t_rev = timeit(rev, ids, reps=5, budget=5.0)[0]
    _, _, inv = rev(ids)
    P = plan.n_tiles * bq
    o_part = jnp.ones((sz.BH, P * sz.G_pad, sz.D_pad), q.dtype)
    lse_part = jnp.zeros((sz.BH, P * sz.G_pad), jnp.float32)
    comb = jax.jit(lambda o, l, i: kv_outer.combine_outputs(o, l, i, G_pad=sz.G_pad, out_dtype=q.dtype))
    t_comb = timeit(comb, o_part, lse_part, inv, reps=5, budget=5.0)[0]
    return dict(query_chunk=tc, n_chunks=plan.n_chunks, n_tiles=plan.n_tiles, partial_gb=o_part.nbytes / 1e9,
                reverse_index_ms=t_rev * 1e3 * plan.n_chunks, combine_ms=t_comb * 1e3 * plan.n_chunks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(BENCH_SHAPES), default="paper", help="head shapes (msa_jax.presets)")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--block-q", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--num-stages", type=int, nargs="+", default=[2])
    p.add_argument("--query-chunk", type=int, nargs="+", default=[0], help="0: the kernel's default")
    p.add_argument("--tiles-per-program", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the reverse index and the combine of one query chunk alone (default tiles)")
    p.add_argument("--out", default="runs/tune_sparse_attention")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and args.preset != "cpu":
        # the paper heads at these lengths in the Pallas interpreter take hours: a GPU sweep only
        print(f"no GPU (jax backend {jax.default_backend()!r}): this sweep times the kernel on a GPU; for an "
              "interpreted smoke run on a CPU use --preset cpu --seq-len 256 --block-q 8 --reps 1. Nothing to do.")
        return
    cfg, T = BENCH_SHAPES[args.preset], args.seq_len
    q, k, v, iq, ik = inputs(jax.random.key(T), cfg, T, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    bs = cfg["block_size"]
    idx = ops.select_blocks(iq, ik, block_size=bs, top_k=cfg["top_k"])
    flops = 4 * cfg["head_dim"] * support_pairs(idx, bs) * (cfg["heads"] // cfg["kv_heads"])
    rows = []
    grid = itertools.product(args.block_q, args.num_warps, args.num_stages, args.query_chunk, args.tiles_per_program)
    for bq, nw, ns, qc, nt in grid:
        kw = dict(block_size=bs, block_q=bq, num_warps=nw, num_stages=ns, query_chunk=qc or None, tiles_per_program=nt)
        fn = jax.jit(lambda q, k, v, i, kw=kw: sparse_attention_fwd(q, k, v, i, **kw)[0])
        try:
            t, n, _ = timeit(fn, q, k, v, idx, reps=args.reps, budget=10.0)
            row = dict(kw, ms=t * 1e3, tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001 - record and go on
            row = dict(kw, error=str(e)[:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    breakdown = time_parts(q, k, idx, bs) if args.breakdown else None
    if breakdown:
        print(json.dumps(breakdown))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(dict(T=T, device=jax.devices()[0].device_kind, rows=rows,
                                                   breakdown=breakdown), indent=1))
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"\nT={T} {jax.devices()[0].device_kind}")
    for r in ok:
        print(f"block_q {r['block_q']:>3} warps {r['num_warps']} stages {r['num_stages']} chunk {r['query_chunk']} "
              f"tiles/program {r['tiles_per_program']}: "
              f"{r['ms']:8.2f} ms {r['tflops']:6.1f} TF/s")


if __name__ == "__main__":
    main()
