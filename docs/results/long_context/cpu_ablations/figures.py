"""Redraw this folder's figure and summary table from its committed files.

ablations.png: per arm, pass-key exact match of its four runs (the parent's value as a grey tick) and the
paired difference from the base recipe with its 95% interval; score recall at the end of training.
summary.md: the same numbers as a table. Run from the repository root: python <this folder>/figures.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parent / "cpu_seeds"
PAIRS = [(1, 1), (1, 11), (2, 2), (2, 12)]  # parent seed, conversion seed (run.sh's PAIRS)
ARMS = {  # arm: (what it changes, keys each query reads of 128, blocks the index chooses: top_k - 1)
    "base": ("block 16 x top 2, 200 warmup steps, KL on, RoPE index", 32, 1),
    "warmup-0": ("no dense warmup", 32, 1),
    "warmup-600": ("600 warmup steps", 32, 1),
    "kl-off": ("KL off (index branch never trained)", 32, 1),
    "index-nope": ("no RoPE on the index", 32, 1),
    "block8-top2": ("block 8 x top 2", 16, 1),
    "block32-top2": ("block 32 x top 2", 64, 1),
    "top3": ("top_k 3 (block 16)", 48, 2),
    "block8-top4": ("block 8 x top 4", 32, 3),
    "top4": ("top_k 4 (block 16)", 64, 3),
    "block8-top8": ("block 8 x top 8", 64, 7),
}


def exact(folder):
    rows = json.loads((folder / "results.json").read_text())["rows"]
    return sum(r["correct"] for r in rows) / sum(r["n"] for r in rows)


def final_eval(metrics):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]


def main():
    arms = [a for a in ARMS if all((HERE / f"eval_{a}_p{p}c{c}").exists() for p, c in PAIRS)]
    vs_base = json.loads((HERE / "arms" / "differences.json").read_text())["recipes"]
    vs_base = {r["recipe"]: r for r in vs_base if r["metric"] == "exact match" and r["depth"] is None}
    vs_dense = json.loads((HERE / "against_dense" / "differences.json").read_text())["recipes"]
    vs_dense = {r["recipe"]: r for r in vs_dense if r["metric"] == "exact match" and r["depth"] is None}
    parent = {p: exact(SEEDS / f"eval_dense_seed{p}") for p in (1, 2)}
    em = {a: [exact(HERE / f"eval_{a}_p{p}c{c}") for p, c in PAIRS] for a in arms}
    ev = {a: [final_eval(HERE / f"metrics_{a}_p{p}c{c}.jsonl") for p, c in PAIRS] for a in arms}

    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(arms) + 1.8), sharey=True)
    y = range(len(arms))[::-1]
    colors = {1: "tab:blue", 2: "tab:orange"}
    for yi, a in zip(y, arms):
        for (p, _), v, e in zip(PAIRS, em[a], ev[a]):
            axes[0].plot(v, yi, "o", color=colors[p], alpha=0.8)
            axes[2].plot(e["score_recall"], yi, "o", color=colors[p], alpha=0.8)
        for p in (1, 2):
            axes[0].plot(parent[p], yi, "|", color="grey", ms=12)
        if a in vs_base and a != "base":
            r = vs_base[a]
            axes[1].errorbar(100 * r["difference"], yi, xerr=[[100 * (r["difference"] - r["ci_low"])],
                             [100 * (r["ci_high"] - r["difference"])]], fmt="s", color="k", capsize=3)
            base = em["base"]
            for (p, _), v, b in zip(PAIRS, em[a], base):
                axes[1].plot(100 * (v - b), yi, "o", color=colors[p], alpha=0.6)
    axes[0].set_yticks(list(y), [f"{a} ({ARMS[a][1]} keys, {ARMS[a][2]} chosen)" for a in arms])
    axes[0].set_xlabel("pass-key exact match (200 examples per run)")
    axes[0].set_title("runs (dots: parent 1 blue, 2 orange;\ngrey tick: the dense parent)", fontsize=10)
    axes[1].axvline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("arm - base, points (paired; 95% CI, t with 3 df)")
    axes[1].set_title("difference from the base recipe", fontsize=10)
    axes[2].set_xlabel("score recall (final evaluation)")
    axes[2].set_title("index branch: attention mass it selects", fontsize=10)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("MSA ablations at T = 128 (0.43M parameters, CPU): 4 conversions per arm from 2 dense parents",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "ablations.png", dpi=110)

    def ci(r):
        return f"{100 * r['difference']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"

    lines = ["| arm | keys read | blocks chosen | exact match, 4 runs | mean | arm - base [95% CI] | arm - dense parent [95% CI] "
             "| score recall | block recall |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        sr = sum(e["score_recall"] for e in ev[a]) / 4
        br = sum(e["block_recall"] for e in ev[a]) / 4
        lines.append(f"| {a}: {ARMS[a][0]} | {ARMS[a][1]} | {ARMS[a][2]} | {' / '.join(f'{v:.2f}' for v in em[a])} "
                     f"| {sum(em[a]) / 4:.3f} | {ci(vs_base[a]) if a != 'base' else '–'} "
                     f"| {ci(vs_dense[a]) if a in vs_dense else '–'} | {sr:.3f} | {br:.3f} |")
    lines.append(f"\nDense parents: {parent[1]:.3f} (seed 1), {parent[2]:.3f} (seed 2).")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
