"""MSA prefill on the GPU: the Pallas indexer + main branch against dense cuDNN, by context length.

For each T: dense causal GQA (cuDNN, bf16) timed in the same process; MSA with `impl="xla"` (up to
--xla-max-T); MSA with `impl="pallas"` split into the indexer (fused scores + block max + top-k)
and the main branch, the latter on two selection patterns (docs/benchmarking.md):
  indexer  the block ids the indexer picks on random inputs (scattered, a few recent blocks);
  skewed   every query picks the first `--hot` blocks (hot blocks, the hard case for KV-outer
           kernels), its local block, and random others.
Reported: times, speedup over dense (indexer + main vs dense), each stage's floor on the card
(`msa_jax.bench.stage_floors`: FLOPs at the measured bf16 matmul rate or bytes at the measured copy
bandwidth, whichever is longer), effective TFLOP/s of each part
(indexer: H_kv * D_idx * T^2 FLOPs as in docs/algorithm.md §5; main branch: 4 * H_q * D per (query,
visible selected key) pair, counted from the actual selection, so causal padding is not counted),
the FLOP-ratio bound of docs/algorithm.md §5, and `impl="auto"` end to end (dense attention where
T <= top_k * block_size, since every query then selects all its blocks; the kernels beyond). Before timing, every backend is checked against
the oracle on a small slice, and the pallas main branch against xla on the first query chunk.

    python experiments/bench_prefill.py --preset cpu           # tiny smoke run (interpret mode off a GPU)
    python experiments/bench_prefill.py --preset paper         # GPU: 64/4/128, T 8K .. 1M

With --profile, also each MSA stage's kernels (GPU time per call from a `jax.profiler` trace:
`msa_jax.bench.kernel_profile`), printed and kept in results.json ("profile"): where the main
branch's time goes (tile kernel, combine, layout copies, reverse index).

Writes --out/results.json (rewritten after every length), --out/speedup.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import ops, plots
from msa_jax.bench import (card_rates, flop_bound, inputs, main_fwd_kernel, profile_stages, skewed_selection, stage_floors,
                           support_pairs, timeit)
from msa_jax.presets import BENCH_SHAPES, HelpFormatter

SEQ_LENS = {"cpu": [128, 256], "paper": [2048, 8192, 32768, 131072, 524288, 1048576]}
PAPER_SPEEDUP_1M = 14.2  # MSA paper, prefill at 1M on H800


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(BENCH_SHAPES), default="cpu", help="head shapes (msa_jax.presets)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override the preset's lengths")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median); fewer where one run is long")
    p.add_argument("--time-budget", type=float, default=20.0, help="seconds of timed runs per measurement at most")
    p.add_argument("--xla-max-T", type=int, default=131072, help="time impl=xla up to this length")
    p.add_argument("--hot", type=int, default=4, help="hot blocks in the skewed pattern")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, f32 off it")
    p.add_argument("--profile", action="store_true",
                   help="also trace the indexer and the main branch once per length: time per kernel")
    p.add_argument("--out", default="runs/bench_prefill")
    return p.parse_args(argv)


def check_small(cfg, dtype_name):
    """Max |impl - oracle| of msa_attention, and select_blocks set agreement, on fresh small inputs."""
    small = dict(cfg, batch=2)
    T = 3 * cfg["block_size"] + 5
    q, k, v, iq, ik = inputs(jax.random.key(int(time.time())), small, T, jnp.float32)
    kw = dict(block_size=cfg["block_size"], top_k=min(cfg["top_k"], 3))
    out = {}
    with jax.default_matmul_precision("highest"):  # the GPU's default f32 matmuls are TF32
        ref, ref_idx = ops.msa_attention(q, k, v, iq, ik, impl="reference", **kw)
    for impl in ("xla", "pallas"):
        with jax.default_matmul_precision("highest"):
            o, idx = ops.msa_attention(q, k, v, iq, ik, impl=impl, **kw)
        same = np.sort(np.asarray(idx), -1) == np.sort(np.asarray(ref_idx), -1)
        out[impl] = dict(max_err=float(jnp.abs(o - ref).max()), select_match=float(same.all(-1).mean()))
    return out


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(BENCH_SHAPES[args.preset], seq_lens=args.seq_lens or SEQ_LENS[args.preset])
    on_gpu = jax.default_backend() == "gpu"
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = jnp.dtype(dtype_name)
    device = jax.devices()[0].device_kind
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {device} | jax {jax.__version__} | {dtype_name} | {cfg}")
    checks = check_small(cfg, dtype_name)
    print(f"oracle check (f32, T={3 * cfg['block_size'] + 5}): {checks}")
    bs, topk = cfg["block_size"], cfg["top_k"]
    kw = dict(block_size=bs, top_k=topk)
    rates = card_rates()
    print(f"card: copy {rates['copy_gb_s']:.0f} GB/s, bf16 matmul {rates['matmul_tflops']:.3g} TFLOP/s (the floors' rates)")
    result = dict(device=device, jax=jax.__version__, dtype=dtype_name, config=cfg, checks=checks, rates=rates, rows=[],
                  main_fwd_kernel=main_fwd_kernel(cfg, dtype))
    print(f"main-branch forward tile kernel (impl pallas): {result['main_fwd_kernel']}")

    dense_fn = jax.jit(lambda q, k, v: ops.dense_attention(q, k, v))
    sel_fn = jax.jit(lambda iq, ik: ops.select_blocks(iq, ik, impl="pallas", **kw))
    main_fn = jax.jit(lambda q, k, v, idx: ops.sparse_attention(q, k, v, idx, block_size=bs, impl="pallas"))
    xla_fn = jax.jit(lambda q, k, v, iq, ik: ops.msa_attention(q, k, v, iq, ik, impl="xla", **kw)[0])
    auto_fn = jax.jit(lambda q, k, v, iq, ik: ops.msa_attention(q, k, v, iq, ik, impl="auto", **kw)[0])
    main_xla = jax.jit(lambda q, k, v, idx: ops.sparse_attention(q, k, v, idx, block_size=bs, impl="xla"))

    for T in cfg["seq_lens"]:
        try:
            row = bench_length(cfg, T, dtype, args, fns=(dense_fn, sel_fn, main_fn, xla_fn, main_xla, auto_fn),
                               rates=rates)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the longest lengths: record, go on
            row = dict(T=T, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"T={T}: {row['error']}", flush=True)
            result.setdefault("errors", []).append(row)
            continue
        result["rows"].append(row)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)

    print_table(result)
    if plot(result, out / "speedup.png"):
        print(f"wrote {out / 'results.json'} and {out / 'speedup.png'}")
    return result


def bench_length(cfg, T, dtype, args, fns, rates):
    """One row of the table: every timing at context length T, and each stage's floor on the card."""
    dense_fn, sel_fn, main_fn, xla_fn, main_xla, auto_fn = fns
    bs = cfg["block_size"]
    q, k, v, iq, ik = inputs(jax.random.key(T), cfg, T, dtype)
    tm = dict(reps=args.reps, budget=args.time_budget)
    row = dict(T=T, flop_bound=flop_bound(cfg, T))
    f_dense = cfg["batch"] * 2 * cfg["heads"] * cfg["head_dim"] * T * T
    t, n, _ = timeit(dense_fn, q, k, v, **tm)
    row["dense"] = dict(ms=t * 1e3, tflops=f_dense / t / 1e12, reps=n)

    idx = sel_fn(iq, ik)
    f_index = cfg["batch"] * cfg["kv_heads"] * cfg["index_dim"] * T * T
    t_sel, n, _ = timeit(sel_fn, iq, ik, **tm)
    row["indexer"] = dict(ms=t_sel * 1e3, tflops=f_index / t_sel / 1e12, reps=n)
    patterns = {"indexer": idx, "skewed": skewed_selection(jax.random.key(T + 1), cfg, T, args.hot)}
    for name, sel in patterns.items():
        pairs = support_pairs(sel, bs) * (cfg["heads"] // cfg["kv_heads"])
        f_main = 4 * cfg["head_dim"] * pairs
        t_main, n, _ = timeit(main_fn, q, k, v, sel, **tm)
        total = t_sel + t_main
        row[f"main_{name}"] = dict(ms=t_main * 1e3, tflops=f_main / t_main / 1e12, reps=n,
                                   total_ms=total * 1e3, speedup=row["dense"]["ms"] / (total * 1e3))
        if name == "indexer":
            row["floors"] = stage_floors(cfg, T, support_pairs(sel, bs), rates, jnp.dtype(dtype).itemsize)
    if args.profile:  # the kernels behind the indexer and main branch times (indexer selection)
        row["profile"] = profile_stages(dict(indexer=(sel_fn, (iq, ik)), main=(main_fn, (q, k, v, idx))), f"T={T} ")
    # pallas main branch vs xla on the first queries (same selection): a correctness check at scale
    Tc = min(T, 8192)
    sl = lambda x: x[:, :Tc]
    err = jnp.abs(main_fn(sl(q), sl(k), sl(v), sl(idx)).astype(jnp.float32)
                  - main_xla(sl(q), sl(k), sl(v), sl(idx)).astype(jnp.float32)).max()
    row["pallas_vs_xla_max_err"] = float(err)
    # impl="auto": the Pallas kernels, or dense attention where every query selects all its blocks
    t, n, _ = timeit(auto_fn, q, k, v, iq, ik, **tm)
    row["auto"] = dict(ms=t * 1e3, speedup=row["dense"]["ms"] / (t * 1e3), reps=n,
                       path="dense" if ops.selects_every_block(T, bs, cfg["top_k"])
                       else ops._backend("auto", bs).__name__.rsplit(".", 1)[-1].removesuffix("_backend"))
    if T <= args.xla_max_T:
        t, n, _ = timeit(xla_fn, q, k, v, iq, ik, **tm)
        row["xla"] = dict(ms=t * 1e3, speedup=row["dense"]["ms"] / (t * 1e3), reps=n)
    return row


def print_table(result):
    hdr = (f"{'T':>8} | {'dense ms':>9} {'TF/s':>5} | {'indexer ms':>10} {'TF/s':>5} | {'main ms':>8} {'TF/s':>5} "
           f"{'speedup':>7} | {'skewed main':>11} {'TF/s':>5} {'speedup':>7} | {'auto':>6} | {'xla':>7} | {'bound':>5} | "
           f"{'floors ms: dense':>16} {'indexer':>7} {'main':>6}")
    print(f"\n{result['device']}, jax {result['jax']}, {result['dtype']}\n{hdr}\n{'-' * len(hdr)}")
    for r in result["rows"]:
        a, b = r["main_indexer"], r["main_skewed"]
        xla = f"{r['xla']['speedup']:>6.2f}x" if "xla" in r else f"{'-':>7}"
        print(f"{r['T']:>8} | {r['dense']['ms']:>9.2f} {r['dense']['tflops']:>5.3g} | {r['indexer']['ms']:>10.2f} "
              f"{r['indexer']['tflops']:>5.3g} | {a['ms']:>8.2f} {a['tflops']:>5.3g} {a['speedup']:>6.2f}x | "
              f"{b['ms']:>11.2f} {b['tflops']:>5.3g} {b['speedup']:>6.2f}x | {r['auto']['speedup']:>5.2f}x | {xla} | "
              f"{r['flop_bound']:>4.1f}x | "
              + " ".join(f"{r['floors'][st]['floor_ms']:>{w}.3g}" for st, w in (("dense", 16), ("indexer", 7), ("main", 6))))


def plot(result, path) -> bool:
    plt = plots.pyplot()
    if plt is None:
        return False

    rows = result["rows"]
    T = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(T, [r["flop_bound"] for r in rows], "k--", label="FLOP-ratio bound (docs/algorithm.md §5)")
    ax.plot(T, [r["main_indexer"]["speedup"] for r in rows], "o-", label="pallas (indexer selection)")
    ax.plot(T, [r["main_skewed"]["speedup"] for r in rows], "s-", label="pallas (skewed, hot blocks)")
    ax.plot(T, [r["auto"]["speedup"] for r in rows], "d:", label='impl="auto" (dense where T <= top_k * block_size)')
    xs = [r for r in rows if "xla" in r]
    if xs:
        ax.plot([r["T"] for r in xs], [r["xla"]["speedup"] for r in xs], "^-", label="xla")
    ax.plot([1 << 20], [PAPER_SPEEDUP_1M], "r*", ms=12, label="paper, 1M (H800)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="context length T", ylabel="speedup over dense cuDNN (prefill fwd)",
           title=f"MSA prefill, {result['device']}, {result['dtype']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
