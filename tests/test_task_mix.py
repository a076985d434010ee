"""Retrieval tasks mixed into the training batches (`--task-mix`), the task-fit checks, and the
evaluation helpers of the long-context study (Wilson intervals, default lengths, tables, figures,
per-layer selections)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re

import numpy as np
import pytest

from msa_jax import data, plots, presets, retrieval
from msa_jax.config import RunConfig

B, T = 8, 256
QUERY = re.compile(rb"\n# what is the (pass key|value of \w+)\? the (pass key|value of \w+) is \d{5}\n$")


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(400_000)


def old_batch_at(arr, batch_size, seq_len, *, seed, step):
    """The batches before task mixing existed (a copy of the old `data.batch_at`)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    starts = rng.integers(0, arr.size - seq_len, size=batch_size)
    return arr[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)


def is_task_row(row) -> bool:
    return QUERY.search(row.astype(np.uint8).tobytes()) is not None


def test_task_mix_zero_gives_the_old_batches_bit_for_bit(corpus):
    it = data.BatchIterator(corpus.train, B, T, seed=5)
    for step, batch in enumerate(itertools.islice(it, 4)):
        want = old_batch_at(corpus.train, B, T, seed=5, step=step)
        assert batch.dtype == want.dtype and np.array_equal(batch, want)
        again = data.batch_at(corpus.train, B, T, seed=5, step=step, task_mix=0.0, tasks=["passkey"])
        assert np.array_equal(again, want)


def test_task_rows_have_the_right_share_and_only_replace_rows(corpus):
    for f, b in ((0.25, 8), (0.1, 8), (0.375, 6), (0.05, 4), (1.0, 3)):
        counts = [data.task_rows_at(b, f, s) for s in range(200)]
        assert set(counts) <= {math.floor(f * b), math.ceil(f * b)}, (f, b)
        assert sum(counts) == math.floor(200 * f * b + 1e-9), (f, b)  # the first s batches: floor(s f B)
    for step in range(6):
        code = data.batch_at(corpus.train, B, T, seed=1, step=step)
        mixed = data.batch_at(corpus.train, B, T, seed=1, step=step, task_mix=0.25)
        replaced = (code != mixed).any(axis=1)
        assert replaced.sum() == data.task_rows_at(B, 0.25, step) == 2
        assert all(is_task_row(r) for r in mixed[replaced]) and not any(is_task_row(r) for r in code)
        assert np.array_equal(mixed[~replaced], code[~replaced])  # the code rows are task_mix 0's
    full = data.batch_at(corpus.train, 4, T, seed=0, step=3, task_mix=1.0, tasks="variable_tracking")
    assert all(is_task_row(r) and re.search(rb"[A-Z]{5} = \d{5}\n", r.astype(np.uint8).tobytes()) for r in full)


def test_task_rows_are_fresh_uniform_and_from_the_given_split(corpus):
    rows = data.batch_at(corpus.train, 64, T, seed=2, step=0, task_mix=1.0)
    texts = [r.astype(np.uint8).tobytes() for r in rows]
    kinds = {"pk" if b"pass key?" in t else "vt" if re.search(rb"value of [A-Z]{5}\?", t) else "mk" for t in texts}
    assert kinds == {"pk", "vt", "mk"}  # all three tasks drawn
    answers = [t[-6:-1] for t in texts]
    assert len(set(answers)) > 55  # fresh values (5-digit: few collisions among 64)
    again = data.batch_at(corpus.train, 64, T, seed=2, step=1, task_mix=1.0)
    assert not np.array_equal(rows, again)
    # The haystack is code of the array the rows were drawn from (the loop passes the training split).
    train = corpus.train.tobytes()
    lines = [ln for t in texts[:8] for ln in t.split(b"\n")[1:-3]
             if len(ln) > 30 and b" = " not in ln and b"pass key" not in ln]  # code, not needles
    assert lines and all(ln in train for ln in lines)


