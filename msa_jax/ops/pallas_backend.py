"""impl="pallas": the kernels of the top-level `pallas/` package behind the ops' signatures.

- `select_blocks`: `pallas.index_topk.select_blocks` (the fused indexer).
- `sparse_attention`: `pallas.sparse_attention.sparse_attention` (KV-outer forward, custom_vjp with
  the KV-outer backward; the LSE is an output too, and differentiable).
- `index_kl_loss`: `pallas.index_kl.index_kl_sum` with the mean's weights (value and gradients in
  one teacher pass; teacher normalised by the main branch's LSE when given, else `teacher_lse`); the
  dense warmup (block_idx=None) runs `pallas.index_kl_full.index_kl_full_sum` (query-outer over the
  full causal support, the teacher's LSE computed in its own pass unless given: the MSA layer gives
  the dense attention's).
- `dense_attention`, `selection_recall`: the xla implementations (no kernels).
- Queries at an offset (q_pos): the selection runs `pallas.decode`'s index scan (split top-k over
  an index-key cache, bf16 or fp8). The main branch and the KL run the KV-outer kernels above with
  the queries' positions (differentiable: a context-parallel slice of a sequence), dense attention
  the xla path; up to `DECODE_MAX_QUERIES` queries per sequence (decoding), the main branch and dense
  attention run `pallas.decode`'s split-KV kernels instead (no gradients).

Each kernel runs inside `kernel_shard_map`: under an active mesh (`jax.set_mesh`) every device runs
it on its own batch rows and KV groups, gradients included (the custom_vjps run per shard). Off a
GPU the kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from msa_jax.ops import xla
from msa_jax.ops.shard import kernel_shard_map
from pallas import decode, index_kl, index_kl_full, index_topk, kv_outer
from pallas import sparse_attention as main_branch
from pallas.common import MIN_DOT, is_pow2

_BTH_ = ("batch", None, "heads", None)  # [B, T, heads, last]: kernels are independent per row and head
_BTH = ("batch", None, "heads")  # [B, T, heads] (LSE, KL)
_BT_ = ("batch", None, None)  # [B, T, D_idx] (ik, shared by the heads)
_BT = ("batch", None)  # [B, S] (q_pos), [B, L] (ik_scale)
DECODE_MAX_QUERIES = 8  # queries per sequence up to which the main branch runs the decode kernel

selection_recall = xla.selection_recall


def supports(block_size: int | None) -> bool:
    """Whether the GPU kernels take this block size (the Triton tiles need a power of two >= 8)."""
    return block_size is None or (block_size >= 8 and is_pow2(block_size))


def _decode_ok(block_size: int) -> bool:
    """The Triton decode kernels take blocks of >= 16 tokens (interpret mode: any power of two)."""
    return block_size >= MIN_DOT or jax.default_backend() != "gpu"


def _pages(x, block_size: int):
    """A cache [B, L, ...] padded to whole pages of block_size tokens (only when L is not: the
    model's caches always are; padding costs a copy of the cache)."""
    L = x.shape[1]
    if L % block_size == 0:
        return x
    return jax.numpy.pad(x, [(0, 0), (0, -L % block_size)] + [(0, 0)] * (x.ndim - 2))


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0, local_blocks: int = 1, q_pos=None,
                  ik_scale=None):
    # The selection is integer-valued: no gradient flows through it (pallas_call has no JVP rule).
    iq, ik = jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    if q_pos is None:
        fn = functools.partial(index_topk.select_blocks, **kw)
        return kernel_shard_map(fn, iq, ik, specs=(_BTH_, _BT_), out_specs=_BTH_)
    if not _decode_ok(block_size):
        ik = xla.dequantize_index_keys(ik, ik_scale, block_size, iq.dtype)
        return xla.select_blocks(iq, ik, q_pos=q_pos, **kw)
    if ik_scale is not None and ik_scale.shape[1] == ik.shape[1]:
        ik_scale = _pages(ik_scale, block_size)
    ik = _pages(ik, block_size)
    if ik_scale is None:
        fn = functools.partial(decode.decode_select_blocks, **kw)
        return kernel_shard_map(fn, iq, ik, q_pos, specs=(_BTH_, _BT_, _BT), out_specs=_BTH_)
    fn = lambda iq, ik, q_pos, scale: decode.decode_select_blocks(iq, ik, q_pos, ik_scale=scale, **kw)  # noqa: E731
    return kernel_shard_map(fn, iq, ik, q_pos, ik_scale, specs=(_BTH_, _BT_, _BT, _BT), out_specs=_BTH_)


def sparse_attention(q, k, v, block_idx, *, block_size: int, return_lse: bool = False, q_pos=None):
    if q_pos is None:
        fn = functools.partial(main_branch.sparse_attention, block_size=block_size)
        out, lse = kernel_shard_map(fn, q, k, v, block_idx, specs=(_BTH_,) * 4, out_specs=(_BTH_, _BTH))
    elif q.shape[1] > DECODE_MAX_QUERIES:  # a slice of a sequence's queries: KV-outer, differentiable
        fn = lambda q, k, v, ids, pos: main_branch.sparse_attention(q, k, v, ids, block_size=block_size,  # noqa: E731
                                                                    q_pos=pos)
        out, lse = kernel_shard_map(fn, q, k, v, block_idx, q_pos, specs=(_BTH_,) * 4 + (_BT,),
                                    out_specs=(_BTH_, _BTH))
    elif not _decode_ok(block_size):
        return xla.sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=return_lse, q_pos=q_pos)
    else:
        fn = functools.partial(decode.decode_sparse_attention, block_size=block_size)
        k, v = _pages(k, block_size), _pages(v, block_size)
        out, lse = kernel_shard_map(fn, q, k, v, block_idx, q_pos, specs=(_BTH_,) * 4 + (_BT,),
                                    out_specs=(_BTH_, _BTH))
    return (out, lse) if return_lse else out


