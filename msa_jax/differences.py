"""How far apart two models' retrieval exact match is, with 95% intervals: paired when both were scored
on the same examples, unpaired otherwise; pooled over needle depths or per depth; a verdict against a
margin (the study's target: MSA within 2 exact-match points of dense); and the examples a margin needs.

    lo, hi = difference_interval(k1, n1, k2, n2)          # p1 - p2, two independent samples
    lo, hi = paired_difference_interval(x1, x2)           # p1 - p2, the same examples scored twice
    rows = compare(cells, baseline="dense", margin=0.02)  # every other run against the baseline
    rows = spread(cells, ["scratch", "rerun", "rerun2"])  # how much reruns of one recipe differ
    rows = compare_recipes(cells, vals, {"dense": [...], "msa": [...]}, "dense")  # with reruns as the noise

Both intervals are Newcombe's hybrid score intervals (method 10 of his 1998 papers on independent and
on paired proportions): each model's own Wilson interval, combined. They stay inside [-1, 1] and keep
close to 95% coverage at 50 examples and rates near 0 or 1, where the normal approximation does not.
Pairing matters: two models that answer mostly the same examples right differ by less than the sum of
their sampling errors, and the paired interval (through the correlation of the two models' outcomes)
is that much narrower. `msa_jax.retrieval.evaluate` draws example i of a cell from the seed and i
only, so two runs evaluated with the same seed, lengths and haystack corpus see the same examples; its
rows carry each example's outcome (`outcomes`, "0"/"1" per example) and a hash of the examples'
tokens (`examples`), and `compare` pairs two cells when both carry outcomes and the hashes agree.

An interval here is the evaluation's sampling error only: it says how well the examples measure this
trained model, not how much another training run of the same recipe would differ. `spread` measures
that from reruns (their accuracies' spread, less the sampling part), and how many runs per recipe a
margin between two recipes would then need; `compare_recipes` compares recipes of several runs each
with that spread as the noise (exact match and validation bits/byte).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import t as student_t

from msa_jax.retrieval import Z95, wilson_interval

__all__ = ["difference_interval", "paired_difference_interval", "examples_needed", "verdict", "compare",
           "run_spread", "spread", "mean_difference_interval", "compare_recipes", "cells_by_run", "pool",
           "load_cells", "MARGIN"]

MARGIN = 0.02  # the study's target: MSA within 2 exact-match points of dense


def _check_count(k, n, name: str) -> None:
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
        raise ValueError(f"{name}: expected ints 0 <= k <= n with n >= 1, got k={k!r}, n={n!r}")


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval of p1 - p2 (p = k / n) for two independent samples: Newcombe's hybrid score interval
    (the Wilson intervals of p1 and p2, combined). For the same examples scored by two models use
    `paired_difference_interval`: this one ignores their correlation and is then too wide."""
    _check_count(k1, n1, "k1, n1")
    _check_count(k2, n2, "k2, n2")
    return _combine(k1 / n1, wilson_interval(int(k1), int(n1), z), k2 / n2, wilson_interval(int(k2), int(n2), z), 0.0)


def paired_difference_interval(x1, x2, z: float = Z95) -> tuple[float, float]:
    """Interval of p1 - p2 where x1[i], x2[i] (bool) are the two models' outcomes on the same example
    i: Newcombe's hybrid score interval for paired proportions, which corrects the combination of the
    two Wilson intervals by the phi correlation of the outcomes (phi = 0, e.g. when a model gets every
    example right, gives the unpaired interval of the same counts)."""
    x1, x2 = np.asarray(x1), np.asarray(x2)
    if x1.ndim != 1 or x1.shape != x2.shape or x1.size == 0:
        raise ValueError(f"x1, x2: expected two non-empty 1-D outcome arrays of one length, got shapes "
                         f"{x1.shape} and {x2.shape}")
    if not all(np.isin(x, (0, 1)).all() for x in (x1, x2)):
        raise ValueError("x1, x2: expected outcomes 0/1 (or bool)")
    x1, x2 = x1.astype(bool), x2.astype(bool)
    n = x1.size
    a, b = int(np.sum(x1 & x2)), int(np.sum(x1 & ~x2))  # both right; only the first right
    c, d = int(np.sum(~x1 & x2)), int(np.sum(~x1 & ~x2))  # only the second right; both wrong
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    return _combine((a + b) / n, wilson_interval(a + b, n, z), (a + c) / n, wilson_interval(a + c, n, z), phi)


