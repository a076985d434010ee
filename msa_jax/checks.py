"""Argument checks shared by the public ops (`msa_jax.ops`) and the kernels (`pallas/`).

Every check raises ValueError("<argument>: expected <what>, got <what was passed>"). Shapes:
q [B, T, H_q, D]; k, v [B, T, H_kv, D]; iq [B, T, H_kv, D_idx]; ik [B, T, D_idx];
block_idx integer [B, T, H_kv, top_k]. `dtypes` restricts the floating dtypes (the kernels take
bfloat16 / float32 only); None accepts any floating dtype. cached=True: S queries against a cache
of L keys (q, iq, block_idx have S rows, k, v, ik have L; docs/algorithm.md §3.6), positions
q_pos int [B, S].
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
    "check_q_pos",
    "check_ik_scale",
]


def fail(name: str, expected: str, got) -> NoReturn:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(name, f"an int >= {minimum}", repr(value))


def check_local_blocks(local_blocks, top_k: int) -> None:
    """Always-selected local blocks: at least the query's own, at most top_k."""
    check_int("local_blocks", local_blocks, 1)
    if local_blocks > top_k:
        fail("local_blocks", f"an int <= top_k ({top_k})", repr(local_blocks))


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


def check_qkv(q, k, v=None, *, dtypes=None, cached: bool = False) -> None:
    """q [B, T, H_q, D], k (and v) [B, T, H_kv, D] with H_kv dividing H_q, one floating dtype.
    cached: k, v [B, L, H_kv, D] with any L >= 1."""
    check_ndim("q", q, 4, "[B, T, H_q, D]")
    check_ndim("k", k, 4, "[B, L, H_kv, D]" if cached else "[B, T, H_kv, D]")
    check_floating("q", q, dtypes)
    B, T, H_q, D = q.shape
    if cached:
        if k.shape[0] != B or k.shape[1] < 1 or k.shape[3] != D:
            fail("k", f"shape [B={B}, L >= 1, H_kv, D={D}] (a cache for q)", k.shape)
    elif k.shape[:2] != (B, T) or k.shape[3] != D:
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


def check_index(iq, ik, k=None, *, dtypes=None, cached: bool = False, scaled: bool = False) -> None:
    """iq [B, T, H_kv, D_idx], ik [B, T, D_idx], one floating dtype; B, T, H_kv those of k if given.
    cached: ik [B, L, D_idx] (L those of k if given; iq has the queries' T = S). scaled: ik may
    also be float8_e4m3fn (dequantised with a scale)."""
    check_ndim("iq", iq, 4, "[B, T, H_kv, D_idx]")
    check_ndim("ik", ik, 3, "[B, L, D_idx]" if cached else "[B, T, D_idx]")
    B, T, _, D_idx = iq.shape
    if k is not None:
        want = (k.shape[0], T if cached else k.shape[1], k.shape[2])
        if iq.shape[:3] != want:
            fail("iq", f"shape [B={want[0]}, T={want[1]}, H_kv={want[2]}, D_idx]", iq.shape)
    L = (k.shape[1] if k is not None else ik.shape[1]) if cached else T
    if ik.shape != (B, L, D_idx):
        fail("ik", f"shape [B={B}, {'L' if cached else 'T'}={L}, D_idx={D_idx}]", ik.shape)
    check_floating("iq", iq, dtypes)
    if ik.dtype != iq.dtype and not (scaled and ik.dtype == jnp.float8_e4m3fn):
        fail("ik", f"dtype {iq.dtype} (same as iq)" + (" or float8_e4m3fn" if scaled else ""), ik.dtype)


def check_block_idx(block_idx, k, n_queries: int | None = None) -> None:
    """block_idx integer [B, T, H_kv, top_k >= 1], B, T, H_kv those of k (T = n_queries if given)."""
    check_ndim("block_idx", block_idx, 4, "[B, T, H_kv, top_k]")
    B, T, H_kv = k.shape[:3]
    T = T if n_queries is None else n_queries
    if block_idx.shape[:3] != (B, T, H_kv):
        fail("block_idx", f"shape [B={B}, T={T}, H_kv={H_kv}, top_k]", block_idx.shape)
    if block_idx.shape[3] < 1:
        fail("block_idx", "at least one slot (top_k >= 1)", block_idx.shape)
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        fail("block_idx", "an integer dtype (int32)", block_idx.dtype)


def check_q_pos(q_pos, B: int, S: int) -> None:
    """Query positions: an integer array [B, S] (-1 = padding query)."""
    check_shape("q_pos", q_pos, (B, S), "[B, S] positions of the queries")
    if not jnp.issubdtype(q_pos.dtype, jnp.integer):
        fail("q_pos", "an integer dtype (int32)", q_pos.dtype)


def check_ik_scale(ik_scale, ik, block_size: int) -> None:
    """A float32 dequantisation scale of the index keys ik [B, L, D_idx]: per token [B, L] or per
    block [B, ceil(L / block_size)]."""
    B, L = ik.shape[:2]
    shapes = {(B, L), (B, -(-L // block_size))}
    if getattr(ik_scale, "shape", None) not in shapes:
        fail("ik_scale", f"shape [B={B}, L={L}] (per token) or [B, {-(-L // block_size)}] (per block)",
             getattr(ik_scale, "shape", type(ik_scale).__name__))
    check_floating("ik_scale", ik_scale)
