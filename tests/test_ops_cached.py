"""The ops with queries at an offset (`q_pos`: generation, chunked prefill; docs/algorithm.md §3.6).

Every backend against the full-sequence oracle: a query at position p against a cache must give
exactly row p of `select_blocks`, `sparse_attention`, `msa_attention` and `dense_attention` run on
the whole sequence. Ragged positions in one batch, padding queries (-1), positions in the first
block and at block boundaries, L not a multiple of the block, GQA ratios 1..16, top_k larger than
the visible blocks, float32 and bfloat16, fp8 index keys with per-token and per-block scales, and
junk in the cache past every query.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import ops
from msa_jax.ops import pallas_backend
from msa_jax.cache import quantize_index_keys

IMPLS = ("reference", "xla", "pallas")

# (B, L, H_q, H_kv, D, D_idx, block_size, top_k, sink_blocks[, local_blocks]), positions [B, S] (-1 = padding)
CASES = {
    "g4_ragged": ((2, 48, 8, 2, 16, 16, 8, 3, 0), [[0, 17, 47], [31, -1, 8]]),
    "g1_decode": ((3, 40, 2, 2, 8, 8, 8, 2, 0), [[39], [7], [24]]),  # S = 1, L = 5 blocks
    "g16_topk_gt_blocks": ((1, 32, 16, 1, 8, 8, 16, 4, 0), [[5, 16, 31]]),
    "g2_sinks_partial_L": ((2, 37, 4, 2, 8, 16, 8, 3, 1), [[36, 9], [20, 0]]),  # L = 37: a partial block
    "g2_local2": ((2, 48, 4, 2, 8, 8, 8, 3, 0, 2), [[47, 9, 3], [20, -1, 40]]),  # two always-selected blocks
    # S = 10 > DECODE_MAX_QUERIES: pallas runs the KV-outer training kernels at these positions
    "g2_slice_padded": ((2, 45, 4, 2, 8, 8, 8, 3, 0),
                        [[3, 40, -1, 17, 44, 8, 9, 31, -1, 26], [0, 12, 13, 14, 39, -1, 22, 5, 44, 30]]),
}


def _inputs(case, dtype, seed=0):
    (B, L, Hq, R, D, Di, bs, k, sinks, *local), pos = CASES[case]
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)  # noqa: E731
    q, kk, v, iq, ik = arr(B, L, Hq, D), arr(B, L, R, D), arr(B, L, R, D), arr(B, L, R, Di), arr(B, L, Di)
    kw = dict(block_size=bs, top_k=k, sink_blocks=sinks, local_blocks=local[0] if local else 1)
    return (q, kk, v, iq, ik), np.asarray(pos, np.int32), kw


def rows(x, pos):
    """x [B, L, ...] -> [B, S, ...] at positions pos [B, S] (padding rows: row 0, ignored)."""
    return jnp.stack([x[b, np.maximum(pos[b], 0)] for b in range(pos.shape[0])])


def as_sets(idx):
    """[B, S, H_kv, top_k] ids -> nested lists [B][S] of per-group tuples of id sets."""
    idx = np.asarray(idx)
    return [[tuple(frozenset(int(i) for i in g if i >= 0) for g in row) for row in seq] for seq in idx]


@functools.cache
def _full(case, dtype):
    (q, k, v, iq, ik), pos, kw = _inputs(case, dtype)
    with jax.default_matmul_precision("highest"):
        out, idx = ops.msa_attention(q, k, v, iq, ik, impl="reference", **kw)
        dense = ops.dense_attention(q, k, v, impl="reference")
    return out, idx, dense


def _pallas_ok(impl, kw, L):
    if impl == "pallas" and kw["block_size"] < 16 and jax.default_backend() == "gpu":
        pytest.skip("the Triton decode kernels take blocks of >= 16 (interpret mode takes 8)")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cached_ops_equal_the_full_sequence_rows(impl, case, dtype):
    (q, k, v, iq, ik), pos, kw = _inputs(case, dtype)
    _pallas_ok(impl, kw, k.shape[1])
    full_out, full_idx, full_dense = _full(case, dtype)
    with jax.default_matmul_precision("highest"):
        out, idx = ops.msa_attention(rows(q, pos), k, v, rows(iq, pos), ik, q_pos=pos, impl=impl, **kw)
        dense = ops.dense_attention(rows(q, pos), k, v, q_pos=pos, impl=impl)
    valid = pos >= 0
    assert idx.shape == (*pos.shape, k.shape[2], kw["top_k"]) and idx.dtype == jnp.int32
    got, want = as_sets(idx), as_sets(rows(full_idx, pos))
    for b, s in zip(*np.nonzero(valid)):
        assert got[b][s] == want[b][s], (b, s)
    assert (np.asarray(idx)[~valid] == -1).all()
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for o, ref in ((out, rows(full_out, pos)), (dense, rows(full_dense, pos))):
        o, ref = np.asarray(o, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(o[valid], ref[valid], atol=tol, rtol=tol)
        assert (o[~valid] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_attention_with_lse_and_hand_selections(impl):
    (q, k, v, iq, ik), pos, kw = _inputs("g4_ragged", jnp.float32, seed=3)
    _pallas_ok(impl, kw, k.shape[1])
    bs = kw["block_size"]
    rng = np.random.default_rng(4)
    # messy ids: duplicates, -1, ids past the query's block (ignored), the local block
    ids = rng.integers(-1, k.shape[1] // bs, size=(*pos.shape, k.shape[2], 4)).astype(np.int32)
    ids[..., 0] = np.maximum(pos, 0)[..., None] // bs
    with jax.default_matmul_precision("highest"):
        out, lse = ops.sparse_attention(rows(q, pos), k, v, jnp.asarray(ids), q_pos=pos, return_lse=True,
                                        impl=impl, block_size=bs)
        full_ids = jnp.zeros((*q.shape[:3][:2], k.shape[2], 4), jnp.int32) - 1
        for b in range(pos.shape[0]):
            for s in range(pos.shape[1]):
                if pos[b, s] >= 0:
                    full_ids = full_ids.at[b, pos[b, s]].set(ids[b, s])
        ref, ref_lse = ops.sparse_attention(q, k, v, full_ids, return_lse=True, impl="reference", block_size=bs)
    valid = pos >= 0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(rows(ref, pos))[valid], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse)[valid], np.asarray(rows(ref_lse, pos))[valid], atol=2e-5, rtol=2e-5)
    assert np.isneginf(np.asarray(lse)[~valid]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_block", [False, True], ids=["per_token", "per_block"])
def test_fp8_index_keys_select_as_their_dequantised_values(impl, per_block):
    (q, k, v, iq, ik), pos, kw = _inputs("g4_ragged", jnp.float32, seed=5)
    _pallas_ok(impl, kw, k.shape[1])
    bs = kw["block_size"]
    if per_block:  # one power-of-two scale per block: exact, so the rows must match exactly
        B, L = ik.shape[:2]
        scale = 2.0 ** jnp.asarray(np.random.default_rng(6).integers(-3, 3, size=(B, L // bs)), jnp.float32)
        ik8 = (ik / jnp.repeat(scale, bs, axis=1)[..., None]).astype(jnp.float8_e4m3fn)
        deq = ik8.astype(jnp.float32) * jnp.repeat(scale, bs, axis=1)[..., None]
    else:
        ik8, scale = quantize_index_keys(ik, jnp.float8_e4m3fn)
        deq = ik8.astype(jnp.float32) * scale[..., None]
    with jax.default_matmul_precision("highest"):
        got = ops.select_blocks(rows(iq, pos), ik8, q_pos=pos, ik_scale=scale, impl=impl, **kw)
        want = ops.select_blocks(iq, deq, impl="reference", **kw)
        exact = ops.select_blocks(iq, ik, impl="reference", **kw)
    g, w, e = as_sets(got), as_sets(rows(want, pos)), as_sets(rows(exact, pos))
    valid = list(zip(*np.nonzero(pos >= 0)))
    agree = np.mean([g[b][s] == w[b][s] for b, s in valid])
    assert agree >= (1.0 if per_block else 0.9), agree  # per token: the kernel's bf16 dot may flip a near-tie
    # against the unquantised keys: fp8 changes few selections (measured, not required equal)
    assert np.mean([g[b][s] == e[b][s] for b, s in valid]) >= 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_junk_past_the_queries_is_invisible(impl):
    (q, k, v, iq, ik), pos, kw = _inputs("g1_decode", jnp.float32, seed=7)
    _pallas_ok(impl, kw, k.shape[1])
    last = int(pos.max())
    junk = lambda x: x.at[:, last + 1:].set(jnp.nan) if last + 1 < x.shape[1] else x  # noqa: E731
    pos = np.full_like(pos, 0) + np.array([[5], [13], [last]], np.int32)
    args = (rows(q, pos), k, v, rows(iq, pos), ik)
    clean = ops.msa_attention(*args, q_pos=pos, impl=impl, **kw)
    dirty = ops.msa_attention(args[0], junk(k), junk(v), args[3], junk(ik), q_pos=pos, impl=impl, **kw)
    np.testing.assert_array_equal(np.asarray(clean[1]), np.asarray(dirty[1]))
    np.testing.assert_array_equal(np.asarray(clean[0]), np.asarray(dirty[0]))


def test_bad_cached_arguments_raise():
    (q, k, v, iq, ik), pos, kw = _inputs("g4_ragged", jnp.float32)
    qs, iqs = rows(q, pos), rows(iq, pos)
    with pytest.raises(ValueError, match="q_pos"):
        ops.select_blocks(iqs, ik, q_pos=pos[:, :2], **kw)
    with pytest.raises(ValueError, match="q_pos"):
        ops.dense_attention(qs, k, v, q_pos=pos.astype(np.float32))
    with pytest.raises(ValueError, match="ik"):
        ops.select_blocks(iqs, ik.astype(jnp.float8_e4m3fn), q_pos=pos, **kw)  # fp8 needs its scale
    with pytest.raises(ValueError, match="ik_scale"):
        ops.select_blocks(iqs, ik.astype(jnp.float8_e4m3fn), q_pos=pos, ik_scale=jnp.ones((2, 5)), **kw)
    with pytest.raises(ValueError, match="k"):
        ops.sparse_attention(qs, k[:1], v[:1], jnp.zeros((2, 3, 2, 3), jnp.int32), q_pos=pos, block_size=8)
    with pytest.raises(ValueError, match="block_idx"):
        ops.sparse_attention(qs, k, v, jnp.zeros((2, 4, 2, 3), jnp.int32), q_pos=pos, block_size=8)


def zigzag_rows(T: int, C: int) -> list[np.ndarray]:
    """The query rows of each of C devices under context parallelism: chunks i and 2C-1-i of 2C."""
    c = T // (2 * C)
    return [np.r_[i * c:(i + 1) * c, (2 * C - 1 - i) * c:(2 * C - i) * c] for i in range(C)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse", (True, False), ids=("sparse", "dense_warmup"))
def test_query_slices_reassemble_the_full_sequence_with_gradients(impl, sparse):
    """Context parallelism's contract: the queries split into slices (q_pos = their positions), each
    slice against all keys, give the full sequence's outputs row by row, its KL as the mean of the
    slices' KLs (equal slices), and the same gradients for q, k, v, iq, ik (impl="pallas": the
    KV-outer kernels at the slices' positions; its dense warmup: the full-support KL kernel)."""
    B, T, Hq, R, D, Di, bs, top_k, C = 2, 64, 4, 2, 8, 8, 8, 3, 2
    rng = np.random.default_rng(7)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    args = (arr(B, T, Hq, D), arr(B, T, R, D), arr(B, T, R, D), arr(B, T, R, Di), arr(B, T, Di))
    w = arr(B, T, Hq, D)  # a random linear read-out of the attention output
    kw = dict(block_size=bs, impl=impl)

    def loss(q, k, v, iq, ik, q_pos=None, w=w, kl_weight=1.0):
        if sparse:
            out, idx = ops.msa_attention(q, k, v, iq, ik, top_k=top_k, q_pos=q_pos, **kw)
        else:
            out, idx = ops.dense_attention(q, k, v, q_pos=q_pos, impl=impl), None
        return (out * w).sum() + kl_weight * ops.index_kl_loss(q, k, iq, ik, idx, q_pos=q_pos, **kw)

    def sliced(q, k, v, iq, ik):  # equal slices: the full KL is the mean of theirs
        total = 0.0
        for r in zigzag_rows(T, C):
            pos = jnp.broadcast_to(jnp.asarray(r, jnp.int32), (B, len(r)))
            total = total + loss(q[:, r], k, v, iq[:, r], ik, q_pos=pos, w=w[:, r], kl_weight=1 / C)
        return total

    assert T // C > pallas_backend.DECODE_MAX_QUERIES  # slices, not decoding
    with jax.default_matmul_precision("highest"):
        want, want_g = jax.value_and_grad(loss, argnums=range(5))(*args)
        got, got_g = jax.value_and_grad(sliced, argnums=range(5))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "iq", "ik"), got_g, want_g):
        assert float(jnp.abs(b).max()) > 0, name  # every input gets a gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_and_recall_at_an_offset_ignore_padding_queries(impl):
    """KL and recall with q_pos: padding queries (-1) count nowhere, and every impl gives the oracle's."""
    (q, k, v, iq, ik), _, kw = _inputs("g4_ragged", jnp.float32)
    kw = dict(block_size=kw["block_size"], top_k=kw["top_k"])
    real = np.asarray([[3, 47, 30], [45, 16, 40]], np.int32)
    padded = np.asarray([[3, -1, 47, 30], [45, 16, -1, 40]], np.int32)

    def kl_recall(pos, impl):
        qs, iqs = rows(q, pos), rows(iq, pos)
        idx = ops.select_blocks(iqs, ik, q_pos=pos, impl="reference", **kw)
        kl = ops.index_kl_loss(qs, k, iqs, ik, idx, q_pos=pos, block_size=kw["block_size"], impl=impl)
        return (kl, *ops.selection_recall(qs, k, idx, q_pos=pos, impl=impl, **kw))

    with jax.default_matmul_precision("highest"):
        want = kl_recall(real, "reference")
        got = kl_recall(padded, impl)
    assert 0 < float(want[0]) and 0 < float(want[1]) <= 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
