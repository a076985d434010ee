"""Pallas MSA main-branch forward, KV-outer (`pallas.sparse_attention.sparse_attention_fwd`).

Runs in interpret mode on CPU (the same `pl.pallas_call`, executed by the Pallas interpreter).
Checked against the oracle `msa_jax.ops.reference.sparse_attention` (out) and a jnp logsumexp of
the masked logits (lse), on random normal inputs, with block ids from the oracle's indexer
(`select_blocks`) and from random hand-made selections (random subsets that always hold the local
block, shuffled, -1 padded), with duplicate, out-of-range and future-block ids, a hot block picked
by every query, and query chunking. The reverse index (`pallas.kv_outer`) is checked on its own.
Other tests lower the kernel to Triton IR for an abstract H100 (no GPU needed) to catch constructs
the Triton lowering rejects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (SELECTIONS, attention_oracle, check_attention, hand_ids, hot_ids, indexer_ids, qkv,
                      triton_ir_for_h100)
from pallas import kv_outer
from pallas.sparse_attention import sparse_attention_fwd


# ------------------------------------------------------------------------------------ tests

# (B, T, H_kv, G, D, block_size, top_k, selection, dtype, query_chunk, block_q)
CASES = [
    (1, 1, 1, 1, 16, 16, 1, "hand", jnp.float32, None, None),  # T = 1, G = 1
    (2, 7, 2, 2, 32, 8, 2, "dup", jnp.float32, None, None),  # T < block_size, B = 2, duplicates
    (1, 16, 1, 4, 16, 16, 1, "hand", jnp.float32, None, None),  # T = block_size, top_k = 1
    (1, 53, 2, 2, 16, 16, 3, "indexer", jnp.float32, None, None),  # T = 3 * block_size + 5
    (1, 53, 1, 16, 16, 16, 6, "hot", jnp.float32, None, None),  # G = 16, top_k > n_blocks (4)
    (1, 29, 2, 3, 16, 8, 3, "dup", jnp.float32, 8, None),  # G = 3, block_size 8, 4 query chunks
    (1, 29, 2, 2, 16, 8, 8, "messy", jnp.float32, None, 1),  # junk ids; 1 token per tile (M = 2)
    (1, 53, 2, 4, 16, 16, 3, "hand", jnp.bfloat16, None, None),
    (1, 29, 1, 16, 32, 8, 5, "indexer", jnp.bfloat16, None, None),  # top_k > n_blocks (4)
    (1, 37, 1, 2, 128, 16, 2, "hot", jnp.bfloat16, 16, None),  # D = 128, 3 query chunks
]


def _case_id(c):
    return "-".join(str(x) for x in c[:8]) + f"-{jnp.dtype(c[8]).name}-qc{c[9]}-bq{c[10]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(case):
    B, T, H_kv, G, D, bs, top_k, selection, dtype, qc, bq = case
    if jax.default_backend() == "gpu" and bq is not None and bq * G < 16:
        pytest.skip("Triton dots need >= 16 rows (block_q * G); interpret mode checks any tile height")
    seed = CASES.index(case)
    q, k, v = qkv(seed, B, T, H_kv, G, D, dtype)
    ids = SELECTIONS[selection](seed, B, T, H_kv, bs, top_k)
    assert ids.shape == (B, T, H_kv, top_k)
    # eager call, interpret=None (other tests with the same shapes reuse the jit cache)
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=bs, block_q=bq, query_chunk=qc)
    ref_out, ref_lse = attention_oracle(bs)(q, k, v, ids)
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("combined_key", [True, False])
def test_reverse_index_invariants(combined_key, monkeypatch):
    """Every valid (token, slot) pair gets one padded position in a tile of its block; tiles hold
    one block each, tokens ascending; empty slots map to -1; the static tile bound holds. Both
    sorts: the int32 key c * T + i, and the stable argsort of c used when that key would overflow."""
    if not combined_key:
        monkeypatch.setattr(kv_outer, "INT32_LIMIT", 0)
    B, T, H_kv, bs, top_k, bq = 1, 61, 2, 8, 3, 4
    n_blocks = -(-T // bs)
    ids = kv_outer.clean_ids(hot_ids(5, B, T, H_kv, bs, top_k), bs)
    ids = np.asarray(ids).transpose(0, 2, 1, 3).reshape(B * H_kv, T, top_k)
    n_tiles = kv_outer.n_tiles(T, top_k, n_blocks, bq)
    tiles, tok, inv = jax.jit(
        functools.partial(kv_outer.reverse_index, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    )(jnp.asarray(ids))
    tiles, tok, inv = map(np.asarray, (tiles, tok, inv))
    for row in range(B * H_kv):
        pos = inv[row]
        valid = ids[row] >= 0
        assert (pos[~valid] == -1).all() and (pos[valid] >= 0).all()
        assert len(np.unique(pos[valid])) == valid.sum()
        tok_i, _ = np.nonzero(valid)
        np.testing.assert_array_equal(tok[row][pos[valid]], tok_i)
        np.testing.assert_array_equal(tiles[row][pos[valid] // bq], ids[row][valid])
        assert (tok[row] >= 0).sum() == valid.sum()
        for t in range(n_tiles):
            tt = tok[row, t * bq : (t + 1) * bq]
            if tiles[row, t] < 0:
                assert (tt == -1).all()
            else:
                live = tt[tt >= 0]
                assert len(live) and (np.diff(live) > 0).all() and (tt[: len(live)] >= 0).all()
        # hot block 0: picked by all T tokens -> ceil(T / bq) tiles
        assert (tiles[row] == 0).sum() == -(-T // bq)


def test_dropping_a_selected_block_changes_the_output():
    """The comparison can fail: removing one selected (non-local) block of one (token, group)
    changes that query's output and lse (and only those), and the kernel follows the oracle."""
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 2, 16, 16, 3
    q, k, v = qkv(5, B, T, H_kv, G, D, jnp.float32)
    ids = np.asarray(indexer_ids(5, B, T, H_kv, bs, top_k))
    i, r = 50, 1  # token 50 sees blocks 0..3 and selected 3 of them
    slots = [s for s in range(top_k) if ids[0, i, r, s] not in (-1, i // bs)]
    assert slots, ids[0, i, r]
    dropped = ids.copy()
    dropped[0, i, r, slots[0]] = -1
    fn = functools.partial(sparse_attention_fwd, block_size=bs)  # same jit cache as CASES[3]
    out, lse = fn(q, k, v, jnp.asarray(ids))
    out_d, lse_d = fn(q, k, v, jnp.asarray(dropped))
    heads = slice(r * G, (r + 1) * G)
    assert np.abs(np.asarray(out_d - out)[0, i, heads]).min() > 1e-3
    assert np.abs(np.asarray(lse_d - lse)[0, i, heads]).min() > 1e-3
    changed = np.zeros(out.shape[:3], bool)
    changed[0, i, heads] = True
    np.testing.assert_array_equal(np.asarray(out_d)[~changed], np.asarray(out)[~changed])
    ref_out, ref_lse = attention_oracle(bs)(q, k, v, jnp.asarray(dropped))
    check_attention(out_d, lse_d, ref_out, ref_lse, jnp.float32)


def test_jit_and_vmap():
    V, B, T, H_kv, G, D, bs, top_k = 2, 1, 40, 2, 2, 16, 16, 2
    qkvs = [qkv(20 + n, B, T, H_kv, G, D, jnp.float32) for n in range(V)]
    ids = [hand_ids(20 + n, B, T, H_kv, bs, top_k, dup=bool(n % 2)) for n in range(V)]
    q, k, v = (jnp.asarray(np.stack([np.asarray(x[j]) for x in qkvs])) for j in range(3))
    # query_chunk=16: the vmapped kernel also runs inside lax.map (3 chunks)
    fwd = jax.jit(jax.vmap(functools.partial(sparse_attention_fwd, block_size=bs, query_chunk=16)))
    out, lse = fwd(q, k, v, jnp.asarray(np.stack([np.asarray(x) for x in ids])))
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    out, lse = np.asarray(out), np.asarray(lse)
    for n in range(V):
        ref_out, ref_lse = attention_oracle(bs)(*qkvs[n], ids[n])
        check_attention(out[n], lse[n], ref_out, ref_lse, jnp.float32)


def test_default_chunk_at_paper_scale():
    """T = 128K, paper heads: the partial buffer of a chunk stays under 2**30 elements (int32
    offsets of the Triton kernel), the chunks divide T (no padded copy of q) and the segment
    padding stays small."""
    T, BH, top_k, bs, G_pad, D_pad = 131072, 4, 16, 128, 16, 128
    n_blocks = T // bs
    bq = kv_outer.default_block_q(T, G_pad)
    assert bq * G_pad == 128
    tc = kv_outer.default_chunk(T, BH, top_k, n_blocks, bq, G_pad, D_pad)
    n_chunks = -(-T // tc)
    assert 8 <= n_chunks <= 32 and n_chunks * tc == T
    rows = kv_outer.n_tiles(tc, top_k, n_blocks, bq) * bq  # padded positions of a chunk
    assert BH * rows * G_pad * D_pad <= 2**30
    assert rows < 1.15 * tc * top_k
    # A length with no divisor in range falls back to balanced chunks (padding < one per chunk).
    T = 131071
    tc = kv_outer.default_chunk(T, BH, top_k, -(-T // bs), bq, G_pad, D_pad)
    n_chunks = -(-T // tc)
    assert 0 <= n_chunks * tc - T < n_chunks


def test_bad_arguments():
    q, k, v = qkv(0, 1, 8, 2, 2, 16, jnp.float32)
    ids = hand_ids(0, 1, 8, 2, 16, 1)
    with pytest.raises(ValueError, match="block_q"):
        sparse_attention_fwd(q, k, v, ids, block_size=16, block_q=3)
    with pytest.raises(ValueError, match="query_chunk"):
        sparse_attention_fwd(q, k, v, ids, block_size=16, query_chunk=0)
    with pytest.raises(ValueError, match="H_q"):
        sparse_attention_fwd(q[:, :, :3], k, v, ids, block_size=16)
    with pytest.raises(ValueError, match="dtype"):
        sparse_attention_fwd(q, k.astype(jnp.bfloat16), v, ids, block_size=16)
    with pytest.raises(ValueError, match="block_idx"):
        sparse_attention_fwd(q, k, v, ids[:, :, :1], block_size=16)
    with pytest.raises(ValueError, match="16 rows"):  # Triton path: M = 2 * 2 < 16
        sparse_attention_fwd(q, k, v, ids, block_size=16, block_q=2, interpret=False)
    with pytest.raises(ValueError, match="power of two"):
        sparse_attention_fwd(q, k, v, ids, block_size=12, interpret=False)


# Lowering to Triton IR needs no GPU: lower for an abstract H100 and check that the Pallas Triton
# lowering accepts every construct and shape (gather loads of token ids and query rows, pl.when,
# dots, the q0 scalar). Compiling the IR to PTX and running it still needs the GPU.
@pytest.mark.parametrize(
    "B,T,H_kv,G,D,bs,top_k,dtype,vmapped,qc",
    [
        (1, 1024, 4, 16, 128, 128, 16, jnp.bfloat16, False, None),  # paper heads
        (2, 37, 2, 3, 16, 8, 3, jnp.float32, False, 16),  # G = 3, block_size 8, chunked
        (1, 100, 1, 1, 64, 32, 1, jnp.bfloat16, True, None),
        (1, 1024, 2, 8, 64, 32, 40, jnp.bfloat16, False, None),  # 40 slots: the combine's slot loop
    ],
)
def test_lowers_to_triton_for_h100(B, T, H_kv, G, D, bs, top_k, dtype, vmapped, qc):
    lead = (2,) if vmapped else ()
    q = jax.ShapeDtypeStruct(lead + (B, T, H_kv * G, D), dtype)
    kv = jax.ShapeDtypeStruct(lead + (B, T, H_kv, D), dtype)
    ids = jax.ShapeDtypeStruct(lead + (B, T, H_kv, top_k), jnp.int32)
    fn = functools.partial(sparse_attention_fwd, block_size=bs, interpret=False, query_chunk=qc, fwd_kernel="triton")
    if vmapped:
        fn = jax.vmap(fn)
    text = triton_ir_for_h100(fn, q, kv, kv, ids)
    assert "__gpu$xla.gpu.triton" in text
    assert "msa_sparse_attention_fwd" in text


@pytest.mark.parametrize("nt", [2, 3])
def test_tiles_per_program_does_not_change_the_result(nt):
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 4, 16, 16, 3
    q, k, v = qkv(5, B, T, H_kv, G, D, jnp.float32)
    ids = hand_ids(5, B, T, H_kv, bs, top_k)
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=bs, tiles_per_program=nt)
    ref_out, ref_lse = attention_oracle(bs)(q, k, v, ids)
    check_attention(out, lse, ref_out, ref_lse, jnp.float32)
