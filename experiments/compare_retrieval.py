"""Compare models' retrieval exact match against a baseline: the difference with a 95% interval per
task and context length (all needle depths pooled, and per depth), and whether it is within a margin.

Reads `eval_retrieval.py` results (a results.json or its folder; `LABEL=PATH` names the run of a
one-run file). Cells scored on the same examples (the same --seed, lengths and corpus, evaluated since
rows carry per-example outcomes) are compared paired, the others unpaired (`msa_jax.differences`).
The verdict against the margin (default 2 points, the study's target for MSA against dense):
"within" (the interval's lower end is at most 2 points below), "below" (all of it more than 2 points
below), "lower, unresolved" (below 0, not resolved against -2), "unresolved"; and the examples per model an interval of +-2 points needs at these rates.
Those intervals are the evaluation's sampling error only; `--spread a,b,c` (runs of one recipe, e.g.
reruns of one command) reports how much such runs differ beyond it, i.e. from training, and the runs
per recipe that a margin between two recipes would need at that spread. `--recipe NAME=a,b,c`
(repeatable; the first is the baseline) compares groups of runs, with their spread as the noise:
exact match per task and length, and validation bits/byte (within 1%?).

Output (under --out, default runs/differences):
  differences.json   every comparison, pooled and per depth
  differences.md     the same as Markdown tables
  differences.png    the pooled differences with their intervals, one panel per task
  (--spread)         spread.md, and "spread" in differences.json
  (--recipe)         recipes.md, "recipes" in differences.json, and recipes.png: every run's exact
                     match by recipe, with the band where one more run of the first recipe would land

  python experiments/compare_retrieval.py dense=runs/eval_dense msa=runs/eval_msa --baseline dense
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from msa_jax import differences, plots
from msa_jax.presets import HelpFormatter


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("results", nargs="+", help="[LABEL=]PATH of eval_retrieval.py results (results.json or its folder)")
    p.add_argument("--baseline", default=None, help="the run the others are compared with (default: the first run)")
    p.add_argument("--runs", default=None, help="comma list: compare only these runs with the baseline (default: all)")
    p.add_argument("--margin", type=float, default=differences.MARGIN, help="the margin, a share (0.02: 2 points)")
    p.add_argument("--spread", action="append", default=[], metavar="RUN,RUN,...",
                   help="runs of one recipe (>= 2; repeatable): their run-to-run spread beyond sampling")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=RUN,RUN,...",
                   help="a recipe's runs (repeatable; the first recipe is the baseline): recipes compared with "
                        "the run-to-run spread as the noise")
    p.add_argument("--paired-recipes", action="store_true",
                   help="--recipe: the i-th run of every recipe started from the same point as the first recipe's "
                        "i-th (e.g. one 2K stage per session, each recipe continued from it): intervals from the "
                        "per-pair differences")
    p.add_argument("--bpb-margin", type=float, default=0.01, help="--recipe: the bits/byte margin, a share")
    p.add_argument("--out", default="runs/differences")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    if not 0 < args.margin <= 1:
        raise SystemExit(f"--margin: expected a share in (0, 1], got {args.margin}")
    try:
        cells, names, vals = differences.load_cells(args.results)
        baseline = args.baseline or names[0]
        runs = None if args.runs is None else [r for r in args.runs.split(",") if r]
        pooled = differences.compare(cells, baseline, runs=runs, margin=args.margin)
        per_depth = differences.compare(cells, baseline, runs=runs, margin=args.margin, by_depth=True)
        recipes = {}
        for spec in args.recipe:
            name, _, runs_of = spec.partition("=")
            if not name or not runs_of:
                raise ValueError(f"--recipe: expected NAME=RUN,RUN,..., got {spec!r}")
            recipes[name] = [r for r in runs_of.split(",") if r]
        recipe_rows, recipe_depth_rows = ([differences.compare_recipes(cells, vals, recipes, next(iter(recipes)),
                                                                      margin=args.margin, bpb_margin=args.bpb_margin,
                                                                      by_depth=d, paired=args.paired_recipes)
                                           for d in (False, True)]
                                          if recipes else ([], []))
        spreads = [row for group in args.spread
                   for row in differences.spread(cells, [r for r in group.split(",") if r], margin=args.margin)]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if not pooled:
        raise SystemExit(f"no (task, length, depth) cell of {baseline} is shared by another run")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = plots.differences_markdown(pooled, args.margin)
    md_depth = plots.differences_markdown(per_depth, args.margin)
    # the verdict is one-sided (non-inferiority): "within" also covers a run resolved above its baseline
    reading = (f"The verdict is one-sided: \"within\" when the interval's lower end is at most "
               f"{100 * args.margin:g} points below 0 (a run above its baseline is within too), \"below\" when all "
               f"of it is further below, else unresolved.")
    head = (f"Exact match against {baseline}, difference in points with its 95% interval (Newcombe's hybrid "
            f"score interval; paired on the same examples where both evaluations stored them). {reading}")
    (out / "differences.json").write_text(json.dumps(dict(baseline=baseline, margin=args.margin, sources=args.results,
                                                          pooled=pooled, per_depth=per_depth, spread=spreads,
                                                          recipes=recipe_rows, recipes_per_depth=recipe_depth_rows),
                                                     indent=1))
    (out / "differences.md").write_text(f"{head}\n\nAll depths pooled:\n\n{md}\n\nPer depth:\n\n{md_depth}\n")
    differ = [r for r in pooled if r["examples_differ"]]
    if differ:
        print(f"note: {len(differ)} of {len(pooled)} comparisons are unpaired although both evaluations stored "
              "outcomes: their examples differ (another --seed, or haystacks from another machine's corpus)",
              file=sys.stderr)
    plotted = plots.plot_differences(pooled, out / "differences.png", args.margin, args.title)
    print(f"{head}\n\n{md}")
    if spreads:
        sp = plots.spread_markdown(spreads, args.margin)
        (out / "spread.md").write_text("Runs of one recipe: the standard deviation of their exact match (points), "
                                       "a single evaluation's sampling part, and the rest, from training.\n\n"
                                       f"{sp}\n")
        print(f"\n{sp}")
    if recipe_rows:
        rm = plots.recipes_markdown(recipe_rows)
        how = ("t on the differences of runs that share a start, pair by pair" if args.paired_recipes else
               "Welch's t; a recipe of one run is read against the other's spread")
        (out / "recipes.md").write_text("Recipes (several runs each) against the first: the difference of their means, "
                                        f"with a 95% interval from the run-to-run spread ({how}). {reading} Bits/byte: "
                                        f"\"within\" when the interval's top is at most {100 * args.bpb_margin:g}% "
                                        f"above the baseline's mean.\n\nAll depths pooled:\n\n"
                                        f"{rm}\n\nPer depth:\n\n{plots.recipes_markdown(recipe_depth_rows)}\n")
        print(f"\n{rm}")
        plots.plot_recipes(cells, recipes, out / "recipes.png")
    print(f"wrote {out}/differences.json, differences.md" + (" and differences.png" if plotted else ""), file=sys.stderr)
    return dict(pooled=pooled, per_depth=per_depth, spread=spreads, recipes=recipe_rows)


if __name__ == "__main__":
    main()
