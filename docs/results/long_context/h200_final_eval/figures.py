"""The figures of this folder from its evaluation and metrics files:
python docs/results/long_context/h200_final_eval/figures.py

retrieval_by_length.png: exact match (all depths pooled, 95% intervals) against context length, one
line per model; retrieval_heatmaps.png: length x depth per task, one row of panels per model;
dense_repeat.png: the same dense recipe run twice (the run-to-run spread on the GPU)."""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).parent
names = {"lc16_dense": "dense", "lc16_scratch": "MSA from scratch", "lc16_cpt": "MSA converted from 16K dense",
         "lc16_index-nope": "MSA from scratch, index without RoPE"}
tasks = ["passkey", "multikey", "variable_tracking"]

cells = []
for run in names:  # the study's order: dense first
    path = here / f"eval_{run.removeprefix('lc16_')}" / "results.json"
    if path.exists():
        cells += [dict(r, run=names[r["run"]]) for r in json.load(open(path))["rows"]]
runs = list(dict.fromkeys(r["run"] for r in cells))
plots.retrieval_by_length(cells, runs, tasks, here / "retrieval_by_length.png", train_len=16384)
plots.plot_retrieval(cells, runs, tasks, here / "retrieval_heatmaps.png")


def rows(path):
    return [json.loads(line) for line in open(path)]


# The same dense recipe twice (two machines, same seed and data): validation loss and the probe along
# both stages, the 16K stage's steps after the 2K stage's 600
plt = plots.pyplot()
fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4))
for i, (label, suffix) in enumerate([("evaluated run", ""), ("repeat", "_repeat")]):
    evals = [r for r in rows(here / f"metrics_lc_2k{suffix}.jsonl") if r["kind"] == "eval"]
    evals += [dict(r, step=r["step"] + 600) for r in rows(here / f"metrics_lc16_dense{suffix}.jsonl") if r["kind"] == "eval"]
    steps = [r["step"] for r in evals]
    ax_l.plot(steps, [r["val_bpb"] for r in evals], "o-", color=f"C{i}", label=label)
    ax_r.plot(steps, [r["val_answer_exact"] for r in evals], "s-", color=f"C{i}", label=label)
for ax in (ax_l, ax_r):
    ax.axvline(600, color="gray", ls="--", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend()
ax_l.set(xlabel="step (2K stage, then 16K from step 600)", ylabel="val LM loss (bits/byte)", yscale="log",
         title="dense, the same command on two machines")
ax_r.set(xlabel="step (2K stage, then 16K from step 600)", ylabel="val probe: whole answers right", ylim=(0, 1.05))
fig.tight_layout()
fig.savefig(here / "dense_repeat.png", dpi=100)
print("wrote", ", ".join(p.name for p in sorted(here.glob("*.png"))))
