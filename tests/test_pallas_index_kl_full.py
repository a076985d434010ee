"""The index KL over the full causal support, query-outer (`pallas.index_kl_full.index_kl_full_sum`).

Runs in interpret mode on CPU (the same `pl.pallas_call`s, executed by the Pallas interpreter).
Value and gradients (iq, ik) against the oracle `reference.index_kl_loss(..., block_idx=None)` (the
mean over real queries and groups: weights 1 / (n_real * H_kv)), and against the KV-outer
`pallas.index_kl.index_kl_sum` on a selection of every visible block (random weights, random
cotangent per (row, group)); G = 1, 3 (padded), 4, 16; T not a multiple of the tiles, T shorter than
a tile; queries at offsets against L > T keys with padding queries, sorted and not; lse given (the
oracle's, `index_kl.teacher_lse`'s) or computed; bfloat16 and float32; under jit and grad. Plus the
Triton lowering for an abstract H100 (no GPU needed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import close_grad, triton_ir_for_h100
from msa_jax.ops import reference
from pallas import kv_outer
from pallas.index_kl import index_kl_sum, teacher_lse
from pallas.index_kl_full import index_kl_full_sum

# (value atol, value rtol, gradient tolerance relative to the largest |gradient|)
TOL = {jnp.float32: (2e-6, 1e-5, 1e-5), jnp.bfloat16: (1e-5, 1e-4, 2e-2)}
ORACLE_BLOCK = 8  # block_size of the oracle's call: unused with block_idx None


def _inputs(seed, B, T, L, H_kv, G, D, Di, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(B, T, H_kv * G, D), (B, L, H_kv, D), (B, T, H_kv, Di), (B, L, Di)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32).astype(dtype)) for s in shapes)


def _positions(kind, B, T, L, seed):
    """None (prefill), "offset": a slice at L - T with a few padding queries, "zigzag": two slices
    (context parallelism's load balancing: not sorted) with padding queries."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    if kind == "offset":
        pos = np.broadcast_to(np.arange(L - T, L), (B, T)).copy()
    else:
        half = T // 2
        rows = np.concatenate([np.arange(half) + 3, np.arange(T - half) + L - (T - half)])
        pos = np.broadcast_to(rows, (B, T)).copy()
    for b in range(B):
        pos[b, rng.choice(T, size=3, replace=False)] = -1
    return jnp.asarray(pos, jnp.int32)


@functools.cache
def _oracle(q_pos_kind):
    """jitted (q, k, iq, ik, q_pos) -> (loss, (d iq, d ik), teacher lse) of the oracle, float32."""

    def f(q, k, iq, ik, q_pos):
        q_pos = None if q_pos_kind is None else q_pos
        with jax.default_matmul_precision("highest"):
            q, k, iq, ik = (x.astype(jnp.float32) for x in (q, k, iq, ik))
            def loss(a, b):
                return reference.index_kl_loss(q, k, a, b, None, block_size=ORACLE_BLOCK, q_pos=q_pos)

            value, grads = jax.value_and_grad(loss, (0, 1))(iq, ik)
            mask = reference.support_mask(None, q.shape[1], 1, q_pos=q_pos, L=k.shape[1])
            lse = reference._lse(q, k, mask)
        return value, grads, lse

    return jax.jit(f)


def _mean_weights(q_pos, B, T, H_kv):
    pos = kv_outer.positions(q_pos, B, T)
    real = pos >= 0
    return jnp.where(real, 1.0 / (real.sum() * H_kv), 0.0).astype(jnp.float32)


# (B, T, L, H_kv, G, D, D_idx, dtype, lse, q_pos); L None: L = T
CASES = [
    (1, 300, None, 2, 1, 16, 16, jnp.float32, None, None),  # G = 1: 5 query tiles of 64, 5 key tiles, T % 64 != 0
    (2, 37, None, 2, 3, 16, 32, jnp.float32, "oracle", None),  # G = 3 (padded to 4), B = 2
    (1, 100, None, 1, 16, 32, 16, jnp.float32, "pallas", None),  # G = 16: BQ = 4, R = 16 student rows
    (1, 150, None, 2, 4, 32, 16, jnp.bfloat16, None, None),  # G = 4, bf16
    (1, 9, None, 2, 4, 16, 16, jnp.bfloat16, "oracle", None),  # T shorter than one tile
    (2, 40, 130, 2, 3, 16, 16, jnp.float32, None, "offset"),  # L > T: a slice at an offset, padding queries
    (1, 48, 100, 1, 16, 16, 16, jnp.bfloat16, "oracle", "zigzag"),  # unsorted positions, padding, G = 16 bf16
]


def _case_id(c):
    return "-".join(str(x) for x in c[:7]) + f"-{jnp.dtype(c[7]).name}-lse_{c[8]}-pos_{c[9]}"


def _setup(case):
    B, T, L, H_kv, G, D, Di, dtype, lse_kind, pos_kind = case
    L = T if L is None else L
    seed = 100 + CASES.index(case)
    q, k, iq, ik = _inputs(seed, B, T, L, H_kv, G, D, Di, dtype)
    q_pos = _positions(pos_kind, B, T, L, seed)
    ref_value, ref_grads, ref_lse = _oracle(pos_kind)(q, k, iq, ik, q_pos)
    lse = None
    if lse_kind == "oracle":
        lse = ref_lse
    elif lse_kind == "pallas":
        pos = kv_outer.positions(q_pos, B, T)
        ids = kv_outer.visible_blocks(pos, 16, -(-L // 16), H_kv)
        lse = teacher_lse(q, k, ids, block_size=16, q_pos=q_pos)
    return q, k, iq, ik, q_pos, lse, (ref_value, ref_grads)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(case):
    """The mean (weights 1 / (n_real * H_kv)) and its d iq, d ik (jax.grad through the custom_vjp)
    against the oracle; the same value without differentiation and under jit; no gradient to q, k,
    lse."""
    dtype = case[7]
    q, k, iq, ik, q_pos, lse, (ref_value, (ref_diq, ref_dik)) = _setup(case)
    B, T, H_kv = q.shape[0], q.shape[1], k.shape[2]
    w = _mean_weights(q_pos, B, T, H_kv)
    fn = lambda q, k, a, b, lse: index_kl_full_sum(q, k, a, b, w, lse=lse, q_pos=q_pos)  # noqa: E731
    value = fn(q, k, iq, ik, lse)
    assert value.dtype == jnp.float32 and value.shape == (B, H_kv)
    loss = lambda a, b: fn(q, k, a, b, lse).sum()  # noqa: E731
    got, (d_iq, d_ik) = jax.jit(jax.value_and_grad(loss, (0, 1)))(iq, ik)

    atol, rtol, gtol = TOL[dtype]
    np.testing.assert_allclose(float(value.sum()), float(ref_value), atol=atol, rtol=rtol)
    np.testing.assert_allclose(float(got), float(value.sum()), atol=1e-7, rtol=1e-6)
    assert d_iq.dtype == iq.dtype and d_iq.shape == iq.shape
    assert d_ik.dtype == ik.dtype and d_ik.shape == ik.shape
    close_grad(d_iq, ref_diq, gtol)
    close_grad(d_ik, ref_dik, gtol)
    if q_pos is not None:  # padding queries: no gradient
        assert not np.asarray(d_iq, np.float32)[np.asarray(q_pos) < 0].any()
    if lse is not None:  # the teacher is detached
        cts = jax.grad(lambda q, k, lse: fn(q, k, iq, ik, lse).sum(), (0, 1, 2))(q, k, lse)
        for x, ct in zip((q, k, lse), cts):
            assert ct.shape == x.shape and not np.asarray(ct, np.float32).any()


@pytest.mark.parametrize("case", [CASES[6]], ids=_case_id)  # (offset positions: test_matches_oracle)
def test_matches_kv_outer_on_every_visible_block(case):
    """Random token weights, a random cotangent per (row, group): value and d iq, d ik against
    `index_kl_sum` on `kv_outer.visible_blocks` with the same lse (lse None: the teacher_lse of that
    selection); the backward is deterministic."""
    dtype = case[7]
    q, k, iq, ik, q_pos, lse, _ = _setup(case)
    B, T, H_kv, L = q.shape[0], q.shape[1], k.shape[2], k.shape[1]
    bs = 16
    pos = kv_outer.positions(q_pos, B, T)
    ids = kv_outer.visible_blocks(pos, bs, -(-L // bs), H_kv)
    teacher = lse if lse is not None else teacher_lse(q, k, ids, block_size=bs, q_pos=q_pos)
    rng = np.random.default_rng(CASES.index(case) + 7)
    w = jnp.asarray(rng.uniform(0.0, 1.0, (B, T)).astype(np.float32))
    c = jnp.asarray(rng.standard_normal((B, H_kv)).astype(np.float32))
    full = lambda a, b: index_kl_full_sum(q, k, a, b, w, lse=lse, q_pos=q_pos)  # noqa: E731
    kv = lambda a, b: index_kl_sum(q, k, a, b, ids, teacher, w, block_size=bs, q_pos=q_pos)  # noqa: E731
    value, vjp = jax.vjp(full, iq, ik)
    grads = vjp(c)
    want, vjp_kv = jax.vjp(kv, iq, ik)
    want_grads = vjp_kv(c)
    atol, rtol, gtol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(value), np.asarray(want), atol=atol * T, rtol=rtol)
    for a, b in zip(grads, want_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        close_grad(a, b, gtol)
    again = jax.vjp(full, iq, ik)[1](c)  # fixed summation orders: the same bits
    for a, b in zip(again, grads):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_tiles_do_not_change_the_result():
    """block_q / block_k: other tilings (more masked and unmasked key tiles) give the same value and
    gradients to float rounding."""
    case = CASES[3]  # G = 4, bf16, 150 tokens
    q, k, iq, ik, q_pos, lse, _ = _setup(case)
    w = _mean_weights(None, *q.shape[:2], k.shape[2])
    runs = []
    for opts in ({}, dict(block_q=4, block_k=16)):
        fn = lambda a, b: index_kl_full_sum(q, k, a, b, w, **opts).sum()  # noqa: E731
        runs.append(jax.value_and_grad(fn, (0, 1))(iq, ik))
    (v0, g0), (v1, g1) = runs
    np.testing.assert_allclose(float(v1), float(v0), atol=1e-6, rtol=1e-5)
    for a, b in zip(g1, g0):
        close_grad(a, b, 2e-2)


def test_bad_arguments():
    q, k, iq, ik = _inputs(0, 1, 8, 8, 2, 2, 16, 16, jnp.float32)
    w = jnp.ones((1, 8), jnp.float32)
    with pytest.raises(ValueError, match="weights"):
        index_kl_full_sum(q, k, iq, ik, w[:, :4])
    with pytest.raises(ValueError, match="lse"):
        index_kl_full_sum(q, k, iq, ik, w, lse=jnp.zeros((1, 8, 3), jnp.float32))
    with pytest.raises(ValueError, match="k"):
        index_kl_full_sum(q, jnp.concatenate([k, k], 1), iq, ik, w)  # L != T needs q_pos
    with pytest.raises(ValueError, match="dtype"):
        index_kl_full_sum(q, k, iq, ik.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="block_k"):
        index_kl_full_sum(q, k, iq, ik, w, block_k=8)
    with pytest.raises(ValueError, match="16 rows"):  # Triton path: M = 2 * 2 < 16
        index_kl_full_sum(q, k, iq, ik, w, block_q=2, interpret=False)


# Lowering to Triton IR for an abstract H100 (no GPU needed): every pass (the teacher lse pass, the
# student-only lse pass, the value pass, d iq, d ik) is accepted by the Pallas Triton lowering at the
# paper's heads (G = 16, D = D_idx = 128, bf16), G = 1, and float32 with G = 3 at offsets.
@pytest.mark.parametrize(
    "B,T,L,H_kv,G,D,Di,dtype,with_lse,with_pos",
    [
        (1, 1024, 1024, 4, 16, 128, 128, jnp.bfloat16, False, False),
        (1, 512, 512, 2, 1, 64, 64, jnp.bfloat16, True, False),
        (2, 100, 300, 2, 3, 16, 32, jnp.float32, True, True),
    ],
)
def test_lowers_to_triton_for_h100(B, T, L, H_kv, G, D, Di, dtype, with_lse, with_pos):
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H_kv * G, D), dtype), S((B, L, H_kv, D), dtype), S((B, T, H_kv, Di), dtype),
            S((B, L, Di), dtype), S((B, T), jnp.float32), S((B, T, H_kv * G), jnp.float32), S((B, T), jnp.int32))

    def f(q, k, iq, ik, w, lse, pos):
        fn = lambda a, b: index_kl_full_sum(q, k, a, b, w, lse=lse if with_lse else None,  # noqa: E731
                                            q_pos=pos if with_pos else None, interpret=False).sum()
        return jax.value_and_grad(fn, (0, 1))(iq, ik), fn(iq, ik)

    text = triton_ir_for_h100(f, *args)
    assert "__gpu$xla.gpu.triton" in text
    for name in ("msa_index_kl_full_lse" + ("" if with_lse else "_teacher"), "msa_index_kl_full_value",
                 "msa_index_kl_full_grad_iq", "msa_index_kl_full_grad_ik"):
        assert name in text