def _combine(p1, ci1, p2, ci2, phi) -> tuple[float, float]:
    (l1, u1), (l2, u2) = ci1, ci2
    below = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return max(p1 - p2 - below, -1.0), min(p1 - p2 + above, 1.0)


def examples_needed(margin: float, p1: float, p2: float, *, discordant: float | None = None, z: float = Z95) -> int:
    """Examples per model for a 95% interval of p1 - p2 about +-margin wide, at these rates (normal
    approximation, a planning number): unpaired z^2 (p1 q1 + p2 q2) / margin^2; paired, with
    `discordant` the share of examples on which the two models disagree, z^2 (discordant -
    (p1 - p2)^2) / margin^2. At least 1 (0 variance at rates 0 or 1 needs few, not none)."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin: expected a share in (0, 1], got {margin!r}")
    if not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        raise ValueError(f"p1, p2: expected shares in [0, 1], got {p1!r}, {p2!r}")
    if discordant is None:
        var = p1 * (1 - p1) + p2 * (1 - p2)
    else:
        if not abs(p1 - p2) - 1e-12 <= discordant <= 1:
            raise ValueError(f"discordant: expected a share in [|p1 - p2|, 1], got {discordant!r}")
        var = discordant - (p1 - p2) ** 2
    return max(1, math.ceil(z * z * var / (margin * margin)))


def verdict(lo: float, hi: float, margin: float = MARGIN) -> str:
    """Where the interval of (model - baseline) lies against a margin: "within" (lo >= -margin: the model
    is at most `margin` below the baseline, or above it), "below" (hi < -margin: more than `margin`
    below), else "unresolved" (the interval crosses -margin: more examples, or runs, needed), or
    "lower, unresolved" when it is below 0 all the same (worse, by an amount not yet resolved)."""
    if lo >= -margin:
        return "within"
    if hi < -margin:
        return "below"
    return "lower, unresolved" if hi < 0 else "unresolved"


def _outcomes(cell: dict) -> np.ndarray | None:
    got = cell.get("outcomes")
    return None if got is None else np.frombuffer(got.encode(), np.uint8) == ord("1")


def cells_by_run(cells: Iterable[dict]) -> dict[str, dict[tuple, dict]]:
    """Rows of `retrieval.evaluate` with "run" as {run: {(task, context_len, depth): cell}}."""
    out: dict[str, dict[tuple, dict]] = {}
    for c in cells:
        out.setdefault(c["run"], {})[(c["task"], int(c["context_len"]), float(c["depth"]))] = c
    return out


def pool(cells: Iterable[dict]) -> tuple[int, int, float]:
    """(correct, n, sampling variance of correct / n) of cells pooled (e.g. one run's depths of a task
    and length). The variance is stratified by cell (each cell's examples are a fixed share: sum_c n_c
    p_c (1 - p_c) / N^2), with p_c = (k_c + 1) / (n_c + 2): 0 of 50 right is not a rate of exactly 0,
    and its evaluation is not free of sampling error."""
    k = n = 0
    var = 0.0
    for c in cells:
        p = (c["correct"] + 1) / (c["n"] + 2)
        k, n, var = k + c["correct"], n + c["n"], var + c["n"] * p * (1 - p)
    return k, n, var / n ** 2 if n else 0.0


def compare(cells: Sequence[dict], baseline: str, *, runs: Iterable[str] | None = None, margin: float = MARGIN,
            by_depth: bool = False) -> list[dict]:
    """Every run of `cells` (rows of `retrieval.evaluate` with "run", e.g. `load_cells`) against the
    `baseline` run, per (task, context length), pooled over the needle depths both have (each depth's
    examples counted once: the all-depths accuracy), or per depth with `by_depth`.

    Returns rows {"run", "baseline", "task", "context_len", "depth" (None when pooled), "n", "accuracy",
    "baseline_accuracy", "difference" (run - baseline), "ci_low", "ci_high", "paired", "examples_differ"
    (both stored outcomes, but of other examples: another seed or corpus; compared unpaired), "discordant"
    (paired: the share of examples the two got differently, else None), "verdict" (`verdict` at
    `margin`), "examples_needed" (per model, for +-margin: paired from the measured discordance,
    else unpaired)}, in the order of `runs` (default: every run but the baseline, first seen first),
    then task, length and depth. Cells pair when both have outcomes of the same examples (equal
    "examples" hashes); a pooled row is paired only when all its depths are. The examples needed are
    planned at rates shrunk towards 1/2, (k + 1) / (n + 2), so that 0 of 50 does not plan for none."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin: expected a share in (0, 1], got {margin!r}")
    by_run = cells_by_run(cells)
    if baseline not in by_run:
        raise ValueError(f"baseline: no run named {baseline!r} (runs: {', '.join(by_run)})")
    runs = [r for r in by_run if r != baseline] if runs is None else list(runs)
    missing = [r for r in runs if r not in by_run]
    if missing:
        raise ValueError(f"runs: no cells of {', '.join(map(repr, missing))} (runs: {', '.join(by_run)})")
    base = by_run[baseline]
    out = []
    for run in runs:
        groups: dict[tuple, list[tuple[dict, dict]]] = {}
        for key, cell in by_run[run].items():
            if key in base:
                task, T, depth = key
                groups.setdefault((task, T, depth if by_depth else None), []).append((cell, base[key]))
        for (task, T, depth), pairs in groups.items():
            pairs.sort(key=lambda p: p[0]["depth"])
            x = [(_outcomes(c), _outcomes(b)) for c, b in pairs]
            paired = all(o1 is not None and o2 is not None and o1.size == o2.size and c.get("examples")
                         and c.get("examples") == b.get("examples") for (o1, o2), (c, b) in zip(x, pairs))
            # both stored outcomes, of other examples (another seed, or another machine's corpus)
            differ = any(o1 is not None and o2 is not None and c.get("examples") != b.get("examples")
                         for (o1, o2), (c, b) in zip(x, pairs))
            (k1, n1, _), (k2, n2, _) = pool(c for c, _ in pairs), pool(b for _, b in pairs)
            p1, p2 = k1 / n1, k2 / n2
            if paired:
                x1, x2 = np.concatenate([o for o, _ in x]), np.concatenate([o for _, o in x])
                lo, hi = paired_difference_interval(x1, x2)
                disc = float(np.mean(x1 != x2))
            else:
                lo, hi = difference_interval(k1, n1, k2, n2)
                disc = None
            # planning rates shrunk towards 1/2 ((k + 1) / (n + 2)): 0 of n is not a rate of exactly 0
            s1, s2 = (k1 + 1) / (n1 + 2), (k2 + 1) / (n2 + 2)
            s_disc = None if disc is None else (disc * n1 + 1) / (n1 + 2)
            out.append(dict(run=run, baseline=baseline, task=task, context_len=T, depth=depth, n=n1, baseline_n=n2,
                            accuracy=p1, baseline_accuracy=p2, difference=p1 - p2, ci_low=lo, ci_high=hi,
                            paired=bool(paired), examples_differ=bool(differ), discordant=disc,
                            verdict=verdict(lo, hi, margin),
                            examples_needed=examples_needed(margin, s1, s2, discordant=s_disc)))
    order = {r: i for i, r in enumerate(runs)}
    out.sort(key=lambda r: (order[r["run"]], r["task"], r["context_len"], -1.0 if r["depth"] is None else r["depth"]))
    return out


