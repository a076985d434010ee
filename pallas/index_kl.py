"""MSA index branch, KL alignment loss over the selected support (docs/algorithm.md §6.1): fused
KV-outer kernels and their differentiable wrapper.

    kl = index_kl(q, k, iq, ik, block_idx, lse, *, block_size)  # jax.custom_vjp
    kl, res = index_kl_fwd(...);  d_iq, d_ik = index_kl_bwd(..., res, g, ...)
    lse = teacher_lse(q, k, block_idx, *, block_size)

q, k, block_idx as in `pallas.sparse_attention` (the teacher); iq [B, T, H_kv, D_idx], ik [B, T,
D_idx] (one dtype, bfloat16 or float32; ik shared by the groups): the student. lse float32 [B, T,
H_q]: the main branch's LSE over the same support. Per (b, token i, group r), with U the keys j <= i
of the selected blocks and G = H_q // H_kv:

    Pbar_j = (1/G) sum_{h in r} exp(q[i,h].k[j,r] / sqrt(D) - lse[i,h]),  z_j = iq[i,r].ik[j] / sqrt(D_idx)
    kl[b, i, r] = sum_U Pbar log Pbar - sum_U Pbar z + logsumexp_U(z) * S,   S = sum_U Pbar

float32 [B, T, H_kv], 0 for an empty support (KL(Pbar || softmax_U z) when lse is exact: S = 1; S is
kept so that the gradient is exactly that of the computed value). Only iq, ik get gradients (the
teacher is detached, docs/algorithm.md §6.2): dz_j = g (S softmax_U(z)_j - Pbar_j).

Design (docs/algorithm.md §7; the machinery is `pallas.kv_outer`): the forward kernel (one tile per
program) recomputes the teacher's P per (token, head) row, sums each token's rows into Pbar with a
0/1 matmul (`kv_outer.head_sum`), computes the student's logits once per token (R = max(BQ, 16) rows: Triton
dots need 16) and writes four float32 partials per padded position (sum Pbar log Pbar, sum Pbar z,
S, the student's lse over the block), combined per token by `combine_scalars`. The backward kernel
runs over units like the main backward: dz per token, g S softmax(z) - (g / G) sum_h P_h (dz is
linear in the heads), into d iq (one partial row per padded position) and d IK_c (accumulated in
float32); `reduce_units` per block, then the sum over the groups, in fixed orders.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu_mosaic
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import (check_block_idx, check_floating, check_index, check_int, check_q_pos, check_qkv,
                            check_shape)
from pallas import kv_outer as kvo
from pallas import mgpu_index_kl as mk
from pallas import mgpu_sparse_attention as mg
from pallas import sparse_attention_bwd as sab
from pallas.common import KERNEL_DTYPES, LOG2E, MASK_VALUE, MIN_DOT, interpret_mode, pad_dim
from pallas.sparse_attention import sparse_attention_fwd

__all__ = ["index_kl", "index_kl_fwd", "index_kl_bwd", "index_kl_sum", "main_and_index_kl_bwd",
           "sparse_attention_with_kl_grad", "teacher_lse"]


# --------------------------------------------------------------------------------------- kernels


def _fwd_kernel(
    pos_ref,  # [Tc] int32: the position of each of the chunk's query tokens (this batch row)
    tiles_ref,  # [n_tiles] int32: block id of every tile of this row, -1 = unused
    tok_ref,  # [BQ] int32: chunk-local token of every position of this tile, -1 = padding
    q_ref,  # [Tc * G_pad, D_pad]: the chunk's queries of this group, token-major
    lse_ref,  # [Tc * G_pad] float32: the teacher's LSE per row (padded heads: +inf, so P = 0)
    iq_ref,  # [Tc, Di_pad]: the chunk's index queries of this group
    k_ref,  # [T_kv_pad, D_pad]
    ik_ref,  # [T_kv_pad, Di_pad]: index keys (shared by the groups)
    a_ref, b_ref, s_ref, z_ref,  # [R] float32: A, Bz, S, student lse of this tile's positions (rows < BQ)
    *,
    scale: float,
    scale_idx: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    groups: int,  # G: real heads per token
    f32_sums: bool,  # float32 inputs: IEEE head sums
):
    bq = tok_ref.shape[0]
    R = a_ref.shape[0]  # max(BQ, 16): token rows of the student's tiles (dots need >= 16 rows)
    M = bq * heads
    c = tiles_ref[pl.program_id(0)]

    @pl.when(c >= 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        row_tok = tok_ref[m_iota // heads]  # [M]: gather load of the tile's token ids
        rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
        q = q_ref[rows]  # [M, D_pad]
        lse = lse_ref[rows]  # [M]
        r_iota = lax.broadcasted_iota(jnp.int32, (R,), 0)
        r_tok = jnp.where(r_iota < bq, tok_ref[jnp.minimum(r_iota, bq - 1)], -1)  # [R]: rows >= BQ are empty
        iq = iq_ref[jnp.maximum(r_tok, 0)]  # [R, Di_pad]: one row per token
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        ik = ik_ref[pl.ds(start, kv_tile), :]
        prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        prec_idx = lax.Precision.HIGHEST if iq_ref.dtype == jnp.float32 else None
        s = plgpu.dot(q, k, trans_b=True, precision=prec) * (scale * LOG2E)  # [M, kv_tile]
        z = plgpu.dot(iq, ik, trans_b=True, precision=prec_idx) * scale_idx  # [R, kv_tile]

        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
        row_pos = pos_ref[jnp.maximum(row_tok, 0)]
        mask = (row_tok >= 0)[:, None] & (key_pos[None, :] <= row_pos[:, None])
        zmask = (r_tok >= 0)[:, None] & (key_pos[None, :] <= pos_ref[jnp.maximum(r_tok, 0)][:, None])
        if kv_tile > block_size:  # 16-row K tile for block_size 8: drop the rows of block c + 1
            mask = mask & (key_pos < start + block_size)[None, :]
            zmask = zmask & (key_pos < start + block_size)[None, :]
        p = jnp.where(mask, jnp.exp2(s - (lse * LOG2E)[:, None]), 0.0)
        pbar = kvo.head_sum(p, heads, R, f32_sums) * (1.0 / groups)  # [R, kv_tile]: the teacher per token
        pos = pbar > 0.0
        a_ref[...] = jnp.sum(jnp.where(pos, pbar * jnp.log(jnp.where(pos, pbar, 1.0)), 0.0), axis=1)
        b_ref[...] = jnp.sum(pbar * jnp.where(zmask, z, 0.0), axis=1)
        s_ref[...] = jnp.sum(pbar, axis=1)
        zr = jnp.where(zmask, z, MASK_VALUE)
        zm = jnp.max(zr, axis=1)
        zl = jnp.sum(jnp.where(zmask, jnp.exp(zr - zm[:, None]), 0.0), axis=1)
        seen = zl > 0.0
        z_ref[...] = jnp.where(seen, zm + jnp.log(jnp.where(seen, zl, 1.0)), -jnp.inf)


def _bwd_kernel(
    pos_ref,  # [Tc] int32: the position of each of the chunk's query tokens (this batch row)
    unit_ref,  # [3 * U] int32: (block, first tile, tile count) of every unit of this row
    tok_ref,  # [P] int32: chunk-local token of every padded position, -1 = padding
    q_ref,  # [Tc * G_pad, D_pad]: the chunk's queries, token-major
    lse_ref,  # [Tc * G_pad] float32: the teacher's LSE (padded heads: +inf, so P = 0)
    iq_ref,  # [Tc, Di_pad]
    zlse_ref, w1_ref, w2_ref,  # [Tc] float32: student lse, g * S, g / G per token
    k_ref,  # [T_kv_pad, D_pad]
    ik_ref,  # [T_kv_pad, Di_pad]
    diq_ref,  # [n_tiles * R, Di_pad]: d iq partial per padded position, R >= BQ rows per tile
    dik_ref,  # [kv_tile, Di_pad] float32: this unit's partial d IK
    *value_refs,  # value=True: A, Bz, S [n_tiles * R] float32 per padded position (as the forward's)
    scale: float,
    scale_idx: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    groups: int,  # G: real heads per token
    bq: int,  # query tokens per tile
    n_units: int,
    f32_sums: bool,
):
    M = bq * heads
    R = max(bq, MIN_DOT)  # token rows of the student's tiles (a dot needs >= 16 rows; rows >= bq are 0)
    u = pl.program_id(0)
    c, t0, n = kvo.read_unit(unit_ref, u, n_units)
    prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    zeros = jnp.zeros(dik_ref.shape, jnp.float32)

    @pl.when(n > 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        ik = ik_ref[pl.ds(start, kv_tile), :]
        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)

        def tile(j, dik):
            t = t0 + j
            row_tok = tok_ref[t * bq + m_iota // heads]
            rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
            s = plgpu.dot(q_ref[rows], k, trans_b=True, precision=prec) * (scale * LOG2E)
            row_pos = pos_ref[jnp.maximum(row_tok, 0)]
            mask = (row_tok >= 0)[:, None] & (key_pos[None, :] <= row_pos[:, None])
            if kv_tile > block_size:
                mask = mask & (key_pos < start + block_size)[None, :]
            p = jnp.where(mask, jnp.exp2(s - (lse_ref[rows] * LOG2E)[:, None]), 0.0)
            it = kvo.index_grad_tile(p, t, start, key_pos, ik, tok_ref, pos_ref, iq_ref, zlse_ref, w1_ref, w2_ref,
                                     bq=bq, heads=heads, block_size=block_size, kv_tile=kv_tile,
                                     scale_idx=scale_idx, f32_sums=f32_sums)
            diq_ref[pl.ds(pl.multiple_of(t * R, R), R), :] = it.diq.astype(diq_ref.dtype)
            if value_refs:  # the forward's partial sums from the same tile (`index_kl_sum`)
                a_ref, b_ref, s_ref = value_refs
                pbar = it.psum * (1.0 / groups)
                pos = pbar > 0.0
                part = pl.ds(pl.multiple_of(t * R, R), R)
                a_ref[part] = jnp.sum(jnp.where(pos, pbar * jnp.log(jnp.where(pos, pbar, 1.0)), 0.0), axis=1)
                b_ref[part] = jnp.sum(pbar * jnp.where(it.zmask, it.z, 0.0), axis=1)
                s_ref[part] = jnp.sum(pbar, axis=1)
            return dik + it.dik

        dik_ref[...] = lax.fori_loop(0, n, tile, zeros)

    @pl.when(n <= 0)
    def _():
        dik_ref[...] = zeros


def _student_kernel(
    pos_ref,  # [Tc] int32: the position of each of the chunk's query tokens (this batch row)
    unit_ref,  # [3 * U] int32: (block, first tile, tile count) of every unit of this row
    tok_ref,  # [P] int32: chunk-local token of every padded position, -1 = padding
    iq_ref,  # [Tc, Di_pad]
    ik_ref,  # [T_kv_pad, Di_pad]
    zl_ref,  # [n_tiles * R] float32: the student's lse over block c per padded position
    *,
    scale_idx: float,
    block_size: int,
    kv_tile: int,
    bq: int,
    n_units: int,
):
    """`index_kl_sum`'s first pass: only the student's logits (no teacher), over the backward's units."""
    R = max(bq, MIN_DOT)
    c, t0, n = kvo.read_unit(unit_ref, pl.program_id(0), n_units)
    prec_idx = lax.Precision.HIGHEST if iq_ref.dtype == jnp.float32 else None

    @pl.when(n > 0)
    def _():
        r_iota = lax.broadcasted_iota(jnp.int32, (R,), 0)
        start = pl.multiple_of(c * block_size, block_size)
        ik = ik_ref[pl.ds(start, kv_tile), :]
        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)

        def tile(j, carry):
            t = t0 + j
            r_tok = jnp.where(r_iota < bq, tok_ref[t * bq + jnp.minimum(r_iota, bq - 1)], -1)
            tok = jnp.maximum(r_tok, 0)
            z = plgpu.dot(iq_ref[tok], ik, trans_b=True, precision=prec_idx) * scale_idx  # [R, kv_tile]
            zmask = (r_tok >= 0)[:, None] & (key_pos[None, :] <= pos_ref[tok][:, None])
            if kv_tile > block_size:
                zmask = zmask & (key_pos < start + block_size)[None, :]
            zr = jnp.where(zmask, z, MASK_VALUE)
            zm = jnp.max(zr, axis=1)
            zl = jnp.sum(jnp.where(zmask, jnp.exp(zr - zm[:, None]), 0.0), axis=1)
            seen = zl > 0.0
            zl_ref[pl.ds(pl.multiple_of(t * R, R), R)] = jnp.where(seen, zm + jnp.log(jnp.where(seen, zl, 1.0)), -jnp.inf)
            return carry

        lax.fori_loop(0, n, tile, 0)