def dense_attention(q, k, v, *, return_lse: bool = False, q_pos=None):
    if q_pos is None or q.shape[1] > DECODE_MAX_QUERIES:  # no decode: the differentiable xla path
        return xla.dense_attention(q, k, v, return_lse=return_lse, q_pos=q_pos)
    L = k.shape[1]
    tile = 128  # the decode kernel's key tile: the largest power of two <= 128 dividing L, >= 16
    while tile > MIN_DOT and L % tile:
        tile //= 2
    fn = functools.partial(decode.decode_dense_attention, block_size=tile)
    k, v = _pages(k, tile), _pages(v, tile)
    out, lse = kernel_shard_map(fn, q, k, v, q_pos, specs=(_BTH_,) * 3 + (_BT,), out_specs=(_BTH_, _BTH))
    return (out, lse) if return_lse else out


def _kl_weights(pos, q_pos, n_groups: int):
    """float32 [B, T]: the weight of each token's KL in the mean over (real query, group)."""
    B, T = pos.shape
    n_real = B * T if q_pos is None else jnp.maximum((q_pos >= 0).sum(), 1)
    return jnp.where(pos >= 0, 1.0 / (n_real * n_groups), 0.0).astype(jnp.float32)


def sparse_attention_and_index_kl_grad(q, k, v, iq, ik, block_idx, *, block_size: int, q_pos=None):
    """(out, kl): the main branch, and a kl that is 0 in value with the mean KL's gradient, both from
    one backward pass (`index_kl.sparse_attention_with_kl_grad`)."""
    B, T = q.shape[:2]
    pos = kv_outer.positions(q_pos, B, T)
    w = _kl_weights(pos, q_pos, iq.shape[2])
    fn = lambda q, k, v, iq, ik, ids, pos, w: index_kl.sparse_attention_with_kl_grad(  # noqa: E731
        q, k, v, iq, ik, ids, w, block_size=block_size, q_pos=pos)[::2]
    out, kl = kernel_shard_map(fn, q, k, v, iq, ik, block_idx, pos, w,
                               specs=(_BTH_, _BTH_, _BTH_, _BTH_, _BT_, _BTH_, _BT, _BT),
                               out_specs=(_BTH_, ("batch", "heads")))
    return out, kl.sum()


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int, lse=None, q_pos=None):
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    B, T = q.shape[:2]
    pos = kv_outer.positions(q_pos, B, T)  # an operand of the shard_map either way
    # The mean over (real query, group) as token weights: the kernels compute the value and its
    # gradients together (the weights are known in the forward).
    w = _kl_weights(pos, q_pos, iq.shape[2])
    if block_idx is None:
        # Dense warmup: the full causal support, query-outer (no selection, no reverse index, O(T)
        # memory); the teacher's LSE from the main branch when given, else its own pass.
        if lse is None:
            fn = lambda q, k, iq, ik, pos, w: index_kl_full.index_kl_full_sum(q, k, iq, ik, w, q_pos=pos)  # noqa: E731
            kl = kernel_shard_map(fn, q, k, iq, ik, pos, w, specs=(_BTH_, _BTH_, _BTH_, _BT_, _BT, _BT),
                                  out_specs=("batch", "heads"))
        else:
            fn = lambda q, k, iq, ik, lse, pos, w: index_kl_full.index_kl_full_sum(  # noqa: E731
                q, k, iq, ik, w, lse=lse, q_pos=pos)
            kl = kernel_shard_map(fn, q, k, iq, ik, jax.lax.stop_gradient(lse), pos, w,
                                  specs=(_BTH_, _BTH_, _BTH_, _BT_, _BTH, _BT, _BT), out_specs=("batch", "heads"))
        return kl.sum()  # [B, H_kv]: the weighted sums per batch row and group
    if lse is None:  # no main-branch LSE at hand: recompute it (a main-branch forward)
        fn = lambda q, k, ids, pos: index_kl.teacher_lse(q, k, ids, block_size=block_size, q_pos=pos)  # noqa: E731
        lse = kernel_shard_map(fn, q, k, block_idx, pos, specs=(_BTH_,) * 3 + (_BT,), out_specs=_BTH)
    fn = lambda *a: index_kl.index_kl_sum(*a[:6], a[7], block_size=block_size, q_pos=a[6])  # noqa: E731
    kl = kernel_shard_map(
        fn, q, k, iq, ik, block_idx, jax.lax.stop_gradient(lse), pos, w,
        specs=(_BTH_, _BTH_, _BTH_, _BT_, _BTH_, _BTH, _BT, _BT), out_specs=("batch", "heads"),
    )  # [B, H_kv]: the weighted sums per batch row and group
    return kl.sum()
