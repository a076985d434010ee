"""Tests for msa_jax.differences: intervals of the difference of two models' exact match, paired and
unpaired, the verdict against a margin, and the comparison of eval_retrieval.py results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msa_jax import differences as dif


# Newcombe (1998), "Interval estimation for the difference between independent proportions", Table II,
# method 10 (the hybrid score interval), to the 4 decimals printed there.
@pytest.mark.parametrize("k1, n1, k2, n2, lo, hi", [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
])
def test_difference_interval_published(k1, n1, k2, n2, lo, hi):
    got = dif.difference_interval(k1, n1, k2, n2)
    np.testing.assert_allclose(got, (lo, hi), atol=6e-5)
    # p2 - p1 is the mirror image
    np.testing.assert_allclose(dif.difference_interval(k2, n2, k1, n1), (-hi, -lo), atol=6e-5)


def _pairs(rng, n, probs):
    """n paired outcomes with P(both right, only 1, only 2, both wrong) = probs."""
    kind = rng.choice(4, size=n, p=probs)
    return np.isin(kind, (0, 1)), np.isin(kind, (0, 2))


def test_paired_interval_properties():
    rng = np.random.default_rng(0)
    x1, x2 = _pairs(rng, 200, [0.7, 0.1, 0.05, 0.15])
    lo, hi = dif.paired_difference_interval(x1, x2)
    d = x1.mean() - x2.mean()
    assert lo < d < hi
    np.testing.assert_allclose(dif.paired_difference_interval(x2, x1), (-hi, -lo), atol=1e-12)
    # positively correlated outcomes: narrower than the unpaired interval of the same counts
    ulo, uhi = dif.difference_interval(int(x1.sum()), 200, int(x2.sum()), 200)
    assert hi - lo < 0.8 * (uhi - ulo)
    # phi = 0 when a model gets everything right: the unpaired interval
    ones = np.ones(50, bool)
    np.testing.assert_allclose(dif.paired_difference_interval(ones, x2[:50]),
                               dif.difference_interval(50, 50, int(x2[:50].sum()), 50), atol=1e-12)
    # identical outcomes: 0 inside, and within the width of one Wilson interval
    lo, hi = dif.paired_difference_interval(x1, x1)
    assert lo < 0 < hi and hi - lo < 0.15
    with pytest.raises(ValueError, match="outcome"):
        dif.paired_difference_interval(x1, x2[:-1])
    with pytest.raises(ValueError, match="0/1"):
        dif.paired_difference_interval(np.full(3, 2), np.ones(3))


def test_paired_interval_coverage():
    """Near 95% coverage on correlated outcomes, where the unpaired interval of the same counts
    over-covers (it is too wide: what pairing gains)."""
    rng = np.random.default_rng(1)
    probs, n, reps = [0.72, 0.08, 0.04, 0.16], 100, 1500
    truth = probs[1] - probs[2]
    hit_p = hit_u = 0
    for _ in range(reps):
        x1, x2 = _pairs(rng, n, probs)
        lo, hi = dif.paired_difference_interval(x1, x2)
        hit_p += lo <= truth <= hi
        lo, hi = dif.difference_interval(int(x1.sum()), n, int(x2.sum()), n)
        hit_u += lo <= truth <= hi
    assert 0.93 <= hit_p / reps <= 0.975, hit_p / reps
    assert hit_u / reps > 0.985, hit_u / reps


def test_examples_needed_and_verdict():
    # unpaired at 0.83 vs 0.84 for +-2 points: z^2 (pq + pq) / 0.02^2
    assert dif.examples_needed(0.02, 0.84, 0.83) == 2646
    # an interval of that many examples is about +-2 points wide
    lo, hi = dif.difference_interval(round(0.84 * 2646), 2646, round(0.83 * 2646), 2646)
    assert 0.038 < hi - lo < 0.042
    # paired: only the discordant share counts
    assert dif.examples_needed(0.02, 0.84, 0.83, discordant=0.1) == 960
    assert dif.examples_needed(0.02, 1.0, 1.0) == 1
    with pytest.raises(ValueError, match="discordant"):
        dif.examples_needed(0.02, 0.9, 0.5, discordant=0.1)
    assert dif.verdict(-0.015, 0.03) == "within"
    assert dif.verdict(0.01, 0.2) == "within"
    assert dif.verdict(-0.3, -0.05) == "below"
    assert dif.verdict(-0.05, 0.01) == "unresolved"
    assert dif.verdict(-0.05, 0.01, margin=0.1) == "within"
    assert dif.verdict(-0.05, -0.01) == "lower, unresolved"


def _cells(run, accs, *, n=50, seed=0, outcomes=True, task="passkey", T=16384, depths=(0.0, 0.5, 1.0)):
    rng = np.random.default_rng(seed)
    out = []
    for depth, acc in zip(depths, accs):
        x = rng.random(n) < acc
        cell = dict(run=run, task=task, context_len=T, depth=depth, correct=int(x.sum()), n=n,
                    accuracy=float(x.mean()), examples=f"h{depth}")
        if outcomes:
            cell["outcomes"] = "".join("1" if v else "0" for v in x)
        out.append(cell)
    return out


def test_compare_pooled_paired_and_unpaired():
    base = _cells("dense", [0.5, 0.9, 1.0], seed=0)
    msa = _cells("msa", [0.1, 0.9, 1.0], seed=1)
    old = _cells("old", [0.4, 0.9, 1.0], seed=2, outcomes=False)
    rows = dif.compare(base + msa + old, "dense")
    assert [(r["run"], r["depth"], r["paired"]) for r in rows] == [("msa", None, True), ("old", None, False)]
    r = rows[0]
    assert r["n"] == r["baseline_n"] == 150
    k1, k2 = sum(c["correct"] for c in msa), sum(c["correct"] for c in base)
    assert r["difference"] == pytest.approx((k1 - k2) / 150)
    o = lambda cells: np.array([ch == "1" for c in cells for ch in c["outcomes"]])  # noqa: E731
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(dif.paired_difference_interval(o(msa), o(base)))
    assert r["discordant"] == pytest.approx(np.mean(o(msa) != o(base)))
    assert rows[1]["discordant"] is None
    assert (rows[1]["ci_low"], rows[1]["ci_high"]) == pytest.approx(
        dif.difference_interval(sum(c["correct"] for c in old), 150, k2, 150))
    # per depth: depth 0 clearly below; other examples (hash differs) are not paired
    per = dif.compare(base + msa, "dense", by_depth=True)
    assert [p["depth"] for p in per] == [0.0, 0.5, 1.0]
    assert per[0]["verdict"] == "below" and all(p["paired"] for p in per)
    assert not any(p["examples_differ"] for p in per)
    msa[1]["examples"] = "other"
    per = dif.compare(base + msa, "dense", by_depth=True)
    assert [(p["paired"], p["examples_differ"]) for p in per] == [(True, False), (False, True), (True, False)]
    assert not dif.compare(base + msa, "dense")[0]["paired"]
    assert not rows[1]["examples_differ"]  # no outcomes stored: unpaired, nothing differs
    # only the depths both have are compared
    short = [c for c in msa if c["depth"] != 1.0]
    assert dif.compare(base + short, "dense")[0]["n"] == 100
    with pytest.raises(ValueError, match="baseline"):
        dif.compare(base, "nope")
    with pytest.raises(ValueError, match="runs"):
        dif.compare(base + msa, "dense", runs=["nope"])


def test_run_spread():
    # three runs at 0.64 / 0.49 / 0.52 of 250: sd 8.3 points, binomial sampling sd 3.1, the rest training
    r = dif.run_spread([(160, 250), (122, 250), (130, 250)])
    assert r["mean"] == pytest.approx(412 / 750)
    assert r["sd"] == pytest.approx(np.std([0.64, 0.488, 0.52], ddof=1))
    assert r["sampling_sd"] == pytest.approx(np.sqrt(r["mean"] * (1 - r["mean"]) / 250))
    assert r["between_sd"] ** 2 == pytest.approx(r["sd"] ** 2 - r["sampling_sd"] ** 2)
    assert r["runs_needed"] == np.ceil(2 * dif.Z95 ** 2 * r["between_sd"] ** 2 / 0.02 ** 2)
    # one more run: mean +- t_2 sd sqrt(1 + 1/3), t_2 = 4.303
    half = 4.302653 * r["sd"] * np.sqrt(4 / 3)
    assert (r["new_run_low"], r["new_run_high"]) == pytest.approx((r["mean"] - half, r["mean"] + half), abs=1e-6)
    # runs that differ less than sampling explains: no training spread, one run suffices
    same = dif.run_spread([(125, 250), (126, 250)])
    assert same["between_sd"] == 0.0 and same["runs_needed"] == 1
    with pytest.raises(ValueError, match=">= 2 runs"):
        dif.run_spread([(1, 2)])


def test_pool():
    cells = [dict(correct=0, n=50), dict(correct=50, n=50), dict(correct=10, n=20)]
    k, n, var = dif.pool(cells)
    p = [1 / 52, 51 / 52, 11 / 22]  # (k + 1) / (n + 2)
    assert (k, n) == (60, 120)
    assert var == pytest.approx((50 * p[0] * (1 - p[0]) + 50 * p[1] * (1 - p[1]) + 20 * p[2] * (1 - p[2])) / 120 ** 2)


def test_spread_by_cells_is_stratified():
    """Pooled over depths where the rate moves from 0 to 1, the sampling error is far below the
    binomial one at the pooled rate: the depths' shares are fixed by design."""
    a = _cells("a", [0.0, 0.5, 1.0], seed=0) + _cells("a", [0.9], seed=0, task="multikey")
    b = _cells("b", [0.0, 0.5, 1.0], seed=1)
    (row,) = dif.spread(a + b, ["a", "b"])  # multikey: only a has it
    assert (row["task"], row["n"], row["runs"]) == ("passkey", 150, ["a", "b"])
    ka, kb = (sum(c["correct"] for c in x if c["task"] == "passkey") for x in (a, b))
    assert row["accuracies"] == [ka / 150, kb / 150]
    p = (ka + kb) / 300
    assert row["sampling_sd"] < 0.7 * np.sqrt(p * (1 - p) / 150)
    with pytest.raises(ValueError, match="not loaded"):
        dif.spread(a + b, ["a", "c"])


