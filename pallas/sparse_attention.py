"""MSA main branch, forward, as one Pallas kernel (Triton lowering): query-tile outer, union of blocks.

Contract (MSA_SPEC.md section 4)::

    out, lse = sparse_attention_fwd(q, k, v, block_idx, block_size=..., block_q=None, interpret=None)

q [B, T, H_q, D]; k, v [B, T, H_kv, D] (same dtype, bfloat16 or float32); H_q = G * H_kv and query
head h belongs to group h // G. block_idx int32 [B, T, H_kv, top_k]: for token i and group r the
selected KV block ids (valid ids >= 0 in any order, then -1 padding; a valid id is <= i // block_size
and the local block i // block_size is among them). Returns out [B, T, H_q, D] in q.dtype, exact
softmax attention of query (i, h) over the keys j <= i of the blocks listed for (i, h // G), logits
q.k / sqrt(D) accumulated in float32; and lse float32 [B, T, H_q] = log sum_j exp(logit_j) (natural
log of the scaled logits). `out` matches `msa_jax.ops.reference.sparse_attention`.

Design ("query-tile outer with a union of blocks")
--------------------------------------------------
The wrapper (plain JAX) rearranges q to [B*H_kv, T_pad*G_pad, D_pad], token-major and head-minor,
so one program's query tile is a contiguous slab of M = block_q * G_pad rows: block_q consecutive
tokens times the G heads of one group (G padded to a power of two with zero heads, which are
dropped at the end). k and v become [B*H_kv, T_kv_pad, D_pad]. For every tile the wrapper also
computes the sorted union of the block ids its block_q tokens selected (sort, drop duplicates and
-1, compact, pad with -1): int32 [B*H_kv, n_tiles, U_pad].

Grid: (n_tiles, B*H_kv); the tile axis is first so that it maps to CUDA's x dimension (no 65535
limit) and consecutive programs work on neighbouring tiles of the same head, which share blocks in
L2. Each program loops (`fori_loop`, bound = the union size, read from the union itself) over its
union. For union block c it loads K/V rows [c*block_size, c*block_size + kv_tile) of its group,
S = Q_tile K_c^T (float32 accumulation) * scale, masks the entries where (a) the row's token did not
select c (the tile's [block_q, top_k] ids are loaded once per program, expanded to the M rows by a
gather load, and compared with c), (b) key position > query position, (c) key position >= T or
outside block c (only when kv_tile > block_size); then an online-softmax step (running max m,
running sum l, float32 accumulator [M, D_pad]; base-2 exponentials with log2(e) folded into the
scale). Masked logits get a finite very negative value and their probabilities are forced to 0, so
rows with nothing visible yet keep m finite and l = 0: no NaN, ever. Finally out = acc / l and
lse = (m + log2 l) * ln 2, written in the tile layout; the wrapper undoes the arrangement.

Tiles and padding (Triton needs power-of-two block shapes and dots with >= 16 rows/columns):
* G_pad = next power of two of G; block_q (a power of two) defaults to 64 // G_pad (M = 64) and is
  shrunk for short sequences, never below 16 // G_pad, so M >= 16. A given block_q must be a power
  of two; on GPU block_q * G_pad >= 16 is also required.
* D_pad = max(16, next power of two of D); zero columns do not change q.k or the output.
* kv_tile = max(block_size, 16): block_size is the K tile. For block_size 8 a 16-row tile covering
  blocks c and c + 1 is loaded and the rows of block c + 1 are masked (half of that MMA is wasted).
  On GPU block_size must be a power of two; interpret mode accepts any block_size >= 1.
* top_k is padded with -1 to a power of two for the membership test; ids outside [0, n_blocks) are
  treated as -1 (they could only hold keys j > i anyway).

Cost
----
FLOPs of the selected support (what PERF.md counts as "effective"):
4 * H_q * D * T * top_k * block_size per batch element (QK^T and PV, 2 FLOPs per multiply-add),
minus causal padding (the local block is on average half visible: subtract about
2 * H_q * D * T * block_size). The kernel executes 4 * M * D_pad * kv_tile FLOPs per (tile, union
block), i.e. 4 * H_kv * G_pad * D_pad * kv_tile * sum_tiles block_q * |U_tile|: the ratio to the
selected support is mean(|U_tile|) / top_k (>= 1, <= block_q) times G_pad / G.

Bytes each program reads: Q M * D_pad * s, the ids block_q * top_k_pad * 4 (gathered G_pad times,
mostly from L1), the union U_pad * 4, and K + V 2 * |U_tile| * kv_tile * D_pad * s (s = 2 for bf16,
4 for f32); it writes out M * D_pad * s and lse M * 4. The K/V term dominates: arithmetic intensity
~ 4 * M * D * bs / (2 * bs * D * s) = 2 M / s FLOPs per byte (M = 64 in bf16: 64 FLOP/B, under the
H100's ~300 FLOP/B ridge; L2 hits on blocks shared by neighbouring tiles are what keeps it fast).

Why the union wastes work: every row of the tile is multiplied with every block of the union, but
a row only keeps the blocks its own token selected. When the block_q neighbouring tokens pick the
same blocks (typical: they share the local block and often the same distant ones) |U_tile| ~ top_k
and there is no waste; when they pick different blocks the union grows up to block_q * top_k (capped
by the number of blocks) and the kernel does up to block_q times the useful MMA work, most of it
masked. Small block_q limits the waste but lowers M (and the dot shape); that trade-off is the
reason for the next step.

Planned next step: the KV-outer design of the paper (MSA_SPEC.md section 7): build the reverse index
(for every (KV block, group), the queries that selected it; CSR via a sort), gather those queries
into 128-row tiles, write per-slot partial outputs and LSEs, then combine with a logsumexp. Every
MMA row is then useful and each KV block is read once per (block, group, chunk of queries).

Other known costs of this first version: the wrapper transposes q, k, v and the output (one extra
HBM pass each; a strided BlockSpec over [B, T, H_kv, G, D] could avoid it when G and D are powers of
two), and the union is computed with two sorts of [B*H_kv, n_tiles, block_q*top_k] int32.

Limits: the Triton lowering indexes every operand with int32 element offsets, so each rearranged
operand must have < 2**31 elements (q at the paper's heads: T * 64 * 128 < 2**31, i.e. T < 256K per
call; split the queries beyond that). float32 inputs use IEEE-precision dots (Triton's default for
f32 is TF32). Forward only (no custom VJP yet).
"""

