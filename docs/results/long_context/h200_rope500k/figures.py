"""The figures of this folder from its metrics files: python docs/results/long_context/h200_rope500k/figures.py"""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).parent
old = here.parent / "h200_length_transfer"


def rows(path):
    return [json.loads(line) for line in open(path)]


for name, title, stages in (
    ("curriculum_base10k.png", "RoPE base 10,000 (h200_length_transfer)",
     [("2K dense", rows(old / "metrics_2k.jsonl")), ("16K dense", rows(old / "metrics_16k_a.jsonl"))]),
    ("curriculum_base500k.png", "RoPE base 500,000",
     [("2K dense", rows(here / "metrics_lc_2k.jsonl")), ("16K dense", rows(here / "metrics_lc_16k_rope.jsonl"))]),
    ("msa_2k.png", "RoPE base 500,000: MSA from the 2K dense model (block 32 x top 8)",
     [("2K dense", rows(here / "metrics_lc_2k.jsonl")), ("2K MSA (50 warmup)", rows(here / "metrics_lc_2k_cpt.jsonl"))]),
):
    fig = plots.stage_curves(stages, title=title)
    fig.savefig(here / name, dpi=100, bbox_inches="tight")
    print("wrote", here / name)
