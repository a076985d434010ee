"""The figures of this folder from its committed evaluation and metrics files (run from the repository root):
python docs/results/long_context/h100_index_nope_local2_sink1/figures.py

by_depth.png: exact match at 16K against needle depth (95% Wilson intervals), one panel per task: MSA with the
RoPE-free index and both the block before the local one and the context's first block forced into every
selection (trained and evaluated so; its depth-0.002-0.05 cells from the second evaluation), the same model
evaluated without the first block (`--sink-blocks 0`), ../h100_index_nope_sink1/'s run (first block only) and
../h200_dense_bar/'s dense model. The x axis is not to scale: the first tenth of the context is stretched.
by_length.png: this model at 4K, 16K and 32K (the training length: 16K) per depth, dense at 16K.
routing.png: along the 16K stage, (left) whether the index selects the needle's block for the answer rows of
the training-time retrieval probe (val_needle_selected, 16 validation rows), the mean over the 28 (MSA layer,
KV group) cells and the best cell, against a uniform choice among the blocks not forced in; (middle) this
model's share per cell at step 600; (right) the training rows' answers (50-step means), dense's too."""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).resolve().parent
bar, nope, sink = (here.parent / name for name in ("h200_dense_bar", "h100_index_nope_far", "h100_index_nope_sink1"))
TASKS = ["passkey", "multikey", "variable_tracking"]
DENSE = "dense, far, 600 steps (H200)"
NOPE = "MSA, RoPE-free index (H100)"
SINK = "MSA, RoPE-free + first block forced (H100)"
BOTH = "MSA, RoPE-free + previous and first blocks forced (H100)"
MODELS = {  # label: (evaluation folders, metrics file, colour, line style)
    DENSE: ([bar / "eval_dense-far_s600"], bar / "metrics_lc16_dense-far_s600.jsonl", "C0", "o-"),
    NOPE: ([nope / "eval_index-nope_far_s600", nope / "eval_index-nope_far_s600_near0"],
           nope / "metrics_lc16_index-nope_far_s600.jsonl", "C2", "D:"),
    SINK: ([sink / "eval_index-nope-sink1_far_s600", sink / "eval_index-nope-sink1_far_s600_near0"],
           sink / "metrics_lc16_index-nope-sink1_far_s600.jsonl", "C4", "s:"),
    BOTH: ([here / "eval_index-nope-local2-sink1_far_s600", here / "eval_index-nope-local2-sink1_far_s600_near0"],
           here / "metrics_lc16_index-nope-local2-sink1_far_s600.jsonl", "C3", "^-"),
}
UNFORCED = "the same evaluated without the first block"


def rows(path):
    return [json.loads(line) for line in open(path)]


depth = {label: (plots.eval_cells(folders, 16384), dict(fmt=style, color=color))
         for label, (folders, _, color, style) in MODELS.items() if label != NOPE}
depth[UNFORCED] = (plots.eval_cells([here / "eval_index-nope-local2-sink1_far_s600_sink0"], 16384),
                   dict(fmt="x--", color="C3", alpha=0.6))
plots.exact_match_by_depth_figure(depth, TASKS, here / "by_depth.png", title="{task} at 16K")

other = here / "eval_index-nope-local2-sink1_far_s600_4k_32k"
length = {f"RoPE-free + previous and first blocks, {n // 1024}K": (plots.eval_cells(folders, n),
                                                                  dict(fmt="^-", color=color))
          for n, folders, color in ((4096, [other], "C9"), (16384, MODELS[BOTH][0][:1], "C3"), (32768, [other], "C5"))}
length["dense, 16K"] = (plots.eval_cells(MODELS[DENSE][0], 16384), dict(fmt="o:", color="C0"))
plots.exact_match_by_depth_figure(length, TASKS, here / "by_length.png", stretch=False, figsize=(15, 4.4))

metrics = {label: (rows(m), color) for label, (_, m, color, _) in MODELS.items()}
chance = {label: next(r["val_needle_selected_chance"] for r in metrics[label][0] if "val_needle_selected_chance" in r)
          for label in (NOPE, SINK, BOTH)}
plots.routing_figure(metrics, here / "routing.png", grid=BOTH, chance=chance, x_label="step at 16K")
print(f"wrote {here / 'by_depth.png'}, {here / 'by_length.png'} and {here / 'routing.png'}")
