"""MSA training cost against dense: attention forward+backward by context length, then whole train steps.

Part 1, attention fwd+bwd per T (paper heads with --preset paper). The loss is sum(out * dout) with
a fixed random cotangent dout, so its gradient is exactly the attention backward for dout.
  dense    value_and_grad w.r.t. (q, k, v) of dense_attention(impl="auto") (cuDNN on a GPU, bf16).
  MSA      per --impls: block_idx = select_blocks(stop_gradient(iq), stop_gradient(ik)) (no grad),
           loss = sum(sparse_attention(q, k, v, block_idx) * dout) + index_kl_loss(q, k, iq, ik,
           block_idx), grad w.r.t. (q, k, v, iq, ik). Timed in parts (indexer; main branch fwd+bwd;
           KL fwd+bwd w.r.t. iq, ik) and as one jit (total). speedup = dense fwd+bwd / MSA total.
  Floors: each stage's FLOPs at the measured bf16 matmul rate or its bytes at the measured copy
  bandwidth, whichever is longer (`msa_jax.bench.stage_floors`).
  Effective TFLOP/s: dense 3.5 x the causal forward (2 * H_q * D * T^2; backward = 2.5 x forward);
  main branch 3.5 x 4 * H_q * D per (query, visible selected key) pair, counted from the actual
  block_idx as bench_prefill does; indexer H_kv * D_idx * T^2 (docs/algorithm.md §5).
  Before timing, every impl's loss gradients are checked against impl="xla" (and xla against the
  reference) in float32 on fresh small inputs, and again at each T on the first --check-T tokens
  of the benchmark inputs in the benchmark dtype; both with one shared selection, so a near-tie
  that flips a block does not show up as a gradient error (the selections' agreement is reported).
  --profile: also each stage's kernels (GPU time per call from a `jax.profiler` trace,
  `msa_jax.bench.kernel_profile`), printed and kept in results.json (the impl's "profile").

Part 2, whole train steps (msa_jax.train.train_step: model fwd+bwd + AdamW) on synthetic tokens:
the model of a run preset (--train-model; gpu-small for paper, tiny for cpu) at each --train-T, dense
(attention="dense", impl="auto": cuDNN on a GPU) against MSA (attention="msa", sparse=True, each
impl of --impls) and MSA's dense-warmup step (sparse=False: dense attention + the KL over the full
causal support, "<impl> warmup"). Reported: ms per step, tokens/s and the MSA/dense tokens/s ratio;
with --profile also each step's kernels (the whole step's GPU time per kernel: where MSA's step goes).
--no-attention skips part 1 (and its gradient checks) for a train-step-only run, e.g. the 16K study's
model: --no-attention --train-model long-context --train-T 16384 --train-batch 8 --train-dense-layers 1.

    python experiments/bench_train.py --preset cpu      # tiny smoke run (interpret mode off a GPU)
    python experiments/bench_train.py --preset paper    # GPU: 64/4/128, T 8K .. 128K; train T 32K

Writes --out/results.json (rewritten after every measurement), --out/speedup.png, prints a
Markdown table per part. A measurement that runs out of memory is recorded as "oom" and skipped.
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
from msa_jax.bench import (PROFILE_TOP, card_rates, cell, fmt, guarded, inputs, is_oom, kernel_profile, log,
                           main_fwd_kernel, profile_stages, stage_floors, support_pairs, timeit, top_kernels)
from msa_jax.presets import BENCH_SHAPES, RUN_PRESETS, run_config, HelpFormatter

# Per head-shape preset: part 1's lengths, part 2's sequence length and model preset.
DEFAULTS = {
    "cpu": dict(seq_lens=[128, 256], train_T=[256], train_model="tiny"),
    "paper": dict(seq_lens=[8192, 32768, 131072], train_T=[32768], train_model="gpu-small"),
}
TARGET_T, TARGET_SPEEDUP = 131072, 8.0  # docs/benchmarking.md: training attention fwd+bwd + KL >= 8x dense at 128K
BWD_FACTOR = 3.5  # fwd + bwd FLOPs = (1 + 2.5) x the forward's
CHECK_TOL_F32 = 1e-3  # relative gradient error allowed in the float32 check (the test uses it too)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(BENCH_SHAPES), default="cpu", help="head shapes (msa_jax.presets)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override the preset's lengths (part 1)")
    p.add_argument("--impls", nargs="+", choices=["pallas", "xla", "auto"], default=["pallas"],
                   help="MSA backends timed against dense (parts 1 and 2)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median); fewer where one run is long")
    p.add_argument("--time-budget", type=float, default=20.0, help="seconds of timed runs per measurement at most")
    p.add_argument("--xla-max-T", type=int, default=131072, help="time impl=xla up to this length")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, f32 off it")
    p.add_argument("--check-T", type=int, default=None,
                   help="tokens of the gradient checks (default: (top_k + 2) * block_size, so the selection is sparse)")
    p.add_argument("--no-attention", dest="attention", action="store_false",
                   help="skip part 1 (attention by length) and its gradient checks")
    p.add_argument("--no-train-step", dest="train_step", action="store_false", help="skip part 2")
    p.add_argument("--train-T", type=int, nargs="+", help="sequence lengths of part 2 (default: the preset's)")
    p.add_argument("--train-batch", type=int, default=1, help="batch size of part 2")
    p.add_argument("--train-model", choices=sorted(RUN_PRESETS),
                   help="run preset (msa_jax.presets) whose model part 2 builds (default: tiny for cpu, gpu-small for paper)")
    p.add_argument("--train-dense-layers", type=int, default=0,
                   help="leading dense layers of the MSA model in part 2 (0: every layer MSA; a dense layer of an "
                        "impl=pallas model runs the xla dense attention, not cuDNN)")
    p.add_argument("--profile", action="store_true",
                   help="also trace the kernels: part 1 the indexer, main fwd+bwd and KL fwd+bwd once per length, "
                        "part 2 each whole train step; time per kernel")
    p.add_argument("--out", default="runs/bench_train")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- the losses


def out_loss(o, dout):
    """sum(o * dout) accumulated in float32: its gradient w.r.t. o is dout (the backward's cotangent)."""
    return jnp.sum(o * dout, dtype=jnp.float32)


def msa_loss(q, k, v, iq, ik, dout, block_idx, *, impl, block_size):
    """The MSA training loss given a selection: main branch against dout + index KL. -> (loss, (main, kl)).

    As the MSA layer does it: the main branch's LSE is handed to the KL as the teacher's
    normaliser (docs/algorithm.md §6.1), so a fused KL does not recompute it.
    """
    o, lse = ops.sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=True, impl=impl)
    main = out_loss(o, dout)
    kl = ops.index_kl_loss(q, k, iq, ik, block_idx, block_size=block_size, lse=lse, impl=impl)
    return main + kl, (main, kl)


