"""Argument checks shared by the public ops (`msa_jax.ops`) and the kernels (`pallas/`).

Every check raises ValueError("<argument>: expected <what>, got <what was passed>"). Shapes:
q [B, T, H_q, D]; k, v [B, T, H_kv, D]; iq [B, T, H_kv, D_idx]; ik [B, T, D_idx];
block_idx integer [B, T, H_kv, top_k]. `dtypes` restricts the floating dtypes (the kernels take
bfloat16 / float32 only); None accepts any floating dtype.
"""

from __future__ import annotations

from typing import NoReturn

import jax.numpy as jnp

__all__ = [
    "fail",
    "check_int",
    "check_pow2",
    "check_ndim",
    "check_shape",
    "check_floating",
    "check_qkv",
    "check_index",
    "check_block_idx",
]


def fail(name: str, expected: str, got) -> NoReturn:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(name, f"an int >= {minimum}", repr(value))


def check_pow2(name: str, value, minimum: int = 1) -> None:
    """A power of two >= minimum."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum and value & (value - 1) == 0
    if not ok:
        fail(name, "a power of two" + (f" >= {minimum}" if minimum > 1 else ""), repr(value))


def check_ndim(name: str, x, ndim: int, layout: str) -> None:
    if not hasattr(x, "shape") or getattr(x, "ndim", None) != ndim:
        fail(name, f"a {ndim}-d array {layout}", getattr(x, "shape", type(x).__name__))


def check_shape(name: str, x, shape: tuple, layout: str) -> None:
    if getattr(x, "shape", None) != tuple(shape):
        fail(name, f"shape {tuple(shape)} ({layout})", getattr(x, "shape", type(x).__name__))


def _dtype_name(d) -> str:
    return jnp.dtype(d).name


def check_floating(name: str, x, dtypes=None) -> None:
    """x has a floating dtype (one of `dtypes` when given)."""
    if dtypes is None:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            fail(name, "a floating dtype", x.dtype)
    elif x.dtype not in tuple(jnp.dtype(d) for d in dtypes):
        fail(name, "dtype " + " or ".join(_dtype_name(d) for d in dtypes), x.dtype)


def check_qkv(q, k, v=None, *, dtypes=None) -> None:
    """q [B, T, H_q, D], k (and v) [B, T, H_kv, D] with H_kv dividing H_q, one floating dtype."""
    check_ndim("q", q, 4, "[B, T, H_q, D]")
    check_ndim("k", k, 4, "[B, T, H_kv, D]")
    check_floating("q", q, dtypes)
    B, T, H_q, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        fail("k", f"shape [B={B}, T={T}, H_kv, D={D}] matching q", k.shape)
    if k.shape[2] < 1 or H_q % k.shape[2]:
        fail("q", f"a head count H_q divisible by H_kv={k.shape[2]} (GQA)", f"H_q={H_q}")
    if k.dtype != q.dtype:
        fail("k", f"dtype {q.dtype} (same as q)", k.dtype)
    if v is not None:
        check_ndim("v", v, 4, "[B, T, H_kv, D]")
        if v.shape != k.shape:
            fail("v", f"shape {k.shape} (same as k)", v.shape)
        if v.dtype != q.dtype:
            fail("v", f"dtype {q.dtype} (same as q)", v.dtype)


def check_index(iq, ik, k=None, *, dtypes=None) -> None:
    """iq [B, T, H_kv, D_idx], ik [B, T, D_idx], one floating dtype; B, T, H_kv those of k if given."""
    check_ndim("iq", iq, 4, "[B, T, H_kv, D_idx]")
    check_ndim("ik", ik, 3, "[B, T, D_idx]")
    if k is not None:
        B, T, H_kv = k.shape[:3]
        if iq.shape[:3] != (B, T, H_kv):
            fail("iq", f"shape [B={B}, T={T}, H_kv={H_kv}, D_idx]", iq.shape)
    B, T, _, D_idx = iq.shape
    if ik.shape != (B, T, D_idx):
        fail("ik", f"shape [B={B}, T={T}, D_idx={D_idx}]", ik.shape)
    check_floating("iq", iq, dtypes)
    if ik.dtype != iq.dtype:
        fail("ik", f"dtype {iq.dtype} (same as iq)", ik.dtype)


def check_block_idx(block_idx, k) -> None:
    """block_idx integer [B, T, H_kv, top_k >= 1], B, T, H_kv those of k."""
    check_ndim("block_idx", block_idx, 4, "[B, T, H_kv, top_k]")
    B, T, H_kv = k.shape[:3]
    if block_idx.shape[:3] != (B, T, H_kv):
        fail("block_idx", f"shape [B={B}, T={T}, H_kv={H_kv}, top_k]", block_idx.shape)
    if block_idx.shape[3] < 1:
        fail("block_idx", "at least one slot (top_k >= 1)", block_idx.shape)
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        fail("block_idx", "an integer dtype (int32)", block_idx.dtype)
