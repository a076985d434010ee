"""The figures of this folder from its metrics and evaluation files, with the 16K study's models as the
baselines: python docs/results/long_context/h200_16k_ablations/figures.py"""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).parent
study = here.parent / "h200_16k_study"


def rows(path):
    return [json.loads(line) for line in open(path)]


fig = plots.stage_curves([("2K MSA", rows(here / "metrics_lc_2k_msa.jsonl")),
                          ("16K MSA", rows(here / "metrics_lc16_scratch.jsonl"))],
                         title="MSA from scratch: 2K MSA (400 dense-warmup + 200 sparse), then 16K MSA (100 + 200)")
fig.savefig(here / "msa_scratch_16k.png", dpi=100, bbox_inches="tight")

# Exact match at 16K per task x depth, every 16K model so far (one panel row per model)
# (index-nope was evaluated with the final evaluation's protocol, in ../h200_final_eval/)
evals = [study / "eval_4k_16k", study / "eval_cpt_16k", here / "eval_scratch_16k", here / "eval_scratch_rerun_16k"] + sorted(
    d for d in here.glob("eval_*") if not d.name.startswith("eval_scratch")) + [
    here.parent / "h200_final_eval" / "eval_index-nope"]
names = {"lc_16k_dense": "dense", "lc_16k_msa": "MSA from 2K dense", "lc_16k_cpt": "MSA from 16K dense",
         "lc16_scratch": "MSA from scratch", "lc16_index-lr-x10": "scratch, index lr x10",
         "lc16_top8": "scratch, top_k 8", "lc16_top32": "scratch, top_k 32", "lc16_warmup-200": "scratch, warmup 200",
         "lc16_kl-off": "MSA, KL off", "lc16_block64-top32": "scratch, 64 x 32", "lc16_block256-top8": "scratch, 256 x 8",
         "lc16_index-nope": "scratch, index NoPE"}
# a rerun of a recipe is named by its folder (the same run name, another 2K stage)
folder_names = {"eval_scratch_rerun_16k": "scratch, rerun"}
cells = []
for d in evals:
    for r in json.load(open(d / "results.json"))["rows"]:
        if r["context_len"] == 16384:
            name = folder_names.get(d.name) or names.get(r["run"], r["run"].removeprefix("lc16_"))
            cells.append(dict(r, run=name))
runs = list(dict.fromkeys(r["run"] for r in cells))
plots.plot_retrieval(cells, runs, ["passkey", "multikey", "variable_tracking"], here / "retrieval_16k.png")
print("wrote", here / "msa_scratch_16k.png", "and", here / "retrieval_16k.png")
