"""Constants and small helpers shared by the kernels: masking, base-2 exponentials, Triton limits,
power-of-two sizes, the interpret-mode default, the always-selected local blocks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked logits: rows that have seen nothing keep a finite running
# max, so exp2(m_prev - m_next) never becomes NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_DOT = 16  # Triton dots need >= 16 rows / columns
# The Triton lowering addresses every operand of a pallas_call with int32 element offsets: each
# operand of one call must have fewer elements than this.
INT32_LIMIT = 2**31
KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)  # input dtypes of the attention kernels


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_dim(d: int) -> int:
    """A feature dim padded for the dots: a power of two >= MIN_DOT."""
    return max(MIN_DOT, next_pow2(d))


def interpret_mode(interpret: bool | None) -> bool:
    """None: run in the Pallas interpreter unless the default backend is a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def local_block_ids(local, local_blocks: int):
    """int32 [..., local_blocks]: the always-selected blocks of queries whose own block is `local`
    [...] (-1: a padding query): local, local - 1, ..., local - local_blocks + 1, -1 below block 0."""
    ids = local[..., None] - jnp.arange(local_blocks, dtype=jnp.int32)
    return jnp.where((local[..., None] >= 0) & (ids >= 0), ids, -1).astype(jnp.int32)
