"""Pallas fused KL loss of the index branch, KV-outer (`pallas.index_kl`).

Runs in interpret mode on CPU (the same `pl.pallas_call`s, executed by the Pallas interpreter).
The teacher's LSE comes from the main-branch kernel (`pallas.sparse_attention.sparse_attention_fwd`).
Checked against a per-(token, group) oracle written from `msa_jax.ops.reference`'s formulas (and
its mean against `reference.index_kl_loss`), gradients against `jax.grad` of that oracle under a
random cotangent, on random normal inputs with block ids from the oracle's indexer and from random
hand-made selections (duplicates, -1 padding, out-of-range and future ids, empty rows, a hot block).
Other tests: determinism of the backward, query chunks / tiles_per_unit / block_q, argument
checks, and lowering to Triton IR for an abstract H100 (no GPU needed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import close_grad, hand_ids, hot_ids, indexer_ids, triton_ir_for_h100
from msa_jax.ops import reference
from pallas.index_kl import index_kl, index_kl_bwd, index_kl_fwd, index_kl_sum, main_and_index_kl_bwd, teacher_lse
from pallas.sparse_attention import sparse_attention_fwd
from pallas.sparse_attention_bwd import sparse_attention_bwd

# (kl atol, kl rtol, gradient tolerance relative to the largest |gradient|)
TOL = {jnp.float32: (2e-5, 1e-5, 1e-5), jnp.bfloat16: (1e-4, 1e-4, 2e-2)}


# --------------------------------------------------------------------------------- helpers


def _inputs(seed, B, T, H_kv, G, D, Di, dtype):
    """Random normal q, k, iq, ik and a random cotangent g [B, T, H_kv] (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = [(B, T, H_kv * G, D), (B, T, H_kv, D), (B, T, H_kv, Di), (B, T, Di)]
    q, k, iq, ik = (jnp.asarray(rng.standard_normal(s, np.float32).astype(dtype)) for s in shapes)
    g = jnp.asarray(rng.standard_normal((B, T, H_kv), np.float32))
    return q, k, iq, ik, g


def _messy_ids(seed, B, T, H_kv, block_size, top_k):
    """Hand-made selections with repeats (top_k - 3 slots) plus an out-of-range id, a future block
    and -1, shuffled; a few (token, group) rows are all -1 (empty support: kl = 0)."""
    assert top_k > 3
    ids = np.asarray(hand_ids(seed, B, T, H_kv, block_size, top_k - 3, dup=True))
    n_blocks = -(-T // block_size)
    local = np.broadcast_to((np.arange(T) // block_size)[None, :, None], (B, T, H_kv))
    junk = [np.full_like(local, n_blocks + 2), local + 1, np.full_like(local, -1)]
    ids = np.concatenate([ids, np.stack(junk, axis=-1)], axis=-1)
    rng = np.random.default_rng(seed)
    ids = np.take_along_axis(ids, rng.permuted(np.argsort(ids, -1), axis=-1), -1)
    ids[:, ::7, -1] = -1  # empty rows for group H_kv - 1 at every 7th token
    return jnp.asarray(ids.astype(np.int32))


# as conftest.SELECTIONS, with this file's "messy" (empty rows)
_SELECTIONS = {
    "indexer": lambda seed, B, T, H_kv, bs, top_k: indexer_ids(seed, B, T, H_kv, bs, top_k),
    "hand": hand_ids,
    "dup": functools.partial(hand_ids, dup=True),
    "hot": hot_ids,
    "messy": _messy_ids,
}


@functools.cache
def _oracle_fn(block_size):
    """(kl rows [B, T, R], mean = reference.index_kl_loss, d iq, d ik of sum(rows * g)), float32."""

    def rows(q, k, iq, ik, ids):  # reference.index_kl_loss without the mean
        T = q.shape[1]
        mask = reference.support_mask(ids, T, block_size)  # [B, R, T, T]
        teacher = reference._head_probs(q, k, mask).mean(axis=2)
        s = reference.index_scores(iq, ik)
        log_student = jax.nn.log_softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        log_teacher = jnp.log(jnp.where(teacher > 0, teacher, 1.0))
        kl = jnp.where(teacher > 0, teacher * (log_teacher - jnp.where(mask, log_student, 0.0)), 0.0)
        return kl.sum(-1).transpose(0, 2, 1)

    def f(q, k, iq, ik, ids, g):
        with jax.default_matmul_precision("highest"):
            q, k, iq, ik = (x.astype(jnp.float32) for x in (q, k, iq, ik))
            kl = rows(q, k, iq, ik, ids)
            loss = reference.index_kl_loss(q, k, iq, ik, ids, block_size=block_size)
            grads = jax.grad(lambda a, b: jnp.sum(rows(q, k, a, b, ids) * g), (0, 1))(iq, ik)
        return kl, loss, grads

    return jax.jit(f)


# ------------------------------------------------------------------------------------ tests

# (B, T, H_kv, G, D, D_idx, block_size, top_k, selection, dtype, query_chunk)
CASES = [
    (1, 40, 2, 1, 16, 16, 8, 3, "hand", jnp.float32, None),  # G = 1, T = 5 blocks
    (2, 7, 2, 2, 16, 16, 8, 2, "dup", jnp.float32, None),  # T < block_size, B = 2, duplicates
    (1, 29, 2, 3, 16, 32, 8, 6, "messy", jnp.float32, 8),  # G = 3, junk / empty rows, 4 chunks
    (1, 53, 1, 4, 32, 16, 16, 6, "hand", jnp.float32, None),  # T = 3 bs + 5, top_k > n_blocks (4)
    (1, 29, 1, 16, 16, 16, 8, 5, "hot", jnp.float32, None),  # G = 16 (BQ = 8), top_k > n_blocks
    (1, 29, 2, 3, 16, 16, 8, 6, "messy", jnp.bfloat16, None),  # G = 3
]


def _case_id(c):
    return "-".join(str(x) for x in c[:9]) + f"-{jnp.dtype(c[9]).name}-qc{c[10]}"


def _setup(case):
    B, T, H_kv, G, D, Di, bs, top_k, selection, dtype, qc = case
    seed = CASES.index(case) if case in CASES else 99
    q, k, iq, ik, g = _inputs(seed, B, T, H_kv, G, D, Di, dtype)
    ids = _SELECTIONS[selection](seed, B, T, H_kv, bs, top_k)
    lse = sparse_attention_fwd(q, k, k, ids, block_size=bs, query_chunk=qc)[1]
    return q, k, iq, ik, ids, lse, g


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(case):
    """kl per (token, group), its mean (= reference.index_kl_loss), d iq and d ik of sum(kl * g)
    through the custom_vjp; q, k and lse get zero cotangents."""
    bs, dtype, qc = case[6], case[9], case[10]
    q, k, iq, ik, ids, lse, g = _setup(case)
    fn = lambda q, k, iq, ik, lse: index_kl(q, k, iq, ik, ids, lse, block_size=bs, query_chunk=qc)  # noqa: E731
    kl, vjp = jax.vjp(fn, q, k, iq, ik, lse)
    dq, dk, d_iq, d_ik, dlse = vjp(g)
    ref_kl, ref_loss, (ref_diq, ref_dik) = _oracle_fn(bs)(q, k, iq, ik, ids, g)

    atol, rtol, gtol = TOL[dtype]
    assert kl.dtype == jnp.float32 and kl.shape == k.shape[:3]
    kl = np.asarray(kl)
    assert np.isfinite(kl).all()
    np.testing.assert_allclose(kl, np.asarray(ref_kl), atol=atol, rtol=rtol)
    np.testing.assert_allclose(kl.mean(), float(ref_loss), atol=atol, rtol=rtol)
    assert d_iq.dtype == iq.dtype and d_iq.shape == iq.shape
    assert d_ik.dtype == ik.dtype and d_ik.shape == ik.shape
    close_grad(d_iq, ref_diq, gtol)
    close_grad(d_ik, ref_dik, gtol)
    for x, ct in ((q, dq), (k, dk), (lse, dlse)):
        assert ct.shape == x.shape and not np.asarray(ct, np.float32).any()


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5]], ids=_case_id)
def test_index_kl_sum_matches_oracle(case):
    """index_kl_sum (student pass + one fused teacher pass): the weighted sums per (row, group) and
    d iq, d ik under a random cotangent per (row, group), random token weights, against the oracle
    (empty supports, G = 16, bf16, query chunks); without differentiation, the same value."""
    bs, dtype, qc = case[6], case[9], case[10]
    q, k, iq, ik, ids, lse, _ = _setup(case)
    rng = np.random.default_rng(CASES.index(case))
    w = jnp.asarray(rng.uniform(0.0, 1.0, q.shape[:2]).astype(np.float32))
    c = jnp.asarray(rng.standard_normal((q.shape[0], k.shape[2])).astype(np.float32))
    fn = lambda a, b: index_kl_sum(q, k, a, b, ids, lse, w, block_size=bs, query_chunk=qc)  # noqa: E731
    value, vjp = jax.vjp(fn, iq, ik)
    d_iq, d_ik = vjp(c)
    ref_kl, _, (ref_diq, ref_dik) = _oracle_fn(bs)(q, k, iq, ik, ids, c[:, None, :] * w[:, :, None])

    atol, rtol, gtol = TOL[dtype]
    T = q.shape[1]
    assert value.dtype == jnp.float32 and value.shape == (q.shape[0], k.shape[2])
    np.testing.assert_allclose(np.asarray(value), np.asarray((ref_kl * w[..., None]).sum(1)), atol=atol * T, rtol=rtol)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(iq, ik)), np.asarray(value), atol=1e-6 * T, rtol=1e-5)
    assert d_iq.dtype == iq.dtype and d_iq.shape == iq.shape
    assert d_ik.dtype == ik.dtype and d_ik.shape == ik.shape
    close_grad(d_iq, ref_diq, gtol)
    close_grad(d_ik, ref_dik, gtol)
    again = jax.vjp(fn, iq, ik)[1](c)  # fixed summation orders: the same bits
    for a, b in zip(again, (d_iq, d_ik)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="weights"):
        index_kl_sum(q, k, iq, ik, ids, lse, w[:, :1], block_size=bs)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5]], ids=_case_id)
