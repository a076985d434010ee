"""Public functional MSA ops: one signature each, validated, dispatched on `impl`.

impl: "reference" (the oracle, O(T^2) memory, small sizes), "xla" (memory linear in T, any
backend), "pallas" (the GPU kernels of `pallas/`; interpret mode off a GPU), "auto" (pallas on a
GPU when the kernels support the block size, xla elsewhere; dense attention uses cuDNN on a GPU
for 16-bit inputs).
Shapes (batch-major, head-last, like jax.nn.dot_product_attention):
q [B, T, H_q, D]; k, v [B, T, H_kv, D]; iq [B, T, H_kv, D_idx]; ik [B, T, D_idx];
block_idx int32 [B, T, H_kv, top_k] with valid ids first and -1 padding after.

Queries at an offset (generation, chunked prefill, context parallelism; docs/algorithm.md §3.6):
every op takes `q_pos` int32 [B, S], the positions
of S query tokens per sequence (-1: a padding query, output 0), against a cache of L keys: q, iq,
block_idx have S rows, k, v, ik have L. The selection rules are those of the full sequence at
each query's row. Index keys may then be float8_e4m3fn with a float32 `ik_scale` per token
[B, L] or per block [B, L / block_size]. With q_pos, impl="pallas" selects with the decode index
scan (`pallas/decode.py`) and runs the main branch and the KL on the KV-outer kernels at the
queries' positions (differentiable); for up to `pallas_backend.DECODE_MAX_QUERIES` queries per
sequence (decoding) the main branch and dense attention run the decode kernels instead (no
gradient). Recall, and dense attention beyond decoding, run the xla path. Every impl is
differentiable on query slices: a sequence's queries split into equal slices, each against all
keys, give its outputs, its KL as the mean of the slices' and the same gradients
(tests/test_ops_cached.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from msa_jax import determinism

from msa_jax.checks import (check_block_idx, check_ik_scale, check_index, check_int, check_local_blocks,
                            check_q_pos, check_qkv, check_shape, fail)
from msa_jax.ops import pallas_backend, reference, xla
from pallas import kv_outer

IMPLS = ("xla", "pallas")  # concrete backends tested against the oracle
_CHOICES = ("auto", "reference") + IMPLS

__all__ = [
    "IMPLS",
    "select_blocks",
    "sparse_attention",
    "msa_attention",
    "dense_attention",
    "index_kl_loss",
    "selection_recall",
    "selects_every_block",
    "sparse_attention_and_index_kl",
]


# ----------------------------------------------------------------------------- validation


def _backend(impl: str, block_size: int | None = None):
    if impl not in _CHOICES:
        fail("impl", f"one of {_CHOICES}", repr(impl))
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return pallas_backend if on_gpu and pallas_backend.supports(block_size) else xla
    return {"reference": reference, "xla": xla, "pallas": pallas_backend}[impl]


@functools.cache
def _jit(fn, *static: str):
    """fn jitted with its config kwargs static: eager calls compile once per shape, not per op."""
    return jax.jit(fn, static_argnames=static)


# ----------------------------------------------------------------------------- public ops


def _q_pos(q_pos, B: int, S: int):
    if q_pos is None:
        return None
    check_q_pos(q_pos, B, S)
    return jnp.asarray(q_pos, jnp.int32)


def select_blocks(iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0, local_blocks: int = 1,
                  q_pos=None, ik_scale=None, impl: str = "auto"):
    """Index branch: per (query, group) the ids of the top_k KV blocks, local block always in.

    Returns int32 [B, T, H_kv, top_k]: valid ids first (order unspecified), -1 padding after.
    local_blocks: the query's own block and the local_blocks - 1 before it are always selected (the
    paper: 1; more: an ablation, 1 <= local_blocks <= top_k). sink_blocks: the first sink_blocks
    blocks too, after those (ablation).
    q_pos, ik_scale: queries at an offset against a cache of index keys (module docstring).
    """
    backend = _backend(impl, block_size)
    cached = q_pos is not None
    check_index(iq, ik, cached=cached, scaled=ik_scale is not None)
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    check_int("sink_blocks", sink_blocks, 0)
    check_local_blocks(local_blocks, top_k)
    q_pos = _q_pos(q_pos, *iq.shape[:2])
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    if ik_scale is not None:
        check_ik_scale(ik_scale, ik, block_size)
        if cached and backend is pallas_backend:  # the decode scan reads fp8 keys and their scales
            return _jit(backend.select_blocks, *kw)(iq, ik, q_pos=q_pos, ik_scale=ik_scale, **kw)
        ik = _jit(xla.dequantize_index_keys, "block_size", "dtype")(ik, ik_scale, block_size=block_size, dtype=iq.dtype)
    if cached:
        return _jit(backend.select_blocks, *kw)(iq, ik, q_pos=q_pos, **kw)
    return _jit(backend.select_blocks, *kw)(iq, ik, **kw)


def sparse_attention(q, k, v, block_idx, *, block_size: int = 128, return_lse: bool = False, q_pos=None,
                     impl: str = "auto"):
    """Main branch: exact causal softmax attention over the tokens of the selected blocks.

    return_lse=True also returns the float32 log-sum-exp [B, T, H_q] of the logits over the support
    (the teacher's normaliser of the KL loss, docs/algorithm.md §6.1: pass it to
    `index_kl_loss(lse=...)`). q_pos: queries at an offset against a cache (module docstring)."""
    backend = _backend(impl, block_size)
    check_qkv(q, k, v, cached=q_pos is not None)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    kw = dict(block_size=block_size, return_lse=bool(return_lse))
    if q_pos is not None:
        kw["q_pos"] = _q_pos(q_pos, *q.shape[:2])
    fn = _jit(backend.sparse_attention, "block_size", "return_lse")
    return fn(q, k, v, block_idx.astype(jnp.int32), **kw)


def selects_every_block(n_keys: int, block_size: int, top_k: int) -> bool:
    """True when a sequence of n_keys has at most top_k blocks: every query then selects all the blocks
    it can see, so MSA's main branch is dense causal attention and its KL the full-support KL."""
    return -(-n_keys // block_size) <= top_k


def _every_block(B: int, T: int, H_kv: int, block_size: int, top_k: int):
    """select_blocks' result when `selects_every_block`: each query's visible blocks, -1 after."""
    return kv_outer.visible_blocks(kv_outer.positions(None, B, T), block_size, top_k, H_kv)


def msa_attention(q, k, v, iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0,
                  local_blocks: int = 1, return_lse: bool = False, q_pos=None, ik_scale=None, impl: str = "auto"):
    """Index branch + main branch. Returns (out [B, T, H_q, D], block_idx) (+ lse with return_lse).

    impl="auto" on a sequence that `selects_every_block` (T <= top_k * block_size) runs dense
    attention (cuDNN on a GPU) instead of the sparse kernels: the same result, faster."""
    _backend(impl)
    cached = q_pos is not None
    check_qkv(q, k, v, cached=cached)
    check_index(iq, ik, k, cached=cached, scaled=ik_scale is not None)
    if impl == "auto" and not (cached or return_lse) and selects_every_block(k.shape[1], block_size, top_k):
        check_int("block_size", block_size, 1)
        check_int("top_k", top_k, 1)
        check_local_blocks(local_blocks, top_k)
        return dense_attention(q, k, v), _every_block(q.shape[0], q.shape[1], k.shape[2], block_size, top_k)
    block_idx = select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks,
                              local_blocks=local_blocks, q_pos=q_pos, ik_scale=ik_scale, impl=impl)
    out = sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=return_lse, q_pos=q_pos, impl=impl)
    return (out[0], block_idx, out[1]) if return_lse else (out, block_idx)


