"""MSA index branch, KL alignment loss over the selected support, KV-outer: fused forward and backward.

Contract (MSA_SPEC.md sections 6.1 and 7)::

    kl = index_kl(q, k, iq, ik, block_idx, lse, *, block_size)  # jax.custom_vjp
    kl, res = index_kl_fwd(q, k, iq, ik, block_idx, lse, *, block_size, ...)
    d_iq, d_ik = index_kl_bwd(q, k, iq, ik, block_idx, lse, res, g, *, block_size, ...)
    lse = teacher_lse(q, k, block_idx, *, block_size)

q [B, T, H_q, D], k [B, T, H_kv, D] (one dtype, bfloat16 or float32): the main branch's queries and
keys (the teacher). iq [B, T, H_kv, D_idx], ik [B, T, D_idx] (one dtype, bfloat16 or float32; ik is
shared by the groups): the index branch (the student). block_idx int32 [B, T, H_kv, top_k] with the
id semantics of `pallas.sparse_attention_kv` (-1 padding, ids outside [0, i // block_size] ignored,
duplicates count once). lse float32 [B, T, H_q]: the main branch's LSE over the same support
(natural log; the second output of `pallas.sparse_attention_kv.sparse_attention_fwd`).

For every (b, token i, group r), with U = the keys j <= i of the selected blocks and G = H_q // H_kv:

    teacher  Pbar_j = (1/G) sum_{h in group r} exp(q[i,h].k[j,r] / sqrt(D) - lse[i,h])
    student  z_j = iq[i,r].ik[j] / sqrt(D_idx),   lse_idx = logsumexp_U z
    kl[b, i, r] = A - Bz + lse_idx * S,  A = sum_U Pbar log Pbar (0 log 0 = 0), Bz = sum_U Pbar z,
                                         S = sum_U Pbar

which is KL(Pbar || softmax_U z) when lse is exact (then S = 1; S is kept so that the gradient is
exactly that of the computed value). kl is float32 [B, T, H_kv]; 0 for a (token, group) with an
empty support. The mean of kl over (b, t, r) is `msa_jax.ops.reference.index_kl_loss`. Only iq, ik
get gradients (the teacher is detached, spec 6.2): with g the cotangent of kl[b, i, r],

    dz_j = g * (S * exp(z_j - lse_idx) - Pbar_j),   d iq[i,r] = sum_j dz_j ik[j] / sqrt(D_idx),
    d ik[j] = sum_{(i, r) with j in U} dz_j iq[i,r] / sqrt(D_idx).

Everything is deterministic (fixed summation orders, no atomics): two runs give the same bits.

Design
------
The reverse index of `pallas.sparse_attention_kv` (tiles of BQ query tokens x G_pad heads = M rows
that all selected one KV block c; `inv` maps every (token, slot) to its padded position).

1. Forward kernel, grid (n_tiles, B*H_kv), one tile per program: loads K_c, IK_c, gathers the M
   rows of q, lse (padded heads: lse = +inf, so P = 0) and iq (every head row of a token gets the
   token's iq row: Triton dots need >= 16 rows, BQ is 8 at G = 16), P = exp(q K_c^T * scale - lse)
   and z = iq IK_c^T * scale_idx per row [M, kv_tile]. The head sum of P reshaped to [BQ, G_pad,
   kv_tile] gives Pbar (for A); Bz, S and the student's lse are row sums first, then summed (or,
   equal over a token's rows, maxed) per token. Per padded position it writes four float32
   partials: A, Bz, S over the block's keys and the student's lse over them.
2. Combine (XLA): per (token, group) the slot sums of A, Bz, S and the logsumexp of the student
   lse partials through `inv`, in slot order; kl = A - Bz + lse_idx * S. res = (lse_idx, S).
3. Backward kernel, grid (n_units, B*H_kv), units of <= tiles_per_unit tiles of one block as in
   `pallas.sparse_attention_kv_bwd`: per tile it recomputes P and z per row; at row granularity dz is
   linear in the heads, dz_row(h) = g (S exp(z - lse_idx) - P_h) / G (0 for padded heads), so no
   cross-row reduction is needed: the d iq partial rows dz_rows IK_c * scale_idx go to a per-slot
   buffer (rows of the tile, like the main backward's dq partials), and d IK_c += dz_rows^T iq_rows *
   scale_idx accumulates in float32 over the unit's tiles.
4. Reduce (Pallas, `reduce_units`): d IK per (row, block) = the sum of its units in unit order; then
   (XLA) summed over the H_kv groups in group order. d iq (XLA): per padded position the sum over the
   G real heads, then per token the sum over its slots (`sum_slots`), in slot order.
Query chunks as in the main kernels (`lax.map` in the forward, `lax.scan` in the backward, d ik
summed over the chunks in chunk order); the default chunk bounds the d iq partial buffer.

Cost. Forward per tile: 2 matmuls (M x D x kv_tile and M x D_idx x kv_tile), bytes ~ M (D + D_idx)
s in, 16 BQ bytes out; it recomputes the teacher's scores (the main kernel does not write its
probabilities), so it costs about half a main-branch forward when D_idx ~ D. Backward per tile: 4
matmuls (q K^T, iq IK^T, dz IK, dz^T iq), the d iq partial M D_idx s out. The student scores are
computed per row (G_pad times the work of a per-token dot) because of the 16-row dot minimum.

Accuracy. Scores, probabilities and all partials are float32; bfloat16 inputs: the dots take bf16
operands with float32 accumulation (exact products), so the forward loses nothing beyond
summation order; the backward rounds dz to bfloat16 for its two dots and the d iq partials are in
iq.dtype (one rounding per (slot, head), summed in float32), like the main backward's dq.

Limits: as `pallas.sparse_attention_kv` (every operand of one kernel < 2**31 elements, checked on
the Triton path; vmapped batches multiply the sizes unseen). On GPU block_size must be a power of
two and block_q * G_pad >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas.common import LOG2E as _LOG2E
from pallas.common import MASK_VALUE, check_attention_args
from pallas.common import MIN_DOT as _MIN_DOT
from pallas.common import is_pow2 as _is_pow2
from pallas.common import next_pow2 as _next_pow2
from pallas.sparse_attention_kv import _INT32_LIMIT, _clean_ids, _default_block_q, _default_chunk
from pallas.sparse_attention_kv import _n_tiles, _reverse_index, sparse_attention_fwd
from pallas.sparse_attention_kv_bwd import TILES_PER_UNIT, _rows, n_units, reduce_units, sum_slots, units

__all__ = ["index_kl", "index_kl_fwd", "index_kl_bwd", "teacher_lse"]


# --------------------------------------------------------------------------------------- kernels


def _fwd_kernel(
    q0_ref,  # [16] int32: absolute position of the chunk's first token (all entries equal)
    tiles_ref,  # [n_tiles] int32: block id of every tile of this row, -1 = unused
    tok_ref,  # [BQ] int32: chunk-local token of every position of this tile, -1 = padding
    q_ref,  # [Tc * G_pad, D_pad]: the chunk's queries of this group, token-major
    lse_ref,  # [Tc * G_pad] float32: the teacher's LSE per row (padded heads: +inf, so P = 0)
    iq_ref,  # [Tc, Di_pad]: the chunk's index queries of this group
    k_ref,  # [T_kv_pad, D_pad]
    ik_ref,  # [T_kv_pad, Di_pad]: index keys (shared by the groups)
    a_ref, b_ref, s_ref, z_ref,  # [BQ] float32: A, Bz, S, student lse of this tile's positions
    *,
    scale: float,
    scale_idx: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    groups: int,  # G: real heads per token
):
    bq = tok_ref.shape[0]
    M = bq * heads
    c = tiles_ref[pl.program_id(0)]

    @pl.when(c >= 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        row_tok = tok_ref[m_iota // heads]  # [M]: gather load of the tile's token ids
        rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
        q = q_ref[rows]  # [M, D_pad]
        lse = lse_ref[rows]  # [M]
        iq = iq_ref[jnp.maximum(row_tok, 0)]  # [M, Di_pad]: each head row gets its token's row
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        ik = ik_ref[pl.ds(start, kv_tile), :]
        prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        prec_idx = lax.Precision.HIGHEST if iq_ref.dtype == jnp.float32 else None
        s = plgpu.dot(q, k, trans_b=True, precision=prec) * (scale * _LOG2E)  # [M, kv_tile]
        z = plgpu.dot(iq, ik, trans_b=True, precision=prec_idx) * scale_idx  # [M, kv_tile]

        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
        q0 = q0_ref[0]
        mask = (row_tok >= 0)[:, None] & (key_pos[None, :] <= (q0 + row_tok)[:, None])
        if kv_tile > block_size:  # 16-row K tile for block_size 8: drop the rows of block c + 1
            mask = mask & (key_pos < start + block_size)[None, :]
        p = jnp.where(mask, jnp.exp2(s - (lse * _LOG2E)[:, None]), 0.0)

        # Only the entropy term needs the head sum of P per key: one [M, kv_tile] reshape. The other
        # partials are row sums first, then [M] -> [BQ, G_pad] reshapes (small: Triton converts
        # the layout of a reshaped 2-d tile through shared memory, which is what runs out).
        pbar = jnp.sum(p.reshape(bq, heads, kv_tile), axis=1) * (1.0 / groups)  # [BQ, kv_tile]
        pos = pbar > 0.0
        a_ref[...] = jnp.sum(jnp.where(pos, pbar * jnp.log(jnp.where(pos, pbar, 1.0)), 0.0), axis=1)
        zr = jnp.where(mask, z, MASK_VALUE)  # every head row of a token holds the token's z
        b_row = jnp.sum(p * jnp.where(mask, z, 0.0), axis=1)  # [M]
        s_row = jnp.sum(p, axis=1)
        zm_row = jnp.max(zr, axis=1)
        zl_row = jnp.sum(jnp.where(mask, jnp.exp(zr - zm_row[:, None]), 0.0), axis=1)
        b_ref[...] = jnp.sum(b_row.reshape(bq, heads), axis=1) * (1.0 / groups)
        s_ref[...] = jnp.sum(s_row.reshape(bq, heads), axis=1) * (1.0 / groups)
        zm = jnp.max(zm_row.reshape(bq, heads), axis=1)  # equal over the token's rows
        zl = jnp.max(zl_row.reshape(bq, heads), axis=1)
        seen = zl > 0.0
        z_ref[...] = jnp.where(seen, zm + jnp.log(jnp.where(seen, zl, 1.0)), -jnp.inf)


def _bwd_kernel(
    q0_ref,  # [16] int32: absolute position of the chunk's first token
    unit_ref,  # [3 * U] int32: (block, first tile, tile count) of every unit of this row
    tok_ref,  # [P] int32: chunk-local token of every padded position, -1 = padding
    q_ref,  # [Tc * G_pad, D_pad]: the chunk's queries, token-major
    lse_ref,  # [Tc * G_pad] float32: the teacher's LSE (padded heads: +inf, so P = 0)
    iq_ref,  # [Tc, Di_pad]
    zlse_ref, w1_ref, w2_ref,  # [Tc] float32: student lse, g * S / G, g / G per token
    k_ref,  # [T_kv_pad, D_pad]
    ik_ref,  # [T_kv_pad, Di_pad]
    diq_ref,  # [P * G_pad, Di_pad]: d iq partial of every padded position (rows of its tile)
    dik_ref,  # [kv_tile, Di_pad] float32: this unit's partial d IK
    *,
    scale: float,
    scale_idx: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    groups: int,  # G: real heads per token
    bq: int,  # query tokens per tile
    n_units: int,
):
    M = bq * heads
    u = pl.program_id(0)
    c = unit_ref[u]
    t0 = unit_ref[n_units + u]
    n = unit_ref[2 * n_units + u]
    prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    prec_idx = lax.Precision.HIGHEST if iq_ref.dtype == jnp.float32 else None
    zeros = jnp.zeros(dik_ref.shape, jnp.float32)

    @pl.when(n > 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        real_head = (m_iota % heads) < groups
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        ik = ik_ref[pl.ds(start, kv_tile), :]
        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
        q0 = q0_ref[0]

        def tile(j, dik):
            t = t0 + j
            row_tok = tok_ref[t * bq + m_iota // heads]
            tok = jnp.maximum(row_tok, 0)
            rows = tok * heads + m_iota % heads
            q = q_ref[rows]
            lse = lse_ref[rows]
            iq = iq_ref[tok]
            zlse = zlse_ref[tok]
            w1 = w1_ref[tok]
            w2 = w2_ref[tok]
            s = plgpu.dot(q, k, trans_b=True, precision=prec) * (scale * _LOG2E)
            z = plgpu.dot(iq, ik, trans_b=True, precision=prec_idx) * scale_idx
            mask = (real_head & (row_tok >= 0))[:, None] & (key_pos[None, :] <= (q0 + row_tok)[:, None])
            if kv_tile > block_size:
                mask = mask & (key_pos < start + block_size)[None, :]
            p = jnp.exp2(s - (lse * _LOG2E)[:, None])
            qz = jnp.exp(z - zlse[:, None])
            dz = jnp.where(mask, w1[:, None] * qz - w2[:, None] * p, 0.0).astype(iq.dtype)
            diq = plgpu.dot(dz, ik, precision=prec_idx) * scale_idx  # [M, Di_pad]
            diq_ref[pl.ds(pl.multiple_of(t * M, M), M), :] = diq.astype(diq_ref.dtype)
            return dik + plgpu.dot(dz, iq, trans_a=True, precision=prec_idx) * scale_idx

        dik_ref[...] = lax.fori_loop(0, n, tile, zeros)

    @pl.when(n <= 0)
    def _():
        dik_ref[...] = zeros


# -------------------------------------------------------------------------------------- wrapper


def _kv_layout(x, T_kv_pad, D_pad):
    """[B, T, H, D] -> [B*H, T_kv_pad, D_pad] ([B, T, D] -> [B, T_kv_pad, D_pad])."""
    T, D = x.shape[1], x.shape[-1]
    pad = [(0, 0), (0, T_kv_pad - T)] + [(0, 0)] * (x.ndim - 3) + [(0, D_pad - D)]
    x = jnp.pad(x, pad)
    if x.ndim == 3:
        return x
    B, _, H, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * H, T_kv_pad, D_pad)


def _group_rows(x, Di_pad=None):
    """[B, Tc, H_kv(, Di)] -> [B*H_kv, Tc(, Di_pad)]: per-token values of a group."""
    if x.ndim == 4:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Di_pad - x.shape[3])))
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _ungroup(x, B, H_kv):
    """[B*H_kv, Tc(, ...)] -> [B, Tc, H_kv(, ...)]."""
    return jnp.moveaxis(x.reshape(B, H_kv, *x.shape[1:]), 1, 2)


def _combine(parts, inv):
    """Partials a, b, s, z [BH, P] + inv [BH, Tc, top_k] -> A, Bz, S, lse_idx float32 [BH, Tc]: slot
    sums (logsumexp for the student lse), in slot order."""
    top_k = inv.shape[-1]

    def row(a, b, s, z, inv_r):
        valid = inv_r >= 0
        idx = jnp.maximum(inv_r, 0)
        zg = jnp.where(valid, z[idx], -jnp.inf)  # [Tc, top_k]
        zm = jnp.max(zg, axis=1)
        zm = jnp.where(jnp.isfinite(zm), zm, 0.0)
        sums = [jnp.zeros(inv_r.shape[:1], jnp.float32) for _ in range(4)]
        for slot in range(top_k):
            ok = valid[:, slot]
            terms = (a[idx[:, slot]], b[idx[:, slot]], s[idx[:, slot]], jnp.exp(zg[:, slot] - zm))
            sums = [acc + jnp.where(ok, x, 0.0) for acc, x in zip(sums, terms)]
        A, Bz, S, zl = sums
        lse_idx = jnp.where(zl > 0.0, zm + jnp.log(jnp.where(zl > 0.0, zl, 1.0)), -jnp.inf)
        return A, Bz, S, lse_idx

    return jax.vmap(row)(*parts, inv)


def _chunk_fwd(q0, qc, lsec, iqc, idc, kg, ikg, *, block_size, bq, n_blocks, n_tiles, G_pad, D_pad,
               Di_pad, kv_tile, interpret, num_warps, num_stages):
    """One query chunk -> kl, lse_idx, S float32 [B, Tc, H_kv]."""
    B, Tc, H_q, D = qc.shape
    H_kv, top_k, Di = idc.shape[2], idc.shape[3], iqc.shape[3]
    G = H_q // H_kv
    BH = B * H_kv
    M = bq * G_pad
    P = n_tiles * bq
    layout = functools.partial(_rows, B=B, Tc=Tc, H_kv=H_kv, G=G, G_pad=G_pad, D_pad=D_pad)
    qg, lseg = layout(qc), layout(lsec, fill=jnp.inf)  # padded heads: P = exp(s - inf) = 0
    iqg = _group_rows(iqc, Di_pad)
    ids = idc.transpose(0, 2, 1, 3).reshape(BH, Tc, top_k)
    tiles, tok, inv = _reverse_index(ids, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    q0_arr = jnp.full((16,), q0, jnp.int32)

    kernel = functools.partial(
        _fwd_kernel, scale=D**-0.5, scale_idx=Di**-0.5, block_size=block_size, kv_tile=kv_tile,
        heads=G_pad, groups=G,
    )
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda t, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    part = pl.BlockSpec((None, bq), lambda t, bh: (bh, t))
    parts = pl.pallas_call(
        kernel,
        grid=(n_tiles, BH),
        in_specs=[
            pl.BlockSpec((16,), lambda t, bh: (0,)),
            row(n_tiles), part,
            row(Tc * G_pad, D_pad), row(Tc * G_pad), row(Tc, Di_pad),
            row(kg.shape[1], D_pad),
            pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda t, bh: (bh // H_kv, 0, 0)),  # shared ik
        ],
        out_specs=[part] * 4,
        out_shape=[jax.ShapeDtypeStruct((BH, P), jnp.float32)] * 4,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (8 if M >= 128 else 4), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name=f"msa_index_kl_fwd_bq{bq}_g{G_pad}_bs{block_size}",
    )(q0_arr, tiles, tok, qg, lseg, iqg, kg, ikg)

    A, Bz, S, lse_idx = _combine(parts, inv)
    kl = A - Bz + jnp.where(jnp.isfinite(lse_idx), lse_idx, 0.0) * S  # empty support: kl = 0
    return tuple(_ungroup(x, B, H_kv) for x in (kl, lse_idx, S))


def _chunk_bwd(q0, qc, lsec, iqc, idc, zlsec, w1c, w2c, kg, ikg, *, block_size, bq, n_blocks, n_tiles,
               n_units_, tiles_per_unit, G_pad, D_pad, Di_pad, kv_tile, interpret, num_warps, num_stages):
    """One query chunk -> d iq float32 [B, Tc, H_kv, Di], d ik float32 [BH, n_blocks * bs, Di_pad]."""
    B, Tc, H_q, D = qc.shape
    H_kv, top_k, Di = idc.shape[2], idc.shape[3], iqc.shape[3]
    G = H_q // H_kv
    BH = B * H_kv
    M = bq * G_pad
    P = n_tiles * bq
    U = n_units_
    layout = functools.partial(_rows, B=B, Tc=Tc, H_kv=H_kv, G=G, G_pad=G_pad, D_pad=D_pad)
    qg, lseg = layout(qc), layout(lsec, fill=jnp.inf)
    iqg = _group_rows(iqc, Di_pad)
    zlseg, w1g, w2g = _group_rows(zlsec), _group_rows(w1c), _group_rows(w2c)
    ids = idc.transpose(0, 2, 1, 3).reshape(BH, Tc, top_k)
    tiles, tok, inv = _reverse_index(ids, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    unit_tab, ustart = units(tiles, n_blocks=n_blocks, tiles_per_unit=tiles_per_unit, n_units=U)
    q0_arr = jnp.full((16,), q0, jnp.int32)

    kernel = functools.partial(
        _bwd_kernel, scale=D**-0.5, scale_idx=Di**-0.5, block_size=block_size, kv_tile=kv_tile,
        heads=G_pad, groups=G, bq=bq, n_units=U,
    )
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda u, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    diq_part, dik_part = pl.pallas_call(
        kernel,
        grid=(U, BH),
        in_specs=[
            pl.BlockSpec((16,), lambda u, bh: (0,)),
            row(3 * U), row(P),
            row(Tc * G_pad, D_pad), row(Tc * G_pad), row(Tc, Di_pad),
            row(Tc), row(Tc), row(Tc),
            row(kg.shape[1], D_pad),
            pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda u, bh: (bh // H_kv, 0, 0)),  # shared ik
        ],
        out_specs=[
            row(P * G_pad, Di_pad),  # every program writes the rows of its own tiles
            pl.BlockSpec((None, None, kv_tile, Di_pad), lambda u, bh: (bh, u, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, P * G_pad, Di_pad), iqc.dtype),
            jax.ShapeDtypeStruct((BH, U, kv_tile, Di_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (8 if M >= 128 else 4), num_stages=num_stages or 1
        ),
        interpret=interpret,
        name=f"msa_index_kl_bwd_bq{bq}_g{G_pad}_bs{block_size}_w{tiles_per_unit}",
    )(q0_arr, unit_tab, tok, qg, lseg, iqg, zlseg, w1g, w2g, kg, ikg)

    (dik,) = reduce_units(ustart, [dik_part], n_blocks=n_blocks, block_size=block_size, interpret=interpret)
    # Per padded position the sum over the real heads (head order), then over the slots (slot order).
    # Rows of positions that no slot points to (padding, unused tiles) are never read.
    diq_part = diq_part.reshape(BH, P, G_pad, Di_pad)
    diq_pos = diq_part[:, :, 0].astype(jnp.float32)
    for h in range(1, G):
        diq_pos = diq_pos + diq_part[:, :, h].astype(jnp.float32)
    diq = sum_slots(diq_pos, inv, G_pad=1, D_pad=Di_pad)  # [BH, Tc, 1, Di_pad]
    return _ungroup(diq[:, :, 0, :Di], B, H_kv), dik


def _prep(q, k, ik, block_idx, lse, block_size, D_pad, Di_pad):
    """Shared wrapper layouts: k, ik in the kernels' padded layout, cleaned ids, float32 lse."""
    T = q.shape[1]
    n_blocks = -(-T // block_size)
    T_kv_pad = n_blocks * block_size + (max(block_size, _MIN_DOT) - block_size)
    kg = _kv_layout(k, T_kv_pad, D_pad)
    ikg = _kv_layout(ik, T_kv_pad, Di_pad)
    return kg, ikg, _clean_ids(block_idx, block_size), lse.astype(jnp.float32)


def _pad_t(x, T_pad, fill=0):
    return jnp.pad(x, [(0, 0), (0, T_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _split(x, n_chunks, t_chunk):
    return x.reshape(x.shape[0], n_chunks, t_chunk, *x.shape[2:]).swapaxes(0, 1)


def _dims(q, k, iq, block_idx, block_size, t_chunk):
    B, T, H_q, D = q.shape
    H_kv, Di, top_k = k.shape[2], iq.shape[3], block_idx.shape[3]
    G_pad = _next_pow2(H_q // H_kv)
    D_pad = max(_MIN_DOT, _next_pow2(D))
    Di_pad = max(_MIN_DOT, _next_pow2(Di))
    n_blocks = -(-T // block_size)
    n_chunks = -(-T // t_chunk)
    return B, T, H_kv, top_k, G_pad, D_pad, Di_pad, n_blocks, n_chunks, n_chunks * t_chunk


@functools.partial(
    jax.jit, static_argnames=("block_size", "bq", "t_chunk", "interpret", "num_warps", "num_stages")
)
def _index_kl_fwd(q, k, iq, ik, block_idx, lse, *, block_size, bq, t_chunk, interpret, num_warps=None,
                  num_stages=None):
    B, T, H_kv, top_k, G_pad, D_pad, Di_pad, n_blocks, n_chunks, T_pad = _dims(q, k, iq, block_idx, block_size, t_chunk)
    kg, ikg, ids, lse = _prep(q, k, ik, block_idx, lse, block_size, D_pad, Di_pad)
    chunk = functools.partial(
        _chunk_fwd, kg=kg, ikg=ikg, block_size=block_size, bq=bq, n_blocks=n_blocks,
        n_tiles=_n_tiles(t_chunk, top_k, n_blocks, bq), G_pad=G_pad, D_pad=D_pad, Di_pad=Di_pad,
        kv_tile=max(block_size, _MIN_DOT), interpret=interpret, num_warps=num_warps, num_stages=num_stages,
    )
    xs = (_pad_t(q, T_pad), _pad_t(lse, T_pad), _pad_t(iq, T_pad), _pad_t(ids, T_pad, -1))
    if n_chunks == 1:
        kl, lse_idx, S = chunk(0, *xs)
    else:
        starts = jnp.arange(n_chunks, dtype=jnp.int32) * t_chunk
        outs = lax.map(lambda a: chunk(*a), (starts, *(_split(x, n_chunks, t_chunk) for x in xs)))
        kl, lse_idx, S = (x.swapaxes(0, 1).reshape(B, T_pad, H_kv) for x in outs)
    return kl[:, :T], (lse_idx[:, :T], S[:, :T])


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "bq", "t_chunk", "tiles_per_unit", "interpret", "num_warps", "num_stages"),
)
def _index_kl_bwd(q, k, iq, ik, block_idx, lse, lse_idx, S, g, *, block_size, bq, t_chunk, tiles_per_unit,
                  interpret, num_warps=None, num_stages=None):
    B, T, H_kv, top_k, G_pad, D_pad, Di_pad, n_blocks, n_chunks, T_pad = _dims(q, k, iq, block_idx, block_size, t_chunk)
    G = q.shape[2] // H_kv
    Di = iq.shape[3]
    BH = B * H_kv
    kg, ikg, ids, lse = _prep(q, k, ik, block_idx, lse, block_size, D_pad, Di_pad)
    g = g.astype(jnp.float32)
    zlse = jnp.where(jnp.isfinite(lse_idx), lse_idx, 0.0)  # empty support: no tile reads it
    w1 = g * S.astype(jnp.float32) * (1.0 / G)
    w2 = g * (1.0 / G)
    n_tiles = _n_tiles(t_chunk, top_k, n_blocks, bq)
    chunk = functools.partial(
        _chunk_bwd, kg=kg, ikg=ikg, block_size=block_size, bq=bq, n_blocks=n_blocks, n_tiles=n_tiles,
        n_units_=n_units(n_tiles, n_blocks, tiles_per_unit), tiles_per_unit=tiles_per_unit, G_pad=G_pad,
        D_pad=D_pad, Di_pad=Di_pad, kv_tile=max(block_size, _MIN_DOT), interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    xs = (q, lse, iq, ids, zlse, w1, w2)
    xs = tuple(_pad_t(x, T_pad, -1 if x is ids else 0) for x in xs)
    if n_chunks == 1:
        diq, dik = chunk(0, *xs)
    else:
        starts = jnp.arange(n_chunks, dtype=jnp.int32) * t_chunk

        def step(acc, a):  # d ik summed over the chunks in chunk order
            diq_c, dik_c = chunk(*a)
            return acc + dik_c, diq_c

        zeros = jnp.zeros((BH, n_blocks * block_size, Di_pad), jnp.float32)
        dik, diq = lax.scan(step, zeros, (starts, *(_split(x, n_chunks, t_chunk) for x in xs)))
        diq = diq.swapaxes(0, 1).reshape(B, T_pad, H_kv, Di)
    dik = dik.reshape(B, H_kv, n_blocks * block_size, Di_pad)
    acc = dik[:, 0]
    for r in range(1, H_kv):  # ik is shared by the groups: their sum, in group order
        acc = acc + dik[:, r]
    return diq[:, :T].astype(iq.dtype), acc[:, :T, :Di].astype(ik.dtype)


def _check_args(q, k, iq, ik, block_idx, lse, block_size):
    """Validate the arguments; returns (B, T, H_q, D, H_kv, top_k, Di)."""
    B, T, H_q, D, H_kv, top_k = check_attention_args(q, k, k, block_idx, block_size)
    if getattr(iq, "ndim", None) != 4 or iq.shape[:3] != (B, T, H_kv):
        raise ValueError(f"iq: expected shape [B={B}, T={T}, H_kv={H_kv}, D_idx], got {getattr(iq, 'shape', type(iq))}")
    Di = iq.shape[3]
    if getattr(ik, "shape", None) != (B, T, Di):
        raise ValueError(f"ik: expected shape [B={B}, T={T}, D_idx={Di}], got {getattr(ik, 'shape', type(ik))}")
    if iq.dtype != ik.dtype or iq.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"iq, ik: expected one dtype, bfloat16 or float32; got {iq.dtype}, {ik.dtype}")
    if getattr(lse, "shape", None) != (B, T, H_q):
        raise ValueError(f"lse: expected shape [B={B}, T={T}, H_q={H_q}], got {getattr(lse, 'shape', type(lse))}")
    if not jnp.issubdtype(lse.dtype, jnp.floating):
        raise ValueError(f"lse: expected a floating dtype, got {lse.dtype}")
    return B, T, H_q, D, H_kv, top_k, Di


def _options(q, k, iq, block_idx, block_size, block_q, query_chunk, tiles_per_unit, interpret):
    """Defaults and checks of the tuning arguments (GPU-only limits on the Triton path)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    interpret = bool(interpret)
    B, T, H_q, D = q.shape
    H_kv, Di, top_k = k.shape[2], iq.shape[3], block_idx.shape[3]
    G_pad = _next_pow2(H_q // H_kv)
    D_pad = max(_MIN_DOT, _next_pow2(D))
    Di_pad = max(_MIN_DOT, _next_pow2(Di))
    BH = B * H_kv
    n_blocks = -(-T // block_size)
    kv_tile = max(block_size, _MIN_DOT)
    if block_q is None:
        block_q = _default_block_q(T, G_pad)
        if jnp.float32 in (q.dtype, iq.dtype):  # f32 tiles of 128 rows exceed the H100's shared memory
            block_q = max(max(1, _MIN_DOT // G_pad), block_q // 2)
    elif not isinstance(block_q, int) or not _is_pow2(block_q):
        raise ValueError(f"block_q: expected a power of two, got {block_q!r}")
    if tiles_per_unit is None:
        tiles_per_unit = TILES_PER_UNIT
    elif not isinstance(tiles_per_unit, int) or tiles_per_unit < 1:
        raise ValueError(f"tiles_per_unit: expected an int >= 1, got {tiles_per_unit!r}")
    if query_chunk is None:  # bounds the d iq partial buffer (and the q chunk's rows)
        t_chunk = _default_chunk(T, BH, top_k, n_blocks, block_q, G_pad, max(D_pad, Di_pad))
        if t_chunk < 1:
            raise ValueError(f"no query chunk fits the partial buffer (B*H_kv={BH}, n_blocks={n_blocks}): split the batch")
    elif not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk: expected an int >= 1, got {query_chunk!r}")
    else:
        t_chunk = min(query_chunk, T)
    if not interpret:
        n_t = _n_tiles(t_chunk, top_k, n_blocks, block_q)
        T_kv_pad = n_blocks * block_size + kv_tile - block_size
        elems = (
            BH * n_t * block_q * G_pad * Di_pad,  # d iq partials
            BH * t_chunk * G_pad * D_pad,  # q chunk
            BH * T_kv_pad * D_pad,  # k
            BH * n_units(n_t, n_blocks, tiles_per_unit) * kv_tile * Di_pad,  # d ik unit partials
        )
        if max(elems) >= _INT32_LIMIT:
            raise ValueError("an operand has >= 2**31 elements (Triton int32 offsets): use a smaller query_chunk")
        if not _is_pow2(block_size):
            raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
        if block_q * G_pad < _MIN_DOT:
            raise ValueError(f"block_q * G_pad = {block_q} * {G_pad} < {_MIN_DOT}: Triton dots need >= 16 rows")
    return interpret, block_q, t_chunk, tiles_per_unit


def index_kl_fwd(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    *,
    block_size: int,
    block_q: int | None = None,
    query_chunk: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """KL(teacher || student) per (b, token, group) over the selected support: (kl float32 [B, T, H_kv],
    res = (lse_idx, S) float32 [B, T, H_kv] each, the student's LSE over the support (-inf where the
    support is empty) and the teacher's mass over it (1 for an exact lse), for `index_kl_bwd`).

    block_q: query tokens per tile (a power of two; M = block_q * G_pad rows); default as the main
      kernels (128 // G_pad, >= 16 // G_pad), halved for float32 inputs (tiles of 128 float32 rows
      exceed the H100's 227 KiB of shared memory at D = D_idx = 128).
    query_chunk: query tokens per kernel call; default: the largest balanced chunk whose backward
      partial buffer (and q chunk) has <= 2**30 elements. The forward and backward need not agree.
    interpret: None = interpret unless jax.default_backend() == "gpu".
    num_warps, num_stages: Triton compiler parameters (default 8 warps for M >= 128, else 4; 2 stages).
    """
    _check_args(q, k, iq, ik, block_idx, lse, block_size)
    interpret, block_q, t_chunk, _ = _options(q, k, iq, block_idx, block_size, block_q, query_chunk, None, interpret)
    return _index_kl_fwd(
        q, k, iq, ik, block_idx, lse, block_size=block_size, bq=block_q, t_chunk=t_chunk,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages,
    )


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
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gradients (d_iq in iq.dtype, d_ik in ik.dtype) of sum(kl * g), kl, res = `index_kl_fwd(...)`.

    g: the cotangent of kl [B, T, H_kv]. q, k, lse get no gradient (the teacher is detached).
    block_q, query_chunk, interpret, num_warps: as in the forward (same defaults).
    num_stages: default 1 (2 stages of pipelined gathers exceed shared memory at the paper heads).
    tiles_per_unit: tiles one program handles for one KV block (default 16), as in
      `pallas.sparse_attention_kv_bwd`.
    """
    B, T, H_q, D, H_kv, top_k, Di = _check_args(q, k, iq, ik, block_idx, lse, block_size)
    lse_idx, S = res
    for name, x in (("res[0] (lse_idx)", lse_idx), ("res[1] (S)", S), ("g", g)):
        if getattr(x, "shape", None) != (B, T, H_kv):
            raise ValueError(f"{name}: expected shape [B={B}, T={T}, H_kv={H_kv}], got {getattr(x, 'shape', type(x))}")
    interpret, block_q, t_chunk, tiles_per_unit = _options(
        q, k, iq, block_idx, block_size, block_q, query_chunk, tiles_per_unit, interpret
    )
    return _index_kl_bwd(
        q, k, iq, ik, block_idx, lse, lse_idx, S, g, block_size=block_size, bq=block_q, t_chunk=t_chunk,
        tiles_per_unit=tiles_per_unit, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _index_kl(q, k, iq, ik, block_idx, lse, block_size, block_q, query_chunk, tiles_per_unit, interpret):
    return index_kl_fwd(
        q, k, iq, ik, block_idx, lse, block_size=block_size, block_q=block_q, query_chunk=query_chunk,
        interpret=interpret,
    )[0]


def _index_kl_vjp_fwd(q, k, iq, ik, block_idx, lse, block_size, block_q, query_chunk, tiles_per_unit, interpret):
    kl, res = index_kl_fwd(
        q, k, iq, ik, block_idx, lse, block_size=block_size, block_q=block_q, query_chunk=query_chunk,
        interpret=interpret,
    )
    return kl, (q, k, iq, ik, block_idx, lse, res)


def _index_kl_vjp_bwd(block_size, block_q, query_chunk, tiles_per_unit, interpret, saved, g):
    q, k, iq, ik, block_idx, lse, res = saved
    d_iq, d_ik = index_kl_bwd(
        q, k, iq, ik, block_idx, lse, res, g, block_size=block_size, block_q=block_q,
        query_chunk=query_chunk, tiles_per_unit=tiles_per_unit, interpret=interpret,
    )
    return None, None, d_iq, d_ik, None, None  # teacher detached (spec 6.2); ids are integers


_index_kl.defvjp(_index_kl_vjp_fwd, _index_kl_vjp_bwd)


def index_kl(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    block_idx: jax.Array,
    lse: jax.Array,
    *,
    block_size: int,
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """kl float32 [B, T, H_kv] of `index_kl_fwd`, differentiable in iq and ik (`index_kl_bwd`); q, k
    and lse get zero gradients, block_idx none. The spec's L_KL is `index_kl(...).mean()`."""
    _check_args(q, k, iq, ik, block_idx, lse, block_size)
    return _index_kl(q, k, iq, ik, block_idx, lse, block_size, block_q, query_chunk, tiles_per_unit, interpret)


def teacher_lse(
    q: jax.Array,
    k: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    block_q: int | None = None,
    query_chunk: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The teacher's LSE float32 [B, T, H_q] over the selected support, for callers that do not have
    the main branch's: the main-branch forward with v = k, its output thrown away (the P V matmul,
    the partial-output writes and the combine are wasted: ~2x the needed work; prefer the LSE that
    the main branch computes anyway, `sparse_attention(..., return_lse=True)`). No gradient."""
    lse = sparse_attention_fwd(
        q, k, k, block_idx, block_size=block_size, block_q=block_q, query_chunk=query_chunk, interpret=interpret
    )[1]
    return lax.stop_gradient(lse)
