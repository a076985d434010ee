"""Public functional MSA ops: one signature each, validated, dispatched on `impl`.

impl: "reference" (the oracle, O(T^2) memory, small sizes), "xla" (memory linear in T, any
backend), "pallas" (the GPU kernels of `pallas/`; interpret mode off a GPU), "auto" (pallas on a
GPU when the kernels support the block size, xla elsewhere; dense attention uses cuDNN on a GPU
for 16-bit inputs).
Shapes (batch-major, head-last, like jax.nn.dot_product_attention):
q [B, T, H_q, D]; k, v [B, T, H_kv, D]; iq [B, T, H_kv, D_idx]; ik [B, T, D_idx];
block_idx int32 [B, T, H_kv, top_k] with valid ids first and -1 padding after.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from msa_jax.checks import check_block_idx, check_index, check_int, check_qkv, check_shape, fail
from msa_jax.ops import pallas_backend, reference, xla

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


def select_blocks(iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0, impl: str = "auto"):
    """Index branch: per (query, group) the ids of the top_k KV blocks, local block always in.

    Returns int32 [B, T, H_kv, top_k]: valid ids first (order unspecified), -1 padding after.
    """
    backend = _backend(impl, block_size)
    check_index(iq, ik)
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    check_int("sink_blocks", sink_blocks, 0)
    fn = _jit(backend.select_blocks, "block_size", "top_k", "sink_blocks")
    return fn(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)


def sparse_attention(q, k, v, block_idx, *, block_size: int = 128, return_lse: bool = False, impl: str = "auto"):
    """Main branch: exact causal softmax attention over the tokens of the selected blocks.

    return_lse=True also returns the float32 log-sum-exp [B, T, H_q] of the logits over the support
    (the teacher's normaliser of the KL loss, docs/algorithm.md §6.1: pass it to
    `index_kl_loss(lse=...)`)."""
    backend = _backend(impl, block_size)
    check_qkv(q, k, v)
    check_block_idx(block_idx, k)
    check_int("block_size", block_size, 1)
    fn = _jit(backend.sparse_attention, "block_size", "return_lse")
    return fn(q, k, v, block_idx.astype(jnp.int32), block_size=block_size, return_lse=bool(return_lse))


def msa_attention(q, k, v, iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0,
                  return_lse: bool = False, impl: str = "auto"):
    """Index branch + main branch. Returns (out [B, T, H_q, D], block_idx) (+ lse with return_lse)."""
    _backend(impl)
    check_qkv(q, k, v)
    check_index(iq, ik, k)
    block_idx = select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, impl=impl)
    out = sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=return_lse, impl=impl)
    return (out[0], block_idx, out[1]) if return_lse else (out, block_idx)


def dense_attention(q, k, v, *, impl: str = "auto"):
    """Causal GQA softmax attention (the dense baseline). On a GPU, impl="auto" uses cuDNN."""
    backend = _backend(impl)
    check_qkv(q, k, v)
    if impl == "auto" and _cudnn_ok(q):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _jit(backend.dense_attention)(q, k, v)


def _cudnn_ok(q) -> bool:
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int = 128, lse=None, impl: str = "auto"):
    """KL(stop_grad(teacher) || student) on the support, mean over (batch, query, group).

    block_idx=None takes the full causal support (dense warmup). Gradients reach iq and ik only.
    lse: optional float32 [B, T, H_q], the main branch's log-sum-exp over the same support
    (`sparse_attention(..., return_lse=True)`), which is the teacher's normaliser (docs/algorithm.md
    §6.1): the fused pallas KL reuses it instead of recomputing it; the other backends do not need it.
    """
    backend = _backend(impl)
    check_qkv(q, k)
    check_index(iq, ik, k)
    if block_idx is not None:
        check_block_idx(block_idx, k)
        block_idx = block_idx.astype(jnp.int32)
    check_int("block_size", block_size, 1)
    if lse is not None:
        check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
        lse = jax.lax.stop_gradient(jnp.asarray(lse, jnp.float32))
    return _jit(backend.index_kl_loss, "block_size")(q, k, iq, ik, block_idx, block_size=block_size, lse=lse)


def selection_recall(q, k, block_idx, *, block_size: int = 128, top_k: int = 16, impl: str = "auto"):
    """(block recall, score recall) of block_idx against the top_k blocks by attention mass.

    Averaged over queries that see more than top_k blocks; (1.0, 1.0) when there are none.
    """
    backend = _backend(impl)
    check_qkv(q, k)
    check_block_idx(block_idx, k)
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    fn = _jit(backend.selection_recall, "block_size", "top_k")
    return fn(q, k, block_idx.astype(jnp.int32), block_size=block_size, top_k=top_k)