def test_markdown_and_plot(tmp_path):
    from msa_jax import plots

    base = _cells("dense", [0.5, 0.9, 1.0], seed=0)
    msa = _cells("msa", [0.1, 0.9, 1.0], seed=1)
    pooled = dif.compare(base + msa, "dense")
    md = plots.differences_markdown(pooled, 0.02)
    assert md.count("\n") == 2 and "| msa | dense | passkey | 16384 | 150 |" in md and "yes (" in md
    assert "| 0 |" in plots.differences_markdown(dif.compare(base + msa, "dense", by_depth=True), 0.02)
    sp = plots.spread_markdown(dif.spread(base + msa, ["dense", "msa"]), 0.02)
    assert "| dense, msa | passkey | 16384 | 150 |" in sp
    vals = {"dense": dict(val_bpb=0.87), "msa": dict(val_bpb=0.88)}
    rm = plots.recipes_markdown(dif.compare_recipes(base + msa, vals, {"dense": ["dense"], "msa": ["msa", "dense"]},
                                                    "dense"))
    assert "| msa | dense | exact match | passkey | 16384 |" in rm and "| msa | dense | val bits/byte | – | – |" in rm
    if plots.pyplot() is not None:
        assert plots.plot_differences(pooled, tmp_path / "d.png", 0.02)
        assert (tmp_path / "d.png").stat().st_size > 1000
        assert plots.plot_recipes(base + msa, {"dense": ["dense", "msa"]}, tmp_path / "r.png")
        assert not plots.plot_recipes(base + msa, {"dense": ["dense", "nope"]}, tmp_path / "x.png")