from __future__ import annotations

import functools

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


# --------------------------------------------------------------------------------------- kernel


def _sparse_attention_kernel(
    q_ref,  # [M, D_pad]
    k_ref,  # [T_kv_pad, D_pad]
    v_ref,  # [T_kv_pad, D_pad]
    ids_ref,  # [block_q, K_pad] int32: the tile's selected block ids, -1 padded
    union_ref,  # [U_pad] int32: sorted union of the tile's ids, -1 padded
    o_ref,  # [M, D_pad]
    lse_ref,  # [M] float32
    *,
    scale: float,
    seq_len: int,
    block_size: int,
    kv_tile: int,
    block_q: int,
    heads: int,  # G_pad: rows per token
):
    tile = pl.program_id(0)
    M, d_pad = q_ref.shape
    # float32 inputs: IEEE products (Triton's default for f32 is TF32, ~1e-3 relative error).
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    q = q_ref[...]
    row_local = lax.broadcasted_iota(jnp.int32, (M,), 0) // heads  # token of each row in the tile
    row_pos = tile * block_q + row_local  # absolute query position of each row
    # [M, K_pad]: the selected ids of each row's token (a gather load on GPU, once per program).
    row_ids = ids_ref[row_local]
    union = union_ref[...]
    n_union = jnp.sum(jnp.where(union >= 0, 1, 0))  # valid ids are compacted to the front

    qk_scale = scale * _LOG2E  # base-2 online softmax
    kv_iota = lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)

    def body(u, carry):
        acc, m_prev, l_prev = carry
        c = union_ref[u]
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        v = v_ref[pl.ds(start, kv_tile), :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale  # [M, kv_tile], f32

        key_pos = start + kv_iota  # [kv_tile]
        selected = jnp.max(jnp.where(row_ids == c, 1, 0), axis=1) > 0  # [M]: row's token chose c
        mask = selected[:, None] & (key_pos[None, :] <= row_pos[:, None])
        key_ok = key_pos < seq_len
        if kv_tile > block_size:  # tile covers more than block c: drop the rows of block c + 1
            key_ok = key_ok & (key_pos < start + block_size)
        mask = mask & key_ok[None, :]

        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_next, l_next

    acc = jnp.zeros((M, d_pad), jnp.float32)
    m_i = jnp.full((M,), MASK_VALUE, jnp.float32)
    l_i = jnp.zeros((M,), jnp.float32)
    acc, m_i, l_i = lax.fori_loop(0, n_union, body, (acc, m_i, l_i))

    # Rows with an empty support (padding rows only: every real query sees itself) give 0 / -inf.
    seen = l_i > 0.0
    l_safe = jnp.where(seen, l_i, 1.0)
    # plgpu.store, not `ref[...] =` (which lowers to a load + store on Triton).
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype))
    plgpu.store(lse_ref, jnp.where(seen, (m_i + jnp.log2(l_safe)) * _LN2, -jnp.inf))