def test_main_backward_with_the_kl_fused_in(case):
    """main_and_index_kl_bwd: dq, dk, dv bit-identical to the main backward's (same tiles, same sums),
    d iq and d ik those of sum(g * kl) against the oracle (G = 3 with junk and empty rows and query
    chunks, G = 16 with a hot block, bf16)."""
    bs, dtype, qc = case[6], case[9], case[10]
    q, k, iq, ik, ids, _, g = _setup(case)
    rng = np.random.default_rng(7)
    v, dout = (jnp.asarray(rng.standard_normal(x.shape, np.float32).astype(dtype)) for x in (k, q))
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=bs, query_chunk=qc)
    got = main_and_index_kl_bwd(q, k, v, iq, ik, ids, out, lse, dout, g, block_size=bs, query_chunk=qc)
    want = sparse_attention_bwd(q, k, v, ids, out, lse, dout, block_size=bs, query_chunk=qc)
    for a, b in zip(got[:3], want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    _, _, (ref_diq, ref_dik) = _oracle_fn(bs)(q, k, iq, ik, ids, g)
    d_iq, d_ik = got[3:]
    assert d_iq.dtype == iq.dtype and d_iq.shape == iq.shape and d_ik.dtype == ik.dtype and d_ik.shape == ik.shape
    close_grad(d_iq, ref_diq, TOL[dtype][2])
    close_grad(d_ik, ref_dik, TOL[dtype][2])
    with pytest.raises(ValueError, match="g"):
        main_and_index_kl_bwd(q, k, v, iq, ik, ids, out, lse, dout, g[:, :1], block_size=bs)


def test_grad_of_mean_matches_reference_loss():
    """jax.grad of the spec's L_KL = mean(index_kl) against jax.grad of reference.index_kl_loss."""
    case = CASES[2]
    bs, qc = case[6], case[10]
    q, k, iq, ik, ids, lse, _ = _setup(case)
    got = jax.grad(lambda a, b: index_kl(q, k, a, b, ids, lse, block_size=bs, query_chunk=qc).mean(), (0, 1))(iq, ik)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.grad(lambda a, b: reference.index_kl_loss(q, k, a, b, ids, block_size=bs), (0, 1)))(iq, ik)
    for a, b in zip(got, want):
        close_grad(a, b, 1e-5)


