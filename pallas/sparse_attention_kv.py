"""MSA main branch, forward, KV-outer: reverse index, one KV block per program, per-slot partials.

Contract (MSA_SPEC.md section 4; the same as `pallas.sparse_attention.sparse_attention_fwd`)::

    out, lse = sparse_attention_fwd(q, k, v, block_idx, block_size=..., block_q=None, interpret=None)

q [B, T, H_q, D]; k, v [B, T, H_kv, D] (same dtype, bfloat16 or float32); H_q = G * H_kv and query
head h belongs to group h // G. block_idx int32 [B, T, H_kv, top_k]: for token i and group r the
selected KV block ids (valid ids in any order, -1 padding, valid ids <= i // block_size, the local
block among them). Ids outside [0, i // block_size] are ignored (they hold only keys j > i) and
duplicate ids in a row count once. Returns out [B, T, H_q, D] in q.dtype (exact softmax attention of
query (i, h) over the keys j <= i of the blocks listed for (i, h // G), logits q.k / sqrt(D),
float32 accumulation) and lse float32 [B, T, H_q] (natural log of sum_j exp(logit_j)). `out`
matches `msa_jax.ops.reference.sparse_attention`.

Design ("KV-outer with a reverse index, per-slot partials and a combine")
-------------------------------------------------------------------------
Why: the query-outer kernel multiplies a tile of block_q tokens with the *union* of their blocks
(~3x the needed MMA work with scattered selections) and each K/V load feeds only M = 64 rows. Here
every MMA row is a (token, head) that really selected the block being multiplied.

1. Wrapper, plain JAX, O(T * top_k) integer work per (b, r) = row of B*H_kv. Ids are cleaned (ids
   outside [0, i // block_size] -> -1), each token's top_k ids are sorted and repeats become -1.
   The (token i, slot s) pairs with a valid block id c are sorted by (c, i) (one argsort of the
   int32 key c * T_chunk + i per row), segmented by c, and every segment is padded to a multiple of
   BQ (query tokens per tile). That gives, per row:
   * tok [P]: chunk-local token id of every padded position (-1 = padding);
   * tiles [n_tiles]: block id c of tile t, which covers padded positions [t*BQ, (t+1)*BQ)
     (-1 = unused tile); tiles are contiguous in the padded list, so the start is t*BQ;
   * inv [T_chunk, top_k]: padded position of each (token, slot) pair (-1 = empty slot).
   n_tiles is a static bound: ceil((T_chunk * min(top_k, n_blocks) + n_blocks * (BQ - 1)) / BQ) and
   P = n_tiles * BQ. Unused tiles cost one int load.
2. Kernel, grid (n_tiles, B*H_kv) (tiles first: CUDA x axis, no 65535 limit; consecutive programs
   work on the same block c, so K_c / V_c and often the same query rows are L2 hits). A program
   reads c = tiles[t] and returns unless c >= 0 (pl.when). It loads K_c, V_c [kv_tile, D_pad] once
   (kv_tile = max(block_size, 16)), gathers its M = BQ * G_pad query rows from q laid out
   [B*H_kv, T_chunk*G_pad, D_pad] (token-major, head-minor; row m is token tok[t*BQ + m // G_pad],
   head m % G_pad: a gather load with an index vector), S = Q K_c^T (float32) * scale * log2(e),
   masks keys j > query position (and padding rows, and for block_size 8 the second half of the
   16-row K tile), p = exp2(S - rowmax), l = rowsum p, o = (p V_c) / l, lse = (rowmax + log2 l) ln 2.
   Rows with an empty mask (padding) write o = 0, lse = -inf: no NaN. o goes to a partial buffer
   [B*H_kv, P*G_pad, D_pad] at rows [t*M, (t+1)*M) (contiguous), lse to [B*H_kv, P*G_pad] float32.
3. Combine, plain JAX: for every (b, i, r) gather the top_k partial (o, lse) of its slots through
   inv (empty slot: lse = -inf), lse = logsumexp over slots, out = sum_s exp(lse_s - lse) o_s.
   Written as a Python loop over the slots (one [T_chunk, G_pad, D_pad] gather + FMA per slot, fused
   by XLA), so nothing of shape [.., top_k, G, D] in float32 is materialised.
Hot blocks (picked by nearly every query, e.g. block 0) just get many tiles: no special case.

Query chunks. The partial buffer holds T * top_k * H_q * D values (see below), which exceeds both
int32 element offsets and a sensible memory budget at long T. The wrapper therefore processes the
queries in chunks of T_chunk tokens (`lax.map` over equal chunks, K/V shared; default: the largest
balanced chunk whose partial buffer has <= 2**30 elements, or `query_chunk` tokens), each chunk
with its own reverse index, kernel call and combine. The chunk start q0 reaches the kernel as a
small int32 operand (for the causal mask: query position = q0 + chunk-local token).

Cost (paper config: B=1, H_q=64, H_kv=4, G=16, D=128, block_size=128, top_k=16, bf16)
-------------------------------------------------------------------------------------
* FLOPs. Effective (PERF.md): 4 * H_q * D * T * top_k * block_size per batch element, minus the
  causal padding of the local block (~2 * H_q * D * T * block_size). Executed: 4 * M * D_pad *
  kv_tile per used tile; the used tiles have sum_c ceil(n_c / BQ) * BQ >= n_valid rows of tokens,
  so the waste is the segment padding (< n_blocks * (BQ - 1) tokens per row and chunk: ~3% at
  T_chunk ~ 7.7K, BQ = 8) times G_pad / G for G not a power of two. No union waste.
* Bytes per tile (s = bytes of q.dtype): Q gather M * D_pad * s in, partial o M * D_pad * s out
  (+ M * 4 lse, BQ * 4 ids), K_c + V_c 2 * kv_tile * D_pad * s (mostly L2 hits: consecutive
  programs share c). FLOPs per tile 4 * M * D * block_size, so FLOP/byte ~ 4 * M * D * bs /
  (2 * M * D * s) = 2 * bs / s = 128 for bf16, bs = 128, independent of M: ~430 TFLOP/s at 3.35
  TB/s is the ceiling of this design (Q gather + partial write at full HBM bandwidth).
* Partial buffer: T * top_k * H_q * D * s bytes over all chunks (34 GB at T = 128K in bf16), held
  one chunk at a time: <= 2**30 elements per chunk by default (2 GiB bf16, 4 GiB f32) plus the
  lse partials (1/D_pad of that in float32: 32 MiB per chunk at the paper config).
* Combine: reads the partials once more (T * top_k * H_q * D * s bytes) and writes out: about the
  same HBM traffic as the kernel's partial write, i.e. ~10 ms at T = 128K (paper config) at ~3.3
  TB/s, next to ~22 ms of MMA at 400 TFLOP/s. Its temporaries per chunk: the float32 accumulator
  [B*H_kv, T_chunk, G_pad, D_pad] (~250 MiB at the default chunk of the paper config) and the
  [B*H_kv, T_chunk, top_k, G_pad] lse weights. A fused Pallas combine (or fusing it into the next
  op) is the next step if it shows in profiles.
* End to end, kernel + combine move 3 * M * D * s bytes per 4 * M * D * bs FLOPs (Q in, partial
  out, partial in again): ~85 FLOP/B, i.e. a byte floor of ~31 ms at T = 128K (~285 TFLOP/s
  effective at 3.35 TB/s) before the q / out re-layouts. Reaching >= 400 end to end needs fewer
  partial bytes (e.g. one partial per token for the blocks it shares with its neighbours, or a
  narrower partial dtype), not a faster kernel alone.
* Wrapper: per chunk one argsort of [B*H_kv, T_chunk * top_k] int32 plus a few scatters; the q
  re-layout and the out transpose are one extra HBM pass each.

Accuracy. float32 inputs: IEEE-precision dots, float32 partials: matches the oracle to ~1e-6.
bfloat16 inputs: the partial o of every slot is rounded to bfloat16 before the combine (one extra
rounding, relative 2**-9 per slot, averaged over the slots), on top of bf16 P @ V as in any flash
kernel. Measured (interpret mode, T=256, G=16, D=128, block 32, top_k 4, indexer selections) against
the float32 oracle: max |err| 7.8e-3 for both this kernel and the query-outer one (the final bf16
rounding of out dominates), mean |err| 2.6e-4 here vs 1.8e-4 there (~1.5x); lse is float32
throughout (~5e-7). Float32 partials would double the partial bytes (and halve the FLOP/byte).

Limits: the Triton lowering computes int32 element offsets per operand over the whole array: every
operand of one call must have < 2**31 elements. Partial buffer and q chunk are kept below that by
the chunking; k, v ([B*H_kv, T_kv_pad, D_pad]) must be < 2**31 elements themselves (T < 4M at the
paper heads). The checks do not see a vmap batch axis (it multiplies every operand's size): keep
vmapped batches inside the same limit. The argsort key c * T_chunk + i must fit int32 (else a
stable argsort of c is used). On GPU block_size must be a power of two and BQ * G_pad >= 16
(Triton dots need >= 16 rows).
Forward only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas.common import LN2 as _LN2
from pallas.common import LOG2E as _LOG2E
from pallas.common import MASK_VALUE, check_attention_args
from pallas.common import MIN_DOT as _MIN_DOT
from pallas.common import is_pow2 as _is_pow2
from pallas.common import next_pow2 as _next_pow2

__all__ = ["sparse_attention_fwd"]


_TARGET_M = 128  # MMA rows per tile (BQ * G_pad)
_PARTIAL_ELEMENTS = 2**30  # default cap on the partial buffer of one query chunk (elements)
_INT32_LIMIT = 2**31


# --------------------------------------------------------------------------------------- kernel


def _kv_outer_kernel(
    q0_ref,  # [16] int32: absolute position of the chunk's first token (all entries equal)
    tiles_ref,  # [n_tiles] int32: block id of every tile of this row, -1 = unused
    tok_ref,  # [NT * BQ] int32: chunk-local token of every position of this program's tiles, -1 = padding
    q_ref,  # [T_chunk * G_pad, D_pad]: the chunk's queries of this group, token-major
    k_ref,  # [T_kv_pad, D_pad]
    v_ref,  # [T_kv_pad, D_pad]
    o_ref,  # [NT * M, D_pad]: partial outputs of this program's tiles
    lse_ref,  # [NT * M] float32
    *,
    scale: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    tiles_per_program: int,  # NT: consecutive tiles handled in a loop (pipelines the loads)
):
    M = o_ref.shape[0] // tiles_per_program
    bq = M // heads
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
    first_tile = pl.program_id(0) * tiles_per_program  # read outside the loop (interpret mode)

    def tile(j, carry):
        c = tiles_ref[first_tile + j]

        @pl.when(c >= 0)
        def _():
            row_tok = tok_ref[j * bq + m_iota // heads]  # [M]: gather load of the tile's token ids
            live = row_tok >= 0
            q_rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
            q = q_ref[q_rows]  # [M, D_pad]: gather load of the query rows
            start = pl.multiple_of(c * block_size, block_size)
            k = k_ref[pl.ds(start, kv_tile), :]
            v = v_ref[pl.ds(start, kv_tile), :]
            s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)  # [M, kv_tile]

            key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
            row_pos = q0_ref[0] + row_tok  # absolute query position (garbage for padding rows)
            # key <= query position also implies key < T (real tokens have position < T).
            mask = live[:, None] & (key_pos[None, :] <= row_pos[:, None])
            if kv_tile > block_size:  # 16-row K tile for block_size 8: drop the rows of block c + 1
                mask = mask & (key_pos < start + block_size)[None, :]

            s = jnp.where(mask, s, MASK_VALUE)
            m = jnp.max(s, axis=1)
            p = jnp.where(mask, jnp.exp2(s - m[:, None]), 0.0)
            l = jnp.sum(p, axis=1)
            o = plgpu.dot(p.astype(v.dtype), v, precision=precision)
            seen = l > 0.0
            l_safe = jnp.where(seen, l, 1.0)
            off = j * M
            rows = pl.ds(off if isinstance(off, int) else pl.multiple_of(off, M), M)
            o_ref[rows, :] = (o / l_safe[:, None]).astype(o_ref.dtype)
            lse_ref[rows] = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)

        return carry

    if tiles_per_program == 1:
        tile(0, 0)
    else:
        lax.fori_loop(0, tiles_per_program, tile, 0)


# ------------------------------------------------------------------------------- reverse index


def _clean_ids(block_idx: jax.Array, block_size: int) -> jax.Array:
    """Ids outside [0, i // block_size] -> -1; sort each row; repeated ids -> -1."""
    T = block_idx.shape[1]
    ids = block_idx.astype(jnp.int32)
    local = (jnp.arange(T, dtype=jnp.int32) // block_size)[None, :, None, None]
    ids = jnp.where((ids >= 0) & (ids <= local), ids, -1)
    ids = jnp.sort(ids, axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], -1)
    return jnp.where(dup, -1, ids)


def _n_tiles(t_chunk: int, top_k: int, n_blocks: int, bq: int, nt: int = 1) -> int:
    """Static bound on the tiles of one row (every segment padded to a multiple of bq), rounded up
    to a multiple of nt (tiles per program)."""
    n_valid = t_chunk * min(top_k, n_blocks)
    n = max(1, -(-(n_valid + n_blocks * (bq - 1)) // bq))
    return -(-n // nt) * nt


def _reverse_index(ids: jax.Array, *, n_blocks: int, bq: int, n_tiles: int):
    """ids [BH, Tc, top_k] (cleaned, -1 = none) -> tiles [BH, n_tiles], tok [BH, P], inv [BH, Tc, top_k]."""
    BH, Tc, top_k = ids.shape
    N = Tc * top_k
    P = n_tiles * bq
    combined_key = (n_blocks + 1) * Tc < _INT32_LIMIT

    def row(x):
        c = x.reshape(N)
        ckey = jnp.where(c >= 0, c, n_blocks)  # invalid pairs sort last
        pair = jnp.arange(N, dtype=jnp.int32)
        if combined_key:
            perm = jnp.argsort(ckey * Tc + pair // top_k)
        else:
            perm = jnp.argsort(ckey, stable=True)  # pairs are token-major: stable = sorted by i
        perm = perm.astype(jnp.int32)
        cs = ckey[perm]  # sorted block ids
        toks = perm // top_k  # sorted tokens
        counts = jnp.zeros((n_blocks + 1,), jnp.int32).at[ckey].add(1)
        ustart = jnp.cumsum(counts) - counts  # segment starts in the sorted list
        pcounts = (counts[:n_blocks] + bq - 1) // bq * bq
        pstart = jnp.cumsum(pcounts) - pcounts  # segment starts in the padded list
        valid = cs < n_blocks
        cc = jnp.minimum(cs, n_blocks - 1)
        pos = jnp.where(valid, pstart[cc] + pair - ustart[cc], -1)  # padded position
        tok = jnp.full((P,), -1, jnp.int32).at[jnp.where(valid, pos, P)].set(toks, mode="drop")
        first = valid & (pos % bq == 0)
        tiles = jnp.full((n_tiles,), -1, jnp.int32)
        tiles = tiles.at[jnp.where(first, pos // bq, n_tiles)].set(cs, mode="drop")
        inv = jnp.zeros((N,), jnp.int32).at[perm].set(pos, unique_indices=True)
        return tiles, tok, inv.reshape(Tc, top_k)

    return jax.vmap(row)(ids)


# --------------------------------------------------------------------------------- combine


def _combine(o_part, lse_part, inv, *, G_pad: int, D_pad: int):
    """Partials [BH, P*G_pad, D_pad], [BH, P*G_pad] + inv [BH, Tc, top_k] -> out f32 [BH, Tc, G_pad,
    D_pad], lse [BH, Tc, G_pad]."""
    BH, Tc, top_k = inv.shape
    o_part = o_part.reshape(BH, -1, G_pad, D_pad)
    lse_part = lse_part.reshape(BH, -1, G_pad)

    def row(o_r, l_r, inv_r):
        valid = inv_r >= 0
        idx = jnp.maximum(inv_r, 0)
        lg = jnp.where(valid[..., None], l_r[idx], -jnp.inf)  # [Tc, top_k, G_pad]
        m = jnp.max(lg, axis=1)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(lg - m[:, None])  # 0 for empty slots
        den = jnp.sum(w, axis=1)
        ok = den > 0.0
        lse = jnp.where(ok, m + jnp.log(jnp.where(ok, den, 1.0)), -jnp.inf)
        w = w / jnp.where(ok, den, 1.0)[:, None]
        acc = jnp.zeros((Tc, G_pad, D_pad), jnp.float32)
        for s in range(top_k):  # one gather + FMA per slot; no [Tc, top_k, G, D] temporary
            acc = acc + w[:, s, :, None] * o_r[idx[:, s]].astype(jnp.float32)
        return acc, lse

    return jax.vmap(row)(o_part, lse_part, inv)


# -------------------------------------------------------------------------------------- wrapper


def _chunk_fwd(q0, qc, idc, kg, vg, *, block_size, bq, n_blocks, n_tiles, G_pad, D_pad, kv_tile,
               interpret, num_warps, num_stages, tiles_per_program):
    """One query chunk: qc [B, Tc, H_q, D], idc [B, Tc, H_kv, top_k] (cleaned) -> out, lse."""
    B, Tc, H_q, D = qc.shape
    H_kv, top_k = idc.shape[2], idc.shape[3]
    G = H_q // H_kv
    BH = B * H_kv
    M = bq * G_pad
    P = n_tiles * bq

    qg = qc.reshape(B, Tc, H_kv, G, D)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, G_pad - G), (0, D_pad - D)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(BH, Tc * G_pad, D_pad)
    ids = idc.transpose(0, 2, 1, 3).reshape(BH, Tc, top_k)
    tiles, tok, inv = _reverse_index(ids, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    q0_arr = jnp.full((16,), q0, jnp.int32)

    nt = tiles_per_program
    kernel = functools.partial(
        _kv_outer_kernel, scale=D**-0.5, block_size=block_size, kv_tile=kv_tile, heads=G_pad,
        tiles_per_program=nt,
    )
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(n_tiles // nt, BH),
        in_specs=[
            pl.BlockSpec((16,), lambda t, bh: (0,)),  # q0
            pl.BlockSpec((None, n_tiles), lambda t, bh: (bh, 0)),  # tile table of the row
            pl.BlockSpec((None, nt * bq), lambda t, bh: (bh, t)),  # token ids of the program's tiles
            pl.BlockSpec((None, Tc * G_pad, D_pad), lambda t, bh: (bh, 0, 0)),  # q of the group
            pl.BlockSpec((None, kg.shape[1], D_pad), lambda t, bh: (bh, 0, 0)),  # k of the group
            pl.BlockSpec((None, vg.shape[1], D_pad), lambda t, bh: (bh, 0, 0)),  # v of the group
        ],
        out_specs=[
            pl.BlockSpec((None, nt * M, D_pad), lambda t, bh: (bh, t, 0)),
            pl.BlockSpec((None, nt * M), lambda t, bh: (bh, t)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, P * G_pad, D_pad), qc.dtype),
            jax.ShapeDtypeStruct((BH, P * G_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (8 if M >= 128 else 4), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name=f"msa_sparse_attention_kv_fwd_bq{bq}_g{G_pad}_bs{block_size}_nt{nt}",
    )(q0_arr, tiles, tok, qg, kg, vg)

    out, lse = _combine(o_part, lse_part, inv, G_pad=G_pad, D_pad=D_pad)
    out = out.reshape(B, H_kv, Tc, G_pad, D_pad)[:, :, :, :G, :D].astype(qc.dtype)
    out = out.transpose(0, 2, 1, 3, 4).reshape(B, Tc, H_q, D)
    lse = lse.reshape(B, H_kv, Tc, G_pad)[..., :G].transpose(0, 2, 1, 3).reshape(B, Tc, H_q)
    return out, lse


class _Sizes(NamedTuple):
    """Padded sizes of one call, shared by the KV-outer wrappers (forward, backward)."""

    B: int
    T: int
    H_q: int
    D: int
    H_kv: int
    top_k: int
    BH: int  # rows of the kernels' grids: B * H_kv
    G_pad: int  # query heads per group, padded to a power of two
    D_pad: int
    kv_tile: int  # K/V rows loaded per block (>= 16 for the dots)
    n_blocks: int
    T_kv_pad: int
    n_chunks: int
    T_pad: int  # n_chunks * t_chunk

    def kv_layout(self, x):
        """[B, T, H_kv, D] -> [B*H_kv, T_kv_pad, D_pad] (zero padding)."""
        x = jnp.pad(x, ((0, 0), (0, self.T_kv_pad - self.T), (0, 0), (0, self.D_pad - self.D)))
        return x.transpose(0, 2, 1, 3).reshape(self.BH, self.T_kv_pad, self.D_pad)


def _sizes(q, k, block_idx, block_size: int, t_chunk: int) -> _Sizes:
    B, T, H_q, D = q.shape
    H_kv = k.shape[2]
    kv_tile = max(block_size, _MIN_DOT)
    n_blocks = -(-T // block_size)
    n_chunks = -(-T // t_chunk)
    return _Sizes(B, T, H_q, D, H_kv, block_idx.shape[-1], B * H_kv, _next_pow2(H_q // H_kv),
                  max(_MIN_DOT, _next_pow2(D)), kv_tile, n_blocks, n_blocks * block_size + kv_tile - block_size,
                  n_chunks, n_chunks * t_chunk)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "bq", "t_chunk", "interpret", "num_warps", "num_stages", "tiles_per_program"),
)
def _sparse_attention_fwd(q, k, v, block_idx, *, block_size, bq, t_chunk, interpret, num_warps=None,
                          num_stages=None, tiles_per_program=1):
    sz = _sizes(q, k, block_idx, block_size, t_chunk)
    B, T, H_q, D, H_kv, top_k = sz.B, sz.T, sz.H_q, sz.D, sz.H_kv, sz.top_k
    G_pad, D_pad, kv_tile, n_blocks, n_chunks, T_pad = sz.G_pad, sz.D_pad, sz.kv_tile, sz.n_blocks, sz.n_chunks, sz.T_pad
    n_tiles = _n_tiles(t_chunk, top_k, n_blocks, bq, tiles_per_program)
    kg, vg = sz.kv_layout(k), sz.kv_layout(v)
    ids = _clean_ids(block_idx, block_size)
    qp = jnp.pad(q, ((0, 0), (0, T_pad - T), (0, 0), (0, 0)))
    ids = jnp.pad(ids, ((0, 0), (0, T_pad - T), (0, 0), (0, 0)), constant_values=-1)
    chunk = functools.partial(
        _chunk_fwd, kg=kg, vg=vg, block_size=block_size, bq=bq, n_blocks=n_blocks,
        n_tiles=n_tiles, G_pad=G_pad, D_pad=D_pad, kv_tile=kv_tile, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, tiles_per_program=tiles_per_program,
    )
    if n_chunks == 1:
        out, lse = chunk(0, qp, ids)
    else:
        qs = qp.reshape(B, n_chunks, t_chunk, H_q, D).swapaxes(0, 1)
        idss = ids.reshape(B, n_chunks, t_chunk, H_kv, top_k).swapaxes(0, 1)
        starts = jnp.arange(n_chunks, dtype=jnp.int32) * t_chunk
        out, lse = lax.map(lambda a: chunk(a[0], a[1], a[2]), (starts, qs, idss))
        out = out.swapaxes(0, 1).reshape(B, T_pad, H_q, D)
        lse = lse.swapaxes(0, 1).reshape(B, T_pad, H_q)
    return out[:, :T], lse[:, :T]


def _default_block_q(T: int, G_pad: int, target_m: int = _TARGET_M) -> int:
    bq = max(1, target_m // G_pad)  # M = BQ * G_pad = 128 rows
    floor = max(1, _MIN_DOT // G_pad)  # keep M >= 16
    return max(floor, min(bq, _next_pow2(T)))


def _partial_rows(t_chunk, top_k, n_blocks, bq):
    return _n_tiles(t_chunk, top_k, n_blocks, bq) * bq


def _default_chunk(T, BH, top_k, n_blocks, bq, G_pad, D_pad, cap=_PARTIAL_ELEMENTS) -> int:
    """Largest balanced query chunk whose partial buffer has <= cap elements (0: none fits)."""
    per_row = cap // (BH * G_pad * D_pad)  # padded positions a chunk may use
    t_max = (per_row - n_blocks * (bq - 1) - bq) // min(top_k, n_blocks)
    if t_max >= T:
        return T
    if t_max < 1:
        return 0
    n_chunks = -(-T // t_max)
    for n in range(n_chunks, 2 * n_chunks + 1):  # a chunk that divides T: no padded copy of q
        if T % n == 0:
            return T // n
    return -(-T // n_chunks)


def sparse_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    block_q: int | None = None,
    interpret: bool | None = None,
    query_chunk: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tiles_per_program: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MSA main branch forward, KV-outer: (out [B, T, H_q, D] in q.dtype, lse float32 [B, T, H_q]).

    block_q: query tokens per tile (BQ, a power of two; M = BQ * G_pad MMA rows); default
      128 // G_pad (64 // G_pad for float32: shared memory), shrunk for short T, never below
      16 // G_pad.
    interpret: None = interpret unless jax.default_backend() == "gpu".
    query_chunk: query tokens per kernel call (the partial buffer holds one chunk); default: the
      largest balanced chunk with a partial buffer of <= 2**30 elements.
    num_warps, num_stages: Triton compiler parameters (tuning; default 8 warps for M >= 128, else
      4, and 2 stages).
    tiles_per_program: consecutive tiles one program handles in a loop (default 1), so that Triton
      can pipeline the next tile's gathers and K/V loads (num_stages) behind the current matmuls.
    See the module docstring for the design, the costs and the limits.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    interpret = bool(interpret)
    B, T, H_q, D, H_kv, top_k = check_attention_args(q, k, v, block_idx, block_size)
    G_pad = _next_pow2(H_q // H_kv)
    D_pad = max(_MIN_DOT, _next_pow2(D))
    BH = B * H_kv
    n_blocks = -(-T // block_size)
    if block_q is None:
        # float32 tiles of 128 rows exceed the H100's shared memory at D = 128: 64 rows
        block_q = _default_block_q(T, G_pad, _TARGET_M if q.dtype != jnp.float32 else _TARGET_M // 2)
    elif not isinstance(block_q, int) or not _is_pow2(block_q):
        raise ValueError(f"block_q: expected a power of two, got {block_q!r}")
    if query_chunk is None:
        t_chunk = _default_chunk(T, BH, top_k, n_blocks, block_q, G_pad, D_pad)
        if t_chunk < 1:
            raise ValueError(
                f"no query chunk fits {_PARTIAL_ELEMENTS} partial elements (B*H_kv={BH}, "
                f"n_blocks={n_blocks}, block_q={block_q}): split the batch"
            )
    elif not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk: expected an int >= 1, got {query_chunk!r}")
    else:
        t_chunk = min(query_chunk, T)
    if not interpret:
        kv_tile = max(block_size, _MIN_DOT)
        kv_elems = BH * (n_blocks * block_size + kv_tile - block_size) * D_pad
        part_elems = BH * _partial_rows(t_chunk, top_k, n_blocks, block_q) * G_pad * D_pad
        if max(kv_elems, part_elems) >= _INT32_LIMIT:
            raise ValueError(
                f"{max(kv_elems, part_elems)} elements in one operand: the Triton kernel indexes "
                "with int32 offsets (< 2**31); use a smaller query_chunk or split the batch"
            )
        if not _is_pow2(block_size):
            raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
        if block_q * G_pad < _MIN_DOT:
            raise ValueError(
                f"block_q * G_pad = {block_q} * {G_pad} < {_MIN_DOT}: Triton dots need >= 16 rows"
            )
    if tiles_per_program is None:
        tiles_per_program = 1
    elif not isinstance(tiles_per_program, int) or tiles_per_program < 1:
        raise ValueError(f"tiles_per_program: expected an int >= 1, got {tiles_per_program!r}")
    return _sparse_attention_fwd(
        q, k, v, block_idx, block_size=block_size, bq=block_q, t_chunk=t_chunk, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, tiles_per_program=tiles_per_program,
    )
