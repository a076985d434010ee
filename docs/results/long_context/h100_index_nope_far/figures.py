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


depth = {label: (plots.eval_cells(folders, 16384), dict(fmt=style, color=color))
         for label, (folders, _, color, style) in MODELS.items()}
plots.exact_match_by_depth_figure(depth, TASKS, here / "by_depth.png", title="{task} at 16K", legend_cols=4,
                                  figsize=(15, 4.6))

other = here / "eval_index-nope_far_s600_4k_32k"
length = {f"RoPE-free index, {n // 1024}K": (plots.eval_cells(folders, n), dict(fmt="D-", color=color))
          for n, folders, color in ((4096, [other], "C9"), (16384, [here / "eval_index-nope_far_s600"], "C2"),
                                    (32768, [other], "C5"))}
length["dense, 16K"] = (plots.eval_cells(MODELS["dense, far, 600 steps (H200)"][0], 16384), dict(fmt="o:", color="C0"))
plots.exact_match_by_depth_figure(length, TASKS, here / "by_length.png", stretch=False, legend_cols=4,
                                  figsize=(15, 4.4))

plots.routing_figure({label: (rows(metrics), color) for label, (_, metrics, color, _) in MODELS.items()},
                     here / "routing.png", grid=NOPE, chance=CHANCE, x_label="step at 16K")
print(f"wrote {here / 'by_depth.png'}, {here / 'by_length.png'} and {here / 'routing.png'}")