def msa_train(q, k, v, iq, ik, dout, *, impl, block_size, top_k):
    """Selection (no gradient) + msa_loss: what one MSA layer's attention costs in training."""
    sg = jax.lax.stop_gradient
    block_idx = ops.select_blocks(sg(iq), sg(ik), block_size=block_size, top_k=top_k, impl=impl)
    loss, (main, kl) = msa_loss(q, k, v, iq, ik, dout, block_idx, impl=impl, block_size=block_size)
    return loss, (main, kl, block_idx)


def make_fns(cfg, impl):
    """Jitted pieces for one impl: indexer, main fwd+bwd, KL fwd+bwd, total fwd+bwd, loss grads given a selection."""
    bs, topk = cfg["block_size"], cfg["top_k"]
    sel = jax.jit(lambda iq, ik: ops.select_blocks(iq, ik, block_size=bs, top_k=topk, impl=impl))
    main = jax.jit(jax.value_and_grad(
        lambda q, k, v, idx, dout: out_loss(ops.sparse_attention(q, k, v, idx, block_size=bs, impl=impl), dout),
        argnums=(0, 1, 2)))
    kl = jax.jit(jax.value_and_grad(  # lse: the main branch's, computed outside (as in a train step)
        lambda iq, ik, q, k, idx, lse: ops.index_kl_loss(q, k, iq, ik, idx, block_size=bs, lse=lse, impl=impl),
        argnums=(0, 1)))
    lse = jax.jit(lambda q, k, v, idx: ops.sparse_attention(q, k, v, idx, block_size=bs, return_lse=True, impl=impl)[1])
    total = jax.jit(jax.value_and_grad(
        lambda q, k, v, iq, ik, dout: msa_train(q, k, v, iq, ik, dout, impl=impl, block_size=bs, top_k=topk),
        argnums=(0, 1, 2, 3, 4), has_aux=True))
    given = jax.jit(jax.value_and_grad(
        lambda q, k, v, iq, ik, dout, idx: msa_loss(q, k, v, iq, ik, dout, idx, impl=impl, block_size=bs),
        argnums=(0, 1, 2, 3, 4), has_aux=True))
    return dict(sel=sel, main=main, kl=kl, lse=lse, total=total, given=given)