def dense_attention(q, k, v, *, return_lse: bool = False, q_pos=None, impl: str = "auto"):
    """Causal GQA softmax attention (the dense baseline). On a GPU, impl="auto" uses cuDNN for
    prefill and the Pallas split-K decode kernel for queries at an offset (q_pos).

    return_lse=True also returns the float32 log-sum-exp [B, T, H_q] of the logits over the causal
    support, as `sparse_attention`: the dense warmup's KL teacher normaliser (`index_kl_loss(lse=...)`).
    From cuDNN it is the softmax statistics its forward keeps for the backward anyway."""
    backend = _backend(impl)
    check_qkv(q, k, v, cached=q_pos is not None)
    fn = _jit(backend.dense_attention, "return_lse")
    if q_pos is not None:
        return fn(q, k, v, return_lse=bool(return_lse), q_pos=_q_pos(q_pos, *q.shape[:2]))
    if impl == "auto" and _cudnn_ok(q):
        if return_lse:
            return _cudnn_attention_with_lse(q, k, v)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return fn(q, k, v, return_lse=bool(return_lse))


def _cudnn_attention_with_lse(q, k, v):
    """cuDNN causal attention and its float32 softmax statistics (the natural log-sum-exp of the scaled
    logits). Through jax's own cuDNN wrapper: the public `jax.nn.dot_product_attention(return_residual=True)`
    returns the same statistics rounded to q's dtype (bf16: ~0.04 at an LSE of 10, a 4% error in the
    teacher's weights). Gradients flow to q, k, v as with the public call; the statistics are detached."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    out, stats = cudnn_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL,
                                 qkv_layout="BTNH", return_residual=True)
    return out, jax.lax.stop_gradient(jnp.transpose(stats, (0, 2, 1)).astype(jnp.float32))  # [B, N, T] -> [B, T, N]


def _cudnn_ok(q) -> bool:
    # Not in deterministic mode: XLA (jax 0.11.2) fails to compile cuDNN attention with
    # --xla_gpu_deterministic_ops (IndexError raw_hash_map::at); the backend's own path is deterministic.
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
            and not determinism.is_enabled())


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int = 128, lse=None, q_pos=None, impl: str = "auto"):
    """KL(stop_grad(teacher) || student) on the support, mean over (batch, query, group).

    block_idx=None takes the full causal support (dense warmup). Gradients reach iq and ik only.
    lse: optional float32 [B, T, H_q], the main branch's log-sum-exp over the same support
    (`sparse_attention(..., return_lse=True)`), which is the teacher's normaliser (docs/algorithm.md
    §6.1): the fused pallas KL reuses it instead of recomputing it; the other backends do not need it.
    q_pos: queries at an offset (module docstring; the mean is over real queries, q_pos >= 0): the
    pallas KL runs its kernels at those positions (a context-parallel slice of a sequence).
    """
    backend = _backend(impl)
    cached = q_pos is not None
    check_qkv(q, k, cached=cached)
    check_index(iq, ik, k, cached=cached)
    if block_idx is not None:
        check_block_idx(block_idx, k, n_queries=q.shape[1])
        block_idx = block_idx.astype(jnp.int32)
    check_int("block_size", block_size, 1)
    if lse is not None:
        check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
        lse = jax.lax.stop_gradient(jnp.asarray(lse, jnp.float32))
    kw = dict(block_size=block_size, lse=lse)
    if cached:
        kw["q_pos"] = _q_pos(q_pos, *q.shape[:2])
    return _jit(backend.index_kl_loss, "block_size")(q, k, iq, ik, block_idx, **kw)


def sparse_attention_and_index_kl(q, k, v, iq, ik, block_idx, *, block_size: int = 128, kl_value: bool = True,
                                  q_pos=None, impl: str = "auto"):
    """(out, kl): a training step's main branch over block_idx and index KL on the same support, as
    `sparse_attention(..., return_lse=True)` then `index_kl_loss(..., lse=lse)`.

    kl_value=False: kl is 0 in value but keeps the KL's gradient (to iq and ik), for the steps that do
    not log the KL (an update does not depend on its value). The pallas backend then takes the KL's
    gradient from the main backward's own tiles (`pallas.index_kl.sparse_attention_with_kl_grad`:
    no teacher pass of the KL's own); the others compute the KL and subtract its stop_gradient. On an
    H200 at 128K that fused backward is slower than the separate passes (279 against 211 ms for this
    op; BENCHMARKS.md), so the train step keeps kl_value=True's path.
    """
    backend = _backend(impl, block_size)
    check_qkv(q, k, v, cached=q_pos is not None)
    check_index(iq, ik, k, cached=q_pos is not None)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    sequence = q_pos is None or q.shape[1] > pallas_backend.DECODE_MAX_QUERIES  # not decoding: KV-outer kernels
    if not kl_value and backend is pallas_backend and sequence:
        kw = dict(block_size=block_size)
        if q_pos is not None:
            kw["q_pos"] = _q_pos(q_pos, *q.shape[:2])
        fn = _jit(pallas_backend.sparse_attention_and_index_kl_grad, "block_size")
        return fn(q, k, v, iq, ik, block_idx.astype(jnp.int32), **kw)
    out, lse = sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=True, q_pos=q_pos, impl=impl)
    kl = index_kl_loss(q, k, iq, ik, block_idx, block_size=block_size, lse=lse, q_pos=q_pos, impl=impl)
    return out, (kl if kl_value else kl - jax.lax.stop_gradient(kl))


def selection_recall(q, k, block_idx, *, block_size: int = 128, top_k: int = 16, q_pos=None, impl: str = "auto"):
    """(block recall, score recall) of block_idx against the top_k blocks by attention mass.

    Averaged over queries that see more than top_k blocks; (1.0, 1.0) when there are none.
    q_pos: queries at an offset (module docstring).
    """
    backend = _backend(impl)
    cached = q_pos is not None
    check_qkv(q, k, cached=cached)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    kw = dict(block_size=block_size, top_k=top_k)
    if cached:
        kw["q_pos"] = _q_pos(q_pos, *q.shape[:2])
    fn = _jit(backend.selection_recall, "block_size", "top_k")
    return fn(q, k, block_idx.astype(jnp.int32), **kw)
