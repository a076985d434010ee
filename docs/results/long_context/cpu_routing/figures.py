"""Redraw this folder's figure and table from its committed metrics (run.sh writes them).

routing.png: per run, over the training steps, the training probe's whole answers right (val_answer_exact,
32 validation rows) and the index's routing of those answers to the needle (val_needle_selected), with the
switch to sparse attention dashed; left the conversions of the T = 512 dense model, right the T = 512 stage
from the T = 128 parent. routing.md: the same at chosen steps. Run from the repository root:
python <this folder>/figures.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PANELS = {  # panel title: {run: (label, switch step = the dense warmup's length)}
    "converted from the T = 512 dense model\n(50 dense-warmup steps)": {
        "warmup-50_p1c1": ("index lr 1x", 50),
        "warmup-50-ilr3_p1c1": ("index lr x3", 50),
        "warmup-50-ilr10_p1c1": ("index lr x10", 50),
    },
    "the T = 512 stage from the T = 128 parent\n(sparse from step 20)": {
        "msa512_w20_p1": ("fresh index", 20),
        "msa512_w20-scratch_p1": ("index trained at T = 128 first", 20),
    },
}
STEPS = [10, 20, 40, 50, 60, 80, 100, 150, 200, 300, 400, 500, 600]


def evals(run):
    path = HERE / f"metrics_{run}.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval" and r.get("val_needle_selected") is not None]


def main():
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 5.6), sharey=True)
    table = ["| run | " + " | ".join(f"step {s}" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for ax, (title, runs) in zip(axes, PANELS.items()):
        for i, (run, (label, switch)) in enumerate(runs.items()):
            ev = evals(run)
            if not ev:
                continue
            color = f"C{i}"
            x = [r["step"] for r in ev]
            ax.plot(x, [r["val_needle_selected"] for r in ev], "-", color=color, lw=2, label=f"{label}: needle selected")
            ax.plot(x, [r["val_answer_exact"] for r in ev], ":", color=color, lw=1.5, label=f"{label}: answers right")
            ax.axvline(switch, color="gray", ls="--", lw=1)
            at = {r["step"]: r for r in ev}
            cells = [f"{at[s]['val_needle_selected']:.2f} / {at[s]['val_answer_exact']:.2f}" if s in at else "-"
                     for s in STEPS]
            table.append(f"| {run} ({label}) | " + " | ".join(cells) + " |")
        ax.set(title=title, xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0].set_ylabel("share (training probe, 32 validation rows)")
    fig.suptitle("Does the index route the answer to the needle? (CPU, T = 512, block 16 x top 4; dashed: sparse from here)")
    fig.tight_layout()
    fig.savefig(HERE / "routing.png", dpi=110)
    (HERE / "routing.md").write_text(
        "Needle selected / whole answers right on the training probe (32 validation rows), per step "
        "(`figures.py` writes this from the metrics files).\n\n" + "\n".join(table) + "\n")
    print(f"wrote {HERE / 'routing.png'}, {HERE / 'routing.md'}")


if __name__ == "__main__":
    main()