def dense_fn():
    return jax.jit(jax.value_and_grad(lambda q, k, v, dout: out_loss(ops.dense_attention(q, k, v, impl="auto"), dout),
                                      argnums=(0, 1, 2)))


# ------------------------------------------------------------------------------- gradient check

GRAD_NAMES = ("dq", "dk", "dv", "diq", "dik")


def compare_grads(fns, ref_fns, args, block_idx):
    """Loss and gradient errors of fns["given"] against ref_fns["given"] with one selection, plus the
    agreement of the two impls' own selections. Errors are max |a - b| and that over max |b|."""
    (_, (ma, ka)), ga = fns["given"](*args, block_idx)
    (_, (mb, kb)), gb = ref_fns["given"](*args, block_idx)
    out = {}
    for name, a, b in zip(GRAD_NAMES, ga, gb):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        out[name] = dict(max_err=err, rel_err=err / max(scale, 1e-30), ref_max_abs=scale)
    out["main_loss_rel_err"] = float(abs(ma - mb) / max(abs(float(mb)), 1e-30))
    out["kl_abs_err"] = float(abs(ka - kb))
    out["max_rel_err"] = max(max(out[n]["rel_err"] for n in GRAD_NAMES), out["main_loss_rel_err"])
    ia, ib = (np.sort(np.asarray(f["sel"](args[3], args[4])), -1) for f in (fns, ref_fns))
    out["select_match"] = float((ia == ib).all(-1).mean())
    return out


def grad_inputs(key, cfg, T, dtype):
    k1, k2 = jax.random.split(key)
    q, k, v, iq, ik = inputs(k1, cfg, T, dtype)
    dout = jax.random.normal(k2, q.shape, dtype)
    return q, k, v, iq, ik, dout


def check_grads_f32(cfg, impls, check_T):
    """float32 (highest matmul precision) on fresh inputs, batch 2: every impl vs xla, xla vs reference."""
    small = dict(cfg, batch=2)
    args = grad_inputs(jax.random.key(int(time.time())), small, check_T, jnp.float32)
    xla_fns = make_fns(small, "xla")
    out = dict(check_T=check_T)
    with jax.default_matmul_precision("highest"):  # the GPU's default f32 matmuls are TF32
        out["xla_vs_reference"] = guarded("f32 check xla vs reference", lambda: compare_grads(
            xla_fns, make_fns(small, "reference"), args, xla_fns["sel"](args[3], args[4])))
        for impl in impls:
            if impl != "xla":
                fns = make_fns(small, impl)
                out[f"{impl}_vs_xla"] = guarded(f"f32 check {impl} vs xla", lambda: compare_grads(
                    fns, xla_fns, args, fns["sel"](args[3], args[4])))
    return out


# ------------------------------------------------------------------------------------ part 1


