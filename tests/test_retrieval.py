"""Tests for msa_jax.retrieval: RULER-style byte-level retrieval tasks, batches and exact match."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from msa_jax import data, retrieval
from msa_jax.config import ModelConfig, MSAConfig

TASKS = sorted(retrieval.TASKS)
DEPTHS = (0.0, 0.1, 0.5, 0.9, 1.0)


@pytest.fixture(scope="module")
def source():
    return data.load_corpus(400_000).val  # 20 kB of real stdlib code


def text(ex) -> bytes:
    return ex.tokens.astype(np.uint8).tobytes()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_len", [200, 512, 2048])
@pytest.mark.parametrize("depth", DEPTHS)
def test_layout(source, task, context_len, depth):
    ex = retrieval.TASKS[task](source, context_len, depth, 7)
    assert ex.task == task
    assert ex.tokens.dtype == np.int32 and ex.tokens.shape == (context_len,)
    assert ex.tokens.min() >= 0 and ex.tokens.max() < 256
    seq = text(ex)
    # Needle exactly where it says, at round(depth * span).
    assert ex.needle_pos == round(depth * ex.span)
    assert seq[ex.needle_pos : ex.needle_pos + len(ex.needle)] == ex.needle
    for pos, needle in ex.needles:
        assert seq[pos : pos + len(needle)] == needle
    # At a line boundary of the code (the corpus has newlines everywhere).
    assert ex.needle_pos == 0 or seq[ex.needle_pos - 1] == ord("\n")
    for pos, _ in ex.needles:
        assert pos == 0 or seq[pos - 1] == ord("\n")
    # Answer bytes at answer_start, then the final newline.
    assert ex.answer.isdigit() and len(ex.answer) == 5
    assert ex.answer_start == context_len - 1 - len(ex.answer)
    assert seq[ex.answer_start : ex.answer_start + len(ex.answer)] == ex.answer
    assert seq.endswith(b"\n")
    # The answer is what the needle says, and the haystack is real code from the source.
    assert ex.answer in ex.needle
    start = ex.haystack_start
    first_needle = ex.needles[0][0]
    if first_needle > 0:
        assert seq[:first_needle] == source[start : start + first_needle].tobytes()


def test_passkey_format(source):
    ex = retrieval.passkey(source, 300, 0.5, 1)
    seq = text(ex)
    assert ex.needle == b"# the pass key is " + ex.answer + b". remember it.\n"
    assert seq.endswith(b"\n# what is the pass key? the pass key is " + ex.answer + b"\n")
    assert seq.count(b"pass key is " + ex.answer) == 2  # needle and answer


@pytest.mark.parametrize("task", TASKS)
def test_depth_ordering(source, task):
    pos = [retrieval.TASKS[task](source, 1024, d, 3).needle_pos for d in (0.0, 0.5, 1.0)]
    ex1 = retrieval.TASKS[task](source, 1024, 1.0, 3)
    assert pos[0] == 0 < pos[1] < pos[2] == ex1.span
    assert abs(pos[1] - ex1.span / 2) <= 1
    # Depth 1: the primary needle (and, for variable tracking, the rest of the chain) sits right
    # before the query.
    seq = text(ex1)
    end = ex1.needles[-1][0] + len(ex1.needles[-1][1])
    assert seq[end:].startswith(b"\n# what is")


def test_multikey_distractors(source):
    for seed in range(10):
        ex = retrieval.multikey(source, 1024, 0.5, seed, n_keys=5)
        seq = text(ex)
        assert len(ex.needles) == 5
        pairs = [re.fullmatch(rb"([a-z]{6}) = (\d{5})\n", b).groups() for _, b in ex.needles]
        keys = [k for k, _ in pairs]
        values = [v for _, v in pairs]
        assert len(set(keys)) == 5 and len(set(values)) == 5
        queried = re.search(rb"# what is the value of ([a-z]{6})\? the value of \1 is (\d{5})\n$", seq)
        assert queried is not None
        qkey, qval = queried.groups()
        assert qval == ex.answer and dict(pairs)[qkey] == ex.answer
        assert ex.needle == qkey + b" = " + ex.answer + b"\n"
        distractors = [p for p, b in ex.needles if b != ex.needle]
        assert len(distractors) == 4 and all(p != ex.needle_pos for p in distractors)
        for k in keys:
            if k != qkey:
                assert k not in seq[ex.answer_start - 60 :]  # only the queried key is asked for
    # Distractors land on both sides of a mid-depth needle for some seeds.
    sides = set()
    for seed in range(10):
        ex = retrieval.multikey(source, 2048, 0.5, seed)
        sides |= {p < ex.needle_pos for p, b in ex.needles if b != ex.needle}
    assert sides == {True, False}


def test_variable_tracking_chain_resolves(source):
    for seed in range(10):
        for depth in (0.0, 0.3, 1.0):
            ex = retrieval.variable_tracking(source, 1024, depth, seed, n_hops=5)
            seq = text(ex)
            assert len(ex.needles) == 5 and ex.needles[0][1] == ex.needle
            assert [p for p, _ in ex.needles] == sorted(p for p, _ in ex.needles)
            env = {}
            for _, line in ex.needles:  # the chain, in sequence order, is valid Python
                exec(line.decode(), {}, env)
            last = re.search(rb"# what is the value of ([A-Z]{5})\? the value of \1 is (\d{5})\n$", seq)
            assert last is not None
            assert str(env[last.group(1).decode()]).encode() == ex.answer == last.group(2)
            assert len(set(env)) == 5


@pytest.mark.parametrize("task", TASKS)
def test_determinism_per_seed(source, task):
    fn = retrieval.TASKS[task]
    a, b = fn(source, 512, 0.3, 11), fn(source, 512, 0.3, 11)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.answer == b.answer and a.needles == b.needles
    c = fn(source, 512, 0.3, 12)
    assert not np.array_equal(a.tokens, c.tokens)
    t1, m1 = retrieval.make_batch(task, source, 256, 0.5, 4, seed=5)
    t2, m2 = retrieval.make_batch(task, source, 256, 0.5, 4, seed=5)
    t3, _ = retrieval.make_batch(task, source, 256, 0.5, 4, seed=6)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(t1, t3)
    assert len({r.tobytes() for r in t1}) == 4  # the examples of a batch differ


@pytest.mark.parametrize("task", TASKS)
def test_make_batch_mask_alignment(source, task):
    tokens, mask = retrieval.make_batch(task, source, 300, 0.4, 6, seed=0)
    assert tokens.shape == mask.shape == (6, 300)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert not mask[:, -1].any()
    targets = tokens[:, 1:]
    exs = retrieval.make_examples(task, source, 300, 0.4, 6, seed=0)
    for i, ex in enumerate(exs):
        np.testing.assert_array_equal(tokens[i], ex.tokens)
        assert targets[i][mask[i, :-1]].astype(np.uint8).tobytes() == ex.answer
        assert np.flatnonzero(mask[i])[0] + 1 == ex.answer_start


def oracle(tokens):
    """Logits that put all mass on the true next token (the last position: token 0)."""
    nxt = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    return np.eye(256, dtype=np.float32)[nxt]


def test_exact_match_oracle_and_wrong(source):
    tokens, mask = retrieval.make_batch("passkey", source, 256, 0.5, 5, seed=0)
    assert retrieval.exact_match(oracle, tokens, mask).all()
    assert retrieval.exact_match(oracle, tokens, mask, batch_size=2).all()
    # Predicting the current token instead of the next one (an off-by-one shift) fails.
    shifted = lambda t: np.eye(256, dtype=np.float32)[t]
    assert not retrieval.exact_match(shifted, tokens, mask).any()
    rng = np.random.default_rng(0)
    random = lambda t: rng.normal(size=(*t.shape, 256)).astype(np.float32)
    assert not retrieval.exact_match(random, tokens, mask).any()

    # One wrong answer digit makes exactly that example wrong.
    def one_wrong(t):
        lg = oracle(t)
        i = 2
        j = np.flatnonzero(mask[i])[-1]
        lg[i, j] = np.roll(lg[i, j], 1)
        return lg

    assert retrieval.exact_match(one_wrong, tokens, mask).tolist() == [True, True, False, True, True]
    exact, byte_acc = retrieval.answer_accuracy(one_wrong, tokens, mask)
    n_answer = mask[2].sum()
    np.testing.assert_allclose(byte_acc, [1, 1, (n_answer - 1) / n_answer, 1, 1])
    assert exact.tolist() == [True, True, False, True, True]
    assert retrieval.answer_accuracy(shifted, tokens, mask)[1].max() < 1.0


def test_evaluate_tiny_decoder_lm(source):
    from msa_jax.model import DecoderLM

    cfg = ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
        attention="msa", msa=MSAConfig(block_size=32, top_k=2, index_dim=8),
    )
    model = DecoderLM(cfg, seed=0)
    fwd = nnx.jit(lambda m, t: m(t, sparse=True)[0])
    rows = retrieval.evaluate(
        lambda t: fwd(model, jax.numpy.asarray(t)), source, tasks=TASKS, context_lens=[256],
        depths=[0.0, 1.0], n=2, seed=0,
    )
    assert len(rows) == len(TASKS) * 2
    assert [(r["task"], r["depth"]) for r in rows] == [(t, d) for t in TASKS for d in (0.0, 1.0)]
    for r in rows:
        assert r["context_len"] == 256 and r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    # The oracle gets everything right through the same path.
    rows = retrieval.evaluate(oracle, source, TASKS, [256], [0.5], n=3, seed=1)
    assert all(r["accuracy"] == 1.0 and r["byte_accuracy"] == 1.0 for r in rows)


def test_evaluate_outcomes_and_examples_hash(source):
    """Rows carry each example's outcome and a hash of the examples: equal for two models scored on the
    same examples (what pairs them in msa_jax.differences), different for other examples."""
    tokens, mask = retrieval.make_batch("passkey", source, 256, 0.5, 4, seed=3)

    def wrong_at(i):  # the oracle with example i's last answer digit wrong
        def fn(t):
            lg = oracle(t)
            if t.shape[0] == len(tokens) and (t == tokens).all():
                j = np.flatnonzero(mask[i])[-1]
                lg[i, j] = np.roll(lg[i, j], 1)
            return lg
        return fn

    a = retrieval.evaluate(wrong_at(1), source, ["passkey"], [256], [0.5], n=4, seed=3)[0]
    b = retrieval.evaluate(wrong_at(2), source, ["passkey"], [256], [0.5], n=4, seed=3)[0]
    assert a["outcomes"] == "1011" and b["outcomes"] == "1101" and a["correct"] == 3
    assert a["examples"] == b["examples"] == retrieval.examples_hash(tokens)
    other = retrieval.evaluate(oracle, source, ["passkey"], [256], [0.5], n=4, seed=4)[0]
    assert other["outcomes"] == "1111" and other["examples"] != a["examples"]


@pytest.mark.parametrize("task", TASKS)
def test_errors(source, task):
    fn = retrieval.TASKS[task]
    with pytest.raises(ValueError, match="context_len"):
        fn(source, 40, 0.5, 0)  # too short for needle + query + answer
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="depth"):
            fn(source, 512, bad, 0)
    with pytest.raises(ValueError, match="source"):
        fn(source[:100], 4096, 0.5, 0)
    with pytest.raises(ValueError, match="task"):
        retrieval.make_batch("nope", source, 256, 0.5, 2)
    with pytest.raises(ValueError, match="task"):
        retrieval.evaluate(oracle, source, ["nope"], [256], [0.5], n=1)
