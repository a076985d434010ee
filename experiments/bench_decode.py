"""MSA decode on the GPU: one new token against a KV + index-key cache, against dense decode.

Part 1, attention of one layer per (batch B, context L): every sequence holds L cached tokens and
decodes one new token at position L - 1 (paper heads with --preset paper). Timed in one process:
  dense   cuDNN (`jax.nn.dot_product_attention`, all L keys), the pure-JAX path (`impl="xla"`) and
          the Pallas split-K decode kernel (`impl="pallas"`); the fastest is the baseline.
  MSA     the Pallas decode kernels with bf16 and with fp8 (e4m3, per-token scale) index keys:
          index scan (scores + block max + split top-k + merge) and main branch (split-KV attention
          over the 16 selected blocks) timed apart and together; plus MSA in plain XLA.
Reported: ms per token, bytes moved (dense: the whole KV cache; MSA: every index key once + the
selected K/V blocks, docs/algorithm.md §5.2) and achieved bytes/s against the copy bandwidth
measured in the same run, and speedups over the fastest dense decode. Before timing, the Pallas
MSA decode is checked against the pure-JAX path on the same cache.

Part 2, whole models (`--model`, default the `gpu` preset: 16 / 4 heads of 64, 12 layers, 10 of
them MSA): a prompt of L random tokens is prefilled, then `msa_jax.generate` decodes; tokens/s of
dense against MSA (bf16 and fp8 index caches) at each (B, L) of `--model-lengths`.

    python experiments/bench_decode.py --preset cpu      # tiny smoke run (interpret mode off a GPU)
    python experiments/bench_decode.py --preset paper    # GPU: 64/4/128, B 1 / 8 / 32, L 32K .. 1M

Writes --out/results.json (after every measurement), --out/decode.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import ops, plots
from msa_jax.bench import cell, copy_bandwidth, fmt, guarded, log, timeit
from msa_jax.cache import quantize_index_keys
from msa_jax.presets import BENCH_SHAPES, RUN_PRESETS, HelpFormatter

DEFAULTS = {
    "cpu": dict(batches=[1, 2], lengths=[256, 512], model="tiny", model_lengths=[256], new_tokens=8),
    "paper": dict(batches=[1, 8, 32], lengths=[32768, 131072, 524288, 1048576], model="gpu",
                  model_lengths=[32768, 131072], new_tokens=64),
}
PAPER_SPEEDUP_1M = 7.6  # MSA paper, decode at 1M on an H800
TARGETS = {"bf16": 8.0, "fp8": 12.0}  # docs/benchmarking.md, at 1M, batch 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(BENCH_SHAPES), default="cpu", help="head shapes (msa_jax.presets)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the preset's)")
    p.add_argument("--lengths", type=int, nargs="+", help="cached context lengths (default: the preset's)")
    p.add_argument("--max-cache-gb", type=float, default=90.0, help="skip (B, L) whose KV + index caches exceed this")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    p.add_argument("--time-budget", type=float, default=5.0, help="seconds of timed runs per measurement at most")
    p.add_argument("--no-model", dest="model_part", action="store_false", help="skip part 2 (whole models)")
    p.add_argument("--breakdown", type=int, nargs="*", default=None,
                   help="also time the index scan alone with these n_splits, its candidate merge, and the "
                        "main branch with 4 and 16 splits (default n_splits when given without values)")
    p.add_argument("--model", choices=sorted(RUN_PRESETS), help="run preset of part 2's models")
    p.add_argument("--model-lengths", type=int, nargs="+", help="part 2 prompt lengths")
    p.add_argument("--model-batches", type=int, nargs="+", default=[1, 8], help="part 2 batch sizes")
    p.add_argument("--new-tokens", type=int, help="part 2 tokens generated per sequence")
    p.add_argument("--out", default="runs/bench_decode")
    return p.parse_args(argv)


def make_cache(key, shape, B, L, dtype):
    """q, k, v, iq, ik of one layer: the queries [B, 1, ...] of a token at position L - 1 and the caches."""
    Hq, R, D, Di = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["index_dim"]
    ks = jax.random.split(key, 5)
    shapes = [(B, 1, Hq, D), (B, L, R, D), (B, L, R, D), (B, 1, R, Di), (B, L, Di)]
    return [jax.random.normal(k, s, dtype) for k, s in zip(ks, shapes)]


def attention_fns(shape):
    bs, top_k = shape["block_size"], shape["top_k"]
    kw = dict(block_size=bs, top_k=top_k)

    def cudnn(q, k, v, pos):  # one query sees every cached key: causal attention of the newest token
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    return dict(
        dense_cudnn=jax.jit(cudnn),
        dense_xla=jax.jit(lambda q, k, v, pos: ops.dense_attention(q, k, v, q_pos=pos, impl="xla")),
        dense_pallas=jax.jit(lambda q, k, v, pos: ops.dense_attention(q, k, v, q_pos=pos, impl="pallas")),
        scan=jax.jit(lambda iq, ik, pos: ops.select_blocks(iq, ik, q_pos=pos, impl="pallas", **kw)),
        scan_fp8=jax.jit(lambda iq, ik, s, pos: ops.select_blocks(iq, ik, q_pos=pos, ik_scale=s, impl="pallas", **kw)),
        main=jax.jit(lambda q, k, v, idx, pos: ops.sparse_attention(q, k, v, idx, q_pos=pos, block_size=bs,
                                                                    impl="pallas")),
        msa=jax.jit(lambda q, k, v, iq, ik, pos: ops.msa_attention(q, k, v, iq, ik, q_pos=pos, impl="pallas", **kw)[0]),
        msa_fp8=jax.jit(lambda q, k, v, iq, ik, s, pos: ops.msa_attention(q, k, v, iq, ik, q_pos=pos, ik_scale=s,
                                                                          impl="pallas", **kw)[0]),
        msa_xla=jax.jit(lambda q, k, v, iq, ik, pos: ops.msa_attention(q, k, v, iq, ik, q_pos=pos, impl="xla", **kw)[0]),
    )


def bench_point(shape, B, L, dtype, fns, args, bandwidth):
    """Every timing of part 1 at (B, L)."""
    R, D, Di, bs, top_k = (shape[x] for x in ("kv_heads", "head_dim", "index_dim", "block_size", "top_k"))
    q, k, v, iq, ik = make_cache(jax.random.key(L + B), shape, B, L, dtype)
    ik8, scale = jax.jit(functools.partial(quantize_index_keys, dtype=jnp.float8_e4m3fn))(ik)
    pos = jnp.full((B, 1), L - 1, jnp.int32)
    tm = dict(reps=args.reps, budget=args.time_budget)
    s = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * B * L * R * D * s
    sel_bytes = 2 * B * R * min(top_k, -(-L // bs)) * bs * D * s  # the selected blocks of K and V
    row = dict(B=B, L=L, bytes=dict(kv_cache=kv_bytes, index_bf16=B * L * Di * s, index_fp8=B * L * (Di + 4),
                                    selected_kv=sel_bytes))

    def timed(name, fn, *a, n_bytes=None):
        def run():
            t, n, _ = timeit(fn, *a, **tm, group=10)
            out = dict(ms=t * 1e3, reps=n)
            if n_bytes:
                out.update(gb_per_s=n_bytes / t / 1e9, of_copy_bw=n_bytes / t / bandwidth)
            return out

        row[name] = guarded(f"B={B} L={L} {name}", run)

    if jax.default_backend() == "gpu":
        timed("dense_cudnn", fns["dense_cudnn"], q, k, v, pos, n_bytes=kv_bytes)
    else:  # cuDNN needs a GPU: not an error of the run
        row["dense_cudnn"] = dict(status="n/a")
    timed("dense_xla", fns["dense_xla"], q, k, v, pos, n_bytes=kv_bytes)
    timed("dense_pallas", fns["dense_pallas"], q, k, v, pos, n_bytes=kv_bytes)

    def check():  # pallas MSA decode against the pure-JAX path on the same cache
        a = fns["msa"](q, k, v, iq, ik, pos).astype(jnp.float32)
        b = fns["msa_xla"](q, k, v, iq, ik, pos).astype(jnp.float32)
        ia = np.sort(np.asarray(fns["scan"](iq, ik, pos)), -1)
        ib = np.sort(np.asarray(ops.select_blocks(iq, ik, q_pos=pos, impl="xla", block_size=bs, top_k=top_k)), -1)
        i8 = np.sort(np.asarray(fns["scan_fp8"](iq, ik8, scale, pos)), -1)
        return dict(max_abs_err=float(jnp.abs(a - b).max()), out_scale=float(jnp.abs(b).max()),
                    select_match=float((ia == ib).all(-1).mean()), fp8_select_match=float((i8 == ia).all(-1).mean()))

    row["check"] = guarded(f"B={B} L={L} check", check)
    idx = fns["scan"](iq, ik, pos)
    timed("scan_bf16", fns["scan"], iq, ik, pos, n_bytes=B * L * Di * s)
    timed("scan_fp8", fns["scan_fp8"], iq, ik8, scale, pos, n_bytes=B * L * (Di + 4))
    timed("main", fns["main"], q, k, v, idx, pos, n_bytes=sel_bytes)
    timed("msa_bf16", fns["msa"], q, k, v, iq, ik, pos, n_bytes=B * L * Di * s + sel_bytes)
    timed("msa_fp8", fns["msa_fp8"], q, k, v, iq, ik8, scale, pos, n_bytes=B * L * (Di + 4) + sel_bytes)
    timed("msa_xla", fns["msa_xla"], q, k, v, iq, ik, pos)
    if args.breakdown is not None:
        row["breakdown"] = breakdown(shape, B, L, q, k, v, iq, ik, idx, pos, args)
    dense = {n: row[n]["ms"] for n in ("dense_cudnn", "dense_xla", "dense_pallas") if row[n].get("status") == "ok"}
    if dense:
        best = min(dense, key=dense.get)
        row["fastest_dense"] = best
        for name in ("msa_bf16", "msa_fp8", "msa_xla"):
            if row[name].get("status") == "ok":
                row[name]["speedup"] = dense[best] / row[name]["ms"]
    row["byte_floor_speedup"] = {"bf16": kv_bytes / (B * L * Di * s + sel_bytes),
                                 "fp8": kv_bytes / (B * L * (Di + 4) + sel_bytes)}
    return row


def breakdown(shape, B, L, q, k, v, iq, ik, idx, pos, args):
    """ms of the index selection (scan + merge kernels) per n_splits, of the merge kernel alone, and of the main branch
    with 4 and 16 splits (a tuning aid: reads pallas.decode's internals)."""
    from pallas import decode

    bs, top_k = shape["block_size"], shape["top_k"]
    tm = dict(reps=args.reps, budget=args.time_budget)
    out = {}
    for n in args.breakdown or [None]:
        f = jax.jit(functools.partial(decode.decode_select_blocks, block_size=bs, top_k=top_k, n_splits=n))
        out[f"scan_splits_{n or 'default'}"] = guarded(
            "scan", lambda: dict(ms=timeit(f, iq, ik, pos, **tm, group=10)[0] * 1e3))
    n_def = decode.default_scan_splits(B, L // bs)
    R = iq.shape[1] * iq.shape[2]  # rows: queries x groups
    # the scan's candidates as the merge kernel reads them: [B, R_pad, S_pad, P], unique ids per row
    shape_c = (B, 16, decode.next_pow2(n_def), 16)
    vals = jax.random.normal(jax.random.key(0), shape_c, jnp.float32)
    ids = jnp.broadcast_to(jnp.arange(shape_c[2] * 16, dtype=jnp.int32).reshape(shape_c[2:]), shape_c)
    rows_pos = jnp.full((B, 16), L - 1, jnp.int32)
    merge = jax.jit(lambda v_, i_, p_: decode._merge_call(
        p_, v_, i_, R=R, n_splits=n_def, n_slots=top_k - 1, top_k=top_k, block_size=bs, local_blocks=1,
        interpret=decode._resolve_interpret(None)))
    out["merge_default_splits"] = guarded("merge", lambda: dict(
        ms=timeit(merge, vals, ids, rows_pos, **tm, group=10)[0] * 1e3, n_splits=n_def))
    for n in (4, 16):
        f = jax.jit(functools.partial(decode.decode_sparse_attention, block_size=bs, n_splits=n))
        out[f"main_splits_{n}"] = guarded(
            "main", lambda: dict(ms=timeit(f, q, k, v, idx, pos, **tm, group=10)[0] * 1e3))
    return out


def model_decode(args, preset, attention, B, L, index_dtype, dtype_name):
    """Whole-model decode tokens/s: prefill L random tokens, then generate (the second call is timed)."""
    from msa_jax.generate import generate
    from msa_jax.model import DecoderLM
    from msa_jax.presets import run_config

    run = run_config(preset, attention=attention, dtype=dtype_name)
    model = DecoderLM(run.model_config(), seed=0)
    prompts = [np.random.default_rng(b).integers(1, 256, size=L).astype(np.int32) for b in range(B)]
    kw = dict(max_new_tokens=args.new_tokens, index_cache_dtype=index_dtype, stream_every=args.new_tokens // 2)
    generate(model, prompts, **kw)  # compile
    res = generate(model, prompts, **kw)
    return dict(tokens_per_s=res.decode_tokens_per_s, ms_per_step=res.decode_s / max(res.decode_steps, 1) * 1e3,
                ttft_ms=res.ttft_s * 1e3, steps=res.decode_steps)


def print_tables(result):
    print(f"\n### Decode attention, one layer ({result['device']}, jax {result['jax']}, {result['dtype']}; copy "
          f"bandwidth {result['copy_bw_gb_s']:.0f} GB/s)\n")
    print("| B | L | cuDNN ms | xla ms | pallas dense ms | scan bf16 ms (% BW) | scan fp8 ms (% BW) | main ms | "
          "MSA bf16 ms | MSA fp8 ms | MSA xla ms | bf16 speedup | fp8 speedup | byte bound bf16 / fp8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["attention"]:
        if "error" in r:
            print(f"| {r['B']} | {r['L']} | {r['error']} |")
            continue
        pct = lambda n: f" ({100 * r[n]['of_copy_bw']:.0f}%)" if r[n].get("status") == "ok" else ""  # noqa: E731
        sp = lambda n: fmt(r[n].get("speedup"), 5)  # noqa: E731
        print(f"| {r['B']} | {r['L']} | {fmt(cell(r['dense_cudnn']))} | {fmt(cell(r['dense_xla']))} "
              f"| {fmt(cell(r['dense_pallas']))} | {fmt(cell(r['scan_bf16']))}{pct('scan_bf16')} "
              f"| {fmt(cell(r['scan_fp8']))}{pct('scan_fp8')} | {fmt(cell(r['main']))} | {fmt(cell(r['msa_bf16']))} "
              f"| {fmt(cell(r['msa_fp8']))} | {fmt(cell(r['msa_xla']))} | {sp('msa_bf16')}x | {sp('msa_fp8')}x "
              f"| {r['byte_floor_speedup']['bf16']:.1f}x / {r['byte_floor_speedup']['fp8']:.1f}x |")
    if result.get("model"):
        m = result["model"]
        print(f"\n### Whole-model decode ({m['preset']}: {m['desc']})\n")
        print("| B | L | dense tokens/s | MSA bf16 tokens/s | MSA fp8 tokens/s | MSA / dense |")
        print("|---|---|---|---|---|---|")
        for r in m["rows"]:
            d, a, b8 = (r.get(x, {}) for x in ("dense", "msa_bf16", "msa_fp8"))
            ratio = a["tokens_per_s"] / d["tokens_per_s"] if "tokens_per_s" in a and "tokens_per_s" in d else None
            print(f"| {r['B']} | {r['L']} | {fmt(cell(d, 'tokens_per_s'))} | {fmt(cell(a, 'tokens_per_s'))} "
                  f"| {fmt(cell(b8, 'tokens_per_s'))} | {fmt(ratio)} |")


def plot(result, path) -> bool:
    plt = plots.pyplot()
    if plt is None:
        return False

    rows = [r for r in result["attention"] if "error" not in r]
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, B in zip(axes[0], batches):
        sub = [r for r in rows if r["B"] == B]
        L = [r["L"] for r in sub]
        for name, style in (("msa_bf16", "o-"), ("msa_fp8", "s-"), ("msa_xla", "^:")):
            pts = [(r["L"], r[name]["speedup"]) for r in sub if "speedup" in r[name]]
            if pts:
                ax.plot(*zip(*pts), style, label=name.replace("_", " "))
        ax.plot(L, [r["byte_floor_speedup"]["bf16"] for r in sub], "k--", lw=1, label="byte bound, bf16 index keys")
        ax.plot(L, [r["byte_floor_speedup"]["fp8"] for r in sub], "k:", lw=1, label="byte bound, fp8 index keys")
        if B == 1:
            ax.plot([1 << 20], [PAPER_SPEEDUP_1M], "r*", ms=12, label="paper, 1M (H800)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="cached context L", ylabel="speedup over the fastest dense decode", title=f"batch {B}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"MSA decode, one layer, {result['device']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    d = DEFAULTS[args.preset]
    shape = BENCH_SHAPES[args.preset]
    batches, lengths = args.batches or d["batches"], args.lengths or d["lengths"]
    args.new_tokens = args.new_tokens or d["new_tokens"]
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth(1 << 32 if on_gpu else 1 << 26)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, dtype=jnp.dtype(dtype).name, shape=shape,
                  copy_bw_gb_s=bw / 1e9, attention=[], args=vars(args))

    def save():
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / "results.json")

    log(f"{result['device']} | jax {jax.__version__} | copy bandwidth {bw / 1e9:.0f} GB/s | {shape}")
    fns = attention_fns(shape)
    R, D, Di = shape["kv_heads"], shape["head_dim"], shape["index_dim"]
    for B in batches:
        for L in lengths:
            gb = B * L * (2 * R * D + Di) * jnp.dtype(dtype).itemsize / 1e9
            if gb > args.max_cache_gb:
                log(f"B={B} L={L}: {gb:.0f} GB of caches > --max-cache-gb, skipped")
                continue
            try:
                row = bench_point(shape, B, L, dtype, fns, args, bw)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory drawing the caches: record, go on
                row = dict(B=B, L=L, error=f"{type(e).__name__}: {str(e)[:200]}")
            result["attention"].append(row)
            save()
            log(json.dumps({k: (v.get("ms") if isinstance(v, dict) and "ms" in v else v) for k, v in row.items()
                            if k not in ("bytes",)}))
    if args.model_part:
        preset = args.model or d["model"]
        mcfg = RUN_PRESETS[preset]
        desc = (f"{mcfg.get('n_layers', 2)} layers, d_model {mcfg.get('d_model', 64)}, heads {mcfg.get('n_heads', 4)}/"
                f"{mcfg.get('n_kv_heads', 2)} of {mcfg.get('head_dim', 16)}, {mcfg.get('n_dense_layers', 0)} dense")
        result["model"] = dict(preset=preset, desc=desc, rows=[])
        dtype_name = "bfloat16" if on_gpu else "float32"
        for B in args.model_batches:
            for L in args.model_lengths or d["model_lengths"]:
                r = dict(B=B, L=L)
                r["dense"] = guarded(f"model dense B={B} L={L}", lambda: model_decode(
                    args, preset, "dense", B, L, None, dtype_name))
                r["msa_bf16"] = guarded(f"model msa B={B} L={L}", lambda: model_decode(
                    args, preset, "msa", B, L, None, dtype_name))
                r["msa_fp8"] = guarded(f"model msa fp8 B={B} L={L}", lambda: model_decode(
                    args, preset, "msa", B, L, "float8_e4m3fn", dtype_name))
                result["model"]["rows"].append(r)
                save()
                log(json.dumps(r))
    save()
    print_tables(result)
    if plot(result, out / "decode.png"):
        print(f"\nwrote {out / 'results.json'} and {out / 'decode.png'}")
    return result


if __name__ == "__main__":
    main()
