"""Which blocks the index chooses, by distance, on ordinary code (the RoPE-free index's loss, 2026-12-06).

For seed 1 of base (RoPE index), index-nope (no RoPE on the index), index-nope-local2 (the same with the
block before the local one forced) and index-nope-sink1 (the first block forced), on the same windows of
validation code (not retrieval examples) at T = 512: per distance d (the query's block minus the chosen
block, d = 0 the local block), the share of (query row, KV group) cases whose selection holds the block
d back (`retrieval.selection_by_distance`), and the same for the top 4 blocks of each model's own dense
attention by mass (`model.layer_block_mass`, `retrieval.top_k_by_distance`: what the KL teaches). Writes
distance.json and distance.png here. Needs the runs in runs/cpu_t512/ (run.sh; ~5 minutes per run on 2
cores). Run from the repository root:

    python docs/results/long_context/cpu_t512/distance.py [--windows 32]
"""

import argparse
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from msa_jax import checkpoint, data, plots, retrieval
from msa_jax.model import layer_block_mass, layer_selections

HERE = pathlib.Path(__file__).resolve().parent
ARMS = {"base": "RoPE index (base)", "index-nope": "no RoPE on the index",
        "index-nope-local2": "no RoPE, previous block forced", "index-nope-sink1": "no RoPE, first block forced"}
TOP = "attention's top-k"  # the blocks its own dense attention puts most mass on: what the KL teaches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/cpu_t512", help="the run directories' parent")
    p.add_argument("--windows", type=int, default=32, help="validation windows of T tokens")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="the arms (seed 1 of each)")
    p.add_argument("--out", default=str(HERE), help="where distance.json and distance.png go")
    args = p.parse_args()
    here = pathlib.Path(args.out)
    out, rates = {}, {}
    selections, masses = nnx.jit(layer_selections), nnx.jit(layer_block_mass, static_argnames="n_rows")
    for arm in args.arms:
        model, cfg, step = checkpoint.load_run(pathlib.Path(args.runs) / f"{arm}_p1c1")
        T, bs, k = cfg.seq_len, cfg.block_size, cfg.top_k
        val = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(","))).val
        starts = np.linspace(0, val.size - T - 1, args.windows).astype(int)  # the same windows for every arm
        layer = next(i for i in range(cfg.n_layers) if cfg.model_config().is_msa_layer(i))
        counts = {"index": [0, 0], TOP: [0, 0]}
        for s in starts:
            tokens = jax.numpy.asarray(val[s : s + T][None].astype(np.int32))
            sel = np.asarray(selections(model, tokens)[layer]["block_idx"])[0]  # [T, H_kv, k]
            mass = np.asarray(masses(model, tokens, 0, n_rows=T)[layer])[0]  # [H_kv, T, n_blocks]
            for name, (picks, visible) in (("index", retrieval.selection_by_distance(sel, (0, T), bs)),
                                           (TOP, retrieval.top_k_by_distance(mass, (0, T), bs, k))):
                counts[name][0] = counts[name][0] + picks
                counts[name][1] = counts[name][1] + visible
        rates[arm] = {name: (picks / np.maximum(visible, 1)).tolist() for name, (picks, visible) in counts.items()}
        out[arm] = dict(step=step, layer=layer, windows=len(starts), block_size=bs, top_k=k, rates=rates[arm])
        r = rates[arm]
        print(f"{arm}: the block 1 back chosen for {r['index'][1]:.2f} of the cases (its attention's top {k}: "
              f"{r[TOP][1]:.2f}); 2 back {r['index'][2]:.2f} ({r[TOP][2]:.2f}); 3 back {r['index'][3]:.2f} "
              f"({r[TOP][3]:.2f})")
    (here / "distance.json").write_text(json.dumps(out, indent=1))
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in args.arms:
        label, color = ARMS[arm], {"base": "C0", "index-nope": "C2", "index-nope-local2": "C4", "index-nope-sink1": "C3"}[arm]
        d = np.arange(1, 12)  # distance 0 is the local block, always chosen
        ax.plot(d, np.array(rates[arm]["index"])[d], "o-", color=color, label=f"{label}: index")
        ax.plot(d, np.array(rates[arm][TOP])[d], "x:", color=color, alpha=0.7,
                label=f"{label}: its attention's top {out[arm]['top_k']}")
    ax.set(xlabel="distance in blocks of 16 (1: the block before the local one)",
           ylabel="share of (row, group) cases",
           title=f"blocks chosen by distance, validation code, T = 512 ({args.windows} windows; seed 1 of each arm)",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(here / "distance.png", dpi=110)
    print(f"wrote {here / 'distance.json'} and {here / 'distance.png'}")


if __name__ == "__main__":
    main()
