"""Quickstart: train a tiny dense-GQA and a tiny MSA byte-level LM on the Python stdlib, compare.

Both models see the same initial seed and exactly the same batches (random windows of the
interpreter's own standard-library sources, see `msa_jax.data`). The MSA model starts with a dense
warmup (`--warmup-steps`, default 20% of the steps: full attention, index branch trained by the KL
loss on the full causal support) and then switches top-k block routing on. The context is really
sparse: with the defaults each query attends to at most top_k * block_size = 4 * 32 = 128 of its
up to 1024 past bytes.

Output (under --out, default runs/quickstart):
  results.json  config, per-eval history, per-step train losses and the final table
                (rewritten after every eval, so an interrupt loses little)
  loss.png      train / val loss curves (bits per byte), dense vs MSA, warmup boundary marked

The CPU defaults (180 steps x 2 x 1024 bytes per model) took 6.7 minutes in all on a 2-core CPU
machine; `--preset gpu` picks sizes for one GPU (200 of its steps took 7.4 minutes on one H100).
Every size can be overridden by its flag. Example:

  python experiments/quickstart.py --steps 100 --attention msa --out runs/qs_msa
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time

try:
    import msa_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from msa_jax import data
from msa_jax.config import IMPLS, ModelConfig, MSAConfig, TrainConfig

LN2 = math.log(2.0)

# Sizes per preset; any flag given on the command line wins.
PRESETS = {
    # Measured on 2 CPU cores (jax 0.11.2): ~1.0 s per dense step, ~1.3 s per MSA warmup step,
    # ~1.0 s per sparse MSA step, plus compilation and evals: 6.7 minutes for both models.
    "cpu": dict(
        steps=180,
        batch_size=2,
        seq_len=1024,
        block_size=32,
        top_k=4,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        index_dim=32,
        d_ff=384,
        n_dense_layers=1,
        lr=3e-3,
        eval_every=45,
        eval_batches=4,
        max_bytes=None,
        dtype="float32",
    ),
    "gpu": dict(
        # Measured on one H100 (jax 0.11.2): 0.33 s per dense step, ~1 s per MSA warmup step, ~1.8 s per
        # sparse MSA step (pure-JAX MSA ops; the Pallas kernels will close this gap): ~17 minutes.
        steps=500,
        batch_size=8,
        seq_len=8192,
        block_size=128,
        top_k=16,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        head_dim=64,
        index_dim=64,
        d_ff=1536,
        n_dense_layers=1,
        lr=1e-3,
        eval_every=100,
        eval_batches=8,
        max_bytes=None,
        dtype="bfloat16",  # bf16 activations: dense layers run on cuDNN
    ),
}


def _ph(key: str, text: str = "") -> str:
    """Help text ending with the preset values of `key`."""
    vals = ", ".join(f"{name} {preset[key]}" for name, preset in PRESETS.items())
    return f"{text} [preset: {vals}]".strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a tiny dense and a tiny MSA byte-level LM on the Python stdlib sources (same seed, "
        "same batches) and compare loss, MSA selection recall and speed. Writes results.json and loss.png "
        "under --out. Sizes come from --preset; every flag given overrides its preset value.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="size preset (default: cpu)")
    p.add_argument("--attention", choices=("dense", "msa", "both"), default="both", help="model(s) to train (default: both)")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="attention ops backend (default: auto)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--seed", type=int, default=0, help="init and data seed, shared by both models (default: 0)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help=_ph("steps", "training steps per model"))
    g.add_argument("--batch-size", type=int, help=_ph("batch_size", "sequences per step"))
    g.add_argument("--seq-len", type=int, help=_ph("seq_len", "context length T in bytes"))
    g.add_argument("--lr", type=float, help=_ph("lr", "peak learning rate (AdamW, linear warmup, cosine decay)"))
    g.add_argument("--lr-warmup-steps", type=int, help="learning-rate warmup steps (default: 5%% of --steps)")
    g.add_argument("--eval-every", type=int, help=_ph("eval_every", "evaluate on val every this many steps and at the end"))
    g.add_argument("--eval-batches", type=int, help=_ph("eval_batches", "val batches per evaluation (fixed windows)"))
    g.add_argument("--max-bytes", type=int, help="cap the corpus at this many bytes (default: all, ~30 MB)")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, help=_ph("d_model"))
    g.add_argument("--n-layers", type=int, help=_ph("n_layers"))
    g.add_argument("--n-heads", type=int, help=_ph("n_heads", "query heads H_q"))
    g.add_argument("--n-kv-heads", type=int, help=_ph("n_kv_heads", "KV heads H_kv (GQA groups)"))
    g.add_argument("--head-dim", type=int, help=_ph("head_dim"))
    g.add_argument("--d-ff", type=int, help=_ph("d_ff", "SwiGLU hidden size"))
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help=_ph("dtype", "activation dtype (params stay float32)"))
    g.add_argument("--n-dense-layers", type=int, help=_ph("n_dense_layers", "leading layers that stay dense in the MSA model"))
    g = p.add_argument_group("MSA")
    g.add_argument("--block-size", type=int, help=_ph("block_size", "KV block size B_k"))
    g.add_argument("--top-k", type=int, help=_ph("top_k", "blocks per query and group, local block included"))
    g.add_argument("--index-dim", type=int, help=_ph("index_dim", "index head dim D_idx"))
    g.add_argument("--warmup-steps", type=int, help="dense warmup steps of the MSA model (default: 20%% of --steps)")
    g.add_argument("--kl-weight", type=float, default=1.0, help="lambda of the index KL loss (default: 1.0)")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Preset values, overridden by the flags that were given; derived defaults filled in."""
    cfg = dict(PRESETS[args.preset])
    for key in list(cfg) + ["lr_warmup_steps", "warmup_steps"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg.setdefault("lr_warmup_steps", max(1, round(0.05 * cfg["steps"])))
    cfg.setdefault("warmup_steps", round(0.2 * cfg["steps"]))
    cfg.update(preset=args.preset, attention=args.attention, impl=args.impl, seed=args.seed, kl_weight=args.kl_weight)
    return cfg


def make_configs(cfg: dict, attention: str) -> tuple[ModelConfig, TrainConfig]:
    msa = MSAConfig(
        block_size=cfg["block_size"],
        top_k=cfg["top_k"],
        index_dim=cfg["index_dim"],
        kl_weight=cfg["kl_weight"],
        warmup_steps=cfg["warmup_steps"],
    )
    mcfg = ModelConfig(
        vocab_size=data.VOCAB_SIZE,
        d_model=cfg["d_model"],
        n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"],
        head_dim=cfg["head_dim"],
        d_ff=cfg["d_ff"],
        attention=attention,
        n_dense_layers=cfg["n_dense_layers"],
        msa=msa,
        impl=cfg["impl"],
        dtype=cfg["dtype"],
    )
    tcfg = TrainConfig(
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        seq_len=cfg["seq_len"],
        learning_rate=cfg["lr"],
        lr_warmup_steps=min(cfg["lr_warmup_steps"], cfg["steps"]),
        seed=cfg["seed"],
    )
    return mcfg, tcfg


def evaluate(model, eval_set, *, is_msa: bool, eval_step) -> dict:
    """Mean val metrics over the fixed windows. The MSA model is always evaluated sparse."""
    sums: dict[str, float] = {}
    for batch in eval_set:
        m = eval_step(model, jnp.asarray(batch), sparse=is_msa, with_recall=is_msa)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / len(eval_set) for k, v in sums.items()}
    out["bpb"] = out["lm_loss"] / LN2
    return out


