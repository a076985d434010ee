"""MSA main branch, KV-outer backward kernel: dq, dk, dv from the forward's output and LSE.

    dq, dk, dv = sparse_attention_bwd(q, k, v, block_idx, out, lse, dout, dlse=None, *, block_size)

q, k, v, block_idx as in `pallas.sparse_attention`; out, lse that forward's results, dout (and
optionally dlse) their cotangents. Returns the gradients of sum(out * dout) + sum(lse * dlse)
w.r.t. q, k, v in their dtypes. Deterministic: every sum has a fixed order (no floating-point
atomics), so two runs give the same bits.

Design (docs/algorithm.md §7; the machinery is `pallas.kv_outer`): delta = rowsum(dout * out) - dlse
(FlashAttention-2's D; since d lse / d logits = P, dlse only shifts it). Grid (units, B*H_kv): a
program loads K_c, V_c of its unit's block once and loops over the unit's tiles, recomputing P =
exp(q k^T * scale - lse) from the saved LSE; dV_u += P^T dout, dS = P * (dout V^T - delta),
dK_u += dS^T q * scale accumulate in float32, and the tile's dq partial dS K_c * scale goes to a
per-slot buffer in q.dtype. `reduce_units` sums each block's unit partials in unit order and
`sum_slots` a token's dq partials in slot order; dk, dv are summed over the query chunks in order.
The same kernel can also produce the index KL's gradient from those tiles' P (`chunk_bwd(...,
ikg=...)`, what `pallas.index_kl.main_and_index_kl_bwd` runs): one teacher pass for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import check_block_idx, check_int, check_q_pos, check_qkv, check_shape
from pallas import kv_outer as kvo
from pallas.common import KERNEL_DTYPES, LOG2E, MIN_DOT

__all__ = ["sparse_attention_bwd"]


def _bwd_kernel(
    pos_ref,  # [Tc] int32: the position of each of the chunk's query tokens (this batch row)
    unit_ref,  # [3 * U] int32: (block, first tile, tile count) of every unit of this row
    tok_ref,  # [P] int32: chunk-local token of every padded position, -1 = padding
    q_ref, do_ref,  # [Tc * G_pad, D_pad]: the chunk's queries / output cotangents, token-major
    lse_ref, delta_ref,  # [Tc * G_pad] float32 (padded heads: lse = +inf, so P = 0)
    k_ref, v_ref,  # [T_kv_pad, D_pad]
    *refs,  # with the KL (index=True): iq_ref [Tc, Di_pad], zlse_ref, w1_ref, w2_ref [Tc] float32 (student
    # lse, g * S, g / G per token), ik_ref [T_kv_pad, Di_pad]; then the outputs: dq_ref [P * G_pad, D_pad]
    # (dq partial of every padded position), dk_ref, dv_ref [kv_tile, D_pad] float32 (this unit's
    # partial dK, dV), and with the KL diq_ref [n_tiles * R, Di_pad], dik_ref [kv_tile, Di_pad] float32
    scale: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    bq: int,  # query tokens per tile
    n_units: int,
    index: bool = False,  # the index KL's gradient from the same tiles' P (kv_outer.index_grad_tile)
    scale_idx: float = 1.0,
    f32_sums: bool = False,
):
    if index:
        iq_ref, zlse_ref, w1_ref, w2_ref, ik_ref, dq_ref, dk_ref, dv_ref, diq_ref, dik_ref = refs
    else:
        dq_ref, dk_ref, dv_ref = refs
    M = bq * heads
    R = max(bq, MIN_DOT)  # the KL's token rows per tile
    u = pl.program_id(0)
    c, t0, n = kvo.read_unit(unit_ref, u, n_units)
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    D_pad = k_ref.shape[1]
    zeros = jnp.zeros((kv_tile, D_pad), jnp.float32)
    accs = (zeros, zeros, jnp.zeros(dik_ref.shape, jnp.float32)) if index else (zeros, zeros)

    @pl.when(n > 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        v = v_ref[pl.ds(start, kv_tile), :]
        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
        ik = ik_ref[pl.ds(start, kv_tile), :] if index else None

        def tile(j, carry):
            dk, dv = carry[:2]
            t = t0 + j
            row_tok = tok_ref[t * bq + m_iota // heads]
            live = row_tok >= 0
            rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
            q = q_ref[rows]
            do = do_ref[rows]
            lse = lse_ref[rows]
            delta = delta_ref[rows]
            s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)
            mask = live[:, None] & (key_pos[None, :] <= pos_ref[jnp.maximum(row_tok, 0)][:, None])
            if kv_tile > block_size:
                mask = mask & (key_pos < start + block_size)[None, :]
            p = jnp.where(mask, jnp.exp2(s - (lse * LOG2E)[:, None]), 0.0)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            dp = plgpu.dot(do, v, trans_b=True, precision=precision)
            ds = (p * (dp - delta[:, None])).astype(q.dtype)
            dk = dk + plgpu.dot(ds, q, trans_a=True, precision=precision) * scale
            dq = plgpu.dot(ds, k, precision=precision) * scale
            dq_ref[pl.ds(pl.multiple_of(t * M, M), M), :] = dq.astype(dq_ref.dtype)
            if not index:
                return dk, dv
            it = kvo.index_grad_tile(p, t, start, key_pos, ik, tok_ref, pos_ref, iq_ref, zlse_ref, w1_ref, w2_ref,
                                     bq=bq, heads=heads, block_size=block_size, kv_tile=kv_tile,
                                     scale_idx=scale_idx, f32_sums=f32_sums)
            diq_ref[pl.ds(pl.multiple_of(t * R, R), R), :] = it.diq.astype(diq_ref.dtype)
            return dk, dv, carry[2] + it.dik

        out = lax.fori_loop(0, n, tile, accs)
        for ref, x in zip((dk_ref, dv_ref, dik_ref) if index else (dk_ref, dv_ref), out):
            ref[...] = x

    @pl.when(n <= 0)
    def _():
        for ref, x in zip((dk_ref, dv_ref, dik_ref) if index else (dk_ref, dv_ref), accs):
            ref[...] = x


def chunk_bwd(posc, qc, doc, lsec, deltac, *rest, kg, vg, sz: kvo.Sizes, plan: kvo.Plan, acc, ikg=None):
    """One query chunk -> dq [B, Tc, H_q, D] (q.dtype), (dk, dv) float32 [BH, n_blocks * bs, D_pad]:
    acc (the running dk, dv) plus this chunk's. rest: the chunk's index (`kv_outer.ChunkIndex`); with
    the index KL's gradient fused in (ikg, the index keys in `kv_layout`, given), first its per-token
    inputs iqc [B, Tc, H_kv, Di], zlsec, w1c, w2c [B, Tc, H_kv] float32 (`kv_outer.index_grad_tile`),
    and then it returns (dq, d iq float32 [B, Tc, H_kv, Di]), (dk, dv, d ik [BH, n_blocks * bs, Di_pad])."""
    index = ikg is not None
    *kl_in, ix = rest
    B, Tc, H_q, D = qc.shape
    G, G_pad, D_pad, BH, kv_tile, H_kv = sz.G, sz.G_pad, sz.D_pad, sz.BH, sz.kv_tile, sz.H_kv
    bq, n_tiles, U = plan.block_q, plan.n_tiles, plan.n_units
    P = n_tiles * bq
    R = max(bq, MIN_DOT)
    layout = functools.partial(kvo.rows, n_groups=H_kv, G_pad=G_pad)
    qg, dog = layout(qc, width=D_pad), layout(doc, width=D_pad)
    lseg, deltag = layout(lsec, fill=jnp.inf), layout(deltac)  # padded heads: P = exp(s - inf) = 0
    tok, inv, unit_tab, ustart = ix.tok, ix.inv, ix.unit_tab, ix.ustart

    row = lambda *shape: pl.BlockSpec((None, *shape), lambda u, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    unit = lambda width: pl.BlockSpec((None, None, kv_tile, width), lambda u, bh: (bh, u, 0, 0))  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, Tc), lambda u, bh: (bh // H_kv, 0)),  # query positions of the batch row
        row(3 * U), row(P),
        row(Tc * G_pad, D_pad), row(Tc * G_pad, D_pad),
        row(Tc * G_pad), row(Tc * G_pad),
        row(kg.shape[1], D_pad), row(vg.shape[1], D_pad),
    ]
    out_specs = [row(P * G_pad, D_pad), unit(D_pad), unit(D_pad)]  # a program writes its own tiles' rows
    out_shape = [
        jax.ShapeDtypeStruct((BH, P * G_pad, D_pad), qc.dtype),
        jax.ShapeDtypeStruct((BH, U, kv_tile, D_pad), jnp.float32),
        jax.ShapeDtypeStruct((BH, U, kv_tile, D_pad), jnp.float32),
    ]
    operands = [posc, unit_tab, tok, qg, dog, lseg, deltag, kg, vg]
    kw = {}
    if index:
        iqc, zlsec, w1c, w2c = kl_in
        Di, Di_pad = iqc.shape[3], ikg.shape[2]
        in_specs += [row(Tc, Di_pad), row(Tc), row(Tc), row(Tc),
                     pl.BlockSpec((None, ikg.shape[1], Di_pad), lambda u, bh: (bh // H_kv, 0, 0))]  # shared ik
        out_specs += [row(n_tiles * R, Di_pad), unit(Di_pad)]
        out_shape += [jax.ShapeDtypeStruct((BH, n_tiles * R, Di_pad), iqc.dtype),
                      jax.ShapeDtypeStruct((BH, U, kv_tile, Di_pad), jnp.float32)]
        operands += [kvo.rows(iqc, H_kv, width=Di_pad), *(kvo.rows(x, H_kv) for x in (zlsec, w1c, w2c)), ikg]
        kw = dict(index=True, scale_idx=Di**-0.5, f32_sums=qc.dtype == jnp.float32)
    kernel = functools.partial(
        _bwd_kernel, scale=D**-0.5, block_size=sz.block_size, kv_tile=kv_tile, heads=G_pad, bq=bq, n_units=U, **kw
    )
    parts = pl.pallas_call(
        kernel,
        grid=(U, BH),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=f"msa_sparse_attention_bwd{'_kl' if index else ''}_bq{bq}_g{G_pad}_bs{sz.block_size}"
             f"_w{plan.tiles_per_unit}",
    )(*operands)
    reduce = functools.partial(kvo.reduce_units, ustart, n_blocks=sz.n_blocks, block_size=sz.block_size,
                               interpret=plan.interpret)
    dq_part = parts[0]
    sums = reduce(list(parts[1:3]), accs=acc[:2])
    if index:  # d IK_c has its own width: a call of its own
        sums = (*sums, *reduce([parts[4]], accs=acc[2:]))
    dq = kvo.sum_slots(dq_part, inv, G_pad=G_pad, out_dtype=qc.dtype, interpret=plan.interpret)
    dq = kvo.ungroup(dq[:, :, :G, :D], B).reshape(B, Tc, H_q, D)
    if not index:
        return dq, tuple(sums)
    # Per token the sum over its slots (slot order) of its positions' d iq rows (row t * R + i of tile t).
    inv_rows = jnp.where(inv >= 0, inv // bq * R + inv % bq, -1)
    diq = kvo.sum_slots(parts[3], inv_rows, G_pad=1, interpret=plan.interpret)  # [BH, Tc, 1, Di_pad]
    return (dq, kvo.ungroup(diq[:, :, 0, :Di], B)), tuple(sums)


def prepare(q, k, v, block_idx, pos, out, lse, dout, dlse, *, sz: kvo.Sizes, plan: kvo.Plan):
    """The backward's operands: (kg, vg) in `kv_layout`, the per-token inputs (pos, q, dout, lse,
    delta) padded to whole chunks, every chunk's reverse index, and zero dK, dV sums."""
    T_pad = plan.n_chunks * plan.t_chunk
    kg, vg = (kvo.kv_layout(x, sz.T_kv_pad, sz.D_pad) for x in (k, v))
    dout = dout.astype(q.dtype)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H_q]
    if dlse is not None:  # d lse / d s = P: the lse cotangent enters dS = P * (dP - delta + dlse)
        delta = delta - dlse.astype(jnp.float32)
    lse = lse.astype(jnp.float32)
    ids = kvo.clean_ids(block_idx, sz.block_size, pos)
    xs = (kvo.pad_time(pos, T_pad, -1),) + tuple(kvo.pad_time(x, T_pad) for x in (q, dout, lse, delta))
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    zeros = jnp.zeros((sz.BH, sz.n_blocks * sz.block_size, sz.D_pad), jnp.float32)
    return (kg, vg), xs, index, (zeros, zeros)


