"""Pallas MSA main-branch forward kernel (`pallas.sparse_attention.sparse_attention_fwd`).

Runs in interpret mode on CPU (the same `pl.pallas_call`, executed by the Pallas interpreter).
Checked against the oracle `msa_jax.ops.reference.sparse_attention` (out) and a jnp logsumexp of
the masked logits (lse), on random normal inputs, with block ids from the oracle's indexer
(`select_blocks`) and from random hand-made selections (random subsets that always hold the local
block, shuffled, -1 padded). One more test lowers the kernel to Triton IR for an abstract H100
(no GPU needed) to catch shapes or constructs the Triton lowering rejects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.ops import reference
from pallas.sparse_attention import sparse_attention_fwd

from sparse_attention_cases import TOL, _check, _hand_ids, _indexer_ids, _oracle_fn, _qkv


@functools.cache
def _kernel_fn(block_size, block_q=None):
    return jax.jit(functools.partial(sparse_attention_fwd, block_size=block_size, block_q=block_q))


# ------------------------------------------------------------------------------------ tests

# (B, T, H_kv, G, D, block_size, top_k, selection, dtype)
# The query-tile kernel is a reference design (the ops use the KV-outer one): a compact set of cases.
CASES = [
    (1, 1, 1, 1, 16, 16, 1, "indexer", jnp.float32),  # T = 1
    (2, 53, 2, 2, 16, 16, 2, "indexer", jnp.float32),  # T = 3 * block_size + 5, B = 2
    (1, 53, 1, 16, 16, 16, 6, "hand", jnp.float32),  # G = 16, top_k > n_blocks (4)
    (1, 29, 2, 3, 16, 16, 2, "hand", jnp.float32),  # G = 3 (padded to 4 heads)
    (1, 29, 1, 2, 16, 8, 3, "hand", jnp.float32),  # block_size 8 < 16-row K tile
    (1, 7, 1, 16, 16, 32, 2, "hand", jnp.bfloat16),  # T < block_size, G = 16
    (1, 37, 1, 2, 128, 16, 2, "indexer", jnp.bfloat16),  # D = 128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:-1]) + f"-{jnp.dtype(c[-1]).name}")
def test_matches_oracle(case):
    B, T, H_kv, G, D, bs, top_k, selection, dtype = case
    seed = CASES.index(case)
    q, k, v = _qkv(seed, B, T, H_kv, G, D, dtype)
    make_ids = _indexer_ids if selection == "indexer" else _hand_ids
    ids = make_ids(seed, B, T, H_kv, bs, top_k)
    assert ids.shape == (B, T, H_kv, top_k)
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=bs)  # eager call, interpret=None
    ref_out, ref_lse = _oracle_fn(bs)(q, k, v, ids)
    _check(out, lse, ref_out, ref_lse, dtype)
    n_blocks = -(-T // bs)
    if top_k >= n_blocks and selection == "indexer":  # everything selected: dense causal GQA
        dense = jax.jit(reference.dense_attention)(q, k, v)
        atol, rtol = TOL[dtype]["out"]
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(dense, np.float32), atol=atol, rtol=rtol
        )


@pytest.mark.parametrize("block_q", [1, 16])
def test_block_q_does_not_change_the_result(block_q):
    """Different tile heights give different unions (1 token: exactly its own blocks; 16 tokens:
    a wide union with most rows masked); the result must not depend on it."""
    B, T, H_kv, G, D, bs, top_k = 1, 61, 2, 2, 16, 8, 3
    if jax.default_backend() == "gpu" and block_q * G < 16:
        pytest.skip("Triton dots need >= 16 rows (block_q * G); interpret mode checks any tile height")
    q, k, v = _qkv(7, B, T, H_kv, G, D, jnp.float32)
    ids = _hand_ids(7, B, T, H_kv, bs, top_k)
    out, lse = _kernel_fn(bs, block_q)(q, k, v, ids)
    ref_out, ref_lse = _oracle_fn(bs)(q, k, v, ids)
    _check(out, lse, ref_out, ref_lse, jnp.float32)


def test_order_and_padding_of_ids_do_not_matter():
    B, T, H_kv, G, D, bs, top_k = 1, 45, 1, 4, 16, 16, 3
    q, k, v = _qkv(11, B, T, H_kv, G, D, jnp.float32)
    ids = _hand_ids(11, B, T, H_kv, bs, top_k)
    fn = _kernel_fn(bs)
    out, lse = fn(q, k, v, ids)
    # Reverse the slots (padding first) and append extra -1 columns.
    ids2 = jnp.concatenate([ids[..., ::-1], jnp.full_like(ids[..., :2], -1)], axis=-1)
    out2, lse2 = fn(q, k, v, ids2)
    np.testing.assert_allclose(out2, out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse2, lse, atol=1e-6, rtol=1e-6)


def test_dropping_a_selected_block_changes_the_output():
    """The comparison can fail: removing one selected (non-local) block of one (token, group)
    changes that query's output and lse (and only those), and the kernel follows the oracle."""
    B, T, H_kv, G, D, bs, top_k = 1, 53, 2, 2, 16, 16, 3
    q, k, v = _qkv(5, B, T, H_kv, G, D, jnp.float32)
    ids = np.asarray(_indexer_ids(5, B, T, H_kv, bs, top_k))
    i, r = 50, 1  # token 50 sees blocks 0..3 and selected 3 of them
    slots = [s for s in range(top_k) if ids[0, i, r, s] not in (-1, i // bs)]
    assert slots, ids[0, i, r]
    dropped = ids.copy()
    dropped[0, i, r, slots[0]] = -1
    fn = _kernel_fn(bs)
    out, lse = fn(q, k, v, jnp.asarray(ids))
    out_d, lse_d = fn(q, k, v, jnp.asarray(dropped))
    heads = slice(r * G, (r + 1) * G)
    assert np.abs(np.asarray(out_d - out)[0, i, heads]).min() > 1e-3
    assert np.abs(np.asarray(lse_d - lse)[0, i, heads]).min() > 1e-3
    changed = np.zeros(out.shape[:3], bool)
    changed[0, i, heads] = True
    np.testing.assert_array_equal(np.asarray(out_d)[~changed], np.asarray(out)[~changed])
    ref_out, ref_lse = _oracle_fn(bs)(q, k, v, jnp.asarray(dropped))
    _check(out_d, lse_d, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_and_vmap(dtype):
    V, B, T, H_kv, G, D, bs, top_k = 2, 1, 40, 2, 2, 16, 16, 2
    qs, ks, vs, ids = [], [], [], []
    for n in range(V):
        q, k, v = _qkv(20 + n, B, T, H_kv, G, D, dtype)
        qs.append(q), ks.append(k), vs.append(v)
        ids.append(_hand_ids(20 + n, B, T, H_kv, bs, top_k) if n % 2 else _indexer_ids(20 + n, B, T, H_kv, bs, top_k))
    q, k, v, ids = (jnp.stack(x) for x in (qs, ks, vs, ids))
    fwd = jax.jit(jax.vmap(functools.partial(sparse_attention_fwd, block_size=bs)))
    out, lse = fwd(q, k, v, ids)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    for n in range(V):
        ref_out, ref_lse = _oracle_fn(bs)(q[n], k[n], v[n], ids[n])
        _check(out[n], lse[n], ref_out, ref_lse, dtype)


def test_bad_arguments():
    q, k, v = _qkv(0, 1, 8, 2, 2, 16, jnp.float32)
    ids = _hand_ids(0, 1, 8, 2, 16, 1)
    with pytest.raises(ValueError, match="block_q"):
        sparse_attention_fwd(q, k, v, ids, block_size=16, block_q=3)
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
# lowering accepts every construct and shape (power-of-two tensors, dots, gather load, dynamic
# loop bound). Compiling the IR to PTX and running it still needs the GPU.
@pytest.mark.parametrize(
    "B,T,H_kv,G,D,bs,top_k,dtype,vmapped",
    [
        (1, 300, 2, 16, 128, 128, 16, jnp.bfloat16, False),
        (2, 37, 2, 3, 16, 8, 3, jnp.float32, False),
        (1, 100, 1, 1, 64, 32, 1, jnp.bfloat16, True),
    ],
)
def test_lowers_to_triton_for_h100(B, T, H_kv, G, D, bs, top_k, dtype, vmapped):
    ad = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=ad)
    lead = (2,) if vmapped else ()
    q = jax.ShapeDtypeStruct(lead + (B, T, H_kv * G, D), dtype)
    kv = jax.ShapeDtypeStruct(lead + (B, T, H_kv, D), dtype)
    ids = jax.ShapeDtypeStruct(lead + (B, T, H_kv, top_k), jnp.int32)
    fn = functools.partial(sparse_attention_fwd, block_size=bs, interpret=False)
    if vmapped:
        fn = jax.vmap(fn)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(q, kv, kv, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
