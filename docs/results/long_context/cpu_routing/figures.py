"""Redraw this folder's figure and tables from its committed metrics (run.sh writes them).

routing.png: per run, over the training steps, the training probe's whole answers right (val_answer_exact, 32
validation rows, dotted) and the index's routing of those answers to the needle (val_needle_selected_groups)
in the KV group that retrieves (the group routing most at the run's last evaluation; solid), with the switch to
sparse attention dashed; the conversions of the T = 512 dense model (50 and 200 warmup steps) and the T = 512
stage from the T = 128 parent; last, every evaluation after the switch, answers against that routing, with
routing ** 5 (an answer is five rows, each needing the needle). routing.md: at chosen steps, that group's routing, the mean over both groups
(val_needle_selected) and the answers. Run from the repository root: python <this folder>/figures.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
PANELS = {  # panel title: {run: (label, switch step = the dense warmup's length)}
    "converted from the T = 512 dense model\n(50 dense-warmup steps)": {
        "warmup-50_p1c1": ("index lr 1x", 50),
        "warmup-50-ilr3_p1c1": ("index lr x3", 50),
        "warmup-50-ilr10_p1c1": ("index lr x10", 50),
    },
    "converted from the T = 512 dense model\n(200 dense-warmup steps: the base recipe; red, purple: 400; thin: seed 11)": {
        "base_p1c1": ("index lr 1x", 200),
        "ilr10_p1c1": ("index lr x10", 200),
        "ilr10-mix25_p1c1": ("x10, 1/4 of the rows retrieval", 400),
        "base-mix25_p1c1": ("1x, 1/4 of the rows retrieval", 400),
        "ilr10_p1c11": ("index lr x10, seed 11", 200),
        "ilr10-mix25_p1c11": ("x10, 1/4 of the rows retrieval, seed 11", 400),
    },
    "the T = 512 stage from the T = 128 parent\n(sparse from step 20; green: from 400)": {
        "msa512_w20_p1": ("fresh index", 20),
        "msa512_w20-scratch_p1": ("index trained at T = 128 first", 20),
        "msa512_w400_p1": ("fresh index, 400 warmup steps", 400),
    },
}
COLORS = {"index lr 1x": "C0", "index lr x3": "C1", "index lr x10": "C2", "fresh index": "C0",
          "index trained at T = 128 first": "C1", "x10, 1/4 of the rows retrieval": "C3",
          "1x, 1/4 of the rows retrieval": "C4", "fresh index, 400 warmup steps": "C2", "index lr x10, seed 11": "C2", "x10, 1/4 of the rows retrieval, seed 11": "C3"}
STEPS = [10, 50, 60, 100, 150, 200, 210, 250, 300, 400, 500, 600]


def evals(run):
    """The run's evaluation rows with the needle routing, and the retrieving group (the one of the one MSA layer
    routing most at the last of them)."""
    path = HERE / f"metrics_{run}.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ev = [r for r in rows if r["kind"] == "eval" and r.get("val_needle_selected_groups") is not None]
    return ev, int(np.argmax(ev[-1]["val_needle_selected_groups"][0])) if ev else None


def main():
    fig, grid = plt.subplots(2, 2, figsize=(16.5, 12), layout="constrained")
    axes = grid.ravel()
    scatter = axes[-1]  # every sparse-phase evaluation: answers against the retrieving group's routing
    table = ["| run | retrieving group | " + " | ".join(f"step {s}" for s in STEPS) + " |",
             "|---|---|" + "---|" * len(STEPS)]
    for ax, (title, runs) in zip(axes, PANELS.items()):
        for run, (label, switch) in runs.items():
            ev, g = evals(run)
            if not ev:
                continue
            color = COLORS[label]
            x = [r["step"] for r in ev]
            ax.plot(x, [r["val_needle_selected_groups"][0][g] for r in ev], "-", color=color,
                    lw=1 if "seed 11" in label else 2,
                    label=f"{label}: needle selected (group {g})")
            if "seed 11" not in label:  # (answers 0.97-1.00 throughout, as seed 1's)
                ax.plot(x, [r["val_answer_exact"] for r in ev], ":", color=color, lw=1.5, label=f"{label}: answers right")
            ax.axvline(switch, color="gray", ls="--", lw=1)
            sparse = [r for r in ev if r["step"] > switch] or None
            stage = "T = 512 stage" in title
            if sparse:
                scatter.plot([r["val_needle_selected_groups"][0][g] for r in sparse], [r["val_answer_exact"] for r in sparse],
                             "x" if stage else "o" if switch == 50 else "s", color=color, ms=4, alpha=0.7,
                             label=f"T = 512 stage, {label}" if stage else f"{label}, {switch} warmup steps")
            at = {r["step"]: r for r in ev}
            cells = [f"{at[s]['val_needle_selected_groups'][0][g]:.2f} ({at[s]['val_needle_selected']:.2f}) / "
                     f"{at[s]['val_answer_exact']:.2f}" if s in at else "" for s in STEPS]
            table.append(f"| {run} ({label}, sparse from step {switch}) | {g} | " + " | ".join(cells) + " |")
        ax.set(title=title, xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    r = np.linspace(0, 1, 101)
    scatter.plot(r, r ** 5, "k--", lw=1, label="routing ** 5 (all five answer rows routed)")
    scatter.set(title="answers right against the retrieving group's routing\n(every evaluation after the switch)",
                xlabel="needle selected (retrieving group)", xlim=(0, 1.02))
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for ax in axes[:-1]:
        ax.set_ylabel("share (training probe, 32 validation rows)")
    scatter.set_ylabel("whole answers right")
    fig.suptitle("Does the index route the answer to the needle? (CPU, T = 512, block 16 x top 4; "
                 "dashed: sparse from here)")
    fig.savefig(HERE / "routing.png", dpi=100)
    (HERE / "routing.md").write_text(
        "The retrieving KV group's needle routing (both groups' mean) / whole answers right, on the training probe "
        "(32 validation rows) per step (`figures.py` writes this from the metrics files).\n\n"
        + "\n".join(table) + "\n")
    print(f"wrote {HERE / 'routing.png'}, {HERE / 'routing.md'}")


if __name__ == "__main__":
    main()
