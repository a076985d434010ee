"""Pallas MSA main-branch backward, KV-outer (`pallas.sparse_attention_bwd.sparse_attention_bwd`).

Interpret mode on CPU. The gradients (dq, dk, dv) of sum(out * dout) + sum(lse * dlse) are
checked against jax.vjp of the oracle `msa_jax.ops.reference.sparse_attention` (float32, highest
precision) on random inputs and the selections of the forward tests (indexer, hand-made, duplicates,
a hot block picked by every query, junk ids), with ragged T, T shorter than a block, top_k larger
than the number of blocks, GQA ratios 1-16 (3: not a power of two), bf16 and f32, query chunks and
units of one tile (every block split over many programs). Also: the unit table, determinism, the
custom_vjp `pallas.sparse_attention.sparse_attention` against the kernels, the Triton lowering for an
abstract H100, and argument errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SELECTIONS, hand_ids, indexer_ids, qkv, triton_ir_for_h100
from msa_jax.ops import reference
from pallas import kv_outer
from pallas.sparse_attention import sparse_attention, sparse_attention_fwd
from pallas.sparse_attention_bwd import sparse_attention_bwd


@functools.cache
def _oracle_grads(block_size):
    def f(q, k, v, ids, dout, dlse):
        with jax.default_matmul_precision("highest"):
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            fn = lambda q, k, v: reference.sparse_attention(q, k, v, ids, block_size=block_size, return_lse=True)  # noqa: E731
            _, vjp = jax.vjp(fn, q, k, v)
            return vjp((dout.astype(jnp.float32), dlse))

    return jax.jit(f)


def _cotangents(seed, q):
    rng = np.random.default_rng(seed + 500)
    dout = jnp.asarray(rng.standard_normal(q.shape, np.float32)).astype(q.dtype)
    dlse = jnp.asarray(rng.standard_normal(q.shape[:3], np.float32))
    return dout, dlse


def _grads(q, k, v, ids, dout, dlse, bs, **kw):
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=bs, query_chunk=kw.get("query_chunk"))
    return sparse_attention_bwd(q, k, v, ids, out, lse, dout, dlse, block_size=bs, **kw)


def _check_grads(got, ref, dtype):
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r)
        assert np.isfinite(g).all(), name
        scale = max(1.0, np.abs(r).max())
        np.testing.assert_allclose(g, r, atol=tol * scale, rtol=tol, err_msg=name)


# (B, T, H_kv, G, D, block_size, top_k, selection, dtype, query_chunk, tiles_per_unit)
CASES = [
    (2, 7, 2, 2, 32, 8, 2, "dup", jnp.float32, None, None),  # T < block_size, B = 2, duplicates
    (1, 53, 2, 1, 16, 16, 3, "indexer", jnp.float32, None, None),  # ragged T, G = 1
    (1, 53, 1, 16, 16, 16, 6, "hot", jnp.float32, None, 1),  # G = 16, top_k > n_blocks, W = 1
    (1, 29, 2, 3, 16, 8, 3, "dup", jnp.float32, 8, 2),  # G = 3, block_size 8, 4 query chunks
    (1, 29, 2, 4, 16, 8, 8, "messy", jnp.float32, None, None),  # junk ids
    (1, 37, 1, 8, 128, 16, 2, "hot", jnp.bfloat16, 16, 1),  # D = 128, 3 query chunks
]


def _case_id(c):
    return "-".join(str(x) for x in c[:8]) + f"-{jnp.dtype(c[8]).name}-qc{c[9]}-w{c[10]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grads_match_oracle(case):
    B, T, H_kv, G, D, bs, top_k, selection, dtype, qc, w = case
    seed = CASES.index(case)
    q, k, v = qkv(seed, B, T, H_kv, G, D, dtype)
    ids = SELECTIONS[selection](seed, B, T, H_kv, bs, top_k)
    dout, dlse = _cotangents(seed, q)
    got = _grads(q, k, v, ids, dout, dlse, bs, query_chunk=qc, tiles_per_unit=w)
    _check_grads(got, _oracle_grads(bs)(q, k, v, ids, dout, dlse), dtype)


def test_without_dlse_and_deterministic():
    """dlse=None is the plain gradient of sum(out * dout); two runs give the same bits."""
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 2, 16, 16, 3
    q, k, v = qkv(2, B, T, H_kv, G, D, jnp.float32)
    ids = indexer_ids(2, B, T, H_kv, bs, top_k)
    dout, _ = _cotangents(2, q)
    a = _grads(q, k, v, ids, dout, None, bs)
    b = _grads(q, k, v, ids, dout, None, bs)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _check_grads(a, _oracle_grads(bs)(q, k, v, ids, dout, jnp.zeros(q.shape[:3])), jnp.float32)


def test_dropping_a_selected_block_changes_dk_of_that_block():
    """The check can fail: with one (token, group) no longer selecting block c, dk and dv of block
    c change, and the kernel follows the oracle."""
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 2, 16, 16, 3
    q, k, v = qkv(5, B, T, H_kv, G, D, jnp.float32)
    ids = np.asarray(indexer_ids(5, B, T, H_kv, bs, top_k))
    i, r = 50, 1
    slot = [s for s in range(top_k) if ids[0, i, r, s] not in (-1, i // bs)][0]
    c = ids[0, i, r, slot]
    dropped = ids.copy()
    dropped[0, i, r, slot] = -1
    dout, dlse = _cotangents(5, q)
    g = _grads(q, k, v, jnp.asarray(ids), dout, dlse, bs)
    g_d = _grads(q, k, v, jnp.asarray(dropped), dout, dlse, bs)
    keys = slice(c * bs, (c + 1) * bs)
    assert np.abs(np.asarray(g_d[1] - g[1])[0, keys, r]).max() > 1e-4
    assert np.abs(np.asarray(g_d[2] - g[2])[0, keys, r]).max() > 1e-4
    _check_grads(g_d, _oracle_grads(bs)(q, k, v, jnp.asarray(dropped), dout, dlse), jnp.float32)


def test_custom_vjp_matches_the_kernels():
    """jax.vjp of the custom_vjp `sparse_attention` gives the forward kernel's (out, lse) and, under
    cotangents of both outputs, the backward kernel's gradients (bit for bit)."""
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 2, 16, 16, 3  # the shapes above: the kernels' jits are cached
    q, k, v = qkv(5, B, T, H_kv, G, D, jnp.float32)
    ids = indexer_ids(5, B, T, H_kv, bs, top_k)
    dout, dlse = _cotangents(5, q)
    (out, lse), vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, ids, block_size=bs), q, k, v)
    for got, want in zip((out, lse, *vjp((dout, dlse))),
                         (*sparse_attention_fwd(q, k, v, ids, block_size=bs), *_grads(q, k, v, ids, dout, dlse, bs))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("w", [1, 3, 16])
def test_units_cover_every_tile_once(w):
    """Units hold <= w consecutive tiles of one block; together they cover every used tile once,
    and ustart delimits the units of each block."""
    B, T, H_kv, bs, top_k, bq = 1, 61, 2, 8, 3, 4
    n_blocks = -(-T // bs)
    ids = kv_outer.clean_ids(hand_ids(3, B, T, H_kv, bs, top_k).at[..., 0].set(0), bs)
    ids = ids.transpose(0, 2, 1, 3).reshape(B * H_kv, T, top_k)
    n_tiles = kv_outer.n_tiles(T, top_k, n_blocks, bq)
    tiles, _, _ = kv_outer.reverse_index(ids, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    U = kv_outer.n_units(n_tiles, n_blocks, w)
    tab, ustart = kv_outer.units(tiles, n_blocks=n_blocks, tiles_per_unit=w, n_units=U)
    tiles, tab, ustart = map(np.asarray, (tiles, tab, ustart))
    for row in range(B * H_kv):
        blk, t0, n = tab[row, :U], tab[row, U : 2 * U], tab[row, 2 * U :]
        covered = np.zeros(n_tiles, int)
        for u in range(U):
            assert 0 <= n[u] <= w
            if n[u]:
                assert (tiles[row, t0[u] : t0[u] + n[u]] == blk[u]).all()
                covered[t0[u] : t0[u] + n[u]] += 1
                assert ustart[row, blk[u]] <= u < ustart[row, blk[u] + 1]
            else:
                assert u >= ustart[row, -1]
        np.testing.assert_array_equal(covered, (tiles[row] >= 0).astype(int))
        assert (tiles[row] == 0).sum() == -(-T // bq)  # block 0 is hot: ceil(T / bq) tiles


def test_bad_arguments():
    q, k, v = qkv(0, 1, 8, 2, 2, 16, jnp.float32)
    ids = hand_ids(0, 1, 8, 2, 16, 1)
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=16)
    with pytest.raises(ValueError, match="out"):
        sparse_attention_bwd(q, k, v, ids, out[:, :4], lse, out, block_size=16)
    with pytest.raises(ValueError, match="lse"):
        sparse_attention_bwd(q, k, v, ids, out, lse[..., :1], out, block_size=16)
    with pytest.raises(ValueError, match="tiles_per_unit"):
        sparse_attention_bwd(q, k, v, ids, out, lse, out, block_size=16, tiles_per_unit=0)
    with pytest.raises(ValueError, match="16 rows"):
        sparse_attention_bwd(q, k, v, ids, out, lse, out, block_size=16, block_q=2, interpret=False)


@pytest.mark.parametrize("G, D, Di", [(3, 64, 64), (16, 128, 128), (4, 128, 64)])
def test_backward_tiles_shrink_for_big_blocks(G, D, Di):
    """Blocks over 128 keys: the backward kernels (main and KL) take M / (block_size / 128) rows, the KL's
    half that again with D_idx over 64, and keep 8 warps (at block 256, M = 128 the fused KL backward asked
    for 228 KiB of shared memory on an H200, over its 227 KiB: Triton 3.9.0 for sm_90 gives 233,472 B, and
    165,888 B at M = 64; at D_idx 128 it needs M = 32, 204 KiB); the forward kernels and blocks up to 128
    keys keep their tiles; a block over 256 keys is refused for the backward."""
    q, k, _ = qkv(0, 1, 4096, 2, G, D, jnp.bfloat16)
    G_pad = 1 << (G - 1).bit_length()
    for bs, rows in ((64, 128), (128, 128), (256, 64)):
        sz = kv_outer.sizes(q, k, jnp.zeros((1, 4096, 2, 4), jnp.int32), bs)
        for kernel, width in (("bwd", None), ("kl_bwd", Di)):
            plan = kv_outer.KVOuterConfig().resolve(kernel, sz, f32=False, width=width, interpret=False)
            want = rows // 2 if kernel == "kl_bwd" and bs == 256 and Di > 64 else rows
            assert (plan.block_q * G_pad, plan.num_warps) == (want, 8), (bs, kernel)
        for kernel, width in (("fwd", None), ("kl_fwd", Di)):
            plan = kv_outer.KVOuterConfig().resolve(kernel, sz, f32=False, width=width, interpret=False)
            assert (plan.block_q * G_pad, plan.num_warps) == (128, 8), (bs, kernel)
    sz = kv_outer.sizes(q, k, jnp.zeros((1, 4096, 2, 4), jnp.int32), 512)
    assert kv_outer.KVOuterConfig().resolve("fwd", sz, f32=False, interpret=False).block_q * G_pad == 128
    for kernel in ("bwd", "kl_bwd"):
        with pytest.raises(ValueError, match="block_size 512"):
            kv_outer.KVOuterConfig().resolve(kernel, sz, f32=False, interpret=False)
        kv_outer.KVOuterConfig().resolve(kernel, sz, f32=False, interpret=True)  # the interpreter has no limit


@pytest.mark.parametrize(
    "B,T,H_kv,G,D,bs,top_k,dtype,qc",
    [
        (1, 1024, 4, 16, 128, 128, 16, jnp.bfloat16, None),  # paper heads
        (2, 37, 2, 3, 16, 8, 3, jnp.float32, 16),  # G = 3, block_size 8, chunked
    ],
)
def test_lowers_to_triton_for_h100(B, T, H_kv, G, D, bs, top_k, dtype, qc):
    """The Pallas Triton lowering accepts the unit loop (dynamic trip count), the transposed dots,
    the row-range stores and the reduce kernel (compiling to PTX still needs the GPU)."""
    q = jax.ShapeDtypeStruct((B, T, H_kv * G, D), dtype)
    kv = jax.ShapeDtypeStruct((B, T, H_kv, D), dtype)
    ids = jax.ShapeDtypeStruct((B, T, H_kv, top_k), jnp.int32)
    lse = jax.ShapeDtypeStruct((B, T, H_kv * G), jnp.float32)
    fn = functools.partial(sparse_attention_bwd, block_size=bs, interpret=False, query_chunk=qc)
    text = triton_ir_for_h100(fn, q, kv, kv, ids, q, lse, q, lse)
    assert "msa_sparse_attention_bwd" in text and "msa_kv_outer_reduce_units" in text
