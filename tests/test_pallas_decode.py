"""Tests for the Pallas decode kernels `pallas.decode` (interpret mode on CPU).

Every check builds full-sequence inputs of length L (the cache), picks query rows q_pos (ragged per
sequence: the first block, block boundaries, the last position L - 1, and -1 padding) and compares
the decode kernels with the rows q_pos of the full-sequence oracle `msa_jax.ops.reference`:
selection (exactly, on integer-valued inputs where every score is exact and ties are common; up to
near ties on random normal inputs and on float8 keys), sparse attention (out and lse, with messy
block lists: duplicates, out-of-range, future and -1 ids, hot blocks), dense causal attention.
Junk (NaN / huge values) written past the queries' positions must not change anything. Other
tests check the argument validation, the batch chunking for int32 offsets, and that the kernels
lower to Triton IR for an abstract H100 (no GPU needed). On a GPU, cases with block_size >= 16 run
the compiled Triton kernels (smaller blocks stay in the interpreter), and one more test checks
the kernels at the paper's heads (skipped without a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas.decode as decode_mod
from msa_jax.ops import reference
from conftest import export_for_h100
from pallas.decode import (decode_dense_attention, decode_select_blocks,
                           decode_sparse_attention)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TOL = {  # (atol, rtol), as the other main-branch kernel tests
    jnp.float32: dict(out=(2e-5, 1e-5), lse=(2e-5, 1e-5)),
    jnp.bfloat16: dict(out=(2e-2, 2e-2), lse=(1e-4, 1e-5)),
}
FP8_MAX = 448.0


# ------------------------------------------------------------------------------------ inputs


def _ints(rng, shape, dtype, lo=-2, hi=2):
    """Integer-valued floats: exact dot products (f32 and bf16), many exact score ties."""
    return jnp.asarray(rng.integers(lo, hi + 1, shape).astype(np.float32), dtype)


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def _positions(rng, B, S, L, bs):
    """Distinct positions per sequence (ragged), covering the first block, block boundaries, the
    last position and -1 padding; the remaining entries are random."""
    specials = [L - 1, 0, bs, bs - 1, -1, 2 * bs, L // 2 + 1, 1]
    out = np.full((B, S), -1, np.int64)
    k = 0
    for b in range(B):
        used = set()
        for s in range(S):
            p = specials[k % len(specials)] if k < len(specials) else int(rng.integers(0, L))
            k += 1
            while p in used and p >= 0:
                p = int(rng.integers(0, L))
            used.add(p)
            out[b, s] = p
    return jnp.asarray(out.astype(np.int32))


def _rows(x, q_pos):
    """Rows q_pos (padding: row 0) of a full-sequence array [B, L, ...] -> [B, S, ...]."""
    idx = np.maximum(np.asarray(q_pos), 0)
    x = np.asarray(x)
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter_rows(rows, q_pos, L, fill):
    """Inverse of _rows for the valid queries: [B, S, ...] -> [B, L, ...] (other rows = fill)."""
    rows = np.asarray(rows)
    full = np.full((rows.shape[0], L) + rows.shape[2:], fill, rows.dtype)
    for b, s in zip(*np.nonzero(np.asarray(q_pos) >= 0)):
        full[b, int(q_pos[b, s])] = rows[b, s]
    return full


def _valid(q_pos):
    q_pos = np.asarray(q_pos)
    return q_pos >= 0


def _junk_past(x, q_pos, value):
    """x [B, L, ...] with value written at every position past each sequence's largest q_pos."""
    x = np.array(x)
    for b in range(x.shape[0]):
        x[b, int(np.max(np.asarray(q_pos)[b])) + 1:] = value
    return jnp.asarray(x)


def _interpret(block_size):
    """Real kernels on a GPU where they support the block size (>= 16); the interpreter for the
    smaller test blocks. On CPU everything runs in the interpreter."""
    return None if block_size >= 16 else True


def _select(*args, **kw):
    return decode_select_blocks(*args, interpret=_interpret(kw["block_size"]), **kw)


def _sparse(*args, **kw):
    return decode_sparse_attention(*args, interpret=_interpret(kw["block_size"]), **kw)


def _dense(*args, **kw):
    return decode_dense_attention(*args, interpret=_interpret(kw["block_size"]), **kw)


# ------------------------------------------------------------------------------------ oracle


@functools.cache
def _oracle_select_fn(block_size, top_k, sink_blocks, local_blocks=1):
    return jax.jit(lambda iq, ik: reference.select_blocks(
        iq.astype(jnp.float32), ik.astype(jnp.float32), block_size=block_size, top_k=top_k,
        sink_blocks=sink_blocks, local_blocks=local_blocks))


def _oracle_select(iq_full, ik_deq, q_pos, **kw):
    return _rows(_oracle_select_fn(kw["block_size"], kw["top_k"], kw.get("sink_blocks", 0),
                                   kw.get("local_blocks", 1))(iq_full, ik_deq), q_pos)


@functools.cache
def _oracle_attn_fn(block_size):
    def f(q, k, v, ids):
        with jax.default_matmul_precision("highest"):
            return reference.sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), ids, block_size=block_size,
                                              return_lse=True)
    return jax.jit(f)