def test_task_mix_is_deterministic_in_seed_and_step_and_resumes(corpus):
    kw = dict(seed=7, task_mix=0.5, tasks=("passkey", "multikey"))
    it = data.BatchIterator(corpus.train, 4, T, **kw)
    first = [next(it) for _ in range(3)]
    state = it.state()
    assert json.loads(json.dumps(state)) == state and state["task_mix"] == 0.5
    assert state["tasks"] == ["passkey", "multikey"]
    after = [next(it) for _ in range(3)]
    resumed = data.BatchIterator.from_state(corpus.train, state)
    for x, y in zip(after, [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(x, y)
    for step, batch in enumerate(first):
        np.testing.assert_array_equal(batch, data.batch_at(corpus.train, 4, T, step=step, **kw))
    other = data.batch_at(corpus.train, 4, T, step=0, **{**kw, "seed": 8})
    assert not np.array_equal(other, first[0])
    # A state saved before task mixing existed resumes with task_mix 0.
    old = {k: v for k, v in data.BatchIterator(corpus.train, 4, T, seed=7, step=2).state().items()
           if k not in ("task_mix", "tasks")}
    np.testing.assert_array_equal(next(data.BatchIterator.from_state(corpus.train, old)),
                                  old_batch_at(corpus.train, 4, T, seed=7, step=2))


def test_depth_power_puts_the_needles_far_back_and_resumes(corpus):
    """task_depth_power P: needle depths u ** P (mean 1 / (P + 1): 0.5 uniform, 0.25 at P = 3); P = 1 gives
    the uniform rows bit for bit; the iterator state keeps P (an older state resumes with 1)."""
    n, L = 160, 512

    def mean_depth(rows):  # where the pass-key needle starts, as a share of the haystack before the query
        at = [r.astype(np.uint8).tobytes().index(b"# the pass key is ") / (L - 60) for r in rows]
        return float(np.mean(at))

    uniform = retrieval.training_rows(corpus.train, n, L, ("passkey",), rng=3)
    np.testing.assert_array_equal(uniform, retrieval.training_rows(corpus.train, n, L, ("passkey",), rng=3,
                                                                   depth_power=1.0))
    far = retrieval.training_rows(corpus.train, n, L, ("passkey",), rng=3, depth_power=3.0)
    assert abs(mean_depth(uniform) - 0.5) < 0.07 and abs(mean_depth(far) - 0.25) < 0.06
    kw = dict(seed=7, task_mix=0.5, tasks=("passkey",), depth_power=2.0)
    it = data.BatchIterator(corpus.train, 4, T, **kw)
    next(it)
    state = it.state()
    assert state["depth_power"] == 2.0
    np.testing.assert_array_equal(next(data.BatchIterator.from_state(corpus.train, state)), next(it))
    np.testing.assert_array_equal(data.batch_at(corpus.train, 4, T, step=0, **kw),
                                  next(data.BatchIterator(corpus.train, 4, T, **kw)))
    assert not np.array_equal(data.batch_at(corpus.train, 4, T, step=0, **kw),
                              data.batch_at(corpus.train, 4, T, step=0, **{**kw, "depth_power": 1.0}))
    old = {k: v for k, v in state.items() if k != "depth_power"}
    assert data.BatchIterator.from_state(corpus.train, old).depth_power == 1.0
    assert parse("--task-mix", "1", "--task-depth-power", "2").task_depth_power == 2.0
    for flags, match in ((("--task-mix", "1", "--task-depth-power", "0"), "task_depth_power: expected a number > 0"),
                         (("--task-depth-power", "2"), "task_depth_power: expected 1 unless task_mix > 0")):
        with pytest.raises(SystemExit, match=f"invalid configuration: {match}"):
            parse(*flags)
    with pytest.raises(ValueError, match="depth_power"):
        retrieval.training_rows(corpus.train, 1, L, ("passkey",), depth_power=-1.0)


def test_min_context_len_is_the_shortest_that_works_at_every_depth(corpus):
    for task in retrieval.TASKS:
        n = retrieval.min_context_len(task)
        for depth in np.linspace(0, 1, 41):
            for seed in range(3):
                ex = retrieval.TASKS[task](corpus.train, n, float(depth), seed)
                assert ex.tokens.size == n
        with pytest.raises(ValueError, match="context_len"):
            retrieval.TASKS[task](corpus.train, n - retrieval.min_context_len(task) // 2, 0.5, 0)
        retrieval.check_tasks([task], n)
        with pytest.raises(ValueError, match=f"{task}.*at least {n}"):
            retrieval.check_tasks([task], n - 1)


def parse(*flags) -> RunConfig:
    p = argparse.ArgumentParser()
    presets.add_run_arguments(p)
    return presets.run_config_from_args(p.parse_args(list(flags)))


def test_bad_task_mix_flags_raise_clear_errors():
    assert parse().task_mix == 0.0 and parse("--task-mix", "0.3").task_mix == 0.3
    assert parse("--task-mix", "1", "--task-mix-tasks", "passkey").mix_tasks == ("passkey",)
    for flags, match in ((("--task-mix", "1.5"), "task_mix: expected a fraction in"),
                         (("--task-mix", "-0.1"), "task_mix: expected a fraction in"),
                         (("--task-mix-tasks", "passkey,needle"), "task_mix_tasks: expected distinct names"),
                         (("--task-mix-tasks", "passkey,passkey"), "task_mix_tasks: expected distinct names"),
                         (("--task-mix-tasks", ""), "task_mix_tasks"),
                         (("--task-mix", "0.5", "--seq-len", "100"), "task_mix_tasks: task 'multikey' needs")):
        with pytest.raises(SystemExit, match=f"invalid configuration: {match}"):
            parse(*flags)
    parse("--task-mix", "0", "--seq-len", "100")  # no tasks mixed in: any length
    with pytest.raises(ValueError, match="task_mix"):
        data.batch_at(np.zeros(1000, np.uint8), 2, 100, seed=0, step=0, task_mix=2.0)


def test_wilson_interval_known_values():
    # Reference values: the Wilson score interval at 95% (z = 1.95996).
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (10, 10): (0.7225, 1.0),
                             (0, 50): (0.0, 0.0713), (25, 50): (0.3664, 0.6336), (1, 20): (0.0089, 0.2361)}.items():
        got = retrieval.wilson_interval(k, n)
        np.testing.assert_allclose(got, (lo, hi), atol=6e-5, err_msg=f"{k}/{n}")
    assert retrieval.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k, n"):
        retrieval.wilson_interval(3, 2)


def test_default_lengths():
    assert retrieval.default_lengths(16384) == [4096, 8192, 16384, 32768]
    assert retrieval.default_lengths(512) == [512, 1024]
    assert retrieval.default_lengths(6000) == [4096, 8192, 12000]


def test_evaluate_rows_carry_counts_and_intervals_and_the_markdown_shows_them(corpus):
    oracle = lambda t: np.eye(256, dtype=np.float32)[np.concatenate([t[:, 1:], t[:, :1]], 1)]  # noqa: E731
    seen = []
    rows = retrieval.evaluate(oracle, corpus.val, ["passkey"], [200], [0.0, 1.0], n=4, on_row=seen.append)
    assert seen == rows and all(r["correct"] == 4 and r["ci_low"] == pytest.approx(0.5101, abs=1e-4)
                                and r["ci_high"] == 1.0 for r in rows)
    md = plots.retrieval_markdown([dict(r, run="x") for r in rows], [0.0, 1.0])
    assert "| x | passkey | 200 | 1.00 [0.51, 1.00] | 1.00 [0.51, 1.00] | 1.00 [0.68, 1.00] |" in md


def test_retrieval_by_length_pools_depths_per_length(tmp_path, monkeypatch):
    rows = [dict(run=run, task="passkey", context_len=T, depth=d, correct=c, n=10)
            for run, c in (("dense", 9), ("msa", 3)) for T in (4096, 16384) for d in (0.0, 1.0)]
    drawn = {}
    real = plots.pyplot()

    class Recorder:  # the figure's lines, as drawn
        def __getattr__(self, name):
            return getattr(real, name)

        def subplots(self, *a, **k):
            fig, axes = real.subplots(*a, **k)
            drawn["axes"] = axes
            return fig, axes

    monkeypatch.setattr(plots, "pyplot", lambda: Recorder())
    assert plots.retrieval_by_length(rows, ["dense", "msa"], ["passkey"], tmp_path / "len.png", train_len=16384)
    assert (tmp_path / "len.png").stat().st_size > 5000
    lines = [ln for ln in drawn["axes"][0, 0].get_lines() if ln.get_label() in ("dense", "msa")]
    assert {ln.get_label(): list(ln.get_ydata()) for ln in lines} == {"dense": [0.9, 0.9], "msa": [0.3, 0.3]}
    assert not plots.retrieval_by_length([r for r in rows if r["context_len"] == 4096], ["dense"], ["passkey"],
                                         tmp_path / "one.png")  # one length: nothing to draw


def test_uniform_needle_selected_is_the_rate_of_a_selection_blind_to_content():
    # Closed forms. 16K, block 128 x top 16, a one-block needle far back, rows near the end: 15 free slots
    # among 127 non-local blocks. In the local block, or with top_k >= the visible blocks: always.
    assert retrieval.uniform_needle_selected((1000, 1010), (16370, 16380), 128, 16) == pytest.approx(15 / 127)
    assert retrieval.uniform_needle_selected((16300, 16310), (16370, 16380), 128, 16) == 1.0
    assert retrieval.uniform_needle_selected((40, 50), (100, 110), 16, 8) == 1.0  # 7 blocks visible
    assert retrieval.uniform_needle_selected((200, 210), (100, 110), 16, 4) == 0.0  # the needle comes later
    # A needle over two blocks (2, 3), row 120 (block 7 local, 7 others): 1 - C(5, 3) / C(7, 3) = 5/7; a sink
    # block takes a slot and a candidate (1 - C(4, 2) / C(6, 2) = 3/5), and a needle in it is always selected.
    assert retrieval.uniform_needle_selected((40, 60), (120, 121), 16, 4) == pytest.approx(5 / 7)
    assert retrieval.uniform_needle_selected((40, 60), (120, 121), 16, 4, sink_blocks=1) == pytest.approx(3 / 5)
    assert retrieval.uniform_needle_selected((3, 9), (120, 121), 16, 4, sink_blocks=1) == 1.0
    assert retrieval.uniform_needle_selected((3, 9), (120, 121), 16, 4, local_blocks=2) == pytest.approx(2 / 6)
    # The oracle's selection over random keys is blind to content (iid block maxima): its needle rate over many
    # draws is this chance, for a needle over two blocks and answer rows spanning a block boundary.
    from msa_jax.ops import reference

    rng = np.random.default_rng(5)
    B, T, H_kv, D, bs, k = 400, 256, 2, 8, 16, 4
    iq = rng.standard_normal((B, T, H_kv, D)).astype(np.float32)
    ik = rng.standard_normal((B, T, D)).astype(np.float32)
    for sink in (0, 1):
        ids = np.asarray(reference.select_blocks(iq, ik, block_size=bs, top_k=k, sink_blocks=sink))
        rate = np.mean([retrieval.needle_selected(ids[b], (40, 60), (236, 250), bs) for b in range(B)])
        chance = retrieval.uniform_needle_selected((40, 60), (236, 250), bs, k, sink_blocks=sink)
        assert abs(rate - chance) < 0.05, (sink, rate, chance)  # ~0.017 sampling error (800 draws)


def test_needle_selection_numbers_and_figure(tmp_path):
    # T = 64, blocks of 8: the needle is in block 2, the answer rows are 60..63.
    ids = np.full((64, 2, 2), -1)
    ids[:, :, 0] = np.arange(64)[:, None] // 8  # the local block
    ids[60:62, 0, 1] = 2  # two of the four answer rows, group 0 only, select the needle's block
    assert retrieval.needle_selected(ids, (17, 23), (60, 64), 8) == 2 / 8
    assert retrieval.needle_selected(ids, (17, 23), (0, 60), 8) == pytest.approx(16 / 120)  # rows 16..23: local
    # Blocks wholly 32+ tokens back from rows 60..63 are 0..2 (3 for row 63): of the 10 selected blocks, the
    # two needle picks; a uniform choice over each row's causal blocks: (3 + 3 + 3 + 4) / (4 * 8)
    assert retrieval.selected_beyond(ids, (60, 64), 32, 8) == (pytest.approx(2 / 10), pytest.approx(13 / 32))
    assert retrieval.selected_beyond(ids, (60, 64), 64, 8) == (0.0, 0.0)  # nothing is that far back
    assert retrieval.uniform_beyond((60, 64), 32, 8) == pytest.approx(13 / 32)
    # The dense attention's side: rows 60..63, 2 groups, 8 blocks; blocks 0..2 are wholly 32+ back
    # (block 3 too for row 63). Mass 0.5 on block 1 for group 0, spread evenly for group 1.
    mass = np.zeros((2, 4, 8))
    mass[0, :, 1], mass[0, :, 7] = 0.5, 0.5
    mass[1] = 1 / 8
    share, top = retrieval.mass_beyond(mass, (60, 64), 32, 8, top_k=2)
    assert share == pytest.approx((4 * 0.5 + 3 * 3 / 8 + 4 / 8) / 8)
    # group 0's top 2 are blocks 1 (far) and 7; group 1's (ties, stable order) blocks 0 and 1 (both far)
    assert top == pytest.approx((4 * 1 + 4 * 2) / 16)
    assert retrieval.mass_beyond(mass, (60, 64), 64, 8, top_k=2) == (0.0, 0.0)
    # By distance (in blocks): rows 60..63 sit in block 7, so the local picks are at distance 0 and the
    # needle's block 2 at 5; every distance 0..7 is visible to all 4 rows x 2 groups.
    picks, visible = retrieval.selection_by_distance(ids, (60, 64), 8)
    assert picks.tolist() == [8, 0, 0, 0, 0, 2, 0, 0] and visible.tolist() == [8] * 8
    picks, visible = retrieval.selection_by_distance(ids, (0, 16), 8)  # rows of blocks 0 and 1
    assert picks.tolist() == [32, 0, 0, 0, 0, 0, 0, 0] and visible.tolist() == [32, 16, 0, 0, 0, 0, 0, 0]
    # the attention's top 2: group 0 blocks 1 and 7 (distances 6, 0), group 1 (ties) blocks 0 and 1 (7, 6)
    picks, visible = retrieval.top_k_by_distance(mass, (60, 64), 8, top_k=2)
    assert picks.tolist() == [4, 0, 0, 0, 0, 0, 8, 4] and visible.tolist() == [8] * 8
    # only causal blocks count: row 3 (block 0) of an even mass picks block 0 alone
    picks, _ = retrieval.top_k_by_distance(np.full((1, 1, 4), 0.25), (3, 4), 8, top_k=2)
    assert picks.tolist() == [1, 0, 0, 0]
    fig = plots.needle_selection_figure([ids, ids], layers=[1, 2], block_size=8, needle=(17, 23), answer=(60, 64),
                                        title="t")
    fig.savefig(tmp_path / "sel.png")
    assert (tmp_path / "sel.png").stat().st_size > 5000


def test_needle_mass_is_the_attention_share_and_top_k_membership_of_the_needle_block():
    # 2 groups x 3 answer rows over 6 blocks of 8; the needle (tokens 17..22) is in block 2.
    rng = np.random.default_rng(3)
    mass = rng.random((2, 3, 6)) + 0.1
    mass[0, :, 2] = 5.0  # group 0: the needle's block is every row's largest
    mass[1, :, 2] = 0.0  # group 1: never in any top-k
    mass /= mass.sum(-1, keepdims=True)
    share, in_top = retrieval.needle_mass(mass, (17, 23), 8, top_k=2)
    assert share == pytest.approx(mass[..., 2].mean()) and in_top == 0.5
    assert retrieval.needle_mass(mass, (17, 23), 8, top_k=6)[1] == 1.0  # top-k of all blocks: every (row, group)
    share2, _ = retrieval.needle_mass(mass, (14, 20), 8, top_k=2)  # a needle over blocks 1 and 2
    assert share2 == pytest.approx(mass[..., 1:3].sum(-1).mean())


def test_stage_curves_put_stages_on_one_step_axis(tmp_path):
    def rows(steps, exact):
        return ([{"kind": "train", "step": s} for s in range(1, steps + 1)]
                + [{"kind": "eval", "step": s, "val_bpb": 1.0, "val_answer_exact": e, "val_answer_bytes": e}
                   for s, e in exact])
    fig = plots.stage_curves([("2K", rows(600, [(300, 0.0), (600, 0.9)])), ("16K", rows(500, [(500, 0.1)]))],
                             title="t")
    lines = [ln for ln in fig.axes[1].get_lines() if len(ln.get_xdata()) > 0]
    assert [list(ln.get_xdata()) for ln in lines] == [[300, 600], [300, 600], [1100], [1100]]  # 16K after 600
    fig.savefig(tmp_path / "stages.png")
    assert (tmp_path / "stages.png").stat().st_size > 5000


def test_block_scores_figure_marks_the_picked_blocks(tmp_path):
    fig = plots.block_scores_figure({"max": np.arange(8.0), "mean": np.ones(8)}, {"max": [7, 6], "mean": [0, 1]},
                                    needle_block=7, title="t")
    assert "picks" in fig.axes[0].get_title() and "misses" in fig.axes[1].get_title()
    fig.savefig(tmp_path / "blocks.png")
    assert (tmp_path / "blocks.png").stat().st_size > 5000


def test_routing_grid_shows_each_layer_and_group():
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    g = np.array([[0.1, 0.9], [0.5, 0.25], [1.0, 0.0]])  # 3 MSA layers x 2 KV groups
    im = plots.routing_grid(ax, g.tolist(), title="step 600")
    np.testing.assert_array_equal(im.get_array(), g)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in g.ravel())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"] and ax.get_title() == "step 600"
    plt.close(fig)


def test_routing_curves_draw_the_mean_and_the_best_cell_at_the_end():
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    rows = [dict(kind="train", step=1), dict(kind="eval", step=10, val_needle_selected_groups=[[0.9, 0.1], [0.2, 0.0]]),
            dict(kind="eval", step=20, val_needle_selected_groups=[[0.3, 0.1], [0.2, 0.8]])]
    step, last = plots.routing_curves(ax, rows, label="run")
    assert step == 20 and last.tolist() == [[0.3, 0.1], [0.2, 0.8]]
    mean, best = ax.get_lines()
    assert mean.get_ydata().tolist() == pytest.approx([0.3, 0.35]) and best.get_ydata().tolist() == [0.0, 0.8]
    assert "layer 2 group 1" in best.get_label()  # the best cell at the last evaluation, layers from 1
    assert plots.routing_curves(ax, [dict(kind="eval", step=5, val_bpb=1.0)], label="dense") is None
    plt.close(fig)


def test_eval_cells_merge_folders_and_the_depth_plot_draws_their_intervals(tmp_path):
    def results(folder, rows):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"rows": rows}))
        return folder

    def row(depth, acc, length=16384, task="passkey"):
        return dict(task=task, context_len=length, depth=depth, accuracy=acc, ci_low=acc - 0.1, ci_high=acc + 0.05)

    main = results(tmp_path / "main", [row(0.0, 0.2), row(0.5, 0.9), row(0.5, 0.1, length=4096)])
    near = results(tmp_path / "near", [row(0.0, 0.7), row(0.02, 0.8), row(0.02, 0.3, task="multikey")])
    cells = plots.eval_cells([main, near], 16384)  # the first folder wins a shared cell; one length only
    assert {k: r["accuracy"] for k, r in cells.items()} == {("passkey", 0.0): 0.2, ("passkey", 0.5): 0.9,
                                                            ("passkey", 0.02): 0.8, ("multikey", 0.02): 0.3}
    assert [plots.stretch_depth(d) for d in (0.0, 0.05, 0.1, 0.55, 1.0)] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    bars = plots.exact_match_by_depth(ax, cells, "passkey", plots.stretch_depth)
    x, y = bars.lines[0].get_data()  # sorted by depth, the errors from the rows' intervals
    assert list(x) == pytest.approx([0, 0.1, 0.7222], abs=1e-4) and list(y) == [0.2, 0.8, 0.9]
    (segments,) = bars.lines[2]
    np.testing.assert_allclose([s[:, 1] for s in segments.get_segments()], [[0.1, 0.25], [0.7, 0.85], [0.8, 0.95]])
    plt.close(fig)