# -------------------------------------------------------------------------------------- wrapper


def _chunk_fwd(posc, qc, lsec, iqc, ix: kvo.ChunkIndex, kg, ikg, *, sz: kvo.Sizes, plan: kvo.Plan, Di_pad: int):
    """One query chunk -> kl, lse_idx, S float32 [B, Tc, H_kv]."""
    B, Tc, H_q, D = qc.shape
    Di = iqc.shape[3]
    G, G_pad, D_pad, BH, H_kv = sz.G, sz.G_pad, sz.D_pad, sz.BH, sz.H_kv
    bq, n_tiles = plan.block_q, plan.n_tiles
    qg = kvo.rows(qc, H_kv, G_pad, D_pad)
    lseg = kvo.rows(lsec, H_kv, G_pad, fill=jnp.inf)  # padded heads: P = exp(s - inf) = 0
    iqg = kvo.rows(iqc, H_kv, width=Di_pad)
    tiles, tok, inv = ix.tiles, ix.tok, ix.inv

    R = max(bq, MIN_DOT)
    kernel = functools.partial(
        _fwd_kernel, scale=D**-0.5, scale_idx=Di**-0.5, block_size=sz.block_size, kv_tile=sz.kv_tile,
        heads=G_pad, groups=G, f32_sums=qc.dtype == jnp.float32,
    )
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda t, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    part = pl.BlockSpec((None, R), lambda t, bh: (bh, t))
    parts = pl.pallas_call(
        kernel,
        grid=(n_tiles, BH),
        in_specs=[
            pl.BlockSpec((None, Tc), lambda t, bh: (bh // H_kv, 0)),  # query positions of the batch row
            row(n_tiles), pl.BlockSpec((None, bq), lambda t, bh: (bh, t)),
            row(Tc * G_pad, D_pad), row(Tc * G_pad), row(Tc, Di_pad),
            row(kg.shape[1], D_pad),
            pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda t, bh: (bh // H_kv, 0, 0)),  # shared ik
        ],
        out_specs=[part] * 4,
        out_shape=[jax.ShapeDtypeStruct((BH, n_tiles * R), jnp.float32)] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=f"msa_index_kl_fwd_bq{bq}_g{G_pad}_bs{sz.block_size}",
    )(posc, tiles, tok, qg, lseg, iqg, kg, ikg)

    inv_rows = jnp.where(inv >= 0, inv // bq * R + inv % bq, -1)  # position -> its row t * R + i
    A, Bz, S, lse_idx = kvo.combine_scalars(parts[:3], parts[3], inv_rows)
    kl = A - Bz + jnp.where(jnp.isfinite(lse_idx), lse_idx, 0.0) * S  # empty support: kl = 0
    return tuple(kvo.ungroup(x, B) for x in (kl, lse_idx, S))


def _chunk_student(posc, iqc, ix: kvo.ChunkIndex, ikg, *, sz: kvo.Sizes, plan: kvo.Plan, Di_pad: int):
    """One query chunk -> the student's lse over the support, float32 [B, Tc, H_kv] (-inf: empty)."""
    B, Tc, H_kv, Di = iqc.shape
    bq, n_tiles, U = plan.block_q, plan.n_tiles, plan.n_units
    R = max(bq, MIN_DOT)
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda u, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    zl_part = pl.pallas_call(
        functools.partial(_student_kernel, scale_idx=Di**-0.5, block_size=sz.block_size, kv_tile=sz.kv_tile,
                          bq=bq, n_units=U),
        grid=(U, sz.BH),
        in_specs=[
            pl.BlockSpec((None, Tc), lambda u, bh: (bh // H_kv, 0)),  # query positions of the batch row
            row(3 * U), row(n_tiles * bq), row(Tc, Di_pad),
            pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda u, bh: (bh // H_kv, 0, 0)),  # shared ik
        ],
        out_specs=row(n_tiles * R),
        out_shape=jax.ShapeDtypeStruct((sz.BH, n_tiles * R), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=plan.interpret,
        name=f"msa_index_kl_student_bq{bq}_bs{sz.block_size}_w{plan.tiles_per_unit}",
    )(posc, ix.unit_tab, ix.tok, kvo.rows(iqc, H_kv, width=Di_pad), ikg)
    inv_rows = jnp.where(ix.inv >= 0, ix.inv // bq * R + ix.inv % bq, -1)
    (zlse,) = kvo.combine_scalars([], zl_part, inv_rows)
    return kvo.ungroup(zlse, B)


def _chunk_bwd(posc, qc, lsec, iqc, zlsec, w1c, w2c, ix: kvo.ChunkIndex, kg, ikg, *, sz: kvo.Sizes, plan: kvo.Plan,
               Di_pad: int, value: bool = False, acc):
    """One query chunk -> d iq float32 [B, Tc, H_kv, Di], (d ik float32 [BH, n_blocks * bs, Di_pad],):
    acc (the running d ik,) plus this chunk's.
    value=True (`index_kl_sum`): (d iq, kl float32 [B, Tc, H_kv]), (d ik,), kl from the same tiles
    (zlsec must then be the student's lse with 0 for an empty support)."""
    B, Tc, H_q, D = qc.shape
    Di = iqc.shape[3]
    G_pad, D_pad, BH, H_kv, kv_tile = sz.G_pad, sz.D_pad, sz.BH, sz.H_kv, sz.kv_tile
    bq, n_tiles, U = plan.block_q, plan.n_tiles, plan.n_units
    R = max(bq, MIN_DOT)
    P = n_tiles * bq
    qg = kvo.rows(qc, H_kv, G_pad, D_pad)
    lseg = kvo.rows(lsec, H_kv, G_pad, fill=jnp.inf)
    iqg = kvo.rows(iqc, H_kv, width=Di_pad)
    zlseg, w1g, w2g = (kvo.rows(x, H_kv) for x in (zlsec, w1c, w2c))
    tok, inv, unit_tab, ustart = ix.tok, ix.inv, ix.unit_tab, ix.ustart

    kernel = functools.partial(
        _bwd_kernel, scale=D**-0.5, scale_idx=Di**-0.5, block_size=sz.block_size, kv_tile=kv_tile,
        heads=G_pad, groups=sz.G, bq=bq, n_units=U, f32_sums=qc.dtype == jnp.float32,
    )
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda u, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    n_value = 3 if value else 0
    diq_part, dik_part, *value_parts = pl.pallas_call(
        kernel,
        grid=(U, BH),
        in_specs=[
            pl.BlockSpec((None, Tc), lambda u, bh: (bh // H_kv, 0)),  # query positions of the batch row
            row(3 * U), row(P),
            row(Tc * G_pad, D_pad), row(Tc * G_pad), row(Tc, Di_pad),
            row(Tc), row(Tc), row(Tc),
            row(kg.shape[1], D_pad),
            pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda u, bh: (bh // H_kv, 0, 0)),  # shared ik
        ],
        out_specs=[
            row(n_tiles * R, Di_pad),  # every program writes the rows of its own tiles
            pl.BlockSpec((None, None, kv_tile, Di_pad), lambda u, bh: (bh, u, 0, 0)),
        ] + [row(n_tiles * R)] * n_value,
        out_shape=[
            jax.ShapeDtypeStruct((BH, n_tiles * R, Di_pad), iqc.dtype),
            jax.ShapeDtypeStruct((BH, U, kv_tile, Di_pad), jnp.float32),
        ] + [jax.ShapeDtypeStruct((BH, n_tiles * R), jnp.float32)] * n_value,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=f"msa_index_kl_{'fused' if value else 'bwd'}_bq{bq}_g{G_pad}_bs{sz.block_size}_w{plan.tiles_per_unit}",
    )(posc, unit_tab, tok, qg, lseg, iqg, zlseg, w1g, w2g, kg, ikg)

    (dik,) = kvo.reduce_units(
        ustart, [dik_part], n_blocks=sz.n_blocks, block_size=sz.block_size, interpret=plan.interpret, accs=acc
    )
    # Per token the sum over its slots (slot order) of its positions' rows (row t * R + i of tile t);
    # rows of positions that no slot points to (padding, unused tiles) are never read.
    inv_rows = jnp.where(inv >= 0, inv // bq * R + inv % bq, -1)
    diq = kvo.sum_slots(diq_part, inv_rows, G_pad=1, interpret=plan.interpret)  # [BH, Tc, 1, Di_pad]
    diq = kvo.ungroup(diq[:, :, 0, :Di], B)
    if not value:
        return diq, (dik,)
    A, Bz, S = kvo.combine_scalars(value_parts, None, inv_rows)
    kl = A - Bz + zlseg * S  # empty support: A = Bz = S = 0 and zlse 0
    return (diq, kvo.ungroup(kl, B)), (dik,)


def _chunk_fused_mgpu(posc, qc, lsec, iqc, zlsec, w1c, w2c, ix: kvo.ChunkIndex, kg, ikg, *, sz: kvo.Sizes,
                      plan: kvo.Plan, Di_pad: int, interpret, acc):
    """`_chunk_bwd(..., value=True)` with the tile kernel on Mosaic GPU (`pallas.mgpu_index_kl`) -> d iq
    float32 [B, Tc, H_kv, Di], (d ik [BH, n_blocks * bs, Di_pad], value [B, H_kv]): the value is the
    chunk's sum_i w1_i kl_i (w1 = the weights), summed in the kernel. The per-position inputs it
    streams (token positions, student lse, w1, w2, index queries; the teacher's rows' positions and
    lse) are gathered here, its d iq^T tiles transposed back to rows."""
    B, Tc, H_q, D = qc.shape
    Di = iqc.shape[3]
    G_pad, D_pad, BH, H_kv = sz.G_pad, sz.D_pad, sz.BH, sz.H_kv
    bq, n_tiles, W = plan.block_q, plan.n_tiles, plan.tiles_per_unit
    P = n_tiles * bq
    pad = W * bq + mk.n_cols(bq)  # a unit's copies may read past the last position
    tok = ix.tok
    tk = jnp.maximum(tok, 0)

    def per_pos(x, fill):  # per token [BH, Tc(, F)] -> per padded position [BH, P + pad(, F)]
        idx = tk if x.ndim == 2 else tk[..., None]
        v = jnp.take_along_axis(x, idx, axis=1)
        v = jnp.where((tok >= 0) if x.ndim == 2 else (tok >= 0)[..., None], v, fill)
        return jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    posg = jnp.repeat(posc, H_kv, axis=0)
    scalars = [per_pos(posg, -1)] + [per_pos(kvo.rows(x, H_kv), 0.0) for x in (zlsec, w1c, w2c)]
    iqp = per_pos(kvo.rows(iqc, H_kv, width=Di_pad).astype(jnp.bfloat16), 0.0)
    lseg = kvo.rows(lsec, H_kv, G_pad, fill=jnp.inf)  # [BH, Tc * G_pad]; padded heads: P = 0
    head = jnp.arange(G_pad, dtype=jnp.int32)
    lse_rows = jnp.take_along_axis(lseg, (tk[..., None] * G_pad + head).reshape(BH, P * G_pad), axis=1)
    row_pad = [(0, 0), (0, W * mk.ROWS)]
    rpos = jnp.pad(mg.row_positions(tok, posc, H_kv=H_kv, G_pad=G_pad), row_pad, constant_values=-1)
    lse_rows = jnp.pad(lse_rows, row_pad, constant_values=jnp.inf)
    U = plan.n_units
    tab = ix.unit_tab.reshape(BH, 3, U).transpose(0, 2, 1)
    units = jnp.concatenate([tab, jnp.zeros((BH, U, 1), jnp.int32)], axis=2)
    tok_p = jnp.pad(tok, [(0, 0), (0, pad)], constant_values=-1)
    diqT, dik_part, vals = mk.fused_parts(
        units, tok_p, *scalars, rpos, lse_rows, kvo.rows(qc, H_kv, G_pad, D_pad), iqp, kg, ikg,
        block_size=sz.block_size, G_pad=G_pad, groups=sz.G, H_kv=H_kv, n_tiles=n_tiles, W=W, D_orig=D, Di_orig=Di,
        interpret=interpret,
    )
    (dik,) = kvo.reduce_units(ix.ustart, [dik_part], n_blocks=sz.n_blocks, block_size=sz.block_size,
                              interpret=plan.interpret, accs=acc[:1])
    diq_part = diqT  # a row per padded position
    diq = kvo.sum_slots(diq_part, ix.inv, G_pad=1, interpret=plan.interpret)
    diq = kvo.ungroup(diq[:, :, 0, :Di], B)
    live = (jnp.arange(plan.n_units) < ix.ustart[:, -1:])[..., None]  # units with tiles (others: not written)
    value = acc[1] + jnp.where(live, vals, 0.0).sum(axis=(1, 2)).reshape(B, H_kv)
    return diq, (dik, value)


def _prep(k, ik, block_idx, lse, pos, sz: kvo.Sizes, Di_pad: int):
    """Shared wrapper layouts: k, ik in the kernels' padded layout, cleaned ids, float32 lse."""
    kg = kvo.kv_layout(k, sz.T_kv_pad, sz.D_pad)
    ikg = kvo.kv_layout(ik, sz.T_kv_pad, Di_pad)
    return kg, ikg, kvo.clean_ids(block_idx, sz.block_size, pos), lse.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("block_size", "plan"))
def _index_kl_fwd(q, k, iq, ik, block_idx, lse, pos, *, block_size: int, plan: kvo.Plan):
    sz = kvo.sizes(q, k, block_idx, block_size)
    Di_pad = pad_dim(iq.shape[3])
    T_pad = plan.n_chunks * plan.t_chunk
    kg, ikg, ids, lse = _prep(k, ik, block_idx, lse, pos, sz, Di_pad)
    chunk = functools.partial(_chunk_fwd, kg=kg, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad)
    xs = (kvo.pad_time(pos, T_pad, -1), kvo.pad_time(q, T_pad), kvo.pad_time(lse, T_pad), kvo.pad_time(iq, T_pad))
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    kl, lse_idx, S = kvo.map_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, index)
    T = sz.T
    return kl[:, :T], (lse_idx[:, :T], S[:, :T])


def _group_sum(dik):
    """[B, H_kv, L, Di] per-group d ik -> [B, L, Di]: ik is shared by the groups, so their sum, in
    group order (a fixed order: deterministic)."""
    acc = dik[:, 0]
    for r in range(1, dik.shape[1]):
        acc = acc + dik[:, r]
    return acc


@functools.partial(jax.jit, static_argnames=("block_size", "plan"))
def _index_kl_bwd(q, k, iq, ik, block_idx, lse, pos, lse_idx, S, g, *, block_size: int, plan: kvo.Plan):
    sz = kvo.sizes(q, k, block_idx, block_size)
    Di = iq.shape[3]
    Di_pad = pad_dim(Di)
    T_pad = plan.n_chunks * plan.t_chunk
    kg, ikg, ids, lse = _prep(k, ik, block_idx, lse, pos, sz, Di_pad)
    g = g.astype(jnp.float32)
    zlse = jnp.where(jnp.isfinite(lse_idx), lse_idx, 0.0)  # empty support: no tile reads it
    w1 = g * S.astype(jnp.float32)  # the kernel's dz is summed over a token's G heads
    w2 = g * (1.0 / sz.G)
    chunk = functools.partial(_chunk_bwd, kg=kg, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad)
    xs = (kvo.pad_time(pos, T_pad, -1),) + tuple(kvo.pad_time(x, T_pad) for x in (q, lse, iq, zlse, w1, w2))
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    zeros = jnp.zeros((sz.BH, sz.n_blocks * block_size, Di_pad), jnp.float32)
    diq, (dik,) = kvo.scan_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, (zeros,), index)  # d ik: chunk order
    acc = _group_sum(dik.reshape(sz.B, sz.H_kv, sz.n_blocks * block_size, Di_pad))
    return diq[:, : sz.T].astype(iq.dtype), acc[:, : sz.L, :Di].astype(ik.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "plan", "mosaic"))
def _index_kl_sum_fused(q, k, iq, ik, block_idx, lse, pos, w, *, block_size: int, plan: kvo.Plan, mosaic=None):
    """value float32 [B, H_kv] = sum_i w[b, i] kl[b, i, r], with d iq float32 [B, T, H_kv, Di] and
    d ik float32 [B, H_kv, L, Di] (per group) of it: a student pass, then one teacher pass."""
    sz = kvo.sizes(q, k, block_idx, block_size)
    Di = iq.shape[3]
    Di_pad = pad_dim(Di)
    T_pad = plan.n_chunks * plan.t_chunk
    kg, ikg, ids, lse = _prep(k, ik, block_idx, lse, pos, sz, Di_pad)
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    posp, iqp = kvo.pad_time(pos, T_pad, -1), kvo.pad_time(iq, T_pad)
    student = functools.partial(_chunk_student, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad)
    zlse = kvo.map_chunks(student, (posp, iqp), plan.n_chunks, plan.t_chunk, index)
    zlse = jnp.where(jnp.isfinite(zlse), zlse, 0.0)  # empty support: no tile reads it
    # dz = w (softmax(z) - Pbar): the teacher's mass S over the support taken as 1 (lse is its normaliser).
    w1 = jnp.broadcast_to(kvo.pad_time(w.astype(jnp.float32), T_pad)[:, :, None], zlse.shape)
    xs = (posp, kvo.pad_time(q, T_pad), kvo.pad_time(lse, T_pad), iqp, zlse, w1, w1 * (1.0 / sz.G))
    zeros = jnp.zeros((sz.BH, sz.n_blocks * block_size, Di_pad), jnp.float32)
    if mosaic is None:
        chunk = functools.partial(_chunk_bwd, kg=kg, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad, value=True)
        (diq, kl), (dik,) = kvo.scan_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, (zeros,), index)
        value = _weighted_sum(kl[:, : sz.T], w)
    else:  # mosaic: the interpret argument of the Mosaic GPU kernel (False on a GPU)
        chunk = functools.partial(_chunk_fused_mgpu, kg=kg, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad,
                                  interpret=mosaic)
        value0 = jnp.zeros((sz.B, sz.H_kv), jnp.float32)
        diq, (dik, value) = kvo.scan_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, (zeros, value0), index)
    dik = dik.reshape(sz.B, sz.H_kv, sz.n_blocks * block_size, Di_pad)[:, :, : sz.L, :Di]
    return value, diq[:, : sz.T], dik


@functools.partial(jax.jit, static_argnames=("block_size", "plan"))
def _main_and_index_kl_bwd(q, k, v, iq, ik, block_idx, pos, out, lse, dout, dlse, g, *, block_size: int,
                           plan: kvo.Plan):
    sz = kvo.sizes(q, k, block_idx, block_size)
    Di = iq.shape[3]
    Di_pad = pad_dim(Di)
    T_pad = plan.n_chunks * plan.t_chunk
    (kg, vg), xs, index, zeros = sab.prepare(q, k, v, block_idx, pos, out, lse, dout, dlse, sz=sz, plan=plan)
    ikg = kvo.kv_layout(ik, sz.T_kv_pad, Di_pad)
    iqp = kvo.pad_time(iq, T_pad)
    student = functools.partial(_chunk_student, ikg=ikg, sz=sz, plan=plan, Di_pad=Di_pad)
    zlse = kvo.map_chunks(student, (xs[0], iqp), plan.n_chunks, plan.t_chunk, index)
    zlse = jnp.where(jnp.isfinite(zlse), zlse, 0.0)  # empty support: no tile reads it
    w1 = kvo.pad_time(g.astype(jnp.float32), T_pad)  # dz = g (softmax(z) - Pbar), S taken as 1
    chunk = functools.partial(sab.chunk_bwd, kg=kg, vg=vg, ikg=ikg, sz=sz, plan=plan)
    dik0 = jnp.zeros((sz.BH, sz.n_blocks * block_size, Di_pad), jnp.float32)
    (dq, diq), (dk, dv, dik) = kvo.scan_chunks(chunk, xs + (iqp, zlse, w1, w1 * (1.0 / sz.G)), plan.n_chunks,
                                               plan.t_chunk, (*zeros, dik0), index)
    d_ik = _group_sum(dik.reshape(sz.B, sz.H_kv, sz.n_blocks * block_size, Di_pad))
    T = sz.T
    return (dq[:, :T], sab.kv_back(dk, sz, k.dtype), sab.kv_back(dv, sz, v.dtype), diq[:, :T].astype(iq.dtype),
            d_ik[:, : sz.L, :Di].astype(ik.dtype))


def main_and_index_kl_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    g: jax.Array,
    dlse: jax.Array | None = None,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
    """The main branch's backward with the index KL's gradient fused in: (dq, dk, dv, d iq, d ik) =
    `sparse_attention_bwd(q, k, v, block_idx, out, lse, dout, dlse)` and the gradients with respect
    to iq, ik of sum_{b, i, r} g[b, i, r] kl[b, i, r] (kl as `index_kl`, float32 g [B, T, H_kv]: the
    weights times the cotangent, as `index_kl_sum` with weights w and cotangent c has g = w c).

    One pass over the units: the backward kernel recomputes every tile's teacher P for dq, dk, dv
    anyway; the KL's per-token rows (head sum, student logits, dz, d iq, d IK_c,
    `kv_outer.index_grad_tile`) come from the same P, so no separate teacher pass. A student-only
    pass (the student's lse over the support) runs first. lse must be the main branch's LSE over the
    support (the teacher's normaliser; the gradient takes the teacher's mass S as 1, as
    `index_kl_sum` does). The KL's value is not computed. Options: see `sparse_attention_bwd`.

    Measured slower than the two passes it replaces on an H200 at 128K (paper heads: 237 ms against
    171 ms for `sparse_attention_bwd` + `index_kl_sum`; the extra index tiles outgrow the registers;
    BENCHMARKS.md), so the train step does not use it.
    """
    sz = _check(q, k, iq, ik, block_idx, lse, block_size, q_pos)
    check_qkv(q, k, v, dtypes=KERNEL_DTYPES, cached=q_pos is not None)
    for name, x in (("out", out), ("dout", dout)):
        check_shape(name, x, q.shape, "[B, T, H_q, D], as q")
    check_shape("g", g, (sz.B, sz.T, sz.H_kv), f"[B={sz.B}, T={sz.T}, H_kv={sz.H_kv}]")
    check_floating("g", g)
    if dlse is not None:
        check_shape("dlse", dlse, q.shape[:3], "[B, T, H_q]")
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit,
                               num_warps=num_warps, num_stages=num_stages)
    plan = config.resolve("bwd", sz, f32=jnp.float32 in (q.dtype, iq.dtype), interpret=interpret)
    if not plan.interpret and sz.kv_tile > kvo.KV_TILE and max(sz.D_pad, pad_dim(iq.shape[3])) > 64:
        # Triton for sm_90 (experiments/kernel_smem.py): 258-324 KiB at block 256 with D or D_idx 128, 194 KiB at 64
        raise ValueError(f"block_size {block_size} with D {sz.D} / D_idx {iq.shape[3]}: the fused backward's tiles "
                         "exceed the 227 KiB of shared memory of an H100 / H200 over 128-key blocks unless D and "
                         "D_idx are <= 64; use the separate passes (sparse_attention_bwd, index_kl_sum)")
    return _main_and_index_kl_bwd(q, k, v, iq, ik, block_idx, kvo.positions(q_pos, sz.B, sz.T), out, lse, dout, dlse,
                                  g, block_size=block_size, plan=plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _attention_kl_grad(q, k, v, iq, ik, block_idx, pos, w, block_size, interpret):
    return _attention_kl_grad_fwd(q, k, v, iq, ik, block_idx, pos, w, block_size, interpret)[0]


def _attention_kl_grad_fwd(q, k, v, iq, ik, block_idx, pos, w, block_size, interpret):
    out, lse = sparse_attention_fwd(q, k, v, block_idx, block_size=block_size, q_pos=pos, interpret=interpret)
    kl = jnp.zeros((q.shape[0], k.shape[2]), jnp.float32)
    return (out, lse, kl), (q, k, v, iq, ik, block_idx, pos, w, out, lse)


def _attention_kl_grad_bwd(block_size, interpret, res, cts):
    q, k, v, iq, ik, block_idx, pos, w, out, lse = res
    dout, dlse, dkl = cts
    g = w.astype(jnp.float32)[:, :, None] * dkl.astype(jnp.float32)[:, None, :]  # [B, T, H_kv]
    dq, dk, dv, d_iq, d_ik = main_and_index_kl_bwd(q, k, v, iq, ik, block_idx, out, lse, dout, g, dlse,
                                                   block_size=block_size, q_pos=pos, interpret=interpret)
    return dq, dk, dv, d_iq, d_ik, None, None, None


_attention_kl_grad.defvjp(_attention_kl_grad_fwd, _attention_kl_grad_bwd)


def sparse_attention_with_kl_grad(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    weights: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A training step's main branch and index-KL gradient in one backward pass: (out, lse, kl).

    out, lse are `pallas.sparse_attention.sparse_attention`'s (differentiable in q, k, v). kl float32
    [B, H_kv] is ZERO in value, but its gradient with respect to iq and ik is that of
    `index_kl_sum(q, k, iq, ik, block_idx, lse, weights)` (q, k get none from it: the teacher is
    detached), so a loss `... + kl.sum()` trains the index branch as the KL would: the backward runs
    `main_and_index_kl_bwd`, one teacher pass for both. For the steps that do not need the KL's
    value (a training step's update does not depend on it); take the value from `index_kl_sum`
    where it is logged.
    """
    cached = q_pos is not None
    check_qkv(q, k, v, dtypes=KERNEL_DTYPES, cached=cached)
    check_index(iq, ik, k, dtypes=KERNEL_DTYPES, cached=cached)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    if cached:
        check_q_pos(q_pos, *q.shape[:2])
    sz = kvo.sizes(q, k, block_idx, block_size)
    check_shape("weights", weights, (sz.B, sz.T), f"[B={sz.B}, T={sz.T}]")
    check_floating("weights", weights)
    return _attention_kl_grad(q, k, v, iq, ik, block_idx, kvo.positions(q_pos, sz.B, sz.T), weights, block_size,
                              interpret)


def _weighted_sum(kl, w):
    """kl [B, T, H_kv], w [B, T] -> float32 [B, H_kv]: sum over tokens of w * kl."""
    return jnp.einsum("btr,bt->br", kl, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def _check(q, k, iq, ik, block_idx, lse, block_size, q_pos) -> kvo.Sizes:
    cached = q_pos is not None
    check_qkv(q, k, dtypes=KERNEL_DTYPES, cached=cached)
    check_index(iq, ik, k, dtypes=KERNEL_DTYPES, cached=cached)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    if cached:
        check_q_pos(q_pos, *q.shape[:2])
    check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
    check_floating("lse", lse)
    return kvo.sizes(q, k, block_idx, block_size)


def _plan(kernel, config, sz, q, iq, interpret) -> kvo.Plan:
    return config.resolve(kernel, sz, f32=jnp.float32 in (q.dtype, iq.dtype), width=pad_dim(iq.shape[3]),
                          interpret=interpret)


def index_kl_fwd(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(kl float32 [B, T, H_kv], res = (lse_idx, S) float32 [B, T, H_kv] each): the student's LSE over
    the support (-inf where it is empty) and the teacher's mass over it, for `index_kl_bwd`.

    block_q, query_chunk, num_warps, num_stages: see `kv_outer.KVOuterConfig` (the default chunk
    bounds the backward's d iq partial buffer; forward and backward need not agree).
    interpret: None = the Pallas interpreter unless jax.default_backend() == "gpu".
    """
    sz = _check(q, k, iq, ik, block_idx, lse, block_size, q_pos)
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, num_warps=num_warps, num_stages=num_stages)
    plan = _plan("kl_fwd", config, sz, q, iq, interpret)
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _index_kl_fwd(q, k, iq, ik, block_idx, lse, pos, block_size=block_size, plan=plan)


def index_kl_bwd(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    res: tuple[jax.Array, jax.Array],
    g: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gradients (d_iq in iq.dtype, d_ik in ik.dtype) of sum(kl * g), kl, res = `index_kl_fwd(...)`;
    g: the cotangent of kl [B, T, H_kv]. q, k, lse get none (the teacher is detached).

    block_q, query_chunk, tiles_per_unit, num_warps, num_stages: see `kv_outer.KVOuterConfig`.
    """
    sz = _check(q, k, iq, ik, block_idx, lse, block_size, q_pos)
    lse_idx, S = res
    layout = f"[B={sz.B}, T={sz.T}, H_kv={sz.H_kv}]"
    for name, x in (("res[0] (lse_idx)", lse_idx), ("res[1] (S)", S), ("g", g)):
        check_shape(name, x, (sz.B, sz.T, sz.H_kv), layout)
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit,
                               num_warps=num_warps, num_stages=num_stages)
    plan = _plan("kl_bwd", config, sz, q, iq, interpret)
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _index_kl_bwd(q, k, iq, ik, block_idx, lse, pos, lse_idx, S, g, block_size=block_size, plan=plan)


# ----------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _index_kl(q, k, iq, ik, block_idx, lse, pos, block_size, config, interpret):
    return _vjp_fwd(q, k, iq, ik, block_idx, lse, pos, block_size, config, interpret)[0]


def _vjp_fwd(q, k, iq, ik, block_idx, lse, pos, block_size, config, interpret):
    sz = kvo.sizes(q, k, block_idx, block_size)
    plan = _plan("kl_fwd", config, sz, q, iq, interpret)
    kl, res = _index_kl_fwd(q, k, iq, ik, block_idx, lse, pos, block_size=block_size, plan=plan)
    return kl, (q, k, iq, ik, block_idx, lse, pos, res)


def _vjp_bwd(block_size, config, interpret, saved, g):
    q, k, iq, ik, block_idx, lse, pos, (lse_idx, S) = saved
    plan = _plan("kl_bwd", config, kvo.sizes(q, k, block_idx, block_size), q, iq, interpret)
    d_iq, d_ik = _index_kl_bwd(q, k, iq, ik, block_idx, lse, pos, lse_idx, S, g, block_size=block_size, plan=plan)
    return None, None, d_iq, d_ik, None, None, None  # teacher detached (docs/algorithm.md §6.2); ids are integers


_index_kl.defvjp(_vjp_fwd, _vjp_bwd)


def index_kl(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """kl float32 [B, T, H_kv] of `index_kl_fwd`, differentiable in iq and ik (`index_kl_bwd`); q, k
    and lse get zero gradients, block_idx none. L_KL (docs/algorithm.md §6.1) is `index_kl(...).mean()`."""
    sz = _check(q, k, iq, ik, block_idx, lse, block_size, q_pos)
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit)
    return _index_kl(q, k, iq, ik, block_idx, lse, kvo.positions(q_pos, sz.B, sz.T), block_size, config, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _index_kl_sum(q, k, iq, ik, block_idx, lse, pos, w, block_size, config, interpret, mosaic):
    # Without a gradient: the forward kernel alone (one teacher pass, no d iq / d ik).
    plan = _plan("kl_fwd", config, kvo.sizes(q, k, block_idx, block_size), q, iq, interpret)
    kl, _ = _index_kl_fwd(q, k, iq, ik, block_idx, lse, pos, block_size=block_size, plan=plan)
    return _weighted_sum(kl, w)


def _sum_vjp_fwd(q, k, iq, ik, block_idx, lse, pos, w, block_size, config, interpret, mosaic):
    plan = _plan("kl_bwd", config, kvo.sizes(q, k, block_idx, block_size), q, iq, interpret)
    value, diq, dik = _index_kl_sum_fused(q, k, iq, ik, block_idx, lse, pos, w, block_size=block_size, plan=plan,
                                          mosaic=mosaic)
    return value, (diq, dik, jnp.zeros((0,), iq.dtype), jnp.zeros((0,), ik.dtype))


def _sum_vjp_bwd(block_size, config, interpret, mosaic, saved, c):
    diq, dik, iq_dtype, ik_dtype = saved
    c = c.astype(jnp.float32)  # [B, H_kv]: one cotangent per (batch row, group)
    d_iq = (diq * c[:, None, :, None]).astype(iq_dtype.dtype)
    d_ik = _group_sum(dik * c[:, :, None, None])
    return None, None, d_iq, d_ik.astype(ik_dtype.dtype), None, None, None, None


_index_kl_sum.defvjp(_sum_vjp_fwd, _sum_vjp_bwd)


def index_kl_sum(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    weights: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    interpret: bool | None = None,
    kl_kernel: str = "triton",
) -> jax.Array:
    """float32 [B, H_kv]: sum_i weights[b, i] * kl[b, i, r] (kl as `index_kl`; weights float [B, T],
    e.g. 1 / (T * H_kv) for L_KL), differentiable in iq and ik for fewer passes than `index_kl`.

    Under differentiation the weights are known in the forward, so it computes the value and the
    gradients together: a student-only pass (the student's lse over the support, cheap: one row per
    token, no teacher), then ONE teacher pass (the backward kernel, also writing the forward's
    partial sums) instead of `index_kl`'s two (forward, backward). Its residuals are the gradients
    themselves (d iq [B, T, H_kv, D_idx] and d ik per group [B, H_kv, L, D_idx], float32), scaled by
    the cotangent in the backward. The gradient takes the teacher's mass over the support S as 1
    (exact when lse is the main branch's LSE over this support, as it must be; `index_kl` keeps S,
    which is 1 to float rounding there). Without differentiation it runs `index_kl`'s forward kernel.
    Options: see `index_kl`; kl_kernel: the teacher pass's tile kernel, "triton" (default), "mosaic"
    (`pallas.mgpu_index_kl`: bfloat16, G_pad 8 or 16, block_size 128, D and D_idx 64 or 128; block_q
    is then 128 // G_pad; interpreted on a CPU) or "auto" (Mosaic GPU when compiled for an sm_90
    GPU and supported). The Mosaic GPU pass matches the Triton one, but on an H200 it is slower
    (BENCHMARKS.md): "triton" stays the default.
    """
    sz = _check(q, k, iq, ik, block_idx, lse, block_size, q_pos)
    check_shape("weights", weights, (sz.B, sz.T), f"[B={sz.B}, T={sz.T}]")
    check_floating("weights", weights)
    mosaic = _mosaic_kl(kl_kernel, sz, q, k, iq, ik, block_q, interpret)
    if mosaic is not None:
        block_q = mk.ROWS // sz.G_pad
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit)
    return _index_kl_sum(q, k, iq, ik, block_idx, lse, kvo.positions(q_pos, sz.B, sz.T), weights, block_size,
                         config, interpret, mosaic)



def _mosaic_kl(kl_kernel: str, sz: kvo.Sizes, q, k, iq, ik, block_q, interpret):
    """None (the Triton teacher pass) or the Mosaic GPU kernel's interpret argument (False: compiled)."""
    if kl_kernel not in ("triton", "mosaic", "auto"):
        raise ValueError(f"kl_kernel: expected 'triton', 'mosaic' or 'auto', got {kl_kernel!r}")
    if kl_kernel == "triton":
        return None
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, iq, ik)}
    dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
    args = (sz.G_pad, sz.D_pad, pad_dim(iq.shape[3]), sz.block_size, dtype)
    interp = interpret_mode(interpret)
    if kl_kernel == "auto":
        ok = mg.on_hopper() and not interp and block_q is None and mk.supported(*args)
        return False if ok else None
    mk.check_supported(*args)
    if block_q is not None and block_q != mk.ROWS // sz.G_pad:
        raise ValueError(f"block_q: the Mosaic GPU KL pass takes {mk.ROWS // sz.G_pad} (128 // G_pad), got {block_q}")
    return plgpu_mosaic.InterpretGPUParams() if interp else False


def teacher_lse(
    q: jax.Array,
    k: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    query_chunk: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The teacher's LSE float32 [B, T, H_q] over the selected support, for callers without the main
    branch's: the main-branch forward with v = k, its output thrown away (~2x the needed work; prefer
    the LSE the main branch computes anyway). No gradient."""
    lse = sparse_attention_fwd(
        q, k, k, block_idx, block_size=block_size, q_pos=q_pos, block_q=block_q, query_chunk=query_chunk,
        interpret=interpret,
    )[1]
    return lax.stop_gradient(lse)
