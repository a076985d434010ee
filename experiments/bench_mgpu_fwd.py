"""Main-branch forward on an H100/H200: the Triton KV-outer kernel against the Mosaic GPU kernel.

At the paper heads (B 1, H_q 64, H_kv 4, D 128, block 128, top 16, bf16) and each --seq-len, with
the indexer's selection (`pallas.index_topk.select_blocks` on random iq, ik):
  triton       `pallas.sparse_attention.sparse_attention_fwd` (default settings), end to end
  mgpu         `pallas.mgpu_sparse_attention.sparse_attention_fwd_mgpu`, end to end, for every
               --tiles-per-program x --q-slots
  *_tile       the tile kernel alone on the middle query chunk (reverse index, q layout and row
               positions built beforehand), times the number of chunks: the Triton `_fwd_kernel`
               (the pallas_call of `sparse_attention._chunk_fwd`) and the Mosaic GPU kernel
               (`mgpu_sparse_attention.tile_partials`) on the same index
Reported: ms, effective TFLOP/s (4 * H_q * D per visible selected (query, key) pair), the max
|out| and |lse| differences of each mgpu run against triton (error > 2e-2 on out or 1e-3 on lse is
flagged), the floor of the tile kernel on the card (FLOPs at the measured bf16 matmul rate or the
bytes of gathered q rows in + partials out at the measured copy bandwidth: `msa_jax.bench`). Before
timing, a small case (T 2000, so that blocks change inside CTAs; with --pingpong that variant too) runs
in a subprocess with a time limit, so that a kernel that hangs (a barrier protocol error) costs
--smoke-timeout seconds, not the session.

    python experiments/bench_mgpu_fwd.py                         # GPU: T 32K and 128K, ~3-5 min
    python experiments/bench_mgpu_fwd.py --smoke                 # CPU: tiny shapes, Mosaic GPU interpreter

Writes --out/results.json (rewritten after every length) and prints a table. Without a GPU and
without --smoke it says so and exits.
"""

from __future__ import annotations

import os

# The Mosaic GPU interpreter (--smoke on a CPU) deadlocks under XLA:CPU's concurrency-optimised
# scheduler on small machines; the flag only matters for CPU computations and must be set before jax starts.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from msa_jax.bench import card_rates, floor_ms, guarded, inputs, log, support_pairs, timeit  # noqa: E402
from msa_jax.presets import BENCH_SHAPES, HelpFormatter  # noqa: E402
from pallas import kv_outer as kvo  # noqa: E402
from pallas import mgpu_sparse_attention as mg  # noqa: E402
from pallas import sparse_attention as sa  # noqa: E402
from pallas.index_topk import select_blocks  # noqa: E402

SMOKE_SHAPE = dict(batch=1, heads=32, kv_heads=2, head_dim=64, index_dim=32, block_size=128, top_k=3)


