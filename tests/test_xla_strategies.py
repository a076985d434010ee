"""The xla path's internal choices give the oracle's answer: both ways of restricting attention to
the selected blocks ("mask" and "gather"), and any query-chunk length (one chunk or many, lengths
that do not divide T). The public suite in test_ops.py only reaches the automatic choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import ops
from msa_jax.ops import xla

# (B, T, H_q, H_kv, block_size, top_k, q_chunk)
CASES = [(2, 37, 4, 2, 4, 3, 8), (1, 50, 4, 4, 6, 20, 7), (2, 64, 8, 1, 8, 4, None), (1, 5, 2, 1, 8, 2, 2)]


def _inputs(seed, B, T, H_q, H_kv, D=16, D_idx=8):
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = [(B, T, H_q, D), (B, T, H_kv, D), (B, T, H_kv, D), (B, T, H_kv, D_idx), (B, T, D_idx)]
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(ks, shapes)]


def _objective(sparse, kl):
    """A scalar that depends on every input: sparse output and index KL together."""
    return lambda q, k, v, iq, ik: (sparse(q, k, v) ** 2).sum() + kl(q, k, iq, ik)


@pytest.mark.parametrize("strategy", ["mask", "gather"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_T{}_H{}-{}_bs{}_k{}_c{}".format(*c))
def test_strategies_match_reference(case, strategy):
    B, T, H_q, H_kv, bs, top_k, chunk = case
    q, k, v, iq, ik = _inputs(sum(case[:6]), B, T, H_q, H_kv)
    idx = ops.select_blocks(iq, ik, block_size=bs, top_k=top_k, impl="reference")
    idx = idx.at[..., 0].set(idx[..., -1])  # duplicates and -1 slots; sometimes drops the local block

    ref_fns = (
        lambda q, k, v: ops.sparse_attention(q, k, v, idx, block_size=bs, impl="reference"),
        lambda q, k, iq, ik: ops.index_kl_loss(q, k, iq, ik, idx, block_size=bs, impl="reference"),
    )
    xla_fns = (
        lambda q, k, v: xla.sparse_attention(q, k, v, idx, block_size=bs, q_chunk=chunk, strategy=strategy),
        lambda q, k, iq, ik: xla.index_kl_loss(q, k, iq, ik, idx, block_size=bs, q_chunk=chunk, strategy=strategy),
    )
    for ref, got in zip(ref_fns, xla_fns):
        args = (q, k, v) if ref is ref_fns[0] else (q, k, iq, ik)
        np.testing.assert_allclose(jax.jit(got)(*args), ref(*args), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(_objective(*ref_fns), argnums=(0, 1, 2, 3, 4))(q, k, v, iq, ik)
    g_xla = jax.jit(jax.grad(_objective(*xla_fns), argnums=(0, 1, 2, 3, 4)))(q, k, v, iq, ik)
    for name, a, b in zip("q k v iq ik".split(), g_xla, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"grad {name}")


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"T{c[1]}_c{c[6]}")
def test_chunked_index_ops_match_reference(case):
    B, T, H_q, H_kv, bs, top_k, chunk = case
    q, k, v, iq, ik = _inputs(7 + T, B, T, H_q, H_kv)
    for sinks in (0, 2):
        got = xla.select_blocks(iq, ik, block_size=bs, top_k=top_k, sink_blocks=sinks, q_chunk=chunk)
        ref = ops.select_blocks(iq, ik, block_size=bs, top_k=top_k, sink_blocks=sinks, impl="reference")
        as_sets = lambda x: np.sort(np.where(x < 0, np.iinfo(np.int32).max, x), axis=-1)
        np.testing.assert_array_equal(as_sets(got), as_sets(ref))
    np.testing.assert_allclose(xla.dense_attention(q, k, v, q_chunk=chunk),
                               ops.dense_attention(q, k, v, impl="reference"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xla.index_kl_loss(q, k, iq, ik, None, block_size=bs, q_chunk=chunk),
                               ops.index_kl_loss(q, k, iq, ik, None, block_size=bs, impl="reference"), rtol=1e-5)
    np.testing.assert_allclose(xla.selection_recall(q, k, ref, block_size=bs, top_k=top_k, q_chunk=chunk),
                               ops.selection_recall(q, k, ref, block_size=bs, top_k=top_k, impl="reference"), rtol=1e-5)


def test_strategy_choice_and_bad_strategy():
    assert xla._strategy(T=4 * 16 * 128, top_k=16, block_size=128, strategy=None) == "mask"
    assert xla._strategy(T=4 * 16 * 128 + 1, top_k=16, block_size=128, strategy=None) == "gather"
    with pytest.raises(ValueError, match="strategy"):
        xla._strategy(T=8, top_k=1, block_size=1, strategy="dense")
