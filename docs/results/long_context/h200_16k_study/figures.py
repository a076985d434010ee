"""The figures of this folder from its metrics files: python docs/results/long_context/h200_16k_study/figures.py"""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).parent


def rows(name):
    return [json.loads(line) for line in open(here / f"metrics_{name}.jsonl")]


for name, title, stages in (
    ("dense_16k.png", "dense: 2K stage, then 16K (300 steps)",
     [("2K dense", rows("lc_2k")), ("16K dense", rows("lc_16k_dense"))]),
    ("msa_16k.png", "MSA from the 2K dense model: 16K, 100 dense-warmup + 200 sparse steps (block 128 x top 16)",
     [("2K dense", rows("lc_2k")), ("16K MSA", rows("lc_16k_msa"))]),
    ("msa_from_16k_dense.png", "MSA from the 16K dense model: 50 dense-warmup + 100 sparse steps",
     [("2K dense", rows("lc_2k")), ("16K dense", rows("lc_16k_dense")), ("16K MSA", rows("lc_16k_cpt"))]),
):
    fig = plots.stage_curves(stages, title=title)
    fig.savefig(here / name, dpi=100, bbox_inches="tight")
    print("wrote", here / name)
