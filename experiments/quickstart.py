"""Quickstart: train a small dense-GQA and a small MSA byte-level LM on the Python stdlib, compare.

Both models are trained by the same loop as `train_lm.py` (`msa_jax.loop.train_and_evaluate`)
with the same seed, so they start from the same weights and see exactly the same batches. The MSA
model first trains with dense attention (the warmup: its index branch learns from the KL loss over
the full causal support), then switches top-k block routing on. With the default preset each
query attends to at most top_k * block_size = 4 * 32 = 128 of its up to 1024 past bytes.

Output (under --out, default runs/quickstart): a run directory per model (`dense/`, `msa/`: metrics,
loss curves, checkpoints; re-running the command resumes an interrupted run), and `compare.json` +
`compare.png` (both models' curves and the MSA selection recall). The final table is printed.

The default preset ("quickstart") takes about 7 minutes on 2 CPU cores; `--preset gpu-small` is
the one-GPU size. Every size can be overridden by its flag, e.g.

  python experiments/quickstart.py --steps 100 --attention msa --out runs/qs_msa
"""

from __future__ import annotations

import argparse
import os
import pathlib

from msa_jax import plots, presets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a small dense and a small MSA byte-level LM on the Python stdlib sources (same seed, same "
        "batches) and compare loss, MSA selection recall and speed.",
        formatter_class=presets.HelpFormatter,
    )
    presets.add_run_arguments(p, attention=("dense", "msa", "both"), default_preset="quickstart",
                              default_attention="both")
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    kinds = ["dense", "msa"] if args.attention == "both" else [args.attention]
    runs = {kind: presets.run_config_from_args(args, attention=kind) for kind in kinds}  # validated up front
    from msa_jax.loop import NonFiniteError, train_and_evaluate

    out = pathlib.Path(args.out)
    run = runs[kinds[-1]]
    span, T = run.top_k * run.block_size, run.seq_len
    print(f"{os.cpu_count()} CPU cores | context T={T}; MSA: block {run.block_size}, top-{run.top_k} -> each query sees "
          f"at most {min(span, T)} of up to {T} keys ({100 * min(span, T) / T:.1f}%)"
          + (" [not sparse: top_k * block_size >= T, MSA equals dense]" if span >= T else ""))
    for kind in kinds:
        print(f"\n=== {kind} ===")
        try:
            train_and_evaluate(runs[kind], out / kind)
        except NonFiniteError as e:
            raise SystemExit(f"error: {e}") from None
    result = plots.compare_runs([out / kind for kind in kinds], out,
                                title=f"stdlib bytes, T={T}, MSA block {run.block_size} x top-{run.top_k}")
    print(f"\nFinal (val: {run.eval_batches * run.batch_size} windows of {T} bytes on unseen packages; losses in "
          f"nats/byte; train loss = mean of the last 10% of steps; tokens/s after compilation)\n")
    print(result["markdown"])
    print(f"\nwrote {out / 'compare.json'}" + (f" and {out / 'compare.png'}" if result["plotted"] else ""))
    return result


if __name__ == "__main__":
    main()