def test_exact_match_by_depth_figure_draws_every_series_per_task(tmp_path, monkeypatch):
    cells = {(t, d): dict(task=t, depth=d, accuracy=0.5, ci_low=0.4, ci_high=0.6)
             for t in ("passkey", "multikey") for d in (0.0, 0.05, 0.5, 1.0)}
    drawn = []
    real = plots.exact_match_by_depth
    monkeypatch.setattr(plots, "exact_match_by_depth", lambda ax, c, task, x_of, **kw: drawn.append(
        (task, kw["label"], x_of(0.05))) or real(ax, c, task, x_of, **kw))
    series = {"a": (cells, dict(fmt="o-")), "b": (cells, dict(fmt="s:", color="C3"))}
    assert plots.exact_match_by_depth_figure(series, ["passkey", "multikey"], tmp_path / "d.png", title="{task} at 16K")
    assert sorted(drawn) == [("multikey", "a", 0.25), ("multikey", "b", 0.25), ("passkey", "a", 0.25),
                             ("passkey", "b", 0.25)]  # every series on every task, the first tenth stretched
    drawn.clear()
    assert plots.exact_match_by_depth_figure(series, ["passkey"], tmp_path / "l.png", stretch=False)
    assert drawn == [("passkey", "a", 0.05), ("passkey", "b", 0.05)]
    assert (tmp_path / "d.png").stat().st_size > 10_000 and (tmp_path / "l.png").exists()


