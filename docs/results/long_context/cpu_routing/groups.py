"""The needle routing of this folder's runs per KV group at their last step (groups.json, groups.md): which of the
MSA layer's two KV groups sends the probe's answers to the needle. The same 32 probe rows as the training
evaluations (`loop.retrieval_probe` with the runs' seed and 8 x 4 rows), the sparse forward. Needs run.sh's runs
(runs/cpu_t512/routing_*). Run from the repository root: python <this folder>/groups.py
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from msa_jax import data, loop, retrieval
from msa_jax.checkpoint import load_run
from msa_jax.model import layer_selections

HERE = Path(__file__).resolve().parent
RUNS = ["warmup-50_p1c1", "warmup-50-ilr3_p1c1", "warmup-50-ilr10_p1c1", "msa512_w20_p1", "msa512_w20-scratch_p1"]


def main():
    out, lines = {}, ["| run | step | group 0 | group 1 | both |", "|---|---|---|---|---|"]
    for name in RUNS:
        model, run, step = load_run(f"runs/cpu_t512/routing_{name}")
        corpus = data.load_corpus(run.max_bytes, sources=tuple(run.sources.split(",")))
        probe = loop.retrieval_probe(run, corpus.val, 4, 8)
        lo, hi = retrieval.answer_targets(run.seq_len)
        bs = run.block_size
        hits = []  # [rows, groups]
        for rows, needles in zip(*probe):
            sel = [s for s in layer_selections(model, jnp.asarray(rows[:, :-1])) if s is not None]
            ids = np.asarray(sel[0]["block_idx"])[:, lo:hi]  # the one MSA layer: [B, answer rows, H_kv, top_k]
            first, last = needles[:, 0] // bs, (needles[:, 1] - 1) // bs
            hit = ((ids >= first[:, None, None, None]) & (ids <= last[:, None, None, None])).any(-1)
            hits.append(hit.mean(axis=1))
        g = np.concatenate(hits).mean(axis=0)
        out[name] = dict(step=step, per_group=g.tolist(), mean=float(g.mean()))
        lines.append(f"| {name} | {step} | {g[0]:.2f} | {g[1]:.2f} | {g.mean():.2f} |")
    (HERE / "groups.json").write_text(json.dumps(out, indent=1))
    (HERE / "groups.md").write_text("Needle selected per KV group at each run's last step (32 probe rows, sparse "
                                    "forward; `groups.py`).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