def triton_tile_partials(posc, tiles, tok, qg, kg, vg, *, sz: kvo.Sizes, bq: int, D: int, interpret: bool = False):
    """The Triton tile kernel alone on one chunk (the pallas_call of `sparse_attention._chunk_fwd`,
    its default settings: one tile per program, 8 warps, 2 stages)."""
    Tc, n_tiles, G_pad, D_pad = posc.shape[1], tiles.shape[1], sz.G_pad, sz.D_pad
    M = bq * G_pad
    kernel = functools.partial(sa._fwd_kernel, scale=D**-0.5, block_size=sz.block_size, kv_tile=sz.kv_tile,
                               heads=G_pad, tiles_per_program=1)
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, sz.BH),
        in_specs=[
            pl.BlockSpec((None, Tc), lambda t, bh: (bh // sz.H_kv, 0)),
            pl.BlockSpec((None, n_tiles), lambda t, bh: (bh, 0)),
            pl.BlockSpec((None, bq), lambda t, bh: (bh, t)),
            pl.BlockSpec((None, Tc * G_pad, D_pad), lambda t, bh: (bh, 0, 0)),
            pl.BlockSpec((None, kg.shape[1], D_pad), lambda t, bh: (bh, 0, 0)),
            pl.BlockSpec((None, vg.shape[1], D_pad), lambda t, bh: (bh, 0, 0)),
        ],
        out_specs=[pl.BlockSpec((None, M, D_pad), lambda t, bh: (bh, t, 0)),
                   pl.BlockSpec((None, M), lambda t, bh: (bh, t))],
        out_shape=[jax.ShapeDtypeStruct((sz.BH, n_tiles * M, D_pad), qg.dtype),
                   jax.ShapeDtypeStruct((sz.BH, n_tiles * M), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=2),
        interpret=interpret,
        name="bench_triton_tile",
    )(posc, tiles, tok, qg, kg, vg)


def tile_inputs(q, k, v, idx, *, bs: int, plan: kvo.Plan):
    """The middle query chunk's tile-kernel operands (as `_chunk_fwd` builds them) and the chunk count."""
    sz = kvo.sizes(q, k, idx, bs)
    T_pad = plan.n_chunks * plan.t_chunk
    pos = kvo.positions(None, sz.B, sz.T)
    ids = kvo.clean_ids(idx, bs, pos)
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    c = plan.n_chunks // 2
    sl = slice(c * plan.t_chunk, (c + 1) * plan.t_chunk)
    posc = kvo.pad_time(pos, T_pad, -1)[:, sl]
    qc = kvo.pad_time(q, T_pad)[:, sl]
    qg = kvo.rows(qc, sz.H_kv, sz.G_pad, sz.D_pad)
    kg, vg = (kvo.kv_layout(x, sz.T_kv_pad, sz.D_pad) for x in (k, v))
    tiles, tok = index.tiles[c], index.tok[c]
    rpos = mg.row_positions(tok, posc, H_kv=sz.H_kv, G_pad=sz.G_pad)
    live = int(jnp.sum(tiles >= 0))
    pad = int(jnp.sum(tok < 0)) - (tiles.size - live) * plan.block_q  # padding positions of live tiles
    return dict(posc=posc, tiles=tiles, tok=tok, rpos=rpos, qg=qg, kg=kg, vg=vg), sz, live, pad


def check(a_out, a_lse, b_out, b_lse) -> dict:
    d_out = float(jnp.max(jnp.abs(a_out.astype(jnp.float32) - b_out.astype(jnp.float32))))
    fin = jnp.isfinite(b_lse)
    d_lse = float(jnp.max(jnp.where(fin, jnp.abs(a_lse - b_lse), 0.0)))
    same_inf = bool(jnp.all(jnp.isfinite(a_lse) == fin))
    return dict(out_maxdiff=d_out, lse_maxdiff=d_lse, lse_inf_match=same_inf,
                flagged=bool(d_out > 2e-2 or d_lse > 1e-3 or not same_inf))


def smoke(timeout: int, pingpong: bool = False) -> dict:
    """A small GPU case in a child process with a time limit (a hang costs `timeout` seconds)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-smoke"] + (["--pingpong"] if pingpong else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", error=f"no result after {timeout} s: the kernel may hang")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return dict(status="error", error=(proc.stdout + proc.stderr)[-1500:])
    return json.loads(lines[-1])


def child_smoke(shape=None, T: int = 2000, pingpong: bool = False) -> dict:
    """mgpu against triton on a small case (also the CPU --smoke run, interpreted)."""
    shape = shape or dict(BENCH_SHAPES["paper"])
    q, k, v, iq, ik = inputs(jax.random.key(1), shape, T, jnp.bfloat16)
    idx = select_blocks(iq, ik, block_size=shape["block_size"], top_k=shape["top_k"])
    out, lse = sa.sparse_attention_fwd(q, k, v, idx, block_size=shape["block_size"], fwd_kernel="triton")
    res = {}
    for nt, pp in [(4, False), (16, False)] + [(16, True)] * pingpong:  # each timed variant runs here first
        m_out, m_lse = mg.sparse_attention_fwd_mgpu(q, k, v, idx, block_size=shape["block_size"],
                                                    config=mg.MGPUConfig(tiles_per_program=nt, pingpong=pp))
        res[f"nt{nt}" + "_pingpong" * pp] = check(m_out, m_lse, out, lse)
    res["status"] = "ok" if not any(r["flagged"] for r in res.values()) else "mismatch"
    return res


def bench_length(T: int, args, rates, shape=None, interpret: bool = False) -> dict:
    shape = shape or BENCH_SHAPES["paper"]
    bs = shape["block_size"]
    q, k, v, iq, ik = inputs(jax.random.key(T), shape, T, jnp.bfloat16)
    idx = jax.block_until_ready(select_blocks(iq, ik, block_size=bs, top_k=shape["top_k"]))
    del iq, ik
    flops = 4 * shape["head_dim"] * (shape["heads"] // shape["kv_heads"]) * support_pairs(idx, bs)
    row = dict(T=T, gflop=flops / 1e9)
    tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731

    ref = {}

    def triton():
        fn = jax.jit(lambda q, k, v, i: sa.sparse_attention_fwd(q, k, v, i, block_size=bs, fwd_kernel="triton"))
        t, n, first = timeit(fn, q, k, v, idx, reps=args.reps, budget=args.budget)
        ref["out"], ref["lse"] = fn(q, k, v, idx)
        return dict(ms=t * 1e3, tflops=tf(t * 1e3), n=n, first_s=first)

    row["triton"] = guarded(f"T={T} triton", triton)
    log(f"T={T} triton {row['triton'].get('ms')} ms")

    row["mgpu"] = []
    variants = [dict()] + ([dict(approx_math=True)] if args.approx_math else []) + (
        [dict(regs_a=False)] if args.p_through_smem else []) + ([dict(pingpong=True)] if args.pingpong else [])
    for nt, qs, var in itertools.product(args.tiles_per_program, args.q_slots, variants):
        config = mg.MGPUConfig(tiles_per_program=nt, q_slots=qs, **var)

        def mgpu(config=config):
            fn = jax.jit(lambda q, k, v, i: mg.sparse_attention_fwd_mgpu(q, k, v, i, block_size=bs, config=config,
                                                                       interpret=interpret))
            t, n, first = timeit(fn, q, k, v, idx, reps=args.reps, budget=args.budget)
            res = dict(ms=t * 1e3, tflops=tf(t * 1e3), n=n, first_s=first)
            if ref:
                res.update(check(*fn(q, k, v, idx), ref["out"], ref["lse"]))
            return res

        what = f"T={T} mgpu nt={nt} q_slots={qs} {var or ''}"
        r = dict(tiles_per_program=nt, q_slots=qs, **var, **guarded(what, mgpu))
        row["mgpu"].append(r)
        log(f"{what}: {r.get('ms')} ms, diff {r.get('out_maxdiff')}")
    ref.clear()

    # The tile kernels alone, on the middle chunk of the mgpu plan's index (BQ = 8 for both kernels).
    sz = kvo.sizes(q, k, idx, bs)
    nt0 = args.tiles_per_program[0]
    plan = mg.plan_for(sz, mg.MGPUConfig(tiles_per_program=nt0), interpret)
    opnds, sz, live, pad = tile_inputs(q, k, v, idx, bs=bs, plan=plan)
    nc = plan.n_chunks
    P = plan.n_tiles * plan.block_q
    n_bytes = (live * 128 * sz.D_pad * 2) * 2 * nc  # gathered q rows in + bf16 partials out (live tiles)
    row["tile_plan"] = dict(n_chunks=nc, t_chunk=plan.t_chunk, n_tiles=plan.n_tiles, live_tiles=live,
                            padding_frac=pad / max(1, live * plan.block_q),
                            partial_gb=sz.BH * P * sz.G_pad * sz.D_pad * 2 / 1e9)
    row["tile_floor"] = floor_ms(flops, n_bytes, rates)

    def triton_tile():
        fn = jax.jit(functools.partial(triton_tile_partials, sz=sz, bq=plan.block_q, D=shape["head_dim"],
                                       interpret=interpret))
        a = (opnds["posc"], opnds["tiles"], opnds["tok"], opnds["qg"], opnds["kg"], opnds["vg"])
        t, n, _ = timeit(fn, *a, reps=args.reps, budget=args.budget)
        return dict(chunk_ms=t * 1e3, ms=t * 1e3 * nc, tflops=tf(t * 1e3 * nc), n=n)

    row["triton_tile"] = guarded(f"T={T} triton tile", triton_tile)
    row["mgpu_tile"] = []
    for nt, qs, pp in itertools.product(args.tiles_per_program, args.q_slots, [False, True][:1 + args.pingpong]):
        if plan.n_tiles % nt:
            continue

        def mgpu_tile(nt=nt, qs=qs, pp=pp):
            fn = jax.jit(functools.partial(mg.tile_partials, block_size=bs, G_pad=sz.G_pad, D_orig=shape["head_dim"],
                                           nt=nt, q_slots=qs, pingpong=pp, interpret=interpret))
            a = (opnds["tiles"], opnds["tok"], opnds["rpos"], opnds["qg"], opnds["kg"], opnds["vg"])
            t, n, _ = timeit(fn, *a, reps=args.reps, budget=args.budget)
            return dict(chunk_ms=t * 1e3, ms=t * 1e3 * nc, tflops=tf(t * 1e3 * nc), n=n)

        what = f"T={T} mgpu tile nt={nt} q_slots={qs}" + (" pingpong" if pp else "")
        r = dict(tiles_per_program=nt, q_slots=qs, **(dict(pingpong=True) if pp else {}), **guarded(what, mgpu_tile))
        row["mgpu_tile"].append(r)
        log(f"{what}: {r.get('ms')} ms")
    return row


def print_table(results: dict) -> None:
    ms = lambda m: f"{m['ms']:8.2f} ms" if m.get("status") == "ok" else f"{m.get('status', '-'):>11}"  # noqa: E731
    print(f"\n{results['device']}  {results.get('heads', 'paper heads, bf16')}  (ms; TFLOP/s effective)")
    for r in results["rows"]:
        fl = r["tile_floor"]
        print(f"T={r['T']:>7}  triton {ms(r['triton'])}   tile kernel floor {fl['floor_ms']:.2f} ms ({fl['bound']})")
        print(f"  triton tile (x{r['tile_plan']['n_chunks']} chunks) {ms(r['triton_tile'])}")
        for m in r["mgpu"]:
            var = "".join(f" {k}={m[k]}" for k in ("approx_math", "regs_a", "pingpong") if k in m)
            cfg = f"nt={m['tiles_per_program']:>2} q_slots={m['q_slots']}{var}"
            print(f"  mgpu {cfg}: {ms(m)} {m.get('tflops', 0):6.1f} TF/s  out diff {m.get('out_maxdiff')}"
                  f"  lse diff {m.get('lse_maxdiff')}{'  FLAGGED' if m.get('flagged') else ''}")
        for m in r["mgpu_tile"]:
            cfg = f"nt={m['tiles_per_program']:>2} q_slots={m['q_slots']}" + (" pingpong" if m.get("pingpong") else "")
            print(f"  mgpu tile {cfg}: {ms(m)} {m.get('tflops', 0):6.1f} TF/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--seq-len", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--tiles-per-program", type=int, nargs="+", default=[16, 32],
                   help="mgpu: consecutive tiles per CTA (multiples of 4)")
    p.add_argument("--q-slots", type=int, nargs="+", default=[2, 3], help="mgpu: q ring depth (2 or 3)")
    p.add_argument("--approx-math", action="store_true", help="mgpu: also time approx_math=True (end to end)")
    p.add_argument("--pingpong", action="store_true",
                   help="mgpu: also time MGPUConfig(pingpong=True), the consumers taking turns (end to end)")
    p.add_argument("--p-through-smem", action="store_true",
                   help="mgpu: also time regs_a=False (P staged through SMEM for its wgmma, the interpreter's variant)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timed runs per measurement")
    p.add_argument("--smoke-timeout", type=int, default=240, help="seconds for the GPU smoke subprocess")
    p.add_argument("--smoke", action="store_true", help="off a GPU: a tiny interpreted mgpu vs triton check, then exit")
    p.add_argument("--child-smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true",
                   help="off a GPU: the whole benchmark at T 300 on tiny heads, interpreted (~2 min)")
    p.add_argument("--out", default="runs/bench_mgpu_fwd")
    args = p.parse_args(argv)

    if args.child_smoke:
        print(json.dumps(child_smoke(pingpong=args.pingpong)), flush=True)
        return
    gpu = jax.default_backend() == "gpu"
    if not gpu and args.dry_run:
        args.reps, args.budget, args.tiles_per_program = 1, 0.0, [4]
        row = bench_length(300, args, card_rates(), shape=SMOKE_SHAPE, interpret=True)
        print(json.dumps(row, indent=1))
        results = dict(device="cpu (interpreted)", heads=f"tiny heads {SMOKE_SHAPE}", rows=[row])
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print_table(results)
        runs = row["mgpu"] + row["mgpu_tile"] + [row["triton"], row["triton_tile"]]
        bad = [m for m in runs if m.get("status") != "ok"]
        if bad or any(m.get("flagged") for m in row["mgpu"]):
            raise SystemExit(1)
        return
    if not gpu:
        if not args.smoke:
            print(f"no GPU (jax backend {jax.default_backend()!r}): this benchmark times Mosaic GPU and Triton "
                  "kernels on an H100/H200; --smoke runs a tiny interpreted check instead. Nothing to do.")
            return
        log("smoke: Mosaic GPU interpreter vs Triton interpreter, tiny shapes")
        res = child_smoke(SMOKE_SHAPE, T=300, pingpong=args.pingpong)
        print(json.dumps(res))
        if res["status"] != "ok":
            raise SystemExit(1)
        return

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=BENCH_SHAPES["paper"], rows=[])
    log("smoke: T=2000 in a subprocess")
    results["smoke"] = smoke(args.smoke_timeout, args.pingpong)
    log(f"smoke: {json.dumps(results['smoke'])[:400]}")
    results["rates"] = rates = card_rates()
    log(f"card: {rates}")
    if results["smoke"].get("status") not in ("ok", "mismatch"):
        log("the mgpu kernel failed or hung on the smoke case: timing triton only")
        args.tiles_per_program, args.q_slots = [], []
    for T in args.seq_len:
        results["rows"].append(bench_length(T, args, rates))
        (out / "results.json").write_text(json.dumps(results, indent=1))

    print_table(results)
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