def test_routing_figure_draws_every_run(tmp_path):
    msa = [dict(kind="train", step=s, answer_exact=s / 4) for s in (1, 2, 3, 4)] + [
        dict(kind="eval", step=4, val_needle_selected_groups=[[0.5, 0.25]])]
    dense = [dict(kind="train", step=s, answer_exact=1.0) for s in (1, 2, 3, 4)] + [dict(kind="eval", step=4, val_bpb=1.0)]
    assert plots.routing_figure({"msa": (msa, "C1"), "dense": (dense, "C0")}, tmp_path / "r.png", grid="msa",
                                chance=0.15, window=2)
    assert (tmp_path / "r.png").stat().st_size > 10_000
    # one uniform-choice line per run where their forced blocks differ; a label not among the runs is refused
    assert plots.routing_figure({"msa": (msa, "C1"), "dense": (dense, "C0")}, tmp_path / "c.png", grid="msa",
                                chance={"msa": 0.14}, window=2)
    with pytest.raises(KeyError):
        plots.routing_figure({"msa": (msa, "C1")}, tmp_path / "x.png", grid="msa", chance={"other": 0.1}, window=2)


def test_no_index_rope_flag_reaches_the_index_branch():
    assert parse().index_rope and parse().model_config().msa.index_rope
    run = parse("--attention", "msa", "--no-index-rope")
    assert run.index_rope is False and run.model_config().msa.index_rope is False
    assert RunConfig.from_dict({k: v for k, v in run.to_dict().items() if k != "index_rope"}).index_rope  # old configs