def test_mean_difference_interval():
    from scipy import stats

    x, y = [0.64, 0.49, 0.52], [0.89, 0.83]
    d, lo, hi, df = dif.mean_difference_interval(x, y)
    ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(x) - np.mean(y))
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    # one run against three: the three's spread stands for both (a prediction interval, t with 2 df)
    d, lo, hi, df = dif.mean_difference_interval([0.40], x)
    half = stats.t.ppf(0.975, 2) * np.std(x, ddof=1) * np.sqrt(1 + 1 / 3)
    assert df == 2 and (lo, hi) == pytest.approx((0.40 - np.mean(x) - half, 0.40 - np.mean(x) + half))
    assert dif.mean_difference_interval([1.0, 1.0], [0.5, 0.5])[1:3] == (0.5, 0.5)
    # a variance floor: runs that happen to agree still carry their evaluations' sampling error
    d, lo, hi, df = dif.mean_difference_interval([0.98] * 3, [0.98, 1.0], min_var=(0.01, 0.0))
    assert lo < d - 0.1 and hi > d + 0.1
    with pytest.raises(ValueError, match=">= 2 runs"):
        dif.mean_difference_interval([0.1], [0.2])
    # paired by a shared start: the per-pair differences' t interval, what the pairs share drops out
    x, y = [0.64, 0.49, 0.52], [0.60, 0.44, 0.49]
    d, lo, hi, df = dif.mean_difference_interval(x, y, paired=True)
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert df == 2 and (lo, hi) == pytest.approx((ci.low, ci.high))
    assert hi - lo < 0.5 * np.subtract(*dif.mean_difference_interval(x, y)[2:0:-1])
    with pytest.raises(ValueError, match="paired"):
        dif.mean_difference_interval(x, y[:2], paired=True)