def kv_back(x, sz: kvo.Sizes, dtype):
    """[BH, n_blocks * bs, D_pad] sums -> [B, L, H_kv, D] in dtype."""
    return kvo.ungroup(x[:, : sz.L, : sz.D], sz.B).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "plan"))
def _sparse_attention_bwd(q, k, v, block_idx, pos, out, lse, dout, dlse, *, block_size: int, plan: kvo.Plan):
    sz = kvo.sizes(q, k, block_idx, block_size)
    (kg, vg), xs, index, zeros = prepare(q, k, v, block_idx, pos, out, lse, dout, dlse, sz=sz, plan=plan)
    chunk = functools.partial(chunk_bwd, kg=kg, vg=vg, sz=sz, plan=plan)
    dq, (dk, dv) = kvo.scan_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, zeros, index)
    return dq[:, : sz.T], kv_back(dk, sz, k.dtype), kv_back(dv, sz, v.dtype)


def sparse_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of sum(out * dout) (+ sum(lse * dlse)), out, lse =
    `sparse_attention_fwd(q, k, v, block_idx, block_size=block_size, q_pos=q_pos)`.

    block_q, query_chunk, tiles_per_unit, num_warps, num_stages: see `kv_outer.KVOuterConfig`.
    interpret: None = the Pallas interpreter unless jax.default_backend() == "gpu".
    """
    check_qkv(q, k, v, dtypes=KERNEL_DTYPES, cached=q_pos is not None)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    if q_pos is not None:
        check_q_pos(q_pos, *q.shape[:2])
    check_shape("out", out, q.shape, "[B, T, H_q, D], as q")
    check_shape("dout", dout, q.shape, "[B, T, H_q, D], as q")
    check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
    if dlse is not None:
        check_shape("dlse", dlse, q.shape[:3], "[B, T, H_q]")
    config = kvo.KVOuterConfig(block_q=block_q, query_chunk=query_chunk, tiles_per_unit=tiles_per_unit,
                               num_warps=num_warps, num_stages=num_stages)
    sz = kvo.sizes(q, k, block_idx, block_size)
    plan = config.resolve("bwd", sz, f32=q.dtype == jnp.float32, interpret=interpret)
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _sparse_attention_bwd(q, k, v, block_idx, pos, out, lse, dout, dlse, block_size=block_size, plan=plan)
