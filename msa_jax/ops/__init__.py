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


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _backend(impl: str, block_size: int | None = None):
    if impl not in _CHOICES:
        _fail("impl", f"one of {_CHOICES}", repr(impl))
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return pallas_backend if on_gpu and pallas_backend.supports(block_size) else xla
    return {"reference": reference, "xla": xla, "pallas": pallas_backend}[impl]


@functools.cache
def _jit(fn, *static: str):
    """fn jitted with its config kwargs static: eager calls compile once per shape, not per op."""
    return jax.jit(fn, static_argnames=static)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, f"an int >= {minimum}", repr(value))


def _check_ndim(name: str, x, ndim: int, layout: str) -> None:
    if not hasattr(x, "shape") or x.ndim != ndim:
        _fail(name, f"a {ndim}-d array {layout}", getattr(x, "shape", type(x).__name__))


def _check_qkv(q, k, v=None) -> None:
    _check_ndim("q", q, 4, "[B, T, H_q, D]")
    _check_ndim("k", k, 4, "[B, T, H_kv, D]")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        _fail("q", "a floating dtype", q.dtype)
    B, T, H_q, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        _fail("k", f"shape [B={B}, T={T}, H_kv, D={D}] matching q", k.shape)
    if H_q % k.shape[2]:
        _fail("q", f"a head count H_q divisible by H_kv={k.shape[2]} (GQA)", f"H_q={H_q}")
    if k.dtype != q.dtype:
        _fail("k", f"dtype {q.dtype} (same as q)", k.dtype)
    if v is not None:
        _check_ndim("v", v, 4, "[B, T, H_kv, D]")
        if v.shape != k.shape:
            _fail("v", f"shape {k.shape} (same as k)", v.shape)
        if v.dtype != q.dtype:
            _fail("v", f"dtype {q.dtype} (same as q)", v.dtype)


def _check_index(iq, ik, k) -> None:
    _check_ndim("iq", iq, 4, "[B, T, H_kv, D_idx]")
    _check_ndim("ik", ik, 3, "[B, T, D_idx]")
    B, T, H_kv, _ = k.shape
    if iq.shape[:3] != (B, T, H_kv):
        _fail("iq", f"shape [B={B}, T={T}, H_kv={H_kv}, D_idx]", iq.shape)
    if ik.shape != (B, T, iq.shape[3]):
        _fail("ik", f"shape [B={B}, T={T}, D_idx={iq.shape[3]}]", ik.shape)
    if not jnp.issubdtype(iq.dtype, jnp.floating):
        _fail("iq", "a floating dtype", iq.dtype)
    if ik.dtype != iq.dtype:
        _fail("ik", f"dtype {iq.dtype} (same as iq)", ik.dtype)


def _check_index_alone(iq, ik) -> None:
    _check_ndim("iq", iq, 4, "[B, T, H_kv, D_idx]")
    B, T, H_kv, D_idx = iq.shape
    _check_index(iq, ik, jax.ShapeDtypeStruct((B, T, H_kv, 1), iq.dtype))


def _check_block_idx(block_idx, k) -> None:
    _check_ndim("block_idx", block_idx, 4, "[B, T, H_kv, top_k]")
    B, T, H_kv, _ = k.shape
    if block_idx.shape[:3] != (B, T, H_kv):
        _fail("block_idx", f"shape [B={B}, T={T}, H_kv={H_kv}, top_k]", block_idx.shape)
    if block_idx.shape[3] < 1:
        _fail("block_idx", "at least one slot (top_k >= 1)", block_idx.shape)
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        _fail("block_idx", "an integer dtype (int32)", block_idx.dtype)


# ----------------------------------------------------------------------------- public ops


def select_blocks(iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0, impl: str = "auto"):
    """Index branch: per (query, group) the ids of the top_k KV blocks, local block always in.

    Returns int32 [B, T, H_kv, top_k]: valid ids first (order unspecified), -1 padding after.
    """
    backend = _backend(impl, block_size)
    _check_index_alone(iq, ik)
    _check_int("block_size", block_size, 1)
    _check_int("top_k", top_k, 1)
    _check_int("sink_blocks", sink_blocks, 0)
    fn = _jit(backend.select_blocks, "block_size", "top_k", "sink_blocks")
    return fn(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)


