"""impl="pallas": the Pallas kernels of the top-level `pallas/` package behind the ops' signatures.

- `select_blocks`: `pallas.index_topk` (fused index scores, causal block max and a streaming top-k;
  the [T, T / block_size] score matrix never goes to memory).
- `sparse_attention`: the KV-outer forward kernel of `pallas.sparse_attention_kv` (reverse index
  from blocks to the queries that chose them, per-slot partial outputs + LSE, a combine; 3x faster
  on an H100 than the query-tile kernel `pallas.sparse_attention`, which stays as a reference
  design), a `jax.custom_vjp` whose backward is the KV-outer kernel of
  `pallas.sparse_attention_kv_bwd` (dq, dk, dv from the saved LSE; deterministic). The LSE is an
  output too (`return_lse`), and differentiable (its cotangent folds into the backward's delta).
- `msa_attention`: both kernels.
- `index_kl_loss`: the fused KL kernels of `pallas.index_kl` (KV-outer; teacher normalised by the
  main branch's LSE when given, else recomputed; gradients to iq, ik only, deterministic). The
  dense warmup (block_idx=None, the full causal support) uses the `xla` path.
- `dense_attention`, `selection_recall`: the `xla` implementations (no kernels).

Off a GPU the kernels run in Pallas interpret mode (slow, but the real kernel code), so the shared
test suite checks them on CPU. Under an active mesh (`jax.set_mesh`, as the sharded train/eval
steps do) each device runs the kernels on its own batch rows and KV groups (`kernel_shard_map`).
"""

from __future__ import annotations

import functools

import jax

from msa_jax.ops import xla
from msa_jax.ops.shard import kernel_shard_map
from pallas import index_kl as _index_kl
from pallas import index_topk as _index_topk
from pallas.common import is_pow2
from pallas import sparse_attention_kv as _sparse_attention
from pallas import sparse_attention_kv_bwd as _sparse_attention_bwd

_BTH_ = ("batch", None, "heads", None)  # [B, T, heads, last]: kernels are independent per row and head


def supports(block_size: int | None) -> bool:
    """Whether the GPU kernels take this block size (the Triton tiles need a power of two >= 8)."""
    return block_size is None or (block_size >= 8 and is_pow2(block_size))


dense_attention = xla.dense_attention
selection_recall = xla.selection_recall


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0):
    # The selection is integer-valued: no gradient flows through it (pallas_call has no JVP rule).
    iq, ik = jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik)
    fn = functools.partial(_index_topk.select_blocks, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    return kernel_shard_map(fn, iq, ik, specs=(_BTH_, ("batch", None, None)), out_specs=_BTH_)


_BTH = ("batch", None, "heads")  # [B, T, heads] (the LSE)


def _fwd_kernels(q, k, v, block_idx, block_size):
    fn = functools.partial(_sparse_attention.sparse_attention_fwd, block_size=block_size)
    return kernel_shard_map(fn, q, k, v, block_idx, specs=(_BTH_,) * 4, out_specs=(_BTH_, _BTH))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sparse(q, k, v, block_idx, block_size):
    return _fwd_kernels(q, k, v, block_idx, block_size)


def _sparse_fwd(q, k, v, block_idx, block_size):
    out, lse = _fwd_kernels(q, k, v, block_idx, block_size)
    return (out, lse), (q, k, v, block_idx, out, lse)


def _sparse_bwd(block_size, res, cts):
    q, k, v, block_idx, out, lse = res
    dout, dlse = cts
    fn = functools.partial(_sparse_attention_bwd.sparse_attention_bwd, block_size=block_size)
    dq, dk, dv = kernel_shard_map(
        fn, q, k, v, block_idx, out, lse, dout, dlse,
        specs=(_BTH_,) * 5 + (_BTH, _BTH_, _BTH), out_specs=(_BTH_,) * 3,  # q k v idx out | lse dout dlse
    )
    return dq, dk, dv, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def sparse_attention(q, k, v, block_idx, *, block_size: int, return_lse: bool = False):
    out, lse = _sparse(q, k, v, block_idx, block_size)
    return (out, lse) if return_lse else out


def msa_attention(q, k, v, iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0, return_lse: bool = False):
    block_idx = select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    out = sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=return_lse)
    return (out[0], block_idx, out[1]) if return_lse else (out, block_idx)


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int, lse=None):
    if block_idx is None:  # dense warmup: the full causal support, no selection to fuse over
        return xla.index_kl_loss(q, k, iq, ik, None, block_size=block_size)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    if lse is None:  # no main-branch LSE at hand: recompute it (a main-branch forward)
        fn = functools.partial(_index_kl.teacher_lse, block_size=block_size)
        lse = kernel_shard_map(fn, q, k, block_idx, specs=(_BTH_, _BTH_, _BTH_), out_specs=_BTH)
    fn = functools.partial(_index_kl.index_kl, block_size=block_size)
    kl = kernel_shard_map(
        fn, q, k, iq, ik, block_idx, jax.lax.stop_gradient(lse),
        specs=(_BTH_, _BTH_, _BTH_, ("batch", None, None), _BTH_, _BTH), out_specs=_BTH,
    )  # [B, T, H_kv]
    B, T, R = kl.shape
    return kl.sum() / (B * T * R)