def train_one(attention: str, cfg: dict, corpus: data.Corpus, eval_set, results: dict, save) -> dict:
    from msa_jax.model import DecoderLM, count_params
    from msa_jax.train import eval_step, make_optimizer, train_step, use_sparse

    mcfg, tcfg = make_configs(cfg, attention)
    is_msa = attention == "msa"
    t_start = time.perf_counter()
    model = DecoderLM(mcfg, seed=cfg["seed"])
    optimizer = make_optimizer(model, tcfg)
    n_params = int(count_params(model))
    run = dict(
        attention=attention,
        n_params=n_params,
        model_config=dataclasses.asdict(mcfg),
        train_config=dataclasses.asdict(tcfg),
        train_loss=[],  # per step: LM loss (nats/byte), KL excluded
        kl=[],
        sparse=[],
        history=[],  # per eval
    )
    results["runs"][attention] = run
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    steady_time, steady_steps, seen_modes = 0.0, 0, set()
    batches = data.batches(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=cfg["seed"])
    bar = tqdm(range(tcfg.steps), desc=f"{attention:>5}", dynamic_ncols=True, file=sys.stdout)
    last_val = None
    for step in bar:
        sparse = bool(is_msa and use_sparse(step, mcfg.msa))
        batch = jnp.asarray(next(batches))
        t0 = time.perf_counter()
        metrics = train_step(model, optimizer, batch, sparse=sparse, kl_weight=mcfg.msa.kl_weight)
        metrics = {k: float(v) for k, v in metrics.items()}  # also waits for the step to finish
        dt = time.perf_counter() - t0
        if sparse in seen_modes:  # the first step of each mode compiles: not counted in tokens/s
            steady_time += dt
            steady_steps += 1
        seen_modes.add(sparse)
        run["train_loss"].append(metrics["lm_loss"])
        run["kl"].append(metrics.get("kl", 0.0))
        run["sparse"].append(sparse)
        if not all(math.isfinite(metrics[k]) for k in ("loss", "lm_loss")):
            raise FloatingPointError(f"{attention}: non-finite loss at step {step}: {metrics}")
        done = step + 1
        if done % cfg["eval_every"] == 0 or done == tcfg.steps:
            ev = evaluate(model, eval_set, is_msa=is_msa, eval_step=eval_step)
            recent = run["train_loss"][-cfg["eval_every"] :]
            entry = dict(step=done, sparse=sparse, train_loss=sum(recent) / len(recent), val_loss=ev["lm_loss"],
                         val_bpb=ev["bpb"], val_kl=ev.get("kl"), block_recall=ev.get("block_recall"),
                         score_recall=ev.get("score_recall"), elapsed_s=time.perf_counter() - t_start)
            run["history"].append(entry)
            last_val = ev
            save()
        postfix = dict(loss=f"{metrics['lm_loss']:.3f}", mode="sparse" if sparse else "dense")
        if is_msa:
            postfix["kl"] = f"{metrics.get('kl', 0.0):.3f}"
        if last_val is not None:
            postfix["val_bpb"] = f"{last_val['bpb']:.3f}"
        bar.set_postfix(postfix, refresh=False)
    bar.close()
    wall = time.perf_counter() - t_start
    tail = run["train_loss"][-max(1, min(10, tcfg.steps)) :]
    run["final"] = dict(
        model=attention,
        train_loss=sum(tail) / len(tail),
        val_loss=last_val["lm_loss"],
        val_bpb=last_val["bpb"],
        block_recall=last_val.get("block_recall"),
        score_recall=last_val.get("score_recall"),
        tokens_per_s=(steady_steps * tokens_per_step / steady_time) if steady_steps else float("nan"),
        wall_s=wall,
        n_params=n_params,
    )
    save()
    return run["final"]


