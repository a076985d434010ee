"""Redraw this folder's figure and summary table from its committed files.

warmup.png: the conversion's first sparse steps, per dense-warmup arm: the training rows' answers (exact, mean
of the four runs) over the steps, and each run's final pass key against the index's KL at its last dense step.
arms.png: per arm, pass-key exact match at 512 of its runs (the paired dense control's as grey ticks), the
paired difference from the dense control with its 95% interval, the same for validation bits/byte (percent),
and score recall. summary.md: the same numbers as a table. Run from the repository root:
python <this folder>/figures.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PAIRS = [1, 11, 21, 31]  # conversion seeds of run.sh's PAIRS (parent seed 1)
MORE = [41, 51, 61, 71]  # run.sh's MORE: four more pairs of these arms and dense
EIGHT = ["base", "ilr10", "index-nope-local2"]
ARMS = {  # arm: (what it changes, keys each query reads of 512, blocks the index chooses: top_k - 1)
    "dense": ("dense attention (the equal-budget control)", 512, None),
    "base": ("block 16 x top 4, 200 warmup steps, KL on, RoPE index", 64, 3),
    "index-nope": ("no RoPE on the index", 64, 3),
    "index-nope-local2": ("no RoPE on the index, the previous block forced too", 64, 2),
    "index-nope-sink1": ("no RoPE on the index, the first block forced", 64, 2),
    "block8-top8": ("block 8 x top 8", 64, 7),
    "block32-top2": ("block 32 x top 2", 64, 1),
    "warmup-0": ("no dense warmup", 64, 3),
    "warmup-50": ("50 dense-warmup steps", 64, 3),
    "warmup-50-ilr3": ("50 dense-warmup steps, index lr x3", 64, 3),
    "warmup-50-ilr10": ("50 dense-warmup steps, index lr x10", 64, 3),
    "ilr10": ("index lr x10, 200 warmup steps", 64, 3),
    "warmup-0-ilr10": ("no dense warmup, index lr x10", 64, 3),
    "top8": ("top 8 (twice the budget)", 128, 7),
    "top2": ("top 2 (half the budget)", 32, 1),
}


def evaluation(arm, seed):
    d = json.loads((HERE / f"eval_{arm}_p1c{seed}" / "results.json").read_text())
    rows = [r for r in d["rows"] if r["context_len"] == 512]
    return sum(r["correct"] for r in rows) / sum(r["n"] for r in rows), d["val"][0]


def recipe_rows(folder):
    rows = json.loads((HERE / folder / "differences.json").read_text())["recipes"]
    return {(r["recipe"], r["metric"]): r for r in rows
            if r["depth"] is None and r["context_len"] in (None, 512)}


def main():
    have = lambda a, seeds: all((HERE / f"eval_{a}_p1c{s}").exists() for s in seeds)  # noqa: E731
    arms = [a for a in ARMS if have(a, PAIRS)]
    groups = [(a, PAIRS) for a in arms]
    vs_dense = recipe_rows("against_dense")
    for a8 in EIGHT:  # the arms run on all eight pairs: a row of their own after their first four
        if have(a8, PAIRS + MORE) and have("dense", PAIRS + MORE) and (HERE / f"{a8}_eight_pairs").exists():
            groups.insert(groups.index((a8, PAIRS)) + 1, (a8, PAIRS + MORE))
            vs_dense.update({(f"{a8} x{len(PAIRS + MORE)}", m): r for (a, m), r in
                             recipe_rows(f"{a8}_eight_pairs").items() if a == a8})

    def label(a, seeds):
        return a if seeds is PAIRS else f"{a} x{len(seeds)}"

    ev = {label(a, s): [evaluation(a, x) for x in s] for a, s in groups}
    fig, axes = plt.subplots(1, 4, figsize=(17, 0.5 * len(groups) + 1.9), sharey=True)
    y = list(range(len(groups)))[::-1]
    for yi, (a, seeds) in zip(y, groups):
        name = label(a, seeds)
        control = [evaluation("dense", x) for x in seeds]
        for (em, val), (em_d, val_d) in zip(ev[name], control):
            axes[0].plot(em, yi, "o", color="tab:blue", alpha=0.7)
            axes[0].plot(em_d, yi, "|", color="grey", ms=12)
            if a != "dense":
                axes[3].plot(val["score_recall"], yi, "o", color="tab:blue", alpha=0.7)
                axes[1].plot(100 * (em - em_d), yi, "o", color="tab:blue", alpha=0.5)
                axes[2].plot(100 * (val["val_bpb"] / val_d["val_bpb"] - 1), yi, "o", color="tab:blue", alpha=0.5)
        for ax, metric in ((axes[1], "exact match"), (axes[2], "val bits/byte")):  # both as shares
            r = vs_dense.get((name, metric))
            if r is None:
                continue
            d = 100 * r["difference"]
            ax.errorbar(d, yi, xerr=[[d - 100 * r["ci_low"]], [100 * r["ci_high"] - d]], fmt="s",
                        color="k", capsize=3)
    axes[0].set_yticks(y, [f"{label(a, s)} ({ARMS[a][1]} keys" + (f", {ARMS[a][2]} chosen)" if ARMS[a][2] else ")")
                           for a, s in groups])
    axes[0].set_xlabel("pass-key exact match at 512 (200 examples per run)")
    axes[0].set_title("runs (grey tick: the dense control of the same seed)", fontsize=10)
    axes[1].axvline(0, color="grey", lw=0.8)
    for x in (-2, 2):
        axes[1].axvline(x, color="tab:red", lw=0.6, ls=":")
    axes[1].set_xlabel("arm - dense, points (paired; 95% CI, t)")
    axes[1].set_title("exact match against dense", fontsize=10)
    axes[2].axvline(0, color="grey", lw=0.8)
    for x in (-1, 1):
        axes[2].axvline(x, color="tab:red", lw=0.6, ls=":")
    axes[2].set_xlabel("arm / dense - 1, % (paired; 95% CI)")
    axes[2].set_title("validation bits/byte against dense", fontsize=10)
    axes[3].set_xlabel("score recall (MSA layer, 64 validation batches)")
    axes[3].set_title("attention mass the index selects", fontsize=10)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("MSA at 16K's sparsity on the CPU (T = 512, 0.43M parameters): paired runs from one dense parent, "
                 "against an equal-budget dense control (dotted: the targets)", fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "arms.png", dpi=110)

    def ci(r, pct=False):  # points of exact match, or percent of dense's bits/byte
        u = "%" if pct else ""
        return f"{100 * r['difference']:+.1f}{u} [{100 * r['ci_low']:+.1f}{u}, {100 * r['ci_high']:+.1f}{u}]"

    lines = ["| arm | keys read | blocks chosen | pass key at 512, runs | mean | minus dense [95% CI] | val bits/byte "
             "| minus dense [95% CI] | block recall | score recall |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a, seeds in groups:
        name = label(a, seeds)
        em = [e for e, _ in ev[name]]
        vals = [v for _, v in ev[name]]
        mean = lambda k: sum(v[k] for v in vals) / len(vals)  # noqa: E731
        em_r, bpb_r = vs_dense.get((name, "exact match")), vs_dense.get((name, "val bits/byte"))
        lines.append(
            f"| {name}: {ARMS[a][0]} | {ARMS[a][1]} | {ARMS[a][2] or '–'} | {' / '.join(f'{v:.2f}' for v in em)} "
            f"| {sum(em) / len(em):.3f} | {ci(em_r) if em_r else '–'} | {mean('val_bpb'):.3f} "
            f"| {ci(bpb_r, pct=True) if bpb_r else '–'} | "
            + ("– | – |" if a == "dense" else f"{mean('block_recall'):.3f} | {mean('score_recall'):.3f} |"))
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    warmup_figure()


WARMUP_ARMS = {"warmup-0": 0, "warmup-0-ilr10": 0, "warmup-50": 50, "warmup-50-ilr3": 50,
               "warmup-50-ilr10": 50, "base": 200, "ilr10": 200}  # arm: dense steps


def warmup_figure():
    arms = [a for a in WARMUP_ARMS if all((HERE / f"metrics_{a}_p1c{s}.jsonl").exists() for s in PAIRS)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    for i, a in enumerate(arms):
        color = f"C{i}"
        rows = {s: [json.loads(x) for x in (HERE / f"metrics_{a}_p1c{s}.jsonl").read_text().splitlines()] for s in PAIRS}
        train = {s: {r["step"]: r for r in rs if r["kind"] == "train"} for s, rs in rows.items()}
        steps = sorted(set.intersection(*(set(t) for t in train.values())))
        answers = [sum(train[s][t]["answer_exact"] for s in PAIRS) / len(PAIRS) for t in steps]
        axes[0].plot(steps, answers, "-o", ms=3, color=color, label=f"{a} ({ARMS[a][0]})")
        w = WARMUP_ARMS[a]
        if w:
            axes[0].axvline(w, color=color, lw=0.8, ls=":")
            for s in PAIRS:  # KL at the last dense step (the committed metrics keep every 50th step)
                axes[1].plot(train[s][w]["kl"], evaluation(a, s)[0], "o", color=color, alpha=0.8)
    axes[0].set_xlabel("step of the conversion (dotted: the last dense-warmup step)")
    axes[0].set_ylabel("training rows' answers exact (4 runs x 4 rows)")
    axes[0].set_xlim(0, 1000)
    axes[0].set_title("answers through the switch to sparse", fontsize=10)
    axes[1].set_xscale("log")
    axes[1].set_xticks([0.2, 0.3, 0.5, 1, 2, 3], ["0.2", "0.3", "0.5", "1", "2", "3"])
    axes[1].minorticks_off()
    axes[1].set_xlabel("index KL to the main branch at the last dense step (nats)")
    axes[1].set_ylabel("pass key at 512 after 1000 steps")
    axes[1].set_title("what each run keeps against how far its index had learned", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Converting a retrieving dense model at T = 512 (block 16 x top 4): the dense warmup and the index's "
                 "learning rate", fontsize=11)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3)  # below both panels
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(HERE / "warmup.png", dpi=110)


if __name__ == "__main__":
    main()