def test_compare_recipes():
    cells = []
    accs = {"d1": 0.9, "d2": 0.86, "m1": 0.6, "m2": 0.5, "m3": 0.55, "x": 0.3}
    for i, (run, a) in enumerate(accs.items()):
        cells += _cells(run, [a, a], seed=i, depths=(0.0, 1.0))
    vals = {r: dict(val_bpb=b) for r, b in zip(accs, [0.865, 0.872, 0.877, 0.871, 0.882, 0.9])}
    rows = dif.compare_recipes(cells, vals, {"dense": ["d1", "d2"], "msa": ["m1", "m2", "m3"], "x": ["x"]}, "dense")
    assert [(r["recipe"], r["metric"]) for r in rows] == [("msa", "exact match"), ("msa", "val bits/byte"),
                                                          ("x", "exact match"), ("x", "val bits/byte")]
    em = rows[0]
    pooled = {r: sum(c["correct"] for c in cells if c["run"] == r) / 100 for r in accs}
    assert em["values"] == [pooled[r] for r in ("m1", "m2", "m3")]
    d, lo, hi, _ = dif.mean_difference_interval(em["values"], em["baseline_values"])
    assert em["difference"] == pytest.approx(d)
    assert em["ci_high"] - em["ci_low"] >= 0.99 * (min(hi, 1) - max(lo, -1))  # the sampling floor: not narrower
    bpb = rows[1]
    m = np.mean([0.865, 0.872])
    assert bpb["difference"] == pytest.approx((np.mean([0.877, 0.871, 0.882]) - m) / m)
    assert bpb["verdict"] in ("within", "above", "unresolved")
    assert -1 <= rows[2]["ci_low"] <= rows[2]["ci_high"] <= 1
    per = dif.compare_recipes(cells, vals, {"dense": ["d1", "d2"], "msa": ["m1", "m2", "m3"]}, "dense", by_depth=True)
    assert [(r["metric"], r["depth"]) for r in per] == [("exact match", 0.0), ("exact match", 1.0)]
    one = {r: next(c for c in cells if c["run"] == r and c["depth"] == 0.0)["accuracy"] for r in accs}
    assert per[0]["values"] == [one[r] for r in ("m1", "m2", "m3")]
    # no bits/byte row when a run has none
    del vals["x"]
    assert [r["metric"] for r in dif.compare_recipes(cells, vals, {"dense": ["d1", "d2"], "x": ["x"]}, "dense")] == [
        "exact match"]
    pr = dif.compare_recipes(cells, vals, {"dense": ["d1", "d2"], "msa": ["m1", "m2"]}, "dense", paired=True)
    xs = [pooled["m1"], pooled["m2"]]
    ys = [pooled["d1"], pooled["d2"]]
    assert pr[0]["difference"] == pytest.approx(np.mean(xs) - np.mean(ys)) and pr[0]["df"] == 1
    with pytest.raises(ValueError, match="paired"):
        dif.compare_recipes(cells, vals, {"dense": ["d1", "d2"], "msa": ["m1", "m2", "m3"]}, "dense", paired=True)
    with pytest.raises(ValueError, match="baseline"):
        dif.compare_recipes(cells, vals, {"dense": ["d1"]}, "msa")
    with pytest.raises(ValueError, match="not loaded"):
        dif.compare_recipes(cells, vals, {"dense": ["d1", "zz"]}, "dense")


def test_load_cells(tmp_path):
    for name, run in (("a", "lc16_scratch"), ("b", "lc16_scratch")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(dict(rows=_cells(run, [0.5]))))
    (tmp_path / "two.json").write_text(json.dumps(dict(rows=_cells("x", [0.5]) + _cells("y", [0.5]),
                                                       val=[dict(run="y", val_bpb=0.9)])))
    cells, names, vals = dif.load_cells([str(tmp_path / "a"), f"rerun={tmp_path / 'b' / 'results.json'}"])
    assert names == ["lc16_scratch", "rerun"] and len(cells) == 2 and vals == {}
    assert dif.load_cells([str(tmp_path / "two.json")])[1:] == (["x", "y"], {"y": dict(run="y", val_bpb=0.9)})
    with pytest.raises(ValueError, match="already loaded"):
        dif.load_cells([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="one-run"):
        dif.load_cells([f"z={tmp_path / 'two.json'}"])
    with pytest.raises(FileNotFoundError, match="results.json"):
        dif.load_cells([str(tmp_path / "missing")])
