"""The figures of this folder from its committed evaluation and metrics files (run from the repository root):
python docs/results/long_context/h100_index_nope_far/figures.py

by_depth.png: exact match at 16K against needle depth (95% Wilson intervals), one panel per task: MSA with
the RoPE-free index (both stages as MSA, the dense bar's recipe; its depth-0.02-0.15 cells from the second
evaluation) beside ../h200_dense_bar/'s dense and MSA-from-dense models and ../h100_scratch_far/'s MSA with
the RoPE index. The x axis is not to scale: the first tenth of the context is stretched.
by_length.png: the RoPE-free model at 4K, 16K and 32K (the training length: 16K) per depth, dense at 16K.
routing.png: along the 16K stage, (left) whether the index selects the needle's block for the answer rows of
the training-time retrieval probe (val_needle_selected, 16 validation rows), the mean over the 28 (MSA layer,
KV group) cells and the best cell, for the RoPE-free and the RoPE index, against a uniform choice (0.151 on
this probe); (middle) the RoPE-free index's share per cell at step 600; (right) the training rows' answers
(50-step means), dense's too."""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).resolve().parent
bar, scratch = here.parent / "h200_dense_bar", here.parent / "h100_scratch_far"
TASKS = ["passkey", "multikey", "variable_tracking"]
NOPE = "MSA, RoPE-free index, far, 600 (H100)"
MODELS = {  # label: (evaluation folders, metrics file, colour, line style)
    "dense, far, 600 steps (H200)": ([bar / "eval_dense-far_s600"], bar / "metrics_lc16_dense-far_s600.jsonl", "C0", "o-"),
    "MSA from the 2K dense stage, far, 600 (H200)": ([bar / "eval_msa_far_s600"], bar / "metrics_lc16_msa_far_s600.jsonl",
                                                     "C3", "s:"),
    "MSA from the 2K MSA stage (RoPE index), far, 600 (H100)": ([scratch / "eval_scratch_far_s600"],
                                                                scratch / "metrics_lc16_scratch_far_s600.jsonl", "C1", "s--"),
    NOPE: ([here / "eval_index-nope_far_s600", here / "eval_index-nope_far_s600_near0"],
           here / "metrics_lc16_index-nope_far_s600.jsonl", "C2", "D-"),
}
CHANCE = 0.151  # retrieval.uniform_needle_selected over the probe's 16 needles (both runs log it or share the probe)


def rows(path):
    return [json.loads(line) for line in open(path)]


def finish(fig, axes, name):  # one panel per task, the legend below them
    axes[0].set_ylabel("exact match (50 examples per point)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.savefig(here / name, dpi=110)
    plt.close(fig)


TICKS = [0, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1]
plt = plots.pyplot()
fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4.6), sharey=True)
for label, (folders, _, color, style) in MODELS.items():
    by_key = plots.eval_cells(folders, 16384)
    for ax, task in zip(axes, TASKS):
        plots.exact_match_by_depth(ax, by_key, task, plots.stretch_depth, fmt=style, color=color, label=label)
for ax, task in zip(axes, TASKS):
    ax.set(title=f"{task} at 16K", xlabel="needle depth (0: start of the context; first tenth stretched)",
           ylim=(-0.03, 1.03), xticks=[plots.stretch_depth(t) for t in TICKS], xticklabels=[f"{t:g}" for t in TICKS])
    ax.grid(alpha=0.3)
finish(fig, axes, "by_depth.png")

fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4.4), sharey=True)
dense16 = plots.eval_cells(MODELS["dense, far, 600 steps (H200)"][0], 16384)
other = here / "eval_index-nope_far_s600_4k_32k"
for length, folders, color in ((4096, [other], "C9"), (16384, [here / "eval_index-nope_far_s600"], "C2"),
                               (32768, [other], "C5")):
    by_key = plots.eval_cells(folders, length)
    for ax, task in zip(axes, TASKS):
        plots.exact_match_by_depth(ax, by_key, task, float, fmt="D-", color=color,
                                   label=f"RoPE-free index, {length // 1024}K")
for ax, task in zip(axes, TASKS):
    plots.exact_match_by_depth(ax, dense16, task, float, fmt="o:", color="C0", label="dense, 16K")
    ax.set(title=task, xlabel="needle depth", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
finish(fig, axes, "by_length.png")

plots.routing_figure({label: (rows(metrics), color) for label, (_, metrics, color, _) in MODELS.items()},
                     here / "routing.png", grid=NOPE, chance=CHANCE, x_label="step at 16K")
print(f"wrote {here / 'by_depth.png'}, {here / 'by_length.png'} and {here / 'routing.png'}")
