"""The xla path must scale: peak temporary memory grows linearly in T, never as T^2.

Compile-only (no execution): XLA's buffer assignment reports the temporaries of each program. With
the query chunk fixed, doubling T must at most double them (a [T, T] tensor would quadruple).
"""

import jax
import jax.numpy as jnp
import pytest

from msa_jax.ops import xla

pytestmark = pytest.mark.usefixtures("optimized_compile")  # compiled memory, as users compile

B, H_Q, H_KV, D, D_IDX, BLOCK, TOP_K, CHUNK = 1, 4, 2, 16, 16, 64, 4, 256


def _programs():
    sparse = lambda q, k, v, iq, ik, idx: xla.sparse_attention(q, k, v, idx, block_size=BLOCK, q_chunk=CHUNK)
    masked = lambda q, k, v, iq, ik, idx: xla.sparse_attention(q, k, v, idx, block_size=BLOCK, q_chunk=CHUNK, strategy="mask")
    kl = lambda q, k, v, iq, ik, idx: xla.index_kl_loss(q, k, iq, ik, idx, block_size=BLOCK, q_chunk=CHUNK)
    return {
        "select_blocks": lambda q, k, v, iq, ik, idx: xla.select_blocks(iq, ik, block_size=BLOCK, top_k=TOP_K, q_chunk=CHUNK),
        "sparse_attention": sparse,
        "sparse_attention_grad": lambda q, k, v, iq, ik, idx: jax.grad(lambda q, k, v: sparse(q, k, v, iq, ik, idx).sum(), (0, 1, 2))(q, k, v),
        "sparse_attention_mask_grad": lambda q, k, v, iq, ik, idx: jax.grad(lambda q, k, v: masked(q, k, v, iq, ik, idx).sum(), (0, 1, 2))(q, k, v),
        "index_kl_loss_grad": lambda q, k, v, iq, ik, idx: jax.grad(lambda iq, ik: kl(q, k, v, iq, ik, idx), (0, 1))(iq, ik),
        "index_kl_loss_dense_grad": lambda q, k, v, iq, ik, idx: jax.grad(
            lambda iq, ik: xla.index_kl_loss(q, k, iq, ik, None, block_size=BLOCK, q_chunk=CHUNK), (0, 1))(iq, ik),
        "dense_attention": lambda q, k, v, iq, ik, idx: xla.dense_attention(q, k, v, q_chunk=CHUNK),
        "selection_recall": lambda q, k, v, iq, ik, idx: xla.selection_recall(q, k, idx, block_size=BLOCK, top_k=TOP_K, q_chunk=CHUNK),
    }


def _temp_bytes(fn, T):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (f32(B, T, H_Q, D), f32(B, T, H_KV, D), f32(B, T, H_KV, D), f32(B, T, H_KV, D_IDX), f32(B, T, D_IDX),
            jax.ShapeDtypeStruct((B, T, H_KV, TOP_K), jnp.int32))
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", sorted(_programs()))
def test_temporaries_grow_linearly_in_T(name):
    fn = _programs()[name]
    small, large = _temp_bytes(fn, 2048), _temp_bytes(fn, 4096)
    assert large <= 2.3 * small, f"{name}: temporaries {small} -> {large} bytes when T doubles"
