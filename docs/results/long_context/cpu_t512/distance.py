"""Which blocks the index chooses, by distance, on ordinary code (the RoPE-free index's loss, 2026-12-06).

For seed 1 of base (RoPE index), index-nope (no RoPE on the index), index-nope-local2 (the same with the
block before the local one forced) and index-nope-sink1 (the first block forced), on the same windows of
validation code (not retrieval examples) at T = 512: per distance d (the query's block minus the chosen
block, d = 0 the local block), the share of (query row, KV group) cases whose selection holds the block
d back, and the same for the top 4 blocks of each model's own dense attention by mass (what the KL
teaches; `needle_trace.selection_by_distance_on`). Writes
distance.json and distance.png here. Needs the runs in runs/cpu_t512/ (run.sh; ~5 minutes per run on 2
cores). Run from the repository root:

    python docs/results/long_context/cpu_t512/distance.py [--windows 32]
"""

import argparse
import json
import pathlib

import numpy as np

from msa_jax import checkpoint, data, needle_trace, plots
from msa_jax.needle_trace import INDEX
from msa_jax.needle_trace import TOP_K as TOP  # the top_k blocks of the layer's own dense attention by mass

HERE = pathlib.Path(__file__).resolve().parent
ARMS = {"base": "RoPE index (base)", "index-nope": "no RoPE on the index",
        "index-nope-local2": "no RoPE, previous block forced", "index-nope-sink1": "no RoPE, first block forced"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/cpu_t512", help="the run directories' parent")
    p.add_argument("--windows", type=int, default=32, help="validation windows of T tokens")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="the arms (seed 1 of each)")
    p.add_argument("--out", default=str(HERE), help="where distance.json and distance.png go")
    args = p.parse_args()
    here = pathlib.Path(args.out)
    out, rates = {}, {}
    for arm in args.arms:
        model, cfg, step = checkpoint.load_run(pathlib.Path(args.runs) / f"{arm}_p1c1")
        T = cfg.seq_len
        val = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(","))).val
        starts = np.linspace(0, val.size - T - 1, args.windows).astype(int)  # the same windows for every arm
        windows = np.stack([val[s : s + T] for s in starts])
        (layer, r), = needle_trace.selection_by_distance_on(model, cfg, windows, rows=T, max_distance=T).items()
        rates[arm] = r
        out[arm] = dict(step=step, layer=int(layer), windows=len(starts), block_size=cfg.block_size, top_k=cfg.top_k,
                        rates=r)
        print(f"{arm}: the block 1 back chosen for {r[INDEX][1]:.2f} of the cases (its attention's top "
              f"{cfg.top_k}: {r[TOP][1]:.2f}); 2 back {r[INDEX][2]:.2f} ({r[TOP][2]:.2f}); 3 back "
              f"{r[INDEX][3]:.2f} ({r[TOP][3]:.2f})")
    (here / "distance.json").write_text(json.dumps(out, indent=1))
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in args.arms:
        label, color = ARMS[arm], {"base": "C0", "index-nope": "C2", "index-nope-local2": "C4", "index-nope-sink1": "C3"}[arm]
        d = np.arange(1, 12)  # distance 0 is the local block, always chosen
        ax.plot(d, np.array(rates[arm][INDEX])[d], "o-", color=color, label=f"{label}: index")
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