def sparse_attention(q, k, v, block_idx, *, block_size: int = 128, return_lse: bool = False, impl: str = "auto"):
    """Main branch: exact causal softmax attention over the tokens of the selected blocks.

    return_lse=True also returns the float32 log-sum-exp [B, T, H_q] of the logits over the support
    (the teacher's normaliser of the KL loss, spec 6.1: pass it to `index_kl_loss(lse=...)`)."""
    backend = _backend(impl, block_size)
    _check_qkv(q, k, v)
    _check_block_idx(block_idx, k)
    _check_int("block_size", block_size, 1)
    fn = _jit(backend.sparse_attention, "block_size", "return_lse")
    return fn(q, k, v, block_idx.astype(jnp.int32), block_size=block_size, return_lse=bool(return_lse))


def msa_attention(q, k, v, iq, ik, *, block_size: int = 128, top_k: int = 16, sink_blocks: int = 0,
                  return_lse: bool = False, impl: str = "auto"):
    """Index branch + main branch. Returns (out [B, T, H_q, D], block_idx) (+ lse with return_lse)."""
    _backend(impl)
    _check_qkv(q, k, v)
    _check_index(iq, ik, k)
    block_idx = select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, impl=impl)
    out = sparse_attention(q, k, v, block_idx, block_size=block_size, return_lse=return_lse, impl=impl)
    return (out[0], block_idx, out[1]) if return_lse else (out, block_idx)


def dense_attention(q, k, v, *, impl: str = "auto"):
    """Causal GQA softmax attention (the dense baseline). On a GPU, impl="auto" uses cuDNN."""
    backend = _backend(impl)
    _check_qkv(q, k, v)
    if impl == "auto" and _cudnn_ok(q):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _jit(backend.dense_attention)(q, k, v)


def _cudnn_ok(q) -> bool:
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int = 128, lse=None, impl: str = "auto"):
    """KL(stop_grad(teacher) || student) on the support, mean over (batch, query, group).

    block_idx=None takes the full causal support (dense warmup). Gradients reach iq and ik only.
    lse: optional float32 [B, T, H_q], the main branch's log-sum-exp over the same support
    (`sparse_attention(..., return_lse=True)`), which is the teacher's normaliser (spec 6.1): the
    fused pallas KL reuses it instead of recomputing it; the other backends do not need it.
    """
    backend = _backend(impl)
    _check_qkv(q, k)
    _check_index(iq, ik, k)
    if block_idx is not None:
        _check_block_idx(block_idx, k)
        block_idx = block_idx.astype(jnp.int32)
    _check_int("block_size", block_size, 1)
    if lse is not None:
        if getattr(lse, "shape", None) != q.shape[:3]:
            _fail("lse", f"shape {q.shape[:3]} ([B, T, H_q])", getattr(lse, "shape", type(lse)))
        lse = jax.lax.stop_gradient(jnp.asarray(lse, jnp.float32))
    return _jit(backend.index_kl_loss, "block_size")(q, k, iq, ik, block_idx, block_size=block_size, lse=lse)


def selection_recall(q, k, block_idx, *, block_size: int = 128, top_k: int = 16, impl: str = "auto"):
    """(block recall, score recall) of block_idx against the top_k blocks by attention mass.

    Averaged over queries that see more than top_k blocks; (1.0, 1.0) when there are none.
    """
    backend = _backend(impl)
    _check_qkv(q, k)
    _check_block_idx(block_idx, k)
    _check_int("block_size", block_size, 1)
    _check_int("top_k", top_k, 1)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    fn = _jit(backend.selection_recall, "block_size", "top_k")
    return fn(q, k, block_idx.astype(jnp.int32), block_size=block_size, top_k=top_k)
