"""Compare training runs: a loss / recall table (Markdown) and curves on one figure.

A run converted from a dense checkpoint (`--init-from`) is drawn from the dense step it started
at, so dense, MSA-from-scratch and MSA-converted runs line up on one "total steps" axis. The table
also has each run's length, mesh, step time and peak memory per device (GPU runs): the same model
on several `--mesh context=N` makes the context-parallel scaling table.

  python experiments/compare_runs.py runs/tiny_dense runs/tiny_msa runs/tiny_cpt --out runs/compare
"""

from __future__ import annotations

import argparse
import sys

from msa_jax import plots
from msa_jax.presets import HelpFormatter


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="training run directories (train_lm.py --run-dir)")
    p.add_argument("--out", default="runs/compare", help="writes compare.png and compare.json here")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        result = plots.compare_runs(args.runs, args.out, args.title)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(result["markdown"])
    print(f"wrote {args.out}/compare.json" + (f" and {args.out}/compare.png" if result["plotted"] else ""), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