def test_backward_is_deterministic():
    case = CASES[-1]  # bf16, G = 3
    bs = case[6]
    q, k, iq, ik, ids, lse, g = _setup(case)
    kl, res = index_kl_fwd(q, k, iq, ik, ids, lse, block_size=bs)
    runs = [index_kl_bwd(q, k, iq, ik, ids, lse, res, g, block_size=bs, tiles_per_unit=2) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_query_chunks_tiles_per_unit_and_block_q_do_not_change_the_result():
    case = CASES[3]  # G = 4, 53 tokens, 4 blocks
    bs = case[6]
    q, k, iq, ik, ids, lse, g = _setup(case)
    kl, res = index_kl_fwd(q, k, iq, ik, ids, lse, block_size=bs)
    grads = index_kl_bwd(q, k, iq, ik, ids, lse, res, g, block_size=bs)
    opts = dict(block_size=bs, query_chunk=16, block_q=4)  # M = 16 rows: the GPU minimum
    kl2, res2 = index_kl_fwd(q, k, iq, ik, ids, lse, **opts)
    grads2 = index_kl_bwd(q, k, iq, ik, ids, lse, res2, g, tiles_per_unit=1, **opts)
    np.testing.assert_allclose(np.asarray(kl2), np.asarray(kl), atol=1e-6, rtol=1e-6)
    for a, b in zip(res2 + grads2, res + grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_teacher_lse():
    case = CASES[1]
    bs = case[6]
    q, k, _, _, ids, lse, _ = _setup(case)
    np.testing.assert_array_equal(np.asarray(teacher_lse(q, k, ids, block_size=bs)), np.asarray(lse))


def test_bad_arguments():
    q, k, iq, ik, _ = _inputs(0, 1, 8, 2, 2, 16, 16, jnp.float32)
    ids = hand_ids(0, 1, 8, 2, 8, 1)
    lse = jnp.zeros(q.shape[:3], jnp.float32)
    kl = functools.partial(index_kl_fwd, block_size=8)
    with pytest.raises(ValueError, match="lse"):
        kl(q, k, iq, ik, ids, lse[:, :, :3])
    with pytest.raises(ValueError, match="iq"):
        kl(q, k, iq[:, :, :1], ik, ids, lse)
    with pytest.raises(ValueError, match="ik"):
        kl(q, k, iq, ik[..., :8], ids, lse)
    with pytest.raises(ValueError, match="dtype"):
        kl(q, k, iq, ik.astype(jnp.bfloat16), ids, lse)
    with pytest.raises(ValueError, match="dtype"):
        kl(q, k.astype(jnp.bfloat16), iq, ik, ids, lse)
    with pytest.raises(ValueError, match="H_q"):
        kl(q[:, :, :3], k, iq, ik, ids, lse[:, :, :3])
    with pytest.raises(ValueError, match="block_idx"):
        kl(q, k, iq, ik, ids[:, :, :1], lse)
    with pytest.raises(ValueError, match="block_q"):
        kl(q, k, iq, ik, ids, lse, block_q=3)
    with pytest.raises(ValueError, match="query_chunk"):
        kl(q, k, iq, ik, ids, lse, query_chunk=0)
    with pytest.raises(ValueError, match="16 rows"):  # Triton path: M = 2 * 2 < 16
        kl(q, k, iq, ik, ids, lse, block_q=2, interpret=False)
    with pytest.raises(ValueError, match="power of two"):
        index_kl_fwd(q, k, iq, ik, ids, lse, block_size=12, interpret=False)
    res = (lse[..., :2], lse[..., :2])
    g = jnp.ones(k.shape[:3], jnp.float32)
    with pytest.raises(ValueError, match="tiles_per_unit"):
        index_kl_bwd(q, k, iq, ik, ids, lse, res, g, block_size=8, tiles_per_unit=0)
    with pytest.raises(ValueError, match="g: expected"):
        index_kl_bwd(q, k, iq, ik, ids, lse, res, g[:, :4], block_size=8)
    with pytest.raises(ValueError, match="res"):
        index_kl_bwd(q, k, iq, ik, ids, lse, (lse, lse), g, block_size=8)


# Lowering to Triton IR needs no GPU: lower the forward and the backward (kernel + unit reduce) for an
# abstract H100 and check that the Pallas Triton lowering accepts every construct and shape (gathers,
# the [M, kv] -> [BQ, G_pad, kv] reshape and its reductions, the unit loop). PTX compilation and the
# run itself still need the GPU.
@pytest.mark.parametrize(
    "B,T,H_kv,G,D,Di,bs,top_k,dtype,qc",
    [
        (1, 1024, 4, 16, 128, 128, 128, 16, jnp.bfloat16, None),  # paper heads
        (2, 37, 2, 3, 16, 32, 8, 3, jnp.float32, 16),  # G = 3, block_size 8, chunked
        (1, 1024, 2, 8, 64, 64, 32, 40, jnp.bfloat16, None),  # 40 slots (> kv_outer.SLOT_UNROLL): slot loops
    ],
)
def test_lowers_to_triton_for_h100(B, T, H_kv, G, D, Di, bs, top_k, dtype, qc):
    S = jax.ShapeDtypeStruct
    args = (
        S((B, T, H_kv * G, D), dtype), S((B, T, H_kv, D), dtype), S((B, T, H_kv, Di), dtype),
        S((B, T, Di), dtype), S((B, T, H_kv, top_k), jnp.int32), S((B, T, H_kv * G), jnp.float32),
    )

    def loss_and_grad(q, k, iq, ik, ids, lse):
        fn = lambda a, b: index_kl(q, k, a, b, ids, lse, block_size=bs, query_chunk=qc, interpret=False).mean()  # noqa: E731
        w = jnp.full(q.shape[:2], 1.0 / T, jnp.float32)
        fused = lambda a, b: index_kl_sum(q, k, a, b, ids, lse, w, block_size=bs, query_chunk=qc, interpret=False).sum()  # noqa: E731
        # the main backward with the KL's gradient (q, k as v, out, dout: shapes are what matter here)
        g = jnp.broadcast_to(w[:, :, None], k.shape[:3])
        main_kl = main_and_index_kl_bwd(q, k, k, iq, ik, ids, q, lse, q, g, block_size=bs, query_chunk=qc,
                                        interpret=False)
        return jax.value_and_grad(fn, (0, 1))(iq, ik), jax.value_and_grad(fused, (0, 1))(iq, ik), main_kl

    text = triton_ir_for_h100(loss_and_grad, *args)
    assert "__gpu$xla.gpu.triton" in text
    for name in ("msa_index_kl_fwd", "msa_index_kl_bwd", "msa_kv_outer_reduce_units", "msa_index_kl_student",
                 "msa_index_kl_fused", "msa_sparse_attention_bwd_kl"):
        assert name in text


@pytest.mark.parametrize("D, Di, fits", [(64, 64, True), (128, 64, False), (64, 128, False)])
def test_fused_backward_refuses_blocks_it_cannot_fit(D, Di, fits):
    """At block 256 the fused main + KL backward fits an H100 / H200's shared memory only with D and D_idx
    <= 64 (Triton for sm_90: 194 KiB, against 258-324 KiB with either at 128): a clear error, at trace
    time, instead of a failed launch; block 128 and the interpreter are not limited."""
    S = jax.ShapeDtypeStruct
    B, T, H_kv, G, top_k = 1, 1024, 2, 4, 4
    q, k = S((B, T, H_kv * G, D), jnp.bfloat16), S((B, T, H_kv, D), jnp.bfloat16)
    iq, ik = S((B, T, H_kv, Di), jnp.bfloat16), S((B, T, Di), jnp.bfloat16)
    ids, lse, g = S((B, T, H_kv, top_k), jnp.int32), S((B, T, H_kv * G), jnp.float32), S((B, T, H_kv), jnp.float32)

    def call(bs, interpret):
        fn = lambda *a: main_and_index_kl_bwd(*a, block_size=bs, interpret=interpret)  # noqa: E731
        return jax.eval_shape(fn, q, k, k, iq, ik, ids, q, lse, q, g)

    call(256, True)
    if fits:
        triton_ir_for_h100(lambda *a: main_and_index_kl_bwd(*a, block_size=256, interpret=False),
                           q, k, k, iq, ik, ids, q, lse, q, g)
    else:
        with pytest.raises(ValueError, match="shared memory"):
            call(256, False)
    triton_ir_for_h100(lambda *a: main_and_index_kl_bwd(*a, block_size=128, interpret=False),
                       q, k, k, iq, ik, ids, q, lse, q, g)
