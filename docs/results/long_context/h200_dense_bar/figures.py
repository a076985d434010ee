"""The figures of this folder from its committed evaluation and metrics files (run from the repository root):
python docs/results/long_context/h200_dense_bar/figures.py

by_depth.png: exact match at 16K against needle depth (95% Wilson intervals), one panel per task: this
folder's dense and MSA models (600 steps at 16K, far needles) beside the 300-step dense and MSA-from-scratch
models of ../h200_final_eval/. curves.png: along the 16K stage, validation bits/byte of both models of this
folder, MSA's validation KL (its index branch against the main branch's attention: over every causal block
in the dense warmup, over the selected blocks once sparse, so the two phases do not compare) and its recalls.
conversion.png: the training rows' exact match (every row is a retrieval example; 25-step means) along the
rebuilt dense model's 600 steps at 16K (H100) and on through MSA converted from it (cpt_far_s600: 50
dense-warmup steps, then sparse), with the converted model's KL."""
import json
import pathlib

from msa_jax import plots

here = pathlib.Path(__file__).resolve().parent
MODELS = {  # label: (evaluation folder, colour, line style)
    "dense, far needles, 600 steps": (here / "eval_dense-far_s600", "C0", "o-"),
    "MSA from the same 2K stage, far, 600": (here / "eval_msa_far_s600", "C3", "s-"),
    "dense, 300 steps (final eval)": (here.parent / "h200_final_eval" / "eval_dense", "C0", "o:"),
    "MSA from scratch, 300 steps (final eval)": (here.parent / "h200_final_eval" / "eval_scratch", "C1", "s:"),
}
TASKS = ["passkey", "multikey", "variable_tracking"]


def rows(path):
    return [json.loads(line) for line in open(path)]


plt = plots.pyplot()
fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4), sharey=True)
for label, (folder, color, style) in MODELS.items():
    cells = [r for r in json.load(open(folder / "results.json"))["rows"] if r["context_len"] == 16384]
    for ax, task in zip(axes, TASKS):
        sub = sorted((r for r in cells if r["task"] == task), key=lambda r: r["depth"])
        d = [r["depth"] for r in sub]
        acc = [r["accuracy"] for r in sub]
        err = [[a - r["ci_low"] for a, r in zip(acc, sub)], [r["ci_high"] - a for a, r in zip(acc, sub)]]
        ax.errorbar(d, acc, yerr=err, fmt=style, color=color, capsize=3, label=label,
                    alpha=1.0 if "600" in label else 0.6)
for ax, task in zip(axes, TASKS):
    ax.set(title=f"{task} at 16K", xlabel="needle depth (0: start of the context)", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("exact match (50 examples per point)")
axes[0].legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(here / "by_depth.png", dpi=110)
plt.close(fig)

fig, (ax_l, ax_m, ax_r) = plt.subplots(1, 3, figsize=(15, 4))
for name, color in (("dense-far_s600", "C0"), ("msa_far_s600", "C3")):
    evals = [r for r in rows(here / f"metrics_lc16_{name}.jsonl") if r["kind"] == "eval"]
    ax_l.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", color=color, label=name)
    if name.startswith("msa"):
        ax_m.plot([r["step"] for r in evals], [r["val_kl"] for r in evals], "s-", color=color)
        for key, style in (("block_recall", "s-"), ("score_recall", "s--")):
            ax_r.plot([r["step"] for r in evals], [r[key] for r in evals], style, color=color, label=key)
for ax in (ax_l, ax_m, ax_r):
    ax.axvline(100, color="grey", lw=0.8, ls=":")  # MSA's last dense-warmup step
    ax.grid(alpha=0.3)
    ax.set_xlabel("step at 16K (MSA sparse after the dotted line)")
ax_l.set(ylabel="validation bits/byte (16K)", title="loss")
ax_l.legend()
ax_m.set(ylabel="validation KL (nats, summed over MSA layers)",
         title="MSA: index vs main attention (step 100: full support; then selected)")
ax_r.set(ylabel="recall against the attention's top 16", title="MSA: block and score recall", ylim=(0.5, 1.0))
ax_r.legend()
fig.tight_layout()
fig.savefig(here / "curves.png", dpi=110)
plt.close(fig)

def means(rs, key, w=25):  # (last step, mean) over consecutive w-step windows
    return [(rs[i + w - 1]["step"], sum(r[key] for r in rs[i:i + w]) / w) for i in range(0, len(rs) - w + 1, w)]


dense = [r for r in rows(here / "metrics_lc16_dense-far_s600_h100.jsonl") if r["kind"] == "train"]
cpt = [r for r in rows(here / "metrics_lc16_cpt_far_s600.jsonl") if r["kind"] == "train"]
cpt = [dict(r, step=r["step"] + dense[-1]["step"]) for r in cpt]  # on from the dense model's last step
fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4))
for rs, label, color in ((dense, "dense (dense-far_s600, rebuilt)", "C0"), (cpt, "MSA converted from it (cpt)", "C2")):
    for key, style in (("answer_exact", "o-"), ("answer_bytes", "o:")):
        x, y = zip(*means(rs, key))
        ax_l.plot(x, y, style, color=color, ms=3, label=f"{label}: {key.replace('_', ' ')}")
x, y = zip(*means(cpt, "kl", 5))
ax_r.plot(x, y, "o-", color="C2", ms=3)
for ax in (ax_l, ax_r):
    ax.axvline(dense[-1]["step"], color="grey", lw=0.8, ls="--")  # conversion
    ax.axvline(dense[-1]["step"] + 50, color="grey", lw=0.8, ls=":")  # the converted model's first sparse step
    ax.grid(alpha=0.3)
    ax.set_xlabel("step at 16K (dashed: converted to MSA; dotted: sparse from here)")
ax_l.set(ylabel="training rows' answers (25-step means)", title="retrieval while training", ylim=(-0.02, 1.02))
ax_l.legend(fontsize=7, loc="upper left")
ax_r.set(ylabel="KL (nats, summed over MSA layers; 5-step means)", yscale="log", xlim=(dense[-1]["step"] - 5, None),
         title="converted model: index vs main attention")
fig.tight_layout()
fig.savefig(here / "conversion.png", dpi=110)
plt.close(fig)
print(f"wrote {here / 'by_depth.png'}, {here / 'curves.png'} and {here / 'conversion.png'}")