def bench_attention(cfg, T, dtype, args, impls, dense, fns_by_impl, on_result, rates):
    """One row of part 1: dense fwd+bwd and every impl's MSA parts at length T, each against its floor
    on the card (`msa_jax.bench.stage_floors`, rates = `card_rates()`); on_result() after each."""
    B, Hq, R, D, Di, bs = (cfg[x] for x in ("batch", "heads", "kv_heads", "head_dim", "index_dim", "block_size"))
    row = dict(T=T, impls={})
    on_result(row)
    q, k, v, iq, ik, dout = grad_inputs(jax.random.key(T), cfg, T, dtype)
    tm = dict(reps=args.reps, budget=args.time_budget)
    f_dense = BWD_FACTOR * B * 2 * Hq * D * T * T

    def run_dense():
        t, n, first = timeit(dense, q, k, v, dout, **tm)
        return dict(ms=t * 1e3, tflops=f_dense / t / 1e12, reps=n, first_s=first)

    row["dense"] = guarded(f"T={T} dense", run_dense)
    log(f"T={T} dense fwd+bwd: {json.dumps(row['dense'])}")
    on_result(row)

    check_T = min(T, args.check_T)
    xla_fns = fns_by_impl.get("xla") or make_fns(cfg, "xla")
    for impl in impls:
        if impl == "xla" and T > args.xla_max_T:
            row["impls"][impl] = dict(status="skipped", error=f"T > --xla-max-T {args.xla_max_T}")
            on_result(row)
            continue
        fns = fns_by_impl[impl]
        res = row["impls"][impl] = {}

        def run_check():
            sl = [x[:, :check_T] for x in (q, k, v, iq, ik, dout)]
            c = compare_grads(fns, xla_fns, sl, fns["sel"](sl[3], sl[4])) if impl != "xla" else {}
            return dict(check_T=check_T, **c)

        res["grad_check"] = guarded(f"T={T} {impl} grad check", run_check)
        on_result(row)
        idx = {}

        def run_sel():
            t, n, _ = timeit(fns["sel"], iq, ik, **tm)
            idx["idx"] = fns["sel"](iq, ik)
            f = B * R * Di * T * T
            return dict(ms=t * 1e3, tflops=f / t / 1e12, reps=n)

        res["indexer"] = guarded(f"T={T} {impl} indexer", run_sel)
        on_result(row)
        if "idx" in idx:
            pairs = support_pairs(idx["idx"], bs) * (Hq // R)
            res["pairs"] = pairs
            row["floors"] = stage_floors(cfg, T, pairs / (Hq // R), rates, jnp.dtype(dtype).itemsize, train=True)
            f_main = BWD_FACTOR * 4 * D * pairs

            def run_main():
                t, n, _ = timeit(fns["main"], q, k, v, idx["idx"], dout, **tm)
                return dict(ms=t * 1e3, tflops=f_main / t / 1e12, reps=n)

            def run_kl():
                lse = fns["lse"](q, k, v, idx["idx"])
                t, n, _ = timeit(fns["kl"], iq, ik, q, k, idx["idx"], lse, **tm)
                del lse
                return dict(ms=t * 1e3, reps=n)

            res["main"] = guarded(f"T={T} {impl} main fwd+bwd", run_main)
            on_result(row)
            res["kl"] = guarded(f"T={T} {impl} KL fwd+bwd", run_kl)
            on_result(row)
            if args.profile:
                def run_profile():
                    lse = fns["lse"](q, k, v, idx["idx"])
                    return profile_stages(dict(indexer=(fns["sel"], (iq, ik)),
                                               main=(fns["main"], (q, k, v, idx["idx"], dout)),
                                               kl=(fns["kl"], (iq, ik, q, k, idx["idx"], lse))), f"T={T} {impl} ")

                res["profile"] = guarded(f"T={T} {impl} profile", run_profile)
                on_result(row)
            del idx["idx"]

        def run_total():
            t, n, first = timeit(fns["total"], q, k, v, iq, ik, dout, **tm)
            out = dict(ms=t * 1e3, reps=n, first_s=first)
            if row["dense"].get("status") == "ok":
                out["speedup"] = row["dense"]["ms"] / out["ms"]
            if all(res.get(p, {}).get("status") == "ok" for p in ("indexer", "main", "kl")):
                out["parts_ms"] = sum(res[p]["ms"] for p in ("indexer", "main", "kl"))  # unfused sum, for reference
            return out

        res["total"] = guarded(f"T={T} {impl} total", run_total)
        on_result(row)
        log(f"T={T} {impl}: {json.dumps(res)}")
    return row


# ------------------------------------------------------------------------------------ part 2


def train_configs(args, cfg, dtype_name, attention, impl, T):
    run = run_config(args.train_model or cfg["train_model"], attention=attention, impl=impl, dtype=dtype_name,
                     seq_len=T, batch_size=args.train_batch, kl_weight=1.0,
                     msa_warmup_steps=0, lr_warmup_steps=1, seed=0, n_dense_layers=args.train_dense_layers)
    return run.model_config(), run.train_config()


def bench_train_step(args, cfg, dtype_name, attention, impl, tokens, T, sparse=True):
    """Median ms of train_step and tokens/s for one model (built, timed, dropped); sparse=False: an MSA
    model's dense-warmup step (dense attention + the KL over the full causal support). With --profile,
    "profile": the step's PROFILE_TOP largest kernels (ms per step) and "profile_sum_ms" all of them."""
    from msa_jax.model import DecoderLM, count_params
    from msa_jax.train import make_optimizer, train_step

    mcfg, tcfg = train_configs(args, cfg, dtype_name, attention, impl, T)
    model = DecoderLM(mcfg, seed=0)
    opt = make_optimizer(model, tcfg)
    sparse = sparse and attention == "msa"
    step = lambda: train_step(model, opt, tokens, sparse=sparse, kl_weight=mcfg.msa.kl_weight)  # noqa: E731
    t, n, first = timeit(step, reps=args.reps, budget=args.time_budget)
    m = jax.device_get(step())
    B, T = tokens.shape[0], tokens.shape[1] - 1
    out = dict(ms=t * 1e3, tokens_per_s=B * T / t, reps=n, first_s=first, params=int(count_params(model)),
               loss=float(m["lm_loss"]), kl=float(m["kl"]))
    if args.profile:
        times = kernel_profile(step)
        out.update(profile=dict(list(times.items())[:PROFILE_TOP]), profile_sum_ms=sum(times.values()))
        log(f"train_step {attention} {impl} sparse={sparse}: kernels, ms per step (sum {out['profile_sum_ms']:.1f}, "
            f"wall {out['ms']:.1f})\n{top_kernels(times, n=15)}")
    return out


def part2(args, cfg, dtype_name, impls, result, save):
    """Whole train steps at every --train-T: result["train_step"] is a list of one entry per length."""
    result["train_step"] = []
    for T in args.train_T or cfg["train_T"]:
        mcfg, tcfg = train_configs(args, cfg, dtype_name, "msa", impls[0], T)
        B = tcfg.batch_size
        model_desc = dict(preset=args.train_model or cfg["train_model"], d_model=mcfg.d_model, n_layers=mcfg.n_layers,
                          n_dense_layers=mcfg.n_dense_layers, heads=mcfg.n_heads, kv_heads=mcfg.n_kv_heads,
                          head_dim=mcfg.head_dim, d_ff=mcfg.d_ff, block_size=mcfg.msa.block_size, top_k=mcfg.msa.top_k,
                          index_dim=mcfg.msa.index_dim, dtype=mcfg.dtype)
        res = dict(T=T, batch=B, model=model_desc, runs={})
        result["train_step"].append(res)
        log(f"part 2: train_step, T={T}, batch {B}, model {model_desc}")
        tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, mcfg.vocab_size, jnp.int32)
        runs = [("dense", "dense", "auto", False)] + [(i, "msa", i, True) for i in impls]
        runs += [(f"{i} warmup", "msa", i, False) for i in impls]  # the dense-warmup steps
        for name, attention, impl, sparse in runs:
            r = guarded(f"train_step {name}", lambda: bench_train_step(args, cfg, dtype_name, attention, impl, tokens, T,
                                                                       sparse))
            d = res["runs"].get("dense", {})
            if name != "dense" and r["status"] == "ok" and d.get("status") == "ok":
                r["ratio"] = r["tokens_per_s"] / d["tokens_per_s"]
            res["runs"][name] = r
            log(f"train_step T={T} {name}: {json.dumps(r)}")
            save()


# ---------------------------------------------------------------------------------- reporting


def floors(row) -> str:
    f = row.get("floors")
    return " / ".join(fmt(f[st]["floor_ms"], 0).strip() for st in ("dense", "indexer", "main", "kl")) if f else "-"


def print_tables(result):
    print(f"\n### Attention fwd+bwd ({result['device']}, jax {result['jax']}, {result['dtype']})\n")
    print("| T | dense ms | dense TF/s | impl | indexer ms | main ms | main TF/s | KL ms | total ms | speedup | grad rel err "
          "| floors ms: dense / indexer / main / KL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["attention"]:
        d = r.get("dense", {})
        for impl, m in r["impls"].items():
            c = m.get("grad_check", {})
            print(f"| {r['T']} | {fmt(cell(d))} | {fmt(cell(d, 'tflops'))} | {impl} | {fmt(cell(m.get('indexer', {})))} "
                  f"| {fmt(cell(m.get('main', {})))} | {fmt(cell(m.get('main', {}), 'tflops'))} "
                  f"| {fmt(cell(m.get('kl', {})))} | {fmt(cell(m.get('total', {})))} "
                  f"| {fmt(m.get('total', {}).get('speedup'))} | {fmt(c.get('max_rel_err'))} | {floors(r)} |")
        if not r["impls"]:
            print(f"| {r['T']} | {fmt(cell(d))} | {fmt(cell(d, 'tflops'))} | - | | | | | | | |")
    for ts in result.get("train_step", []):
        print(f"\n### Train step (T={ts['T']}, batch {ts['batch']}, model {ts['model']['preset']}, "
              f"{ts['model']['n_layers']} layers)\n")
        print("| model | impl (warmup: dense attention + full KL) | ms / step | tokens/s | vs dense |")
        print("|---|---|---|---|---|")
        for name, r in ts["runs"].items():
            print(f"| {'dense' if name == 'dense' else 'msa'} | {'auto' if name == 'dense' else name} "
                  f"| {fmt(cell(r))} | {fmt(cell(r, 'tokens_per_s'))} | {fmt(r.get('ratio'))} |")


def plot(result, path) -> bool:
    plt = plots.pyplot()
    if plt is None:
        return False

    fig, ax = plt.subplots(figsize=(7, 4.5))
    impls = sorted({i for r in result["attention"] for i in r["impls"]})
    for impl, marker in zip(impls, "os^v"):
        pts = [(r["T"], r["impls"][impl]["total"]["speedup"]) for r in result["attention"]
               if "speedup" in r["impls"].get(impl, {}).get("total", {})]
        if pts:
            ax.plot(*zip(*pts), marker + "-", label=f"{impl}: indexer + main + KL, fwd+bwd")
    if max((r["T"] for r in result["attention"]), default=0) * 4 >= TARGET_T:  # not on a CPU smoke run's axes
        ax.plot([TARGET_T], [TARGET_SPEEDUP], "r*", ms=12, label=f"docs/benchmarking.md target ({TARGET_SPEEDUP:g}x at 128K)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="context length T", ylabel="speedup over dense fwd+bwd",
           title=f"MSA training attention, {result['device']}, {result['dtype']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(BENCH_SHAPES[args.preset], **DEFAULTS[args.preset])
    if args.seq_lens:
        cfg["seq_lens"] = args.seq_lens
    if args.check_T is None:
        args.check_T = (cfg["top_k"] + 2) * cfg["block_size"]
    on_gpu = jax.default_backend() == "gpu"
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = jnp.dtype(dtype_name)
    impls = list(dict.fromkeys(args.impls))
    device = jax.devices()[0].device_kind
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = dict(device=device, jax=jax.__version__, dtype=dtype_name, config=cfg, impls=impls,
                  args=vars(args), attention=[])

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / "results.json")

    print(f"device: {device} | jax {jax.__version__} | {dtype_name} | impls {impls} | {cfg}", flush=True)
    result["rates"] = rates = card_rates()
    if not args.attention:  # part 2 only
        cfg["seq_lens"] = []
    result["main_fwd_kernel"] = main_fwd_kernel(cfg, dtype)
    result["main_bwd_kernel"] = main_fwd_kernel(cfg, dtype, which="bwd")
    log(f"main-branch tile kernels (impl pallas): forward {result['main_fwd_kernel']}, "
        f"backward {result['main_bwd_kernel']}")
    log(f"card: copy {rates['copy_gb_s']:.0f} GB/s, bf16 matmul {rates['matmul_tflops']:.0f} TFLOP/s (the floors' rates)")
    if args.attention:
        result["grad_check"] = guarded("f32 gradient check", lambda: check_grads_f32(cfg, impls, args.check_T))
        log(f"gradient check (f32, T={args.check_T}), max relative error: "
            + json.dumps({k: v.get("max_rel_err", v.get("error")) if isinstance(v, dict) else v
                         for k, v in result["grad_check"].items()}))
    save()

    dense = dense_fn()
    fns_by_impl = {impl: make_fns(cfg, impl) for impl in set(impls) | {"xla"}}
    for T in cfg["seq_lens"]:
        rows = result["attention"]

        def on_result(row):
            if not rows or rows[-1] is not row:
                rows.append(row)
            save()

        # bench_attention guards each measurement; this catches the rest (e.g. drawing the inputs)
        try:
            bench_attention(cfg, T, dtype, args, impls, dense, fns_by_impl, on_result, rates)
        except Exception as e:  # noqa: BLE001
            row = rows[-1] if rows and rows[-1]["T"] == T else dict(T=T, impls={})
            row.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:300]}")
            on_result(row)
            log(f"T={T}: {row['error']}")

    if args.train_step:
        part2(args, cfg, dtype_name, impls, result, save)
    save()
    print_tables(result)
    if result["attention"] and plot(result, out / "speedup.png"):
        print(f"\nwrote {out / 'results.json'} and {out / 'speedup.png'} ({result['wall_s']:.0f} s)", flush=True)
    else:
        print(f"\nwrote {out / 'results.json'} ({result['wall_s']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