# -------------------------------------------------------------------------------------- wrapper


def _tile_unions(ids: jax.Array, block_q: int, n_blocks: int) -> jax.Array:
    """ids [BH, T_pad, top_k] (-1 = none) -> sorted union per tile [BH, n_tiles, U_pad], -1 padded."""
    BH, T_pad, top_k = ids.shape
    n_tiles = T_pad // block_q
    x = jnp.sort(ids.reshape(BH, n_tiles, block_q * top_k), axis=-1)
    first = jnp.concatenate([jnp.ones_like(x[..., :1], bool), x[..., 1:] != x[..., :-1]], axis=-1)
    key = jnp.where(first & (x >= 0), x, n_blocks)  # duplicates and -1 sort last
    width = min(block_q * top_k, n_blocks)  # a union never has more than n_blocks ids
    u = jnp.sort(key, axis=-1)[..., :width]
    u = jnp.where(u < n_blocks, u, -1)
    u_pad = _next_pow2(width)
    return jnp.pad(u, ((0, 0), (0, 0), (0, u_pad - width)), constant_values=-1)


@functools.partial(jax.jit, static_argnames=("block_size", "block_q", "interpret"))
def _sparse_attention_fwd(q, k, v, block_idx, *, block_size: int, block_q: int, interpret: bool):
    B, T, H_q, D = q.shape
    H_kv = k.shape[2]
    top_k = block_idx.shape[-1]
    G = H_q // H_kv
    G_pad = _next_pow2(G)
    D_pad = max(_MIN_DOT, _next_pow2(D))
    K_pad = _next_pow2(top_k)
    kv_tile = max(block_size, _MIN_DOT)
    n_blocks = -(-T // block_size)
    n_tiles = -(-T // block_q)
    T_pad = n_tiles * block_q
    T_kv_pad = n_blocks * block_size + (kv_tile - block_size)
    M = block_q * G_pad
    BH = B * H_kv

    # q: [B, T, H_q, D] -> [B*H_kv, T_pad*G_pad, D_pad], token-major / head-minor per group.
    qg = q.reshape(B, T, H_kv, G, D)
    qg = jnp.pad(qg, ((0, 0), (0, T_pad - T), (0, 0), (0, G_pad - G), (0, D_pad - D)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(BH, T_pad * G_pad, D_pad)

    def kv_layout(x):  # [B, T, H_kv, D] -> [B*H_kv, T_kv_pad, D_pad]
        x = jnp.pad(x, ((0, 0), (0, T_kv_pad - T), (0, 0), (0, D_pad - D)))
        return x.transpose(0, 2, 1, 3).reshape(BH, T_kv_pad, D_pad)

    kg, vg = kv_layout(k), kv_layout(v)

    ids = block_idx.astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < n_blocks), ids, -1)
    ids = jnp.pad(ids, ((0, 0), (0, T_pad - T), (0, 0), (0, K_pad - top_k)), constant_values=-1)
    ids = ids.transpose(0, 2, 1, 3).reshape(BH, T_pad, K_pad)
    unions = _tile_unions(ids, block_q, n_blocks)  # [BH, n_tiles, U_pad]
    U_pad = unions.shape[-1]

    kernel = functools.partial(
        _sparse_attention_kernel,
        scale=D**-0.5,
        seq_len=T,
        block_size=block_size,
        kv_tile=kv_tile,
        block_q=block_q,
        heads=G_pad,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(n_tiles, BH),
        in_specs=[
            pl.BlockSpec((None, M, D_pad), lambda t, bh: (bh, t, 0)),  # q tile
            pl.BlockSpec((None, T_kv_pad, D_pad), lambda t, bh: (bh, 0, 0)),  # k of the group
            pl.BlockSpec((None, T_kv_pad, D_pad), lambda t, bh: (bh, 0, 0)),  # v of the group
            pl.BlockSpec((None, block_q, K_pad), lambda t, bh: (bh, t, 0)),  # ids of the tile
            pl.BlockSpec((None, None, U_pad), lambda t, bh: (bh, t, 0)),  # union of the tile
        ],
        out_specs=[
            pl.BlockSpec((None, M, D_pad), lambda t, bh: (bh, t, 0)),
            pl.BlockSpec((None, M), lambda t, bh: (bh, t)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, T_pad * G_pad, D_pad), q.dtype),
            jax.ShapeDtypeStruct((BH, T_pad * G_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4 if M <= 64 else 8, num_stages=2),
        interpret=interpret,
        name=f"msa_sparse_attention_fwd_bq{block_q}_g{G_pad}_bs{block_size}",
    )(qg, kg, vg, ids, unions)

    out = out.reshape(B, H_kv, T_pad, G_pad, D_pad)[:, :, :T, :G, :D]
    out = out.transpose(0, 2, 1, 3, 4).reshape(B, T, H_q, D)
    lse = lse.reshape(B, H_kv, T_pad, G_pad)[:, :, :T, :G]
    lse = lse.transpose(0, 2, 1, 3).reshape(B, T, H_q)
    return out, lse


def _default_block_q(T: int, G_pad: int) -> int:
    bq = max(1, 64 // G_pad)  # M = block_q * G_pad = 64 rows (or G_pad rows when G_pad > 64)
    floor = max(1, _MIN_DOT // G_pad)  # keep M >= 16
    return max(floor, min(bq, _next_pow2(T)))


def sparse_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    block_q: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MSA main branch forward: (out [B, T, H_q, D] in q.dtype, lse float32 [B, T, H_q]).

    block_q: query tokens per program (a power of two); default 64 // G_pad, shrunk for short T.
    interpret: None = interpret unless jax.default_backend() == "gpu".
    See the module docstring for the layout, the masking and the costs.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    interpret = bool(interpret)
    B, T, H_q, D, H_kv, top_k = check_attention_args(q, k, v, block_idx, block_size)
    G_pad = _next_pow2(H_q // H_kv)
    if block_q is None:
        block_q = _default_block_q(T, G_pad)
    elif not isinstance(block_q, int) or not _is_pow2(block_q):
        raise ValueError(f"block_q: expected a power of two, got {block_q!r}")
    if not interpret:
        # The Triton lowering computes element offsets in int32 (per operand, over the whole
        # rearranged array): process the queries in chunks beyond that.
        n_tiles = -(-T // block_q)
        rows = B * H_kv * n_tiles * block_q * G_pad * max(16, _next_pow2(D))
        kv_rows = B * H_kv * (-(-T // block_size) * block_size + 16) * max(16, _next_pow2(D))
        if max(rows, kv_rows) >= 2**31:
            raise ValueError(
                f"{max(rows, kv_rows)} elements in one operand: the Triton kernel indexes with int32 "
                "offsets (< 2**31); split the batch or the queries into chunks"
            )
        if not _is_pow2(block_size):
            raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
        if block_q * G_pad < _MIN_DOT:
            raise ValueError(
                f"block_q * G_pad = {block_q} * {G_pad} < {_MIN_DOT}: Triton dots need >= 16 rows"
            )
    return _sparse_attention_fwd(
        q, k, v, block_idx, block_size=block_size, block_q=block_q, interpret=interpret
    )
