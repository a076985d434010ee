"""The training curves of this folder's runs from their metrics files: the share of pass-key answers the
training batches get right, per seed (dense, then MSA converted from it at step 8000).
python docs/results/long_context/cpu_seeds/figures.py"""
import json
import pathlib

import numpy as np

from msa_jax import plots

here = pathlib.Path(__file__).parent
plt = plots.pyplot()
fig, ax = plt.subplots(figsize=(8, 3.6))
for i, seed in enumerate((1, 2, 3)):
    for run, offset, style in ((f"dense_seed{seed}", 0, "-"), (f"msa_cpt_seed{seed}", 8000, "--")):
        rows = [json.loads(line) for line in open(here / f"metrics_{run}.jsonl")]
        train = [r for r in rows if r["kind"] == "train"]
        steps = np.array([r["step"] for r in train]) + offset
        exact = np.array([r["answer_exact"] for r in train])
        k = 5  # a running mean over 5 logged rows (250 steps)
        ax.plot(steps[k - 1:], np.convolve(exact, np.ones(k) / k, "valid"), style, color=f"C{i}",
                label=f"seed {seed}, " + ("dense" if offset == 0 else "MSA from it"))
ax.axvline(8000, color="gray", lw=0.8)
ax.set(xlabel="step (MSA: after its dense parent's 8000)", ylabel="pass-key answers right (training batches)",
       ylim=(-0.02, 1.02), title="T = 128, 0.43M parameters: the copy skill appears, or not")
ax.grid(alpha=0.3)
ax.legend(fontsize=7, loc="upper left")
fig.tight_layout()
fig.savefig(here / "curves.png", dpi=110)
