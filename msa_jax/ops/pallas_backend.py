"""impl="pallas": the Pallas kernels of the top-level `pallas/` package behind the ops' signatures.

- `select_blocks`: `pallas.index_topk` (fused index scores, causal block max and a streaming top-k;
  the [T, T / block_size] score matrix never goes to memory).
- `sparse_attention`: the KV-outer forward kernel of `pallas.sparse_attention_kv` (reverse index
  from blocks to the queries that chose them, per-slot partial outputs + LSE, a combine; 3x faster
  on an H100 than the query-tile kernel `pallas.sparse_attention`, which stays as a reference
  design). Its gradient is, for now, the VJP of the `xla` path (a recompute): the backward kernel
  is issue 5's. `jax.grad` therefore works and is exact, just not fast.
- `msa_attention`: both kernels.
- `dense_attention`, `index_kl_loss`, `selection_recall`: the `xla` implementations (no kernels).

Off a GPU the kernels run in Pallas interpret mode (slow, but the real kernel code), so the shared
test suite checks them on CPU. Under an active mesh (`jax.set_mesh`, as the sharded train/eval
steps do) each device runs the kernels on its own batch rows and KV groups (`kernel_shard_map`).
"""

from __future__ import annotations

import functools

import jax

from msa_jax.ops import xla
from msa_jax.sharding import kernel_shard_map
from pallas import index_topk as _index_topk
from pallas.common import is_pow2
from pallas import sparse_attention_kv as _sparse_attention

_BTH_ = ("batch", None, "heads", None)  # [B, T, heads, last]: kernels are independent per row and head


def supports(block_size: int | None) -> bool:
    """Whether the GPU kernels take this block size (the Triton tiles need a power of two >= 8)."""
    return block_size is None or (block_size >= 8 and is_pow2(block_size))


dense_attention = xla.dense_attention
index_kl_loss = xla.index_kl_loss
selection_recall = xla.selection_recall


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0):
    # The selection is integer-valued: no gradient flows through it (pallas_call has no JVP rule).
    iq, ik = jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik)
    fn = functools.partial(_index_topk.select_blocks, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    return kernel_shard_map(fn, iq, ik, specs=(_BTH_, ("batch", None, None)), out_specs=_BTH_)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sparse(q, k, v, block_idx, block_size):
    fn = lambda *a: _sparse_attention.sparse_attention_fwd(*a, block_size=block_size)[0]  # noqa: E731
    return kernel_shard_map(fn, q, k, v, block_idx, specs=(_BTH_,) * 4, out_specs=_BTH_)


def _sparse_fwd(q, k, v, block_idx, block_size):
    return _sparse(q, k, v, block_idx, block_size), (q, k, v, block_idx)


def _sparse_bwd(block_size, res, g):
    q, k, v, block_idx = res
    _, vjp = jax.vjp(lambda q, k, v: xla.sparse_attention(q, k, v, block_idx, block_size=block_size), q, k, v)
    return (*vjp(g), None)


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def sparse_attention(q, k, v, block_idx, *, block_size: int):
    return _sparse(q, k, v, block_idx, block_size)


def msa_attention(q, k, v, iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0):
    block_idx = select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    return sparse_attention(q, k, v, block_idx, block_size=block_size), block_idx