def _oracle_attention(q_rows, k, v, ids_rows, q_pos, block_size):
    """Oracle rows: q / ids placed at their positions of a full sequence, other rows junk-free."""
    L = k.shape[1]
    q_full = _scatter_rows(np.asarray(q_rows, np.float32), q_pos, L, 0.0)
    ids_full = _scatter_rows(ids_rows, q_pos, L, -1).astype(np.int32)
    out, lse = _oracle_attn_fn(block_size)(jnp.asarray(q_full), k, v, jnp.asarray(ids_full))
    return _rows(out, q_pos), _rows(lse, q_pos)


def _block_scores(iq_rows, ik_deq, q_pos, block_size):
    """float64 block scores [B, S, H, n_blocks] of the query rows (-inf: no visible key)."""
    iq = np.asarray(iq_rows, np.float64)
    ik = np.asarray(ik_deq, np.float64)
    B, S, H, D = iq.shape
    L = ik.shape[1]
    s = np.einsum("bshd,bld->bshl", iq, ik) / np.sqrt(D)
    vis = np.arange(L)[None, None, None, :] <= np.asarray(q_pos)[:, :, None, None]
    s = np.where(vis, s, -np.inf)
    return s.reshape(B, S, H, L // block_size, block_size).max(-1)


# ------------------------------------------------------------------------------------ checks


def _check_ids(got, want, q_pos):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.int32 and got.shape == want.shape
    valid = _valid(q_pos)
    np.testing.assert_array_equal(got[valid], want[valid])
    assert (got[~valid] == -1).all(), "padding queries must get -1 ids"


def _boundary_ties(ids, scores, q_pos, *, block_size, sink_blocks):
    """Rows where an unselected ranked visible block scores exactly like a selected one."""
    n = 0
    for b, s in zip(*np.nonzero(_valid(q_pos))):
        local = int(q_pos[b, s]) // block_size
        for r in range(ids.shape[2]):
            sel = set(np.asarray(ids)[b, s, r]) - {-1}
            ranked = range(sink_blocks, local)
            s_in = {scores[b, s, r, c] for c in ranked if c in sel}
            s_out = {scores[b, s, r, c] for c in ranked if c not in sel}
            n += bool(s_in & s_out)
    return n


def _check_near_ties(got, want, scores, q_pos, *, block_size, top_k, sink_blocks, rtol,
                     min_agree=0.99):
    """got may differ from want only where the swapped blocks' scores are within rtol."""
    got, want = np.asarray(got), np.asarray(want)
    valid = _valid(q_pos)
    assert (got[~valid] == -1).all()
    differ = (got != want).any(-1) & valid[:, :, None]
    n_rows = valid.sum() * got.shape[2]
    assert differ.sum() <= (1 - min_agree) * n_rows, f"{differ.sum()} of {n_rows} rows differ"
    for b, s, r in np.argwhere(differ):
        g, w = set(got[b, s, r]) - {-1}, set(want[b, s, r]) - {-1}
        assert len(g) == len(w)
        local = int(q_pos[b, s]) // block_size
        assert local in g and set(range(min(sink_blocks, local, top_k - 1))) <= g
        sc = scores[b, s, r]
        lo, hi = min(sc[c] for c in g - w), max(sc[c] for c in w - g)
        assert lo >= hi - rtol * (abs(lo) + abs(hi)), (b, s, r, lo, hi)


def _check_attention(got, want, q_pos, dtype):
    (out, lse), (ref_out, ref_lse) = got, want
    out32, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    assert out.dtype == dtype and lse.dtype == np.float32
    valid = _valid(q_pos)
    tol = TOL[dtype]
    np.testing.assert_allclose(out32[valid], np.asarray(ref_out)[valid], *tol["out"])
    np.testing.assert_allclose(lse[valid], np.asarray(ref_lse)[valid], *tol["lse"])
    assert (out32[~valid] == 0).all() and np.isneginf(lse[~valid]).all()
    assert np.isfinite(out32).all()


# ------------------------------------------------------------------------- (a) selection


# (dtype, kind, B, S, L, H_kv, D_idx, block_size, top_k, sink_blocks, n_splits)
SELECT_CASES = [
    (jnp.float32, "int", 3, 3, 96, 2, 16, 8, 4, 0, 1),  # one split
    (jnp.float32, "int", 3, 3, 96, 2, 16, 8, 4, 0, 3),  # several
    (jnp.float32, "int", 3, 3, 96, 2, 16, 8, 4, 0, 40),  # more splits than blocks (12)
    (jnp.float32, "int", 3, 3, 96, 2, 16, 8, 4, 0, None),  # default rule (also end to end below)
    (jnp.bfloat16, "int", 2, 1, 128, 4, 32, 16, 3, 3, None),  # S = 1, H_kv = 4, sinks > slots
    (jnp.bfloat16, "tie", 3, 8, 96, 2, 16, 8, 4, 1, 1),  # values in {0, 1}: ties at the cut
    (jnp.float32, "int", 2, 3, 64, 1, 16, 8, 20, 1, 2),  # top_k > n_blocks (8)
    (jnp.float32, "int", 2, 2, 64, 2, 16, 8, 1, 0, None),  # top_k = 1: no kernel
    (jnp.float32, "int", 1, 20, 64, 4, 16, 8, 3, 0, 2),  # 80 rows: two row tiles of 64
]


def _select_inputs(seed, dtype, kind, B, L, H, D):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return _normal(rng, (B, L, H, D), dtype), _normal(rng, (B, L, D), dtype), rng
    lo, hi = (0, 1) if kind == "tie" else (-2, 2)
    return _ints(rng, (B, L, H, D), dtype, lo, hi), _ints(rng, (B, L, D), dtype, lo, hi), rng


@pytest.mark.parametrize("dtype,kind,B,S,L,H,D,block_size,top_k,sink_blocks,n_splits",
                         SELECT_CASES)
def test_select_matches_oracle(dtype, kind, B, S, L, H, D, block_size, top_k, sink_blocks,
                               n_splits):
    iq_full, ik, rng = _select_inputs(L + 7 * S + H, dtype, kind, B, L, H, D)
    q_pos = _positions(rng, B, S, L, block_size)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    got = _select(iq, ik, q_pos, n_splits=n_splits, **kw)
    assert got.shape == (B, S, H, top_k)
    want = _oracle_select(iq_full, ik, q_pos, **kw)
    _check_ids(got, want, q_pos)
    if kind == "tie":  # the case must exercise the tie rule
        assert _boundary_ties(want, _block_scores(iq, ik, q_pos, block_size), q_pos,
                              block_size=block_size, sink_blocks=sink_blocks) >= 10


@pytest.mark.parametrize("top_k,sink_blocks,local_blocks,n_splits", [
    (4, 0, 2, 3), (4, 1, 3, None), (3, 0, 3, 2), (20, 1, 2, 2)])  # ..., every slot forced, top_k > n_blocks
def test_select_local_blocks_matches_oracle(top_k, sink_blocks, local_blocks, n_splits):
    B, S, L, H, D, bs = 3, 5, 96, 2, 16, 8
    iq_full, ik, rng = _select_inputs(3 + top_k + local_blocks, jnp.float32, "int", B, L, H, D)
    q_pos = _positions(rng, B, S, L, bs)
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    got = _select(jnp.asarray(_rows(iq_full, q_pos)), ik, q_pos, n_splits=n_splits, **kw)
    _check_ids(got, _oracle_select(iq_full, ik, q_pos, **kw), q_pos)
    got = np.asarray(got)
    for b, s in np.ndindex(B, S):  # the local blocks are in every row
        p = int(q_pos[b, s])
        for c in range(max(0, p // bs - local_blocks + 1), p // bs + 1 if p >= 0 else 0):
            assert (got[b, s] == c).any(axis=-1).all(), (b, s, c)


def test_select_random_normal_up_to_near_ties():
    dtype, B, S, L, H, D, bs, top_k, sinks = jnp.float32, 3, 3, 96, 2, 16, 8, 4, 0
    iq_full, ik, rng = _select_inputs(5, dtype, "normal", B, L, H, D)
    q_pos = _positions(rng, B, S, L, bs)
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    got = _select(iq, ik, q_pos, n_splits=3, **kw)
    want = _oracle_select(iq_full, ik, q_pos, **kw)
    _check_near_ties(got, want, _block_scores(iq, ik, q_pos, bs), q_pos, rtol=1e-5, **kw)
    # the comparison can fail: another sequence's keys give another selection
    wrong = np.asarray(_select(iq, ik[::-1], q_pos, n_splits=3, **kw))
    assert (wrong != np.asarray(want)).any(-1)[_valid(q_pos)].mean() > 0.2


def test_select_tie_rule_and_ordering_by_hand():
    """Scores increase with the block id (iq = e0, ik[j] = j // 24 e0, so runs of three 8-blocks
    tie): the best blocks are the latest; among equal scores the lower id wins."""
    B, S, H, D, L, bs, top_k = 3, 3, 2, 16, 96, 8, 4  # the shapes of a case above: no compile
    iq = jnp.zeros((B, S, H, D), jnp.float32).at[..., 0].set(1.0)
    ik = jnp.zeros((B, L, D), jnp.float32).at[..., 0].set(jnp.arange(L) // 24)
    q_pos = jnp.asarray([[95, 64, 40]] * B, jnp.int32)
    got = np.asarray(_select(iq, ik, q_pos, block_size=bs, top_k=top_k, n_splits=3))
    # block scores (block c holds keys 8c..8c+7 -> value 8c // 24): 0 0 0 1 1 1 2 2 2 3 3 3; the
    # last slot goes to a tie (6 / 7 / 8, split over two programs), won by the lowest id
    want = np.asarray([[6, 9, 10, 11], [3, 6, 7, 8], [0, 3, 4, 5]])
    np.testing.assert_array_equal(got, np.broadcast_to(want[None, :, None], got.shape))


def test_merge_kernel_total_order_and_split_padding():
    """The candidate merge alone, against a sort in numpy: integer values (ties across splits, won by
    the lower id), sinks (+inf), empty slots (negative ids, -inf; the scan's pad slots: +inf), padding
    queries, one or two local blocks. The splits are padded to a power of two and the pad is never
    written: on a GPU it holds whatever memory held, so here it holds the most attractive candidates
    (valid ids, huge values), which must never be picked."""
    rng = np.random.default_rng(700)
    B, R_pad, n_splits, s_pad, bs = 2, 16, 5, 8, 8  # splits padded to 8
    for local_blocks, top_k in [(1, 4), (2, 6), (1, 9)]:
        n_slots = top_k - local_blocks
        P = max(2, 1 << (n_slots - 1).bit_length())  # the scan's slots: a power of two >= n_slots
        pos = rng.integers(-1, 400, (B, R_pad)).astype(np.int32)
        pos[:, :3] = [-1, 5, 399]  # a padding query, a query in block 0, the last block
        vals = rng.integers(-3, 4, (B, R_pad, s_pad, P)).astype(np.float32)
        ids = np.full((B, R_pad, s_pad, P), -1, np.int32)
        want = np.full((B, R_pad, top_k), -1, np.int32)
        for b in range(B):
            for r in range(R_pad):
                local = pos[b, r] // bs if pos[b, r] >= 0 else -1
                first = local - (local_blocks - 1)
                n_cand = min(max(first, 0), n_splits * P)
                pool = rng.permutation(max(first, 0))[:n_cand]  # unique ids below the local blocks
                slots = rng.permutation(n_splits * P)[:n_cand]
                ids[b, r, slots // P, slots % P] = pool
                empty = ids[b, r, :n_splits] < 0
                ids[b, r, :n_splits][empty] = -1 - rng.integers(0, P, empty.sum())
                vals[b, r, :n_splits][empty] = rng.choice([-np.inf, np.inf], empty.sum())
                sinks = pool[pool < 2]
                vals[b, r][np.isin(ids[b, r], sinks)] = np.inf
                ids[b, r, n_splits:] = rng.integers(0, 50, (s_pad - n_splits, P))  # the unwritten pad
                vals[b, r, n_splits:] = 1e30
                cand = sorted((-vals[b, r, s, j], ids[b, r, s, j]) for s in range(n_splits) for j in range(P)
                              if ids[b, r, s, j] >= 0)
                picked = [int(i) for _, i in cand[:n_slots]]
                loc = [c for c in range(first, local + 1) if c >= 0] if local >= 0 else []
                row = sorted(picked) + loc
                want[b, r, :len(row)] = row
        R = R_pad - 2  # the merge's grid covers the real rows only
        got = decode_mod._merge_call(jnp.asarray(pos), jnp.asarray(vals), jnp.asarray(ids), R=R,
                                     n_splits=n_splits, n_slots=n_slots, top_k=top_k, block_size=bs,
                                     local_blocks=local_blocks, interpret=True)
        np.testing.assert_array_equal(np.asarray(got)[..., :top_k], want[:, :R])


# ------------------------------------------------------------------ (b) sparse attention


def _messy_ids(rng, B, S, H, L, bs, top_k, q_pos, hot=False):
    """Per (query, group): the local block (sometimes left out) and a random subset of earlier
    blocks, plus junk the kernel must ignore or count once: a repeat, an out-of-range id, a
    future block, -1 or another negative id; shuffled. hot=True: block 0 everywhere (and repeated)."""
    n_blocks = L // bs
    ids = np.full((B, S, H, top_k), -1, np.int64)
    for b in range(B):
        for s in range(S):
            local = max(int(q_pos[b, s]), 0) // bs
            for r in range(H):
                n_extra = int(rng.integers(0, min(top_k - 5, local) + 1))
                chosen = list(rng.choice(local, size=n_extra, replace=False)) if n_extra else []
                if rng.random() < 0.8 or not chosen:
                    chosen.append(local)
                if hot:
                    chosen[0] = 0
                junk = [chosen[0], n_blocks + 3, local + 1, int(rng.choice([-1, -7]))]
                row = (chosen + junk)[:top_k]
                row += [-1] * (top_k - len(row))
                rng.shuffle(row)
                ids[b, s, r] = row
    return jnp.asarray(ids.astype(np.int32))


# (dtype, B, S, L, H_kv, G, D, block_size, top_k, selection, n_splits)
ATTN_CASES = [
    (jnp.float32, 3, 3, 96, 2, 1, 16, 8, 4, "indexer", 1),  # G = 1, one split, end to end
    (jnp.float32, 3, 3, 64, 2, 4, 16, 8, 9, "messy", 3),  # G = 4, several splits
    (jnp.float32, 2, 1, 64, 1, 16, 32, 8, 9, "hot", 12),  # G = 16, more splits than ids
    (jnp.bfloat16, 3, 3, 128, 2, 4, 16, 16, 9, "messy", None),
    (jnp.bfloat16, 2, 3, 128, 1, 16, 16, 16, 9, "hot", 2),
    (jnp.float32, 2, 2, 64, 2, 3, 24, 8, 9, "messy", 2),  # G = 3, D = 24 (padded rows / dims)
]


@pytest.mark.parametrize("dtype,B,S,L,H,G,D,block_size,top_k,selection,n_splits", ATTN_CASES)
def test_sparse_attention_matches_oracle(dtype, B, S, L, H, G, D, block_size, top_k, selection,
                                         n_splits):
    rng = np.random.default_rng(100 + L + S * G + D)
    q_full = _normal(rng, (B, L, H * G, D), dtype)
    k, v = _normal(rng, (B, L, H, D), dtype), _normal(rng, (B, L, H, D), dtype)
    q_pos = _positions(rng, B, S, L, block_size)
    q = jnp.asarray(_rows(q_full, q_pos))
    if selection == "indexer":  # end to end: the decode indexer's selection, checked on the way
        iq_full, ik, _ = _select_inputs(7, dtype, "int", B, L, H, 16)  # shapes of a select case
        kw = dict(block_size=block_size, top_k=top_k)
        ids = _select(jnp.asarray(_rows(iq_full, q_pos)), ik, q_pos, **kw)
        _check_ids(ids, _oracle_select(iq_full, ik, q_pos, **kw), q_pos)
    else:
        ids = _messy_ids(rng, B, S, H, L, block_size, top_k, q_pos, hot=selection == "hot")
    got = _sparse(q, k, v, ids, q_pos, block_size=block_size, n_splits=n_splits)
    assert got[0].shape == (B, S, H * G, D) and got[1].shape == (B, S, H * G)
    _check_attention(got, _oracle_attention(q, k, v, ids, q_pos, block_size), q_pos, dtype)


def test_sparse_attention_comparison_can_fail():
    dtype, B, S, L, H, G, D, bs, top_k = jnp.float32, 3, 3, 64, 2, 4, 16, 8, 9
    rng = np.random.default_rng(1)
    q = _normal(rng, (B, S, H * G, D), dtype)
    k, v = _normal(rng, (B, L, H, D), dtype), _normal(rng, (B, L, H, D), dtype)
    q_pos = _positions(rng, B, S, L, bs)
    ids = _messy_ids(rng, B, S, H, L, bs, top_k, q_pos)
    want = _oracle_attention(q, k, v, ids, q_pos, bs)
    _check_attention(_sparse(q, k, v, ids, q_pos, block_size=bs, n_splits=3),
                     want, q_pos, dtype)
    other = jnp.where(ids >= 0, 0, -1)  # block 0 only (or nothing)
    with pytest.raises(AssertionError):
        _check_attention(_sparse(q, k, v, other, q_pos, block_size=bs, n_splits=3),
                         want, q_pos, dtype)


# ------------------------------------------------------------------- (c) dense attention


# (dtype, B, S, L, H_kv, G, D, block_size, n_splits)
DENSE_CASES = [
    (jnp.float32, 3, 3, 64, 2, 4, 16, 8, 1),
    (jnp.float32, 3, 3, 64, 2, 4, 16, 8, 5),
    (jnp.bfloat16, 2, 1, 64, 1, 16, 16, 16, 20),  # G = 16, more splits than blocks
]


@pytest.mark.parametrize("dtype,B,S,L,H,G,D,block_size,n_splits", DENSE_CASES)
def test_dense_attention_matches_oracle(dtype, B, S, L, H, G, D, block_size, n_splits):
    rng = np.random.default_rng(200 + S * G + block_size)
    q = _normal(rng, (B, S, H * G, D), dtype)
    k, v = _normal(rng, (B, L, H, D), dtype), _normal(rng, (B, L, H, D), dtype)
    q_pos = _positions(rng, B, S, L, block_size)
    all_blocks = jnp.broadcast_to(jnp.arange(L // block_size, dtype=jnp.int32),
                                  (B, S, H, L // block_size))
    want = _oracle_attention(q, k, v, all_blocks, q_pos, block_size)  # every block = causal
    got = _dense(q, k, v, q_pos, block_size=block_size, n_splits=n_splits)
    _check_attention(got, want, q_pos, dtype)


# ----------------------------------------------------------------- (d) float8 index keys


def _fp8_keys(rng, ik_real, mode, block_size, exact):
    """Quantise [B, L, D] keys to float8_e4m3fn with per-token or per-block scales. exact: scales
    are powers of two and the keys small integers, so dequantised scores are exact."""
    B, L, D = ik_real.shape
    if exact:
        n = L if mode == "token" else L // block_size
        scale = 2.0 ** rng.integers(-3, 4, (B, n)).astype(np.float32)
        q8 = rng.integers(-6, 7, (B, L, D)).astype(np.float32)
    else:
        x = np.asarray(ik_real, np.float32)
        if mode == "token":
            amax = np.abs(x).max(-1)
        else:
            amax = np.abs(x).reshape(B, L // block_size, -1).max(-1)
        scale = (amax / FP8_MAX).astype(np.float32)
        per_tok = scale if mode == "token" else np.repeat(scale, block_size, axis=1)
        q8 = x / per_tok[..., None]
    ik8 = jnp.asarray(q8).astype(jnp.float8_e4m3fn)
    per_tok = scale if mode == "token" else np.repeat(scale, block_size, axis=1)
    deq = np.asarray(ik8.astype(jnp.float32)) * per_tok[..., None]
    return ik8, jnp.asarray(scale), jnp.asarray(deq)


@pytest.mark.parametrize("mode", ["token", "block"])
@pytest.mark.parametrize("exact", [True, False])
def test_fp8_index_keys(mode, exact):
    dtype, B, S, L, H, D, bs, top_k, sinks = jnp.bfloat16, 3, 3, 96, 2, 16, 8, 4, 1
    rng = np.random.default_rng(300 + exact)
    iq_full = (_ints(rng, (B, L, H, D), dtype) if exact else _normal(rng, (B, L, H, D), dtype))
    ik8, scale, deq = _fp8_keys(rng, _normal(rng, (B, L, D), jnp.float32), mode, bs, exact)
    q_pos = _positions(rng, B, S, L, bs)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks)
    got = _select(iq, ik8, q_pos, ik_scale=scale, n_splits=3, **kw)
    want = _oracle_select(iq_full, deq, q_pos, **kw)
    if exact:
        _check_ids(got, want, q_pos)
    else:
        _check_near_ties(got, want, _block_scores(iq, deq, q_pos, bs), q_pos, rtol=1e-5, **kw)


# ------------------------------------------------------------------ (e) junk past q_pos


def test_junk_in_the_cache_past_the_queries_changes_nothing():
    rng = np.random.default_rng(400)
    B, S, L, H, G, D, bs = 3, 3, 64, 2, 4, 16, 8
    q_pos = _positions(rng, B, S, L, bs)
    q_pos = q_pos.at[0].set(jnp.asarray([5, 17, -1], jnp.int32))  # a sequence far from full

    # selection, float index keys (the shapes / statics of an oracle case: no new compile)
    iq_full, ik, _ = _select_inputs(9, jnp.float32, "int", B, 96, H, 16)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    iq_nan = jnp.where(jnp.asarray(_valid(q_pos))[:, :, None, None], iq, jnp.nan)  # padding rows
    kw = dict(block_size=bs, top_k=4, n_splits=3)
    clean = _select(iq, ik, q_pos, **kw)
    _check_ids(clean, _oracle_select(iq_full, ik, q_pos, block_size=bs, top_k=4), q_pos)
    for junk in (jnp.nan, 1e30, -jnp.inf):
        dirty = _select(iq_nan, _junk_past(ik, q_pos, junk), q_pos, **kw)
        np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))

    # selection, float8 keys with per-token scales
    ik8, scale, _ = _fp8_keys(rng, _normal(rng, (B, 96, 16), jnp.float32), "token", bs, False)
    iqb = iq.astype(jnp.bfloat16)
    kw8 = dict(block_size=bs, top_k=4, sink_blocks=1, n_splits=3)
    clean8 = _select(iqb, ik8, q_pos, ik_scale=scale, **kw8)
    dirty8 = _select(iqb, _junk_past(ik8, q_pos, jnp.nan), q_pos,
                                  ik_scale=_junk_past(scale, q_pos, jnp.nan), **kw8)
    np.testing.assert_array_equal(np.asarray(dirty8), np.asarray(clean8))

    # attention (NaN keys / values past q_pos, NaN queries of padding rows)
    q = _normal(rng, (B, S, H * G, D), jnp.float32)
    k, v = _normal(rng, (B, L, H, D), jnp.float32), _normal(rng, (B, L, H, D), jnp.float32)
    ids = _messy_ids(rng, B, S, H, L, bs, 9, q_pos)
    q_nan = jnp.where(jnp.asarray(_valid(q_pos))[:, :, None, None], q, jnp.nan)
    kd, vd = _junk_past(k, q_pos, jnp.nan), _junk_past(v, q_pos, jnp.nan)
    sparse = _sparse(q, k, v, ids, q_pos, block_size=bs, n_splits=3)
    _check_attention(sparse, _oracle_attention(q, k, v, ids, q_pos, bs), q_pos, jnp.float32)
    sparse_d = _sparse(q_nan, kd, vd, ids, q_pos, block_size=bs, n_splits=3)
    dense = _dense(q, k, v, q_pos, block_size=bs, n_splits=5)
    dense_d = _dense(q_nan, kd, vd, q_pos, block_size=bs, n_splits=5)
    for a, b in ((sparse, sparse_d), (dense, dense_d)):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


# ------------------------------------------------------------------------- (f) arguments


def test_rejects_bad_arguments():
    B, S, L, H, D = 1, 2, 32, 2, 16
    iq, ik = jnp.ones((B, S, H, D)), jnp.ones((B, L, D))
    pos = jnp.zeros((B, S), jnp.int32)
    sel = functools.partial(decode_select_blocks, block_size=8, top_k=2, interpret=True)
    bad_select = [
        (lambda: sel(iq[0], ik, pos), "iq"),
        (lambda: sel(iq, ik[:, :, :8], pos), "ik"),
        (lambda: sel(iq, ik.astype(jnp.bfloat16), pos), "ik"),
        (lambda: sel(iq.astype(jnp.float16), ik.astype(jnp.float16), pos), "iq"),
        (lambda: sel(iq, ik[:, :28], pos), "multiple"),
        (lambda: sel(iq, ik, pos, block_size=12), "block_size"),
        (lambda: decode_select_blocks(iq, ik, pos, block_size=8, top_k=2, interpret=False),
         "block_size"),  # the Triton kernels need block_size >= 16
        (lambda: sel(iq, ik, pos, top_k=0), "top_k"),
        (lambda: sel(iq, ik, pos, sink_blocks=-1), "sink_blocks"),
        (lambda: sel(iq, ik, pos, n_splits=0), "n_splits"),
        (lambda: sel(iq, ik, pos[:, :1]), "q_pos"),
        (lambda: sel(iq, ik, pos.astype(jnp.float32)), "q_pos"),
        (lambda: sel(iq, ik.astype(jnp.float8_e4m3fn), pos, ik_scale=jnp.ones((B, 3))),
         "ik_scale"),
        (lambda: sel(iq, ik, pos, ik_scale=jnp.ones((B, L), jnp.bfloat16)), "ik_scale"),
    ]
    q, k = jnp.ones((B, S, 4 * H, D)), jnp.ones((B, L, H, D))
    ids = jnp.zeros((B, S, H, 3), jnp.int32)
    att = functools.partial(decode_sparse_attention, block_size=8, interpret=True)
    bad_attn = [
        (lambda: att(q, k, k[:, :, :1], ids, pos), "^v: expected shape"),
        (lambda: att(q[..., :8], k, k, ids, pos), "^k: expected shape"),
        (lambda: att(q[:, :, :3], k, k, ids, pos), "^q: expected a head count"),
        (lambda: att(q.astype(jnp.bfloat16), k, k, ids, pos), "dtype"),
        (lambda: att(q, k, k, ids[:, :1], pos), "block_idx"),
        (lambda: att(q, k, k, ids.astype(jnp.float32), pos), "block_idx"),
        (lambda: att(q, k, k, ids, pos[0]), "q_pos"),
        (lambda: att(q, k[:, :28], k[:, :28], ids, pos), "multiple"),
        (lambda: att(q, k, k, ids, pos, n_splits=0), "n_splits"),
        (lambda: decode_dense_attention(q, k, k, pos, block_size=8, interpret=False),
         "block_size"),
        (lambda: decode_dense_attention(q, k, k, pos, block_size=6, interpret=True), "block_size"),
    ]
    for fn, match in bad_select + bad_attn:
        with pytest.raises(ValueError, match=match):
            fn()


# ------------------------------------------------------------- int32 offsets: batch chunks


def test_batch_chunks_when_an_operand_would_overflow_int32_offsets(monkeypatch):
    B, S, L, H, G, D, bs = 3, 2, 40, 2, 2, 16, 8  # shapes no other test compiles (jit cache)
    rng = np.random.default_rng(500)
    iq_full, ik, _ = _select_inputs(11, jnp.float32, "int", B, L, H, D)
    q = _normal(rng, (B, S, H * G, D), jnp.float32)
    k, v = _normal(rng, (B, L, H, D), jnp.float32), _normal(rng, (B, L, H, D), jnp.float32)
    q_pos = _positions(rng, B, S, L, bs)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    kw = dict(block_size=bs, top_k=3)
    ids = _messy_ids(rng, B, S, H, L, bs, 8, q_pos)
    whole = _select(iq, ik, q_pos, n_splits=3, **kw)  # one chunk (and another n_splits: its own trace)
    # operands over 2**32 bytes get 64-bit offsets in the lowering: no chunks for them
    assert decode_mod._offsets_fit(3 * 2**30, 2) and not decode_mod._offsets_fit(3 * 2**30, 1)
    assert decode_mod._batch_chunk(20, [(2**27, 1)]) == 15  # float8 ik of 20 x 1M x 128
    assert decode_mod._batch_chunk(20, [(2**29, 2)]) == 20  # bf16 k of 20 x 1M x 4 x 128
    monkeypatch.setattr(decode_mod, "_I64_OFFSETS_ABOVE_BYTES", 2**40)
    # ik: L * D = 640 elements per sequence -> chunks of 2 + 1 sequences
    monkeypatch.setattr(decode_mod, "_INT32_ELEMS", 2 * L * D + 1)
    f_sel = functools.partial(_select, n_splits=2, **kw)
    assert str(jax.make_jaxpr(f_sel)(iq, ik, q_pos)).count("pallas_call[") == 4  # scan + merge per chunk
    np.testing.assert_array_equal(f_sel(iq, ik, q_pos), whole)
    # k: L * H * D = 1280, partial outputs 2048 elements per sequence -> 3 chunks of 1
    monkeypatch.setattr(decode_mod, "_INT32_ELEMS", 2 * L * H * D + 1)
    f_att = functools.partial(_sparse, block_size=bs, n_splits=2)
    assert str(jax.make_jaxpr(f_att)(q, k, v, ids, q_pos)).count("pallas_call[") == 3
    _check_attention(f_att(q, k, v, ids, q_pos), _oracle_attention(q, k, v, ids, q_pos, bs),
                     q_pos, jnp.float32)
    monkeypatch.setattr(decode_mod, "_INT32_ELEMS", 100)
    with pytest.raises(ValueError, match="int32"):
        _select(iq[:, :1], ik, q_pos[:, :1], **kw)


def test_default_splits():
    # paper heads at 1M tokens, B = 1: 8192 blocks
    assert decode_mod.default_scan_splits(1, 8192) == 128  # ~one per SM, a power of two (the merge's tile)
    assert decode_mod.default_scan_splits(64, 8192) == 128
    assert decode_mod.default_scan_splits(1, 32) == 4  # >= 8 blocks per split
    assert decode_mod.default_scan_splits(1, 100) == 8  # 13 -> 8
    assert decode_mod.default_attention_splits(4, 16) == 16  # sparse, B = S = 1, H_kv = 4
    assert decode_mod.default_attention_splits(4, 8192, 4) == 132  # dense at 1M


# ---------------------------------------------------------------------- (g) Triton lowering




SD = jax.ShapeDtypeStruct


@pytest.mark.parametrize("B,S,iq_dtype,ik_dtype,scale,block_size", [
    (2, 1, jnp.bfloat16, jnp.bfloat16, None, 128),  # paper heads
    (1, 3, jnp.bfloat16, jnp.float8_e4m3fn, "token", 128),
    (2, 1, jnp.bfloat16, jnp.float8_e4m3fn, "block", 128),
    (1, 1, jnp.float32, jnp.float8_e4m3fn, "token", 64),
    (1, 32, jnp.bfloat16, jnp.bfloat16, None, 16),  # 128 rows: two row tiles; 16-token blocks
])
def test_select_lowers_to_triton(B, S, iq_dtype, ik_dtype, scale, block_size):
    L, H, D = 4096, 4, 128
    args = [SD((B, S, H, D), iq_dtype), SD((B, L, D), ik_dtype), SD((B, S), jnp.int32)]
    if scale is not None:
        args.append(SD((B, L if scale == "token" else L // block_size), jnp.float32))
    f = lambda *a: decode_select_blocks(*a[:3], ik_scale=a[3] if len(a) > 3 else None,
                                        block_size=block_size, top_k=16, interpret=False)
    text = export_for_h100(f, *args)
    assert "__gpu$xla.gpu.triton" in text and "msa_decode_index_scan" in text and "msa_decode_merge" in text
    assert "sort" not in text  # the merge is a kernel: no XLA sort (a chain of launches at batch 1)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("B,S,H_q,H_kv,dtype,bs", [
    (2, 1, 64, 4, jnp.bfloat16, 128),  # paper heads
    (1, 3, 16, 4, jnp.bfloat16, 16),  # G = 4: padded rows; 16-token blocks
    (1, 1, 8, 8, jnp.float32, 64),  # G = 1, float32
])
def test_attention_lowers_to_triton(dense, B, S, H_q, H_kv, dtype, bs):
    L, D, top_k = 4096, 128, 16
    qkv = [SD((B, S, H_q, D), dtype), SD((B, L, H_kv, D), dtype), SD((B, L, H_kv, D), dtype)]
    if dense:
        f = lambda q, k, v, p: decode_dense_attention(q, k, v, p, block_size=bs, interpret=False)
        text = export_for_h100(f, *qkv, SD((B, S), jnp.int32))
    else:
        f = lambda q, k, v, i, p: decode_sparse_attention(q, k, v, i, p, block_size=bs,
                                                          interpret=False)
        text = export_for_h100(f, *qkv, SD((B, S, H_kv, top_k), jnp.int32), SD((B, S), jnp.int32))
    name = "msa_decode_dense_attention" if dense else "msa_decode_sparse_attention"
    assert "__gpu$xla.gpu.triton" in text and name in text
    assert "sort" not in text  # the ids are cleaned in the kernel


def test_no_cache_relayout_outside_the_kernel():
    """At the paper heads the wrapper only reshapes the caches (free): no op outside the kernels
    produces an array as large as the KV or index-key cache."""
    B, S, L = 1, 1, 4096
    f_sel = lambda iq, ik, p: decode_select_blocks(iq, ik, p, block_size=128, top_k=16)
    f_att = lambda q, k, v, i, p: decode_sparse_attention(q, k, v, i, p, block_size=128)
    for f, args, cache in [
        (f_sel, (SD((B, S, 4, 128), jnp.bfloat16), SD((B, L, 128), jnp.bfloat16),
                 SD((B, S), jnp.int32)), B * L * 128),
        (f_att, (SD((B, S, 64, 128), jnp.bfloat16), SD((B, L, 4, 128), jnp.bfloat16),
                 SD((B, L, 4, 128), jnp.bfloat16), SD((B, S, 4, 16), jnp.int32),
                 SD((B, S), jnp.int32)), B * L * 4 * 128),
    ]:
        big = []

        def walk(jx):
            for eqn in jx.eqns:
                if eqn.primitive.name == "pallas_call":
                    continue
                if eqn.primitive.name not in ("reshape", "pjit", "jit"):
                    big.extend(eqn.primitive.name for o in eqn.outvars
                               if int(np.prod(o.aval.shape)) >= cache)
                for p in eqn.params.values():
                    if hasattr(p, "eqns"):
                        walk(p)
                    elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                        walk(p.jaxpr)

        walk(jax.make_jaxpr(f)(*args).jaxpr)
        assert not big, big


# ------------------------------------------------------------------- real kernels on a GPU


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton kernels need a GPU")
@pytest.mark.parametrize("ik_kind", ["bf16", "fp8_token", "fp8_block"])
def test_paper_heads_on_gpu(ik_kind):
    """The compiled Triton kernels at the paper's heads (short cache: the oracle is O(L^2))."""
    dtype, B, S, L, H, G, D, bs, top_k = jnp.bfloat16, 2, 3, 1024, 4, 16, 128, 128, 4
    rng = np.random.default_rng(600)
    iq_full = _normal(rng, (B, L, H, D), dtype)
    ik_real = _normal(rng, (B, L, D), jnp.float32)
    if ik_kind == "bf16":
        ik, scale = ik_real.astype(dtype), None
        deq = ik.astype(jnp.float32)
    else:
        ik, scale, deq = _fp8_keys(rng, ik_real, ik_kind[4:], bs, exact=False)
    q_pos = _positions(rng, B, S, L, bs)
    iq = jnp.asarray(_rows(iq_full, q_pos))
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=0)
    ids = decode_select_blocks(iq, ik, q_pos, ik_scale=scale, **kw)
    _check_near_ties(ids, _oracle_select(iq_full, deq, q_pos, **kw),
                     _block_scores(iq, deq, q_pos, bs), q_pos, rtol=1e-4, **kw)
    q = _normal(rng, (B, S, H * G, D), dtype)
    k, v = _normal(rng, (B, L, H, D), dtype), _normal(rng, (B, L, H, D), dtype)
    _check_attention(decode_sparse_attention(q, k, v, ids, q_pos, block_size=bs),
                     _oracle_attention(q, k, v, ids, q_pos, bs), q_pos, dtype)
    all_blocks = jnp.broadcast_to(jnp.arange(L // bs, dtype=jnp.int32), (B, S, H, L // bs))
    _check_attention(decode_dense_attention(q, k, v, q_pos, block_size=bs),
                     _oracle_attention(q, k, v, all_blocks, q_pos, bs), q_pos, dtype)