def format_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    header = ["model", "params", "train loss", "val loss", "val bits/B", "block recall", "score recall", "tok/s", "wall"]
    lines = [header]
    for r in rows:
        lines.append([
            r["model"],
            f"{r['n_params'] / 1e6:.2f}M",
            num(r["train_loss"], ".3f"),
            num(r["val_loss"], ".3f"),
            num(r["val_bpb"], ".3f"),
            num(r["block_recall"], ".3f"),
            num(r["score_recall"], ".3f"),
            num(r["tokens_per_s"], ",.0f"),
            f"{r['wall_s']:.0f}s",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule] + [fmt(line) for line in lines[1:]])


def plot(results: dict, path: pathlib.Path) -> bool:
    """Write the loss / recall figure; False (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} (pip install -e '.[dev]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    has_recall = "msa" in runs and runs["msa"]["history"]
    fig, axes = plt.subplots(1, 2 if has_recall else 1, figsize=(12 if has_recall else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    colors = {"dense": "tab:blue", "msa": "tab:orange"}
    for name, run in runs.items():
        loss = np.asarray(run["train_loss"]) / LN2
        if loss.size == 0:
            continue
        w = max(1, min(10, loss.size // 10))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        steps = np.arange(w, loss.size + 1)
        ax.plot(steps, smooth, color=colors[name], alpha=0.6, lw=1, label=f"{name} train")
        hist = run["history"]
        if hist:
            ax.plot([h["step"] for h in hist], [h["val_bpb"] for h in hist], "o-", color=colors[name], label=f"{name} val")
    warm = results["config"]["warmup_steps"]
    if "msa" in runs and 0 < warm < results["config"]["steps"]:
        for a in axes[0]:
            a.axvline(warm, color="gray", ls="--", lw=1, label="MSA: dense warmup ends")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits per byte)")
    c = results["config"]
    ax.set_title(f"stdlib bytes, T={c['seq_len']}, MSA block {c['block_size']} x top-{c['top_k']}")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_recall:
        ax = axes[0, 1]
        hist = runs["msa"]["history"]
        ax.plot([h["step"] for h in hist], [h["block_recall"] for h in hist], "o-", label="block recall")
        ax.plot([h["step"] for h in hist], [h["score_recall"] for h in hist], "s-", label="score recall")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_title("MSA selection recall on val")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')}: expected an int >= 1, got {cfg[key]}")
    kinds = ["dense", "msa"] if cfg["attention"] == "both" else [cfg["attention"]]
    make_configs(cfg, "msa")  # validate every size before any work

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} | backend {jax.default_backend()} | devices {jax.devices()} | "
          f"python {platform.python_version()} | {os.cpu_count()} CPU cores")
    corpus = data.load_corpus(cfg["max_bytes"], sources=("stdlib",))
    print(f"corpus: {corpus.summary()}")
    eval_set = data.eval_batches(corpus.val, cfg["batch_size"], cfg["seq_len"], cfg["eval_batches"])
    T, span = cfg["seq_len"], cfg["top_k"] * cfg["block_size"]
    print(f"context T={T}; MSA: block {cfg['block_size']}, top-{cfg['top_k']} -> each query sees at most "
          f"{min(span, T)} of up to {T} keys ({100 * min(span, T) / T:.1f}%)"
          + (" [not sparse: top_k * block_size >= T, MSA equals dense]" if span >= T else ""))
    print(f"training {', '.join(kinds)}: {cfg['steps']} steps x {cfg['batch_size']} x {T} bytes, "
          f"MSA dense warmup {cfg['warmup_steps']} steps, eval every {cfg['eval_every']} "
          f"on {cfg['eval_batches']} x {cfg['batch_size']} val windows")

    results = dict(
        config=cfg,
        env=dict(jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                 python=platform.python_version(), cpu_count=os.cpu_count()),
        corpus=dict(sources=corpus.sources, python_version=corpus.python_version, n_files=corpus.n_files,
                    n_packages=corpus.n_packages, fingerprint=corpus.fingerprint,
                    n_bytes=corpus.n_bytes, train_bytes=int(corpus.train.size), val_bytes=int(corpus.val.size)),
        runs={},
        table=[],
    )
    json_path, png_path = out / "results.json", out / "loss.png"

    def save():
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        tmp.replace(json_path)

    t0 = time.perf_counter()
    for kind in kinds:
        results["table"].append(train_one(kind, cfg, corpus, eval_set, results, save))
        save()
        plotted = plot(results, png_path)
    results["total_wall_s"] = time.perf_counter() - t0
    save()

    table = format_table(results["table"])
    print()
    print(f"Final (val: {cfg['eval_batches'] * cfg['batch_size']} windows of {T} bytes; losses in nats/byte; "
          f"train loss = mean of the last 10 steps; tok/s = training steps after compilation)")
    print(table)
    print(f"\ntotal wall time {results['total_wall_s']:.0f}s; wrote {json_path}" + (f" and {png_path}" if plotted else ""))
    results["table_text"] = table
    save()
    return results


if __name__ == "__main__":
    main()