def test_long_context_preset_and_the_documented_ablations():
    """Every ablation is a valid run, the block ones keep 2048 attended keys per query, and
    docs/long_context.md lists each one's command with exactly its flags."""
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "long_context.md").read_text()
    base = presets.run_config("long-context", attention="msa")
    assert base.seq_len == 16384 and base.block_size * base.top_k == 2048 and base.task_mix > 0
    for name, overrides in presets.LONG_CONTEXT_ABLATIONS.items():
        run = presets.run_config("long-context", attention="msa", **overrides)
        if name.startswith("block"):
            assert run.block_size * run.top_k == 2048, name
        if overrides:
            flags = " ".join(f"--no-{k.replace('_', '-')}" if v is False else f"--{k.replace('_', '-')} {v:g}"
                             for k, v in overrides.items())
            assert f"--run-dir runs/lc_{name} {flags}\n" in doc, name


# ------------------------------------------------------------------------ answer-weighted loss


def test_task_row_mask_marks_exactly_the_retrieval_rows_and_their_answers(corpus):
    it = data.BatchIterator(corpus.train, B, T, seed=3, task_mix=0.4)
    lo, hi = retrieval.answer_targets(T)
    seen = 0
    for step in range(6):
        batch = next(it)
        mask = it.task_rows(step)
        assert mask.dtype == bool and mask.shape == (B,)
        assert mask.sum() == data.task_rows_at(B, 0.4, step)
        assert [is_task_row(r) for r in batch] == mask.tolist()
        for row in batch[mask]:  # the targets [lo, hi) predict the 5 answer digits; then the newline
            ans = row[1:][lo:hi].astype(np.uint8).tobytes()
            assert len(ans) == retrieval.ANSWER_LEN and ans.isdigit() and row[-1] == retrieval.NEWLINE
            assert row[1:][lo - 3:lo].astype(np.uint8).tobytes() == b"is "
        seen += mask.sum()
    assert seen > 0
    assert not data.task_row_mask(B, 0.0, seed=3, step=0).any()
    assert data.task_row_mask(B, 1.0, seed=3, step=0).all()