def run_spread(counts: Sequence[tuple[int, int]], margin: float = MARGIN, z: float = Z95, *,
               sampling_var: float | None = None) -> dict:
    """How much reruns of one recipe differ beyond their evaluations' sampling error. counts: (correct,
    n) of each run on the same examples (>= 2 runs). Returns {"mean", "sd" (the runs' accuracies'
    standard deviation), "sampling_sd" (a single evaluation's standard error: `sampling_var` if given,
    e.g. stratified by needle depth, else binomial at the mean rate), "between_sd" (the rest, from
    training: sqrt(max(sd^2 - sampling_sd^2, 0))), "runs_needed"
    (runs per recipe for a 95% interval of +-margin on the difference of two recipes' means with this
    between-run spread: 2 z^2 between_sd^2 / margin^2, at least 1), "new_run_low", "new_run_high" (the
    95% prediction interval of one more run's accuracy, mean +- t_{runs-1} sd sqrt(1 + 1/runs), in
    [0, 1]: a single run of another recipe outside it differs from this recipe beyond its reruns)}.
    With few runs the estimate is itself rough (2 runs: one degree of freedom), which the t quantile
    of the prediction interval carries (4.30 at 3 runs)."""
    if len(counts) < 2:
        raise ValueError(f"counts: expected (correct, n) of >= 2 runs, got {len(counts)}")
    for k, n in counts:
        _check_count(k, n, "counts")
    acc = np.array([k / n for k, n in counts])
    mean = float(acc.mean())
    sd = float(acc.std(ddof=1))
    if sampling_var is None:
        sampling_var = mean * (1 - mean) / np.mean([n for _, n in counts])
    sampling = math.sqrt(sampling_var)
    between = math.sqrt(max(sd * sd - sampling * sampling, 0.0))
    half = float(student_t.ppf(0.975, len(counts) - 1)) * sd * math.sqrt(1 + 1 / len(counts))
    return dict(mean=mean, sd=sd, sampling_sd=sampling, between_sd=between,
                runs_needed=max(1, math.ceil(2 * z * z * between * between / (margin * margin))),
                new_run_low=max(mean - half, 0.0), new_run_high=min(mean + half, 1.0))


