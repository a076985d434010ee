"""The figures of this folder from its committed evaluation and metrics files (run from the repository root):
python docs/results/long_context/h100_scratch_far/figures.py

by_depth.png: exact match at 16K against needle depth (95% Wilson intervals), one panel per task: MSA from
the 2K MSA stage with far needles (600 steps, and 300 steps with 200 of dense warmup) beside the dense and
MSA models of ../h200_dense_bar/ (600 steps, far needles, from one 2K dense stage).
routing.png: along the 16K stage, (left) whether the index branch selects the needle's block for the
answer rows of the training-time retrieval probe (val_needle_selected: 16 validation rows), the mean over
MSA layers and KV groups and the one (layer, group) that routes best, against a uniform choice of 15 of the
~127 visible non-local blocks (0.15 on this probe); (middle) the share per MSA layer and KV group at the last step; (right)
the training rows' answers (50-step means), the dense model's too."""
import json
import pathlib

import numpy as np

from msa_jax import plots

here = pathlib.Path(__file__).resolve().parent
bar = here.parent / "h200_dense_bar"
TASKS = ["passkey", "multikey", "variable_tracking"]
SCRATCH = "MSA from the 2K MSA stage, far, 600 (H100)"
MODELS = {  # label: (evaluation folder, metrics file, colour, line style)
    "dense, far, 600 steps (H200)": (bar / "eval_dense-far_s600", bar / "metrics_lc16_dense-far_s600.jsonl", "C0", "o-"),
    "MSA from the 2K dense stage, far, 600 (H200)": (bar / "eval_msa_far_s600", bar / "metrics_lc16_msa_far_s600.jsonl",
                                                     "C3", "s:"),
    SCRATCH: (here / "eval_scratch_far_s600",
                                                   here / "metrics_lc16_scratch_far_s600.jsonl", "C1", "s-"),
    "the same, 300 steps, 200 warmup (H100)": (here / "eval_warmup-200_far", here / "metrics_lc16_warmup-200_far.jsonl",
                                               "C2", "^-"),
}
# A uniform choice of 15 of the non-local blocks visible to the answer rows finds the needle's block 0.118 of
# the time, 0.223 when the needle straddles two blocks (5 of the probe's 16): retrieval.uniform_needle_selected
# over this probe gives 0.151, as the later runs' val_needle_selected_chance logs
CHANCE = 0.151


def rows(path):
    return [json.loads(line) for line in open(path)]


plt = plots.pyplot()
fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4.6), sharey=True)
for label, (folder, _, color, style) in MODELS.items():
    cells = [r for r in json.load(open(folder / "results.json"))["rows"] if r["context_len"] == 16384]
    for ax, task in zip(axes, TASKS):
        sub = sorted((r for r in cells if r["task"] == task), key=lambda r: r["depth"])
        acc = np.array([r["accuracy"] for r in sub])
        err = [acc - [r["ci_low"] for r in sub], [r["ci_high"] for r in sub] - acc]
        ax.errorbar([r["depth"] for r in sub], acc, yerr=err, fmt=style, color=color, capsize=3, label=label)
for ax, task in zip(axes, TASKS):
    ax.set(title=f"{task} at 16K", xlabel="needle depth (0: start of the context)", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("exact match (50 examples per point)")
fig.tight_layout(rect=(0, 0.08, 1, 1))
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
fig.savefig(here / "by_depth.png", dpi=110)
plt.close(fig)

plots.routing_figure({label: (rows(metrics), color) for label, (_, metrics, color, _) in MODELS.items()},
                     here / "routing.png", grid=SCRATCH, chance=CHANCE, x_label="step at 16K")
print(f"wrote {here / 'by_depth.png'} and {here / 'routing.png'}")