def test_answer_weights_follow_positions_through_a_permuted_layout():
    import jax.numpy as jnp

    from msa_jax.train import answer_weights, lm_loss

    rows = jnp.array([True, False, True])
    w = np.asarray(answer_weights(rows, jnp.arange(T), T, 50.0))
    lo, hi = retrieval.answer_targets(T)
    expect = np.ones((3, T), np.float32)
    expect[[0, 2], lo:hi] = 50.0
    assert np.array_equal(w, expect)
    perm = np.random.default_rng(0).permutation(T)  # a layout's slot -> position
    assert np.array_equal(np.asarray(answer_weights(rows, jnp.asarray(perm), T, 50.0)), expect[:, perm])
    # the weighted mean: equal weights give the plain mean; the answer slots count answer_weight times
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, T, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(3, T)))
    ce = -np.take_along_axis(np.asarray(jax_log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(lm_loss(logits, targets, jnp.ones((3, T))), ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(lm_loss(logits, targets, jnp.asarray(w)), (ce * w).sum() / w.sum(), rtol=1e-6)
    assert abs(float(lm_loss(logits, targets, jnp.asarray(w))) - ce.mean()) > 1e-3


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def test_train_step_with_answer_weight_weights_the_answer_bytes(corpus):
    """loss_fn's LM loss with answer_rows is the weighted mean over the model's own logits; the train
    step runs with it (and answer_weight 1 is the plain loss)."""
    import jax.numpy as jnp

    from msa_jax import train
    from msa_jax.model import DecoderLM

    run = presets.run_config("tiny", attention="dense", seq_len=T, batch_size=4, task_mix=0.5, answer_weight=20.0)
    model = DecoderLM(run.model_config(), seed=0)
    it = data.BatchIterator(corpus.train, 4, T, seed=0, task_mix=0.5)
    tokens = jnp.asarray(next(it))
    rows = jnp.asarray(it.task_rows(0))
    assert bool(rows.any())
    plain, _ = train.loss_fn(model, tokens, sparse=False, kl_weight=0.0)
    same, _ = train.loss_fn(model, tokens, sparse=False, kl_weight=0.0, answer_rows=rows, answer_weight=1.0)
    weighted, _ = train.loss_fn(model, tokens, sparse=False, kl_weight=0.0, answer_rows=rows, answer_weight=20.0)
    logits, _ = model(tokens[:, :-1], sparse=False)
    ce = -np.take_along_axis(np.asarray(jax_log_softmax(logits.astype(jnp.float32))),
                             np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    w = np.asarray(train.answer_weights(rows, jnp.arange(T), T, 20.0))
    assert float(plain) == float(same)
    np.testing.assert_allclose(float(weighted), (ce * w).sum() / w.sum(), rtol=1e-5)
    opt = train.make_optimizer(model, run.train_config())
    m = train.train_step(model, opt, tokens, sparse=False, kl_weight=0.0, answer_rows=rows, answer_weight=20.0)
    np.testing.assert_allclose(float(m["lm_loss"]), float(weighted), rtol=1e-5)


def test_answer_weight_flag_checks():
    assert parse().answer_weight == 1.0
    assert parse("--task-mix", "0.5", "--answer-weight", "100").answer_weight == 100
    for flags, match in ((("--answer-weight", "10"), "answer_weight: expected 1 unless task_mix > 0"),
                         (("--task-mix", "0.5", "--answer-weight", "-1"), "answer_weight: expected a number >= 0")):
        with pytest.raises(SystemExit, match=f"invalid configuration: {match}"):
            parse(*flags)


def test_run_labels_keep_runs_of_the_same_name_apart(tmp_path):
    runs = [tmp_path / "a" / "dense", tmp_path / "b" / "dense", tmp_path / "b" / "msa", "dense"]
    assert plots.run_labels(runs[2:3]) == ["msa"]
    labels = plots.run_labels(runs)
    assert labels[:3] == ["a-dense", "b-dense", "msa"]
    assert len(set(labels)) == 4 and labels[3].endswith("dense")
    assert plots.run_labels([runs[0], runs[0]]) == ["a-dense", "a-dense-2"]


def test_answer_counts_score_the_retrieval_rows_like_answer_accuracy(corpus):
    """train.answer_counts on a batch with retrieval rows equals retrieval.answer_accuracy on the same
    rows (teacher-forced greedy over the answer bytes), and the loop's rates come from them."""
    import jax
    import jax.numpy as jnp

    from msa_jax import loop, train
    from msa_jax.model import DecoderLM

    run = presets.run_config("tiny", attention="dense", seq_len=T, batch_size=4, task_mix=0.5)
    model = DecoderLM(run.model_config(), seed=1)
    it = data.BatchIterator(corpus.train, 4, T, seed=3, task_mix=0.5)
    tokens = next(it)
    rows = it.task_rows(0)
    assert rows.any() and not rows.all()
    lo, hi = retrieval.answer_targets(T)
    mask = np.zeros(tokens.shape, bool)
    mask[:, lo:hi] = True  # answer_accuracy's mask: logits[t] predicts tokens[t + 1] = targets[t]
    m = train.loss_fn(model, jnp.asarray(tokens), sparse=False, kl_weight=0.0, answer_rows=jnp.asarray(rows))[1]
    exact, byte_acc = retrieval.answer_accuracy(lambda t: model(jnp.asarray(t), sparse=False)[0], tokens[rows],
                                                mask[rows])
    assert float(m["answer_rows"]) == rows.sum() and float(m["answer_bytes"]) == rows.sum() * (hi - lo)
    assert float(m["answer_rows_right"]) == exact.sum()
    np.testing.assert_allclose(float(m["answer_bytes_right"]), (byte_acc * (hi - lo)).sum())
    rates = loop.answer_rates({k: float(m[k]) for k in loop.ANSWER_COUNTS})
    assert rates == {"answer_bytes": byte_acc.mean(), "answer_exact": exact.mean()}
    # logits that put the target first everywhere: every answer right; one answer byte wrong in row r
    targets = jnp.asarray(tokens[:, 1:])
    logits = jax.nn.one_hot(targets, 256)
    c = train.answer_counts(logits, targets, jnp.asarray(rows), jnp.arange(T))
    assert float(c["answer_rows_right"]) == rows.sum() and float(c["answer_bytes_right"]) == rows.sum() * (hi - lo)
    r = int(np.flatnonzero(rows)[0])
    c = train.answer_counts(logits.at[r, lo + 2].set(0.0), targets, jnp.asarray(rows), jnp.arange(T))
    assert float(c["answer_rows_right"]) == rows.sum() - 1
    assert float(c["answer_bytes_right"]) == rows.sum() * (hi - lo) - 1
    assert loop.answer_rates({k: 0.0 for k in loop.ANSWER_COUNTS}) == {"answer_bytes": None, "answer_exact": None}
    probe = loop.retrieval_probe(run, corpus.val, 4, 2)
    assert len(probe.batches) == 2 and probe.batches[0].shape == (4, T + 1)
    assert all(is_task_row(r) for b in probe.batches for r in b)


def test_probe_needle_selected_is_needle_selected_per_row_and_layer(corpus):
    """The loop's probe knows where each row's needle is (its bytes are there), and
    probe_needle_selected equals retrieval.needle_selected of layer_selections' choice at the answer
    rows, per MSA layer and row, in either mode, with or without a mesh; a needle inside the answer's
    own (always selected, local) block scores exactly 1; evaluate reports it for MSA only."""
    import jax

    from msa_jax import loop, sharding
    from msa_jax.model import DecoderLM, layer_selections
    from msa_jax.needle_trace import probe_needle_selected

    run = presets.run_config("tiny", attention="msa", seq_len=T, batch_size=4, task_mix=1.0, block_size=16, top_k=3,
                             n_dense_layers=0)
    probe = loop.retrieval_probe(run, corpus.val, 4, 2)
    exs = retrieval.training_examples(corpus.val, 8, T + 1, run.mix_tasks, rng=run.seed + 1)
    np.testing.assert_array_equal(np.concatenate(probe.batches), np.stack([ex.tokens for ex in exs]))
    for rows, needles in zip(probe.batches, probe.needles):
        for r, (a, b) in zip(rows, needles):
            assert b - a >= 5 and is_task_row(r) and bytes(r[a:b].astype(np.uint8)) in r.astype(np.uint8).tobytes()
    ex = exs[0]
    np.testing.assert_array_equal(probe.needles[0][0], (ex.needle_pos, ex.needle_pos + len(ex.needle)))
    model = DecoderLM(run.model_config(), seed=2)
    lo, hi = retrieval.answer_targets(T)
    rows, needles = probe.batches[1], probe.needles[1]
    h_kv = run.model_config().n_kv_heads
    got_by_mode = {}
    for sparse in (True, False):
        got = got_by_mode[sparse] = probe_needle_selected(model, rows, needles, 16, sparse=sparse)
        sels = [s["block_idx"] for s in layer_selections(model, jax.numpy.asarray(rows[:, :-1]), sparse=sparse)]
        want = [[retrieval.needle_selected(np.asarray(s)[i], tuple(needles[i]), (lo, hi), 16) for i in range(4)]
                for s in sels]
        assert got.shape == (2, 4, h_kv)
        np.testing.assert_allclose(got.mean(-1), want, atol=1e-6)
        for g in range(h_kv):  # each group alone: its slice of the selection
            want_g = [[retrieval.needle_selected(np.asarray(s)[i][:, g:g + 1], tuple(needles[i]), (lo, hi), 16)
                       for i in range(4)] for s in sels]
            np.testing.assert_allclose(got[..., g], want_g, atol=1e-6)
    assert not np.array_equal(got_by_mode[True], got_by_mode[False])  # layer 1's input differs between modes
    mesh = sharding.make_mesh("data=1")
    np.testing.assert_allclose(probe_needle_selected(model, rows, needles, 16, sparse=False, mesh=mesh), got)
    local = np.tile([[T - 20, T - 15]], (4, 1))  # the answer rows' own block (T - 18 .. T - 2 lie in 15)
    assert (lo // 16, (hi - 1) // 16) == (15, 15)
    np.testing.assert_array_equal(probe_needle_selected(model, rows, local, 16), np.ones((2, 4, h_kv)))
    far = np.tile([[0, 2]], (4, 1))
    assert not np.array_equal(probe_needle_selected(model, rows, far, 16), np.ones((2, 4, h_kv)))
    msa = run.model_config().msa
    assert msa.block_size == 16
    row = loop.evaluate(model, [rows], mesh, is_msa=True, sparse=True, probe=probe, msa=msa)
    groups = np.concatenate([probe_needle_selected(model, b, n, 16) for b, n in zip(*probe)], 1).mean(1)
    np.testing.assert_allclose(row["val_needle_selected_groups"], groups, atol=1e-4)
    np.testing.assert_allclose(row["val_needle_selected_layers"], groups.mean(1), atol=1e-6)
    assert row["val_needle_selected"] == pytest.approx(groups.mean())
    chance = np.mean([retrieval.uniform_needle_selected(tuple(n), (lo, hi), 16, msa.top_k)
                      for n in np.concatenate(probe.needles)])
    assert row["val_needle_selected_chance"] == pytest.approx(chance) and 0 < chance < 1
    assert "val_needle_selected" not in loop.evaluate(model, [rows], mesh, is_msa=False, sparse=True, probe=probe)


@pytest.mark.parametrize("attention", ["msa", "dense"])
def test_needle_trace_at_and_past_the_training_length(corpus, attention, tmp_path):
    """needle_trace on a fresh model: at the training length the needle's numbers per layer; past it
    the shares at unseen distances and the rate by distance, each equal to retrieval's statistics
    of that one example's selection and attention (examples=1), and the figures."""
    import jax.numpy as jnp

    from msa_jax.model import DecoderLM, layer_block_mass, layer_selections
    from msa_jax.needle_trace import needle_trace

    cfg = presets.run_config("tiny", attention=attention, seq_len=128, block_size=16, top_k=3, n_dense_layers=0)
    model = DecoderLM(cfg.model_config(), seed=1)
    at = needle_trace(model, cfg, corpus.val, 128, 0.0, examples=2, seed=5, name="m", figure_dir=tmp_path)
    assert "attention_top_k_beyond" not in at and at["examples"] == 2 and 0 <= at["correct"] <= 1
    assert set(at["teacher_needle_mass"]) == {"0", "1"}
    assert ("needle_selected" in at) == (attention == "msa")
    far = needle_trace(model, cfg, corpus.val, 256, 0.0, examples=1, seed=5, name="m", figure_dir=tmp_path)
    ex = retrieval.passkey(corpus.val, 256, 0.0, 5)
    answer = (ex.answer_start - 1, ex.answer_start - 1 + len(ex.answer))
    tokens = jnp.asarray(ex.tokens[None])
    masses = [np.asarray(m)[0] for m in layer_block_mass(model, tokens, answer[0], n_rows=answer[1] - answer[0])]
    for layer, m in enumerate(masses):
        share, top = retrieval.mass_beyond(m, answer, 128, 16, 3)
        assert far["attention_mass_beyond"][str(layer)] == pytest.approx(share)
        assert far["attention_top_k_beyond"][str(layer)] == pytest.approx(top)
        picks, visible = retrieval.top_k_by_distance(m, answer, 16, 3)
        rate = far["selection_rate_by_distance"][str(layer)]["attention's top-k (answer rows)"]
        assert rate == pytest.approx([p / v if v else None for p, v in zip(picks, visible)], abs=1e-6)
    assert far["beyond_uniform"] == pytest.approx(retrieval.uniform_beyond(answer, 128, 16))
    assert (tmp_path / "distance_m_T256_depth0.png").stat().st_size > 10_000
    if attention == "msa":
        sel = [np.asarray(s["block_idx"])[0] for s in layer_selections(model, tokens)]
        for layer, s in enumerate(sel):
            assert far["selected_beyond"][str(layer)] == pytest.approx(retrieval.selected_beyond(s, answer, 128, 16)[0])
            rates = far["selection_rate_by_distance"][str(layer)]
            assert rates["index (rows past 128)"][0] == 1.0  # the local block, always selected
        assert (tmp_path / "selection_m_depth0.png").exists() and (tmp_path / "selection_m_T256_depth0.png").exists()
    else:
        assert not list(tmp_path.glob("selection_*"))  # no index branch to draw
