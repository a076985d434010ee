"""The Triton kernels' shared memory on an H100 / H200, measured on the CPU (`pallas.triton_smem`: lowered
for an abstract sm_90, compiled with the triton package): every kernel of an MSA layer fits the 227 KiB
at the project's head configurations and blocks 64-256, or refuses the sizes with a clear error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton")

from pallas import index_kl  # noqa: E402
from pallas.triton_smem import SMEM_LIMIT, layer_kernels, measure  # noqa: E402

FAMILIES = ("msa_index_topk", "msa_sparse_attention_fwd", "msa_sparse_attention_bwd_bq", "msa_index_kl_student",
            "msa_index_kl_fused", "msa_index_kl_fwd", "msa_index_kl_full_lse_teacher", "msa_index_kl_full_grad_ik")


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, index_dim, block_size, dtype",
    [
        (12, 4, 64, 64, 64, jnp.bfloat16),  # the long-context preset's heads
        (12, 4, 64, 64, 128, jnp.bfloat16),
        (12, 4, 64, 64, 256, jnp.bfloat16),  # failed on an H200 before the backward's tiles shrank
        (64, 4, 128, 128, 128, jnp.bfloat16),  # the paper's heads
        (64, 4, 128, 128, 256, jnp.bfloat16),
    ],
)
def test_layer_kernels_fit(heads, kv_heads, head_dim, index_dim, block_size, dtype):
    rows, refused = layer_kernels(heads=heads, kv_heads=kv_heads, head_dim=head_dim, index_dim=index_dim,
                                  block_size=block_size, top_k=2048 // block_size, dtype=dtype)
    names = [r["name"] for r in rows]
    for family in FAMILIES:
        assert any(n.startswith(family) for n in names), (family, names)
    over = {r["name"]: r["shared"] for r in rows if r["shared"] > SMEM_LIMIT}
    assert not over, over
    assert all(r["shared"] > 0 for r in rows if "sparse_attention" in r["name"] or "index_kl_f" in r["name"])
    # only the fused main + KL backward refuses, and only over 128-key blocks with D or D_idx 128
    expect_refused = block_size > 128 and max(head_dim, index_dim) > 64
    assert [r.split(":")[0] for r in refused] == (["fused main + KL backward"] if expect_refused else [])


def test_measures_the_launch_that_failed():
    """The fused KL backward at block 256 with the 128-row tiles it had (block_q 32 at G_pad 4) asked an H200
    for 233,472 B and failed: the measurement gives that number, over the limit."""
    S = jax.ShapeDtypeStruct
    B, T, R, G, D = 1, 4096, 4, 3, 64
    q, k = S((B, T, R * G, D), jnp.bfloat16), S((B, T, R, D), jnp.bfloat16)
    iq, ik = S((B, T, R, D), jnp.bfloat16), S((B, T, D), jnp.bfloat16)
    ids, lse, w = S((B, T, R, 8), jnp.int32), S((B, T, R * G), jnp.float32), S((B, T), jnp.float32)

    def grads(q, k, iq, ik, ids, lse, w):
        f = lambda a, b: index_kl.index_kl_sum(q, k, a, b, ids, lse, w, block_size=256, block_q=32,  # noqa: E731
                                               interpret=False).sum()
        return jax.grad(f, argnums=(0, 1))(iq, ik)

    fused = [r for r in measure(grads, q, k, iq, ik, ids, lse, w) if r["name"].startswith("msa_index_kl_fused")]
    assert [r["shared"] for r in fused] == [233_472] and fused[0]["shared"] > SMEM_LIMIT
