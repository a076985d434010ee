"""MSA main branch (docs/algorithm.md §4), KV-outer forward kernel and its differentiable wrapper.

    out, lse = sparse_attention(q, k, v, block_idx, *, block_size)       # jax.custom_vjp
    out, lse = sparse_attention_fwd(q, k, v, block_idx, *, block_size)   # forward only

q [B, T, H_q, D]; k, v [B, T, H_kv, D] (one dtype, bfloat16 or float32); query head h belongs to
KV group h // G, G = H_q // H_kv. block_idx integer [B, T, H_kv, top_k]: per (token i, group) the
selected block ids in any order, -1 padding; ids outside [0, i // block_size] are ignored and
repeats count once. out [B, T, H_q, D] in q.dtype: exact softmax attention of query (i, h) over the
keys j <= i of its group's selected blocks, logits q.k / sqrt(D), float32 accumulation; lse float32
[B, T, H_q]: natural log of the softmax denominator (-inf for an empty support). `sparse_attention`
is differentiable in q, k, v and in lse's cotangent (`pallas.sparse_attention_bwd`).

Queries at positions (`q_pos=` int32 [B, T], every function here): query i sits at position
q_pos[b, i] (-1: a padding query: out 0, lse -inf) against k, v [B, L, H_kv, D] of L >= T keys, and
"i" above reads "q_pos[b, i]": a slice of a sequence's queries (context parallelism) or a prompt
chunk against a cache. Default: positions 0..T-1, L = T.

Design (docs/algorithm.md §7; the machinery is `pallas.kv_outer`): grid (tiles, B*H_kv), one tile
(or tiles_per_program consecutive tiles) per program. A program loads K_c, V_c of its block once,
gathers its M = BQ * G_pad query rows, and writes the tile's softmax over block c as a per-slot
partial (o normalised within the block, lse); `combine_outputs` merges a token's slots. Rows
with an empty mask write o = 0, lse = -inf: no NaN. bfloat16 partials round o once per slot before
the float32 combine; float32 inputs use IEEE-precision dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas import kv_outer as kvo
from pallas import mgpu_sparse_attention as mg
from pallas import mgpu_sparse_attention_bwd as mb
from pallas.common import KERNEL_DTYPES, LN2, LOG2E, MASK_VALUE, interpret_mode
from pallas.sparse_attention_bwd import sparse_attention_bwd

__all__ = ["sparse_attention", "sparse_attention_fwd", "FWD_KERNELS", "BWD_KERNELS", "fwd_kernel_used",
           "bwd_kernel_used"]

# Forward tile kernels: Triton (every GPU, interpret mode, float32) and Mosaic GPU (Hopper, bf16; TMA +
# wgmma: 1.4x faster end to end at 128K on an H200, BENCHMARKS.md). Same partials and combine.
FWD_KERNELS = ("auto", "triton", "mosaic")
# Backward unit kernels: Triton, and Mosaic GPU (Hopper, bf16; keys on wgmma's M dimension): 13% faster
# at 128K with 16 query heads per group on an H200, even at 4 heads of dim 64 (BENCHMARKS.md), so "auto"
# takes it from 8 heads per group up.
BWD_KERNELS = ("auto", "triton", "mosaic")


def _fwd_kernel(
    pos_ref,  # [Tc] int32: the position of each of the chunk's query tokens (this batch row)
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
            s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)  # [M, kv_tile]

            key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
            row_pos = pos_ref[jnp.maximum(row_tok, 0)]  # query position (garbage for padding rows)
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
            lse_ref[rows] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)

        return carry

    if tiles_per_program == 1:
        tile(0, 0)
    else:
        lax.fori_loop(0, tiles_per_program, tile, 0)


def _chunk_fwd(posc, qc, ix: kvo.ChunkIndex, kg, vg, *, sz: kvo.Sizes, plan: kvo.Plan):
    """One query chunk: positions posc [B, Tc], qc [B, Tc, H_q, D], ix its reverse index -> out, lse."""
    B, Tc, H_q, D = qc.shape
    G, G_pad, D_pad, BH = sz.G, sz.G_pad, sz.D_pad, sz.BH
    bq, nt, n_tiles = plan.block_q, plan.tiles_per_program, plan.n_tiles
    M = bq * G_pad
    P = n_tiles * bq

    qg = kvo.rows(qc, sz.H_kv, G_pad, D_pad)  # [BH, Tc * G_pad, D_pad]
    tiles, tok, inv = ix.tiles, ix.tok, ix.inv

    kernel = functools.partial(
        _fwd_kernel, scale=D**-0.5, block_size=sz.block_size, kv_tile=sz.kv_tile, heads=G_pad,
        tiles_per_program=nt,
    )
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(n_tiles // nt, BH),
        in_specs=[
            pl.BlockSpec((None, Tc), lambda t, bh: (bh // sz.H_kv, 0)),  # query positions of the batch row
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
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=f"msa_sparse_attention_fwd_bq{bq}_g{G_pad}_bs{sz.block_size}_nt{nt}",
    )(posc, tiles, tok, qg, kg, vg)

    out, lse = kvo.combine_outputs(o_part, lse_part, inv, G_pad=G_pad, out_dtype=qc.dtype, interpret=plan.interpret)
    out = kvo.ungroup(out[:, :, :G, :D], B).reshape(B, Tc, H_q, D)
    lse = kvo.ungroup(lse[..., :G], B).reshape(B, Tc, H_q)
    return out, lse


@functools.partial(jax.jit, static_argnames=("block_size", "plan"))
def _sparse_attention_fwd(q, k, v, block_idx, pos, *, block_size: int, plan: kvo.Plan):
    sz = kvo.sizes(q, k, block_idx, block_size)
    T_pad = plan.n_chunks * plan.t_chunk
    kg, vg = (kvo.kv_layout(x, sz.T_kv_pad, sz.D_pad) for x in (k, v))
    ids = kvo.clean_ids(block_idx, block_size, pos)
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    chunk = functools.partial(_chunk_fwd, kg=kg, vg=vg, sz=sz, plan=plan)
    xs = (kvo.pad_time(pos, T_pad, -1), kvo.pad_time(q, T_pad))
    out, lse = kvo.map_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, index)
    return out[:, : sz.T], lse[:, : sz.T]


def _use_mosaic(fwd_kernel: str, sz: kvo.Sizes, dtype, interpret, triton_knobs: bool) -> bool:
    """Which tile kernel runs the forward. "auto": Mosaic GPU on a Hopper GPU (not interpreted) for the
    shapes it takes (`mgpu_sparse_attention.check_supported`) unless Triton tuning knobs were given;
    "mosaic": always (ValueError for shapes it does not take; interpreted off a GPU)."""
    if fwd_kernel not in FWD_KERNELS:
        raise ValueError(f"fwd_kernel: expected one of {FWD_KERNELS}, got {fwd_kernel!r}")
    if fwd_kernel == "mosaic":
        mg.check_supported(sz, dtype)
        return True
    return (fwd_kernel == "auto" and not triton_knobs and not interpret_mode(interpret) and mg.on_hopper()
            and mg.supported(sz, dtype))


def _use_mosaic_bwd(bwd_kernel: str, sz: kvo.Sizes, dtype, interpret, triton_knobs: bool) -> bool:
    """Which unit kernel runs the backward. "auto": Mosaic GPU on a Hopper GPU (not interpreted) for the
    shapes it takes with >= 8 (padded) query heads per group, unless block_q (a Triton knob) was given;
    "mosaic": always (ValueError for shapes it does not take; interpreted off a GPU)."""
    if bwd_kernel not in BWD_KERNELS:
        raise ValueError(f"bwd_kernel: expected one of {BWD_KERNELS}, got {bwd_kernel!r}")
    if bwd_kernel == "mosaic":
        mb.check_supported(sz, dtype)
        return True
    return (bwd_kernel == "auto" and not triton_knobs and not interpret_mode(interpret) and mg.on_hopper()
            and sz.G_pad >= 8 and mb.supported(sz, dtype))


def fwd_kernel_used(q, k, block_idx, *, block_size: int, fwd_kernel: str = "auto", interpret=None) -> str:
    """"mosaic" or "triton": the tile kernel `sparse_attention(_fwd)` runs for these operands (arrays or
    `jax.ShapeDtypeStruct`s) with no tuning knob given; for benchmark records."""
    mosaic = _use_mosaic(fwd_kernel, kvo.sizes(q, k, block_idx, block_size), q.dtype, interpret, False)
    return "mosaic" if mosaic else "triton"


def bwd_kernel_used(q, k, block_idx, *, block_size: int, bwd_kernel: str = "auto", interpret=None) -> str:
    """"mosaic" or "triton": the unit kernel `sparse_attention`'s backward runs for these operands (arrays
    or `jax.ShapeDtypeStruct`s) with no tuning knob given; for benchmark records."""
    mosaic = _use_mosaic_bwd(bwd_kernel, kvo.sizes(q, k, block_idx, block_size), q.dtype, interpret, False)
    return "mosaic" if mosaic else "triton"


def _forward(q, k, v, block_idx, pos, *, block_size: int, config: kvo.KVOuterConfig, interpret, mosaic: bool):
    """(out, lse) by the chosen tile kernel."""
    sz = kvo.sizes(q, k, block_idx, block_size)
    if mosaic:
        mconf = mg.MGPUConfig(query_chunk=config.query_chunk)
        interp = interpret_mode(interpret)
        plan = mg.plan_for(sz, mconf, interp)
        return mg._fwd(q, k, v, block_idx, pos, block_size=block_size, plan=plan, config=mconf, interpret=interp)
    plan = config.resolve("fwd", sz, f32=q.dtype == jnp.float32, interpret=interpret)
    return _sparse_attention_fwd(q, k, v, block_idx, pos, block_size=block_size, plan=plan)


def _check(q, k, v, block_idx, block_size, q_pos) -> kvo.Sizes:
    return kvo.check_attention(q, k, v, block_idx, block_size, q_pos, KERNEL_DTYPES)


def sparse_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fwd_kernel: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, H_q, D] in q.dtype, lse float32 [B, T, H_q]), no gradient rule.

    q_pos: see the module docstring. block_q, query_chunk, tiles_per_program, num_warps, num_stages:
    see `kv_outer.KVOuterConfig` (all but query_chunk tune the Triton tile kernel: giving one makes
    "auto" pick it). fwd_kernel: "auto" (Mosaic GPU on a Hopper GPU where it applies, else Triton),
    "triton" or "mosaic" (`FWD_KERNELS`). interpret: None = the Pallas interpreter unless
    jax.default_backend() == "gpu".
    """
    sz = _check(q, k, v, block_idx, block_size, q_pos)
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_program=tiles_per_program,
                               num_warps=num_warps, num_stages=num_stages)
    knobs = any(x is not None for x in (block_q, tiles_per_program, num_warps, num_stages))
    mosaic = _use_mosaic(fwd_kernel, sz, q.dtype, interpret, knobs)
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _forward(q, k, v, block_idx, pos, block_size=block_size, config=config, interpret=interpret,
                    mosaic=mosaic)