def spread(cells: Sequence[dict], runs: Sequence[str], *, margin: float = MARGIN) -> list[dict]:
    """`run_spread` of the named runs (reruns of one recipe) per (task, context length), all depths
    pooled, over the cells all of them have: rows {"task", "context_len", "runs", "accuracies", "n",
    and run_spread's keys}. The sampling variance of a pooled accuracy is stratified by depth (`pool`,
    averaged over the runs), smaller than the binomial one when the rate changes with the depth."""
    runs = list(runs)
    by_run = cells_by_run(cells)
    missing = [r for r in runs if r not in by_run]
    if len(runs) < 2 or missing:
        raise ValueError(f"runs: expected >= 2 loaded runs, got {runs!r}" + (f" ({', '.join(missing)} not loaded)"
                                                                             if missing else ""))
    shared = sorted(set.intersection(*(set(by_run[r]) for r in runs)))  # sorted: sums in one order
    out = []
    for task, T in sorted({(t, T) for t, T, _ in shared}):
        keys = [k for k in shared if k[:2] == (task, T)]
        pooled = [pool(by_run[r][k] for k in keys) for r in runs]
        counts = [(k, n) for k, n, _ in pooled]
        var = float(np.mean([v for _, _, v in pooled]))
        out.append(dict(task=task, context_len=T, runs=runs, accuracies=[k / n for k, n in counts],
                        n=counts[0][1], **run_spread(counts, margin, sampling_var=var)))
    return out


