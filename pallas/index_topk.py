"""Fused MSA indexer: score GEMM + causal mask + block max + streaming top-k (Pallas, Triton).

Computes exactly what `msa_jax.ops.reference.select_blocks` computes (MSA_SPEC.md section 3):

    s[i, r, j]  = <iq[i, r], ik[j]> / sqrt(D_idx)                       (float32, j <= i)
    bs[i, r, c] = max over visible tokens j of block c of s[i, r, j]
    sel[i, r]   = local block i // block_size, then the sink blocks (lower id first), then the
                  other visible blocks by bs descending (ties: lower block id), top_k in all.

Output: int32 [B, T, H_kv, top_k], selected ids ascending, -1 padding after.

Design
------
* `iq [B, T, H_kv, D]` is viewed (free reshape) as `[B, T*H_kv, D]`: row `m = t*H_kv + r`. One
  program owns `block_q` consecutive rows (all groups of `block_q / H_kv` tokens), so a key tile
  loaded once serves every group, and any H_kv (3 included) keeps power-of-two tiles.
  Grid = (row tiles, B); row tiles are launched in reverse order (longest causal rows first).
* The program loops (`lax.fori_loop`, dynamic trip count = last visible block of its rows) over key
  tiles of `bk` rows. A tile holds `nsub` whole index blocks (`nsub = 1` when
  `block_size >= 16`; several blocks per tile for tiny blocks, because Triton dots need >= 16
  columns); `bk = next_pow2(nsub * block_size)`, extra columns are masked.
  Per tile: `S = iq_tile @ ik_tile.T` (f32 accumulation; f32 inputs use IEEE precision, not TF32),
  causal mask `j <= t` to -inf (a second loop: key tiles wholly before the program's first
  token skip the mask), per-block row max, times `1/sqrt(D_idx)` (after the max: rounding
  is monotone, so this is bit-identical to the oracle's `max(s * scale)`).
* Streaming top-k over the `top_k - 1` non-local slots, held in registers as two
  `[block_q, P]` arrays (values f32, ids int32; `P = max(2, next_pow2(min(top_k, n_blocks) -
  1))`; top_k = 1 or a single block needs no kernel at all), padding slots are
  pinned at +inf so they are never evicted). Blocks arrive in ascending id order, so a candidate
  replaces the worst slot iff its value is STRICTLY greater (equal scores: the earlier, lower id
  stays). Worst slot = minimum value, among equal minima the highest id (ids of empty slots are
  distinct negatives, so this is one min + one max reduction, no sort). Sink blocks enter with
  value +inf (ascending arrival => lower sink id wins ties among sinks); the local block is
  excluded from the stream (value -inf never enters) and appended in the wrapper; invisible and
  padded blocks are -inf and never enter.
* Epilogue in plain JAX on the small [B, T, H_kv, top_k] result: add the local block, sort
  ascending with -1 last, pad to top_k.

On chip: the query tile [block_q, D], one key tile [bk, D], the score tile [block_q, bk] (f32)
and the running top-k state [block_q, P] x 2. The [T, T] scores and the [T, T/block_size] block
scores are never written to HBM; HBM traffic = iq once + ik once per row tile (reads that mostly
hit L2, since concurrent programs sweep the keys in the same order) + the int32 output.

FLOPs (2 per multiply-add): the useful causal work is `2 * D_idx * T^2 / 2 = D_idx * T^2` per
(batch, group), i.e. `H_kv * D_idx * T^2` per batch element (the spec's index term, section 5).
Whole tiles are computed up to the diagonal, so the kernel issues about
`H_kv * D_idx * T * (T + bk + block_q / H_kv)`, where `bk` = key-tile rows (= block_size for
power-of-two blocks >= 16): +2% at T = 8K with the paper shapes, negligible at long T. The top-k
update is ~10 elementwise ops and 2 row reductions on `[block_q, P]` per (row tile, block):
`~10 * H_kv * T * (T / block_size) / 2 * P` scalar ops, small next to the GEMM when
`2 * D_idx * block_size >> 10 * P` (paper shapes: 32768 vs 160). No exp, no softmax.

Limits: the Triton lowering addresses operands with int32 element offsets, so the batch is split
into several calls when `B * T * H_kv * D_idx` would pass 2**31 (one sequence must stay below it:
T * H_kv * D_idx < 2**31, i.e. T < 4M at H_kv = 4, D_idx = 128). Under `jax.vmap` the vmapped
axis multiplies into the same limit and is not split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas.common import next_pow2 as _next_pow2

__all__ = ["select_blocks"]

_INF = float("inf")
_DEFAULT_BLOCK_Q = 64
_MIN_DOT = 16  # Triton dots need >= 16 rows / columns / contraction
_MAX_CALL_ELEMS = 2**31 - 1  # per operand of one pallas_call (int32 offsets in the lowering)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _index_topk_kernel(iq_ref, ik_ref, o_ref, *, seq_len: int, n_kv: int, block_size: int,
                       nsub: int, bk: int, block_q: int, n_slots: int, n_pad_slots: int,
                       sink_blocks: int, scale: float, n_row_tiles: int, precision):
    """One program: rows [m0, m0 + block_q) of the flattened (token, group) axis of one batch."""
    tile = n_row_tiles - 1 - pl.program_id(0)  # heavy (late) tiles launch first
    m0 = tile * block_q
    rows = m0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    tok = lax.div(rows, jnp.int32(n_kv))  # query token of each row
    local = lax.div(tok, jnp.int32(block_size))  # its local block
    tok_col = tok[:, None]

    # Last key tile any row of this program can see (rows past the end of the sequence are
    # padding: clamp so that they never make the loop read past the padded keys).
    t_last = jnp.minimum(lax.div(m0 + (block_q - 1), n_kv), seq_len - 1)
    n_key_tiles = lax.div(lax.div(t_last, block_size), nsub) + 1

    q = iq_ref[...]  # [block_q, D]

    slot = lax.broadcasted_iota(jnp.int32, (block_q, n_pad_slots), 1)
    vals0 = jnp.where(slot < n_slots, -_INF, _INF).astype(jnp.float32)
    ids0 = -1 - slot  # distinct negatives: "empty", never a block id
    col = lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    col_blk = lax.div(col, jnp.int32(block_size))  # sub-block of each key column
    tile_keys = nsub * block_size  # keys of the whole blocks in one key tile

    def insert(vals, ids, v, c):
        worst = jnp.min(vals, axis=1)  # [block_q]
        worst_id = jnp.max(jnp.where(vals == worst[:, None], ids, jnp.iinfo(jnp.int32).min),
                           axis=1)
        rep = (ids == worst_id[:, None]) & (v > worst)[:, None]
        return jnp.where(rep, v[:, None], vals), jnp.where(rep, c, ids)

    def body(kt, carry, *, causal: bool):
        vals, ids = carry
        k0 = kt * tile_keys
        k = ik_ref[pl.ds(k0, bk), :]  # [bk, D]
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [block_q, bk] f32
        if causal:  # also hides the padded keys
            s = jnp.where(k0 + col <= tok_col, s, -_INF)
        for sub in range(nsub):
            c = kt * nsub + sub  # block id, ascending over the whole loop
            if nsub == 1 and bk == block_size:
                bmax = jnp.max(s, axis=1)
            else:
                bmax = jnp.max(jnp.where(col_blk == sub, s, -_INF), axis=1)
            v = bmax * scale
            if sink_blocks > 0:
                v = jnp.where((c < sink_blocks) & (c < local), _INF, v)
            v = jnp.where(c == local, -_INF, v)  # the local block is added by the wrapper
            vals, ids = insert(vals, ids, v, c)
        return vals, ids

    # Key tiles entirely at or before the first token of this program need no causal mask.
    n_full = jnp.minimum(lax.div(lax.div(m0, n_kv) + 1, tile_keys), n_key_tiles)
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False), (vals0, ids0))
    _, ids = lax.fori_loop(n_full, n_key_tiles, functools.partial(body, causal=True), carry)
    o_ref[...] = ids


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "top_k", "sink_blocks", "block_q", "interpret", "num_warps",
                     "num_stages"),
)
def _select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int, block_q: int | None,
                   interpret: bool, num_warps: int | None, num_stages: int | None):
    B, T, H, D = iq.shape
    nb = _cdiv(T, block_size)
    local = (jnp.arange(T, dtype=jnp.int32) // block_size)[None, :, None, None]
    local = jnp.broadcast_to(local, (B, T, H, 1))
    n_slots = min(top_k - 1, nb - 1)  # non-local blocks that can ever be selected

    if n_slots == 0:  # only the local block is ever selected: nothing to rank
        out = local
    else:
        R = T * H
        if block_q is None:
            block_q = min(_DEFAULT_BLOCK_Q, max(_MIN_DOT, _next_pow2(R)))
        n_row_tiles = _cdiv(R, block_q)
        n_pad_slots = max(2, _next_pow2(n_slots))
        d_pad = max(_MIN_DOT, _next_pow2(D))
        nsub = max(1, _MIN_DOT // block_size)
        bk = max(_MIN_DOT, _next_pow2(nsub * block_size))
        # Keys the loop may read: tiles up to the one holding the last block, each bk rows.
        n_keys = (_cdiv(nb, nsub) - 1) * nsub * block_size + bk

        q2 = iq.reshape(B, R, D)
        pad_r = n_row_tiles * block_q - R
        if pad_r or d_pad != D:
            q2 = jnp.pad(q2, ((0, 0), (0, pad_r), (0, d_pad - D)))
        k2 = ik
        if n_keys > T or d_pad != D:
            k2 = jnp.pad(k2, ((0, 0), (0, max(0, n_keys - T)), (0, d_pad - D)))
        n_keys_arr = k2.shape[1]

        precision = lax.Precision.HIGHEST if iq.dtype == jnp.float32 else None
        kernel = functools.partial(
            _index_topk_kernel, seq_len=T, n_kv=H, block_size=block_size, nsub=nsub, bk=bk,
            block_q=block_q, n_slots=n_slots, n_pad_slots=n_pad_slots, sink_blocks=sink_blocks,
            scale=D ** -0.5, n_row_tiles=n_row_tiles, precision=precision)
        if num_warps is None:
            num_warps = 4 if block_q * bk <= 64 * 128 else 8
        if num_stages is None:
            num_stages = 2

        def call(q_chunk, k_chunk):
            nbatch = q_chunk.shape[0]
            return pl.pallas_call(
                kernel,
                grid=(n_row_tiles, nbatch),
                in_specs=[
                    pl.BlockSpec((None, block_q, d_pad),
                                 lambda i, b: (b, n_row_tiles - 1 - i, 0)),
                    pl.BlockSpec((None, n_keys_arr, d_pad), lambda i, b: (b, 0, 0)),
                ],
                out_specs=pl.BlockSpec((None, block_q, n_pad_slots),
                                       lambda i, b: (b, n_row_tiles - 1 - i, 0)),
                out_shape=jax.ShapeDtypeStruct((nbatch, n_row_tiles * block_q, n_pad_slots),
                                               jnp.int32),
                compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                     num_stages=num_stages),
                interpret=interpret,
                name="msa_index_topk",
            )(q_chunk, k_chunk)

        # The Triton lowering addresses every operand with int32 element offsets: keep each
        # call's operands below 2**31 elements by splitting the batch (B * T * H_kv * D_idx
        # reaches 2**31 at T = 1M, H_kv = 4, D_idx = 128, B = 4).
        per_batch = max(q2.shape[1] * d_pad, n_keys_arr * d_pad,
                        n_row_tiles * block_q * n_pad_slots)
        if per_batch > _MAX_CALL_ELEMS:
            raise ValueError(f"one sequence needs {per_batch} elements in one operand, more than "
                             f"the int32 offsets of the Triton lowering allow")
        chunk = _MAX_CALL_ELEMS // per_batch
        if chunk >= B:
            slots = call(q2, k2)
        else:
            slots = jnp.concatenate([call(q2[b0:b0 + chunk], k2[b0:b0 + chunk])
                                     for b0 in range(0, B, chunk)], axis=0)
        slots = slots[:, :R, :n_slots].reshape(B, T, H, n_slots)
        slots = jnp.where(slots < 0, -1, slots)
        out = jnp.concatenate([slots, local], axis=-1)  # [B, T, H, n_slots + 1]

    # Canonical layout: ascending ids, -1 last, width top_k.
    big = jnp.iinfo(jnp.int32).max
    out = jnp.sort(jnp.where(out < 0, big, out), axis=-1)
    out = jnp.where(out == big, -1, out)
    if out.shape[-1] < top_k:
        out = jnp.pad(out, ((0, 0), (0, 0), (0, 0), (0, top_k - out.shape[-1])),
                      constant_values=-1)
    return out.astype(jnp.int32)


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0,
                  block_q: int | None = None, interpret: bool | None = None) -> jax.Array:
    """MSA block selection (spec section 3), fused in one Pallas kernel.

    Args:
      iq: [B, T, H_kv, D_idx] index queries (bfloat16 / float16 / float32).
      ik: [B, T, D_idx] index keys, same dtype as iq.
      block_size: KV block size (tokens).
      top_k: blocks selected per (token, group), local block included.
      sink_blocks: the first `sink_blocks` blocks are always selected when visible (ablation).
      block_q: rows per program along the flattened (token, group) axis `T * H_kv` (a power of
        two >= 16; one program covers `block_q / H_kv` tokens, all groups). Default 64 (smaller
        for tiny inputs).
      interpret: run the kernel in the Pallas interpreter. None: True unless the default
        backend is "gpu".

    Returns:
      int32 [B, T, H_kv, top_k]: selected block ids ascending, then -1 padding. Identical to
      `msa_jax.ops.reference.select_blocks` (given the same float32 scores).
    """
    if iq.ndim != 4 or ik.ndim != 3:
        raise ValueError(f"expected iq [B, T, H_kv, D] and ik [B, T, D], got {iq.shape=}, "
                         f"{ik.shape=}")
    B, T, H, D = iq.shape
    if ik.shape != (B, T, D):
        raise ValueError(f"ik shape {ik.shape} does not match iq shape {iq.shape}")
    if iq.dtype != ik.dtype or not jnp.issubdtype(iq.dtype, jnp.floating):
        raise ValueError(f"iq and ik need the same float dtype, got {iq.dtype} and {ik.dtype}")
    if iq.dtype == jnp.float64:
        raise ValueError("float64 is not supported; use float32")
    if block_size < 1 or top_k < 1 or sink_blocks < 0:
        raise ValueError(f"need block_size >= 1, top_k >= 1, sink_blocks >= 0; got "
                         f"{block_size=}, {top_k=}, {sink_blocks=}")
    if block_q is not None and (block_q < _MIN_DOT or block_q & (block_q - 1)):
        raise ValueError(f"block_q must be a power of two >= {_MIN_DOT}, got {block_q}")
    if T == 0:
        return jnp.zeros((B, 0, H, top_k), jnp.int32)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _select_blocks(iq, ik, block_size=int(block_size), top_k=int(top_k),
                          sink_blocks=int(sink_blocks), block_q=block_q, interpret=bool(interpret),
                          num_warps=None, num_stages=None)