# ----------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _sparse_attention(q, k, v, block_idx, pos, block_size, config, interpret, mosaic, bwd_mosaic):
    return _vjp_fwd(q, k, v, block_idx, pos, block_size, config, interpret, mosaic, bwd_mosaic)[0]


def _vjp_fwd(q, k, v, block_idx, pos, block_size, config, interpret, mosaic, bwd_mosaic):
    out, lse = _forward(q, k, v, block_idx, pos, block_size=block_size, config=config, interpret=interpret,
                        mosaic=mosaic)
    return (out, lse), (q, k, v, block_idx, pos, out, lse)


def _vjp_bwd(block_size, config, interpret, mosaic, bwd_mosaic, res, cts):
    q, k, v, block_idx, pos, out, lse = res
    dout, dlse = cts
    if bwd_mosaic:
        mconf = mb.MGPUBwdConfig(tiles_per_unit=config.tiles_per_unit or kvo.TILES_PER_UNIT,
                                 query_chunk=config.query_chunk)
        dq, dk, dv = mb.sparse_attention_bwd_mgpu(q, k, v, block_idx, out, lse, dout, dlse, block_size=block_size,
                                                  q_pos=pos, config=mconf, interpret=interpret)
        return dq, dk, dv, None, None
    dq, dk, dv = sparse_attention_bwd(
        q, k, v, block_idx, out, lse, dout, dlse, block_size=block_size, q_pos=pos, block_q=config.block_q,
        query_chunk=config.query_chunk, tiles_per_unit=config.tiles_per_unit, interpret=interpret,
    )
    return dq, dk, dv, None, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    tiles_per_program: int | None = None,
    fwd_kernel: str = "auto",
    bwd_kernel: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(out, lse) as `sparse_attention_fwd`, differentiable in q, k, v (the cotangents of out and of
    lse reach the backward kernel); block_idx and q_pos get no gradient. block_q, query_chunk: both
    kernels; tiles_per_program: the forward's, tiles_per_unit: the backward's
    (`kv_outer.KVOuterConfig`). fwd_kernel: the forward's tile kernel, as `sparse_attention_fwd`
    (block_q or tiles_per_program given: "auto" picks Triton). bwd_kernel: the backward's, "auto"
    (Mosaic GPU on Hopper for bf16, block 128 and >= 8 query heads per group; otherwise Triton),
    "triton" (`sparse_attention_bwd`) or "mosaic" (`mgpu_sparse_attention_bwd`; its block_q is its
    own, 64 // G_pad; block_q given: "auto" picks Triton)."""
    sz = _check(q, k, v, block_idx, block_size, q_pos)
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit,
                               tiles_per_program=tiles_per_program)
    mosaic = _use_mosaic(fwd_kernel, sz, q.dtype, interpret, block_q is not None or tiles_per_program is not None)
    bwd_mosaic = _use_mosaic_bwd(bwd_kernel, sz, q.dtype, interpret, block_q is not None)
    return _sparse_attention(q, k, v, block_idx, kvo.positions(q_pos, sz.B, sz.T), block_size, config, interpret,
                             mosaic, bwd_mosaic)