def mean_difference_interval(x: Sequence[float], y: Sequence[float], level: float = 0.95, *,
                             min_var: tuple[float, float] = (0.0, 0.0), paired: bool = False
                             ) -> tuple[float, float, float, float]:
    """(difference, low, high, degrees of freedom) of mean(x) - mean(y), x and y one value per training
    run of two recipes: Welch's t interval when both have >= 2 runs; when one has a single run, the
    other's variance stands for both recipes' (the prediction interval of one more run of the other
    recipe, as `run_spread`'s). The spread between runs is the noise here, not the evaluation's
    sampling: a study of single runs has no such interval. min_var: floors of x's and y's per-run
    variance (e.g. one evaluation's sampling variance: three runs that happen to score alike do not
    make a recipe exact). paired: x[i] and y[i] share what the runs start from (e.g. a 2K stage
    trained once per session, both recipes continued from it): the t interval of the mean of the
    differences x[i] - y[i] (k - 1 degrees of freedom, variance at least the sum of the floors), which
    removes what the pairs share from the noise."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or y.ndim != 1 or min(x.size, y.size) < 1 or max(x.size, y.size) < 2:
        raise ValueError(f"x, y: expected one value per run, >= 2 runs in one of them, got {x.size} and {y.size}")
    diff = float(x.mean() - y.mean())
    if paired:
        if x.size != y.size or x.size < 2:
            raise ValueError(f"paired: expected as many runs in x as in y, >= 2, got {x.size} and {y.size}")
        d = x - y
        se, df = math.sqrt(max(d.var(ddof=1), sum(min_var)) / d.size), d.size - 1.0
        half = float(student_t.ppf(0.5 + level / 2, df)) * se
        return diff, diff - half, diff + half, df
    var = [max(v.var(ddof=1) if v.size > 1 else 0.0, floor) for v, floor in zip((x, y), min_var)]
    if min(x.size, y.size) == 1:
        many, v = (x, var[0]) if x.size > 1 else (y, var[1])
        se, df = math.sqrt(v * (1 + 1 / many.size)), many.size - 1.0
    else:
        vx, vy = var[0] / x.size, var[1] / y.size
        se = math.sqrt(vx + vy)
        df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1)) if se > 0 else math.inf
    half = float(student_t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0
    return diff, diff - half, diff + half, float(df)


def compare_recipes(cells: Sequence[dict], vals: dict[str, dict], recipes: dict[str, Sequence[str]], baseline: str,
                    *, margin: float = MARGIN, bpb_margin: float = 0.01, by_depth: bool = False,
                    paired: bool = False) -> list[dict]:
    """Recipes (groups of runs of one command: reruns, seeds) against the `baseline` recipe, with the
    run-to-run spread as the noise (`mean_difference_interval`): per (task, context length) the
    runs' exact match, all depths they share pooled, and the validation bits/byte where every run has
    it (`vals`, from `load_cells`), relative to the baseline's mean; with `by_depth`, exact match per
    needle depth instead (no bits/byte). Rows {"recipe", "baseline", "metric" ("exact match" or "val
    bits/byte"), "task", "context_len", "depth" (None: pooled, or bits/byte), "values",
    "baseline_values", "mean", "baseline_mean", "difference", "ci_low", "ci_high" (points of exact
    match; bits/byte: a share of the baseline's mean), "df", "verdict"}. The verdict: exact match as
    `verdict` at `margin`; bits/byte "within" when the interval's top is at most `bpb_margin` above
    the baseline (lower is better), "above" when all of it is more, else "unresolved". The exact
    match's per-run variance is at least one evaluation's sampling variance. `paired`: the i-th run
    of every recipe started from the same point as the baseline's i-th (one 2K stage per session,
    each recipe continued from it): intervals from the per-pair differences."""
    if baseline not in recipes:
        raise ValueError(f"baseline: no recipe named {baseline!r} (recipes: {', '.join(recipes)})")
    by_run = cells_by_run(cells)
    for name, runs in recipes.items():
        missing = [r for r in runs if r not in by_run]
        if not runs or missing:
            raise ValueError(f"recipe {name}: expected loaded runs, got {list(runs)!r}"
                             + (f" ({', '.join(missing)} not loaded)" if missing else ""))
    out = []
    base = list(recipes[baseline])
    for name, runs in recipes.items():
        if name == baseline:
            continue
        group = list(runs) + base
        if paired and len(runs) != len(base):
            raise ValueError(f"paired: recipe {name} has {len(runs)} runs, {baseline} {len(base)}; the i-th runs "
                             "must share a start")
        if max(len(runs), len(base)) < 2:
            raise ValueError(f"recipe {name} against {baseline}: needs >= 2 runs in one of them")
        shared = sorted(set.intersection(*(set(by_run[r]) for r in group)))
        for task, T, depth in sorted({k if by_depth else (*k[:2], -1.0) for k in shared}):
            keys = [k for k in shared if k[:2] == (task, T) and (not by_depth or k[2] == depth)]
            pooled = {r: pool(by_run[r][k] for k in keys) for r in group}
            xs, ys = [pooled[r][0] / pooled[r][1] for r in runs], [pooled[r][0] / pooled[r][1] for r in base]
            # at least one evaluation's sampling variance per run (stratified by depth)
            floors = tuple(float(np.mean([pooled[r][2] for r in rs])) for rs in (runs, base))
            d, lo, hi, df = mean_difference_interval(xs, ys, min_var=floors, paired=paired)
            lo, hi = max(lo, -1.0), min(hi, 1.0)  # a difference of two shares
            out.append(dict(recipe=name, baseline=baseline, metric="exact match", task=task, context_len=T,
                            depth=depth if by_depth else None,
                            values=xs, baseline_values=ys, mean=float(np.mean(xs)), baseline_mean=float(np.mean(ys)),
                            difference=d, ci_low=lo, ci_high=hi, df=df, verdict=verdict(lo, hi, margin)))
        if not by_depth and all(vals.get(r, {}).get("val_bpb") is not None for r in group):
            xs, ys = [vals[r]["val_bpb"] for r in runs], [vals[r]["val_bpb"] for r in base]
            d, lo, hi, df = mean_difference_interval(xs, ys, paired=paired)
            m = float(np.mean(ys))
            lo, hi = lo / m, hi / m
            v = "within" if hi <= bpb_margin else "above" if lo > bpb_margin else "unresolved"
            out.append(dict(recipe=name, baseline=baseline, metric="val bits/byte", task=None, context_len=None, depth=None,
                            values=xs, baseline_values=ys, mean=float(np.mean(xs)), baseline_mean=m, difference=d / m,
                            ci_low=lo, ci_high=hi, df=df, verdict=v))
    return out


def load_cells(specs: Iterable[str]) -> tuple[list[dict], list[str], dict[str, dict]]:
    """The cells of `eval_retrieval.py` results: (cells, run names in order, each run's validation row
    by name: "val_bpb" etc., where the evaluation measured it). Each spec is `[LABEL=]PATH`: PATH a
    results.json or the folder holding one; LABEL renames the file's run (only for a file of one run),
    e.g. two evaluations of runs that share a name: `scratch=eval_scratch_16k rerun=eval_scratch_rerun_16k`."""
    cells, names, vals = [], [], {}
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise FileNotFoundError(f"{spec}: no results.json at {p} (an eval_retrieval.py --out folder or file)")
        results = json.loads(p.read_text())
        rows = results.get("rows")
        if not rows:
            raise ValueError(f"{spec}: {p} has no retrieval rows (not an eval_retrieval.py results.json?)")
        runs = list(dict.fromkeys(r["run"] for r in rows))
        val = {v["run"]: v for v in results.get("val", [])}
        if label:
            if len(runs) != 1:
                raise ValueError(f"{spec}: a label renames the run of a one-run file; {p} has {', '.join(runs)}")
            rows = [dict(r, run=label) for r in rows]
            val = {label: dict(v, run=label) for v in val.values()}
            runs = [label]
        clash = [r for r in runs if r in names]
        if clash:
            raise ValueError(f"{spec}: run {clash[0]!r} is already loaded from another file: name it, LABEL={path}")
        cells += rows
        names += runs
        vals.update({r: val[r] for r in runs if r in val})
    return cells, names, vals
