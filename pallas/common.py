"""Small helpers shared by the kernels: constants, power-of-two sizes, argument checks."""

from __future__ import annotations

import math

import jax.numpy as jnp

# Finite "minus infinity" for masked logits: rows that have seen nothing keep a finite running
# max, so exp2(m_prev - m_next) never becomes NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_DOT = 16  # Triton dots need >= 16 rows / columns


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def check_attention_args(q, k, v, block_idx, block_size) -> tuple[int, int, int, int, int, int]:
    """Validate the main-branch arguments; returns (B, T, H_q, D, H_kv, top_k)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("block_idx", block_idx)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}: expected a 4-d array, got {getattr(x, 'shape', type(x))}")
    B, T, H_q, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k, v: expected shape [B={B}, T={T}, H_kv, D={D}], got {k.shape}, {v.shape}")
    H_kv = k.shape[2]
    if H_q % H_kv:
        raise ValueError(f"H_q={H_q} must be a multiple of H_kv={H_kv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"q, k, v: expected one dtype, bfloat16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_idx.shape[:3] != (B, T, H_kv) or block_idx.shape[3] < 1:
        raise ValueError(f"block_idx: expected [B={B}, T={T}, H_kv={H_kv}, top_k>=1], got {block_idx.shape}")
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        raise ValueError(f"block_idx: expected an integer dtype, got {block_idx.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    return B, T, H_q, D, H_kv, block_idx.shape[3]
