"""MSA main branch, backward, KV-outer: dq, dk, dv from the forward's output and LSE, no atomics.

Contract (MSA_SPEC.md sections 4 and 7)::

    dq, dk, dv = sparse_attention_bwd(q, k, v, block_idx, out, lse, dout, dlse=None, *, block_size, ...)

q, k, v, block_idx as in `pallas.sparse_attention_kv.sparse_attention_fwd`; out [B, T, H_q, D] and
lse float32 [B, T, H_q] are that forward's results, dout the cotangent of out (dlse, optional, that
of lse: since d lse / d logits = P, it just shifts delta below). Returns the
gradients of sum(out * dout) with respect to q, k, v, in their dtypes. The result is deterministic:
every sum has a fixed order (no floating-point atomics), so two runs give the same bits.

Design
------
The same reverse index as the forward (tiles of BQ query tokens x G_pad heads = M rows that all
selected one KV block c; see `pallas.sparse_attention_kv`). The tiles of block c are consecutive,
and are grouped into *units* of at most W = tiles_per_unit tiles (a hot block that every query picks
becomes many units, so many programs share it; the paper's hot-block split).

1. Wrapper (XLA): delta = rowsum(dout * out) in float32 per (token, head) (FlashAttention-2's D).
2. Kernel, grid (n_units, B*H_kv): a program loads K_c, V_c once and loops over its unit's tiles:
   gathers the M rows of q, dout, lse, delta, recomputes P = exp(q k^T * scale - lse) (the exact
   attention probabilities, thanks to the forward's LSE), and
     dV_u += P^T dout,   dS = P * (dout V^T - delta),   dK_u += dS^T q * scale   (registers, f32)
     dq partial of the tile = dS K_c * scale  -> rows [t*M, (t+1)*M) of a per-slot buffer
   and finally writes dK_u, dV_u (float32, one [kv_tile, D_pad] pair per unit).
3. Reduce kernel, grid (n_blocks, B*H_kv): dK_c = sum of the partials of block c's units, in unit
   order (deterministic; a scatter-add would use atomics on a GPU).
4. dq (XLA): for every (token, head), the sum of its top_k slot partials through `inv`, in slot
   order, in float32.
Query chunks as in the forward (the dq partial buffer holds one chunk); dk, dv are summed over the
chunks in chunk order.

Cost per tile: 5 matmuls of M x D x kv_tile (QK^T, P^T dO, dO V^T, dS^T Q, dS K) against the
forward's 2; bytes: q, dout gathered in (2 M D s), the dq partial out (M D s), lse and delta.
dq partials are in q.dtype (bf16: one extra rounding per slot, summed in float32 like the
forward's output partials); dK, dV accumulate in float32. Per unit one [kv_tile, D_pad] float32
pair goes out (W = 16 tiles: ~8% of the unit's other traffic).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas.common import LOG2E as _LOG2E
from pallas.common import MIN_DOT as _MIN_DOT
from pallas.common import check_attention_args
from pallas.common import is_pow2 as _is_pow2
from pallas.common import next_pow2 as _next_pow2
from pallas.sparse_attention_kv import _INT32_LIMIT, _clean_ids, _default_block_q, _default_chunk
from pallas.sparse_attention_kv import _n_tiles, _reverse_index, _sizes

__all__ = ["sparse_attention_bwd"]

TILES_PER_UNIT = 16


# ------------------------------------------------------------------------------------ units


def n_units(n_tiles: int, n_blocks: int, tiles_per_unit: int) -> int:
    """Static bound on the units of one row: every block's last unit may be partly empty."""
    return max(1, -(-n_tiles // tiles_per_unit) + n_blocks)


def units(tiles: jax.Array, *, n_blocks: int, tiles_per_unit: int, n_units: int):
    """tiles [BH, n_tiles] (block id per tile, grouped by block, -1 unused) -> unit tables.

    Returns unit_tab int32 [BH, 3 * n_units] = (block id, first tile, tile count) per unit, laid out
    as three consecutive [n_units] parts (count 0 = unused unit), and ustart int32 [BH, n_blocks + 1]
    (the units of block c are [ustart[c], ustart[c + 1])).
    """
    W = tiles_per_unit

    def row(t):
        valid = t >= 0
        cnt = jnp.zeros((n_blocks + 1,), jnp.int32).at[jnp.where(valid, t, n_blocks)].add(1)[:n_blocks]
        tstart = jnp.cumsum(cnt) - cnt
        nu = (cnt + W - 1) // W
        ustart = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nu)]).astype(jnp.int32)
        u = jnp.arange(n_units, dtype=jnp.int32)
        # block of unit u: the last c with ustart[c] <= u (blocks without units are skipped)
        blk = jnp.searchsorted(ustart[1:], u, side="right").astype(jnp.int32)
        live = u < ustart[-1]
        blk = jnp.minimum(blk, n_blocks - 1)
        t0 = tstart[blk] + (u - ustart[blk]) * W
        n = jnp.clip(tstart[blk] + cnt[blk] - t0, 0, W)
        tab = jnp.concatenate([jnp.where(live, blk, -1), jnp.where(live, t0, 0), jnp.where(live, n, 0)])
        return tab.astype(jnp.int32), ustart

    return jax.vmap(row)(tiles)


def _reduce_kernel(ustart_ref, *refs, block_size: int):
    """One block c: sum its units' partials in unit order."""
    n_in = len(refs) // 2
    ins, outs = refs[:n_in], refs[n_in:]
    c = pl.program_id(0)
    u0, u1 = ustart_ref[c], ustart_ref[c + 1]
    shape = outs[0].shape

    def body(u, accs):
        return tuple(a + x[u, pl.ds(0, block_size), :] for a, x in zip(accs, ins))

    accs = lax.fori_loop(u0, u1, body, tuple(jnp.zeros(shape, jnp.float32) for _ in ins))
    for o, a in zip(outs, accs):
        o[...] = a


def reduce_units(ustart, parts, *, n_blocks: int, block_size: int, interpret: bool):
    """ustart [BH, n_blocks + 1]; parts: float32 [BH, n_units, kv_tile, D] each -> [BH, n_blocks *
    block_size, D] each: per block, the sum of its units (a fixed order: deterministic)."""
    BH, U, kv_tile, D = parts[0].shape
    return pl.pallas_call(
        functools.partial(_reduce_kernel, block_size=block_size),
        grid=(n_blocks, BH),
        in_specs=[pl.BlockSpec((None, n_blocks + 1), lambda c, bh: (bh, 0))]
        + [pl.BlockSpec((None, U, kv_tile, D), lambda c, bh: (bh, 0, 0, 0)) for _ in parts],
        out_specs=[pl.BlockSpec((None, block_size, D), lambda c, bh: (bh, c, 0)) for _ in parts],
        out_shape=[jax.ShapeDtypeStruct((BH, n_blocks * block_size, D), jnp.float32) for _ in parts],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="msa_kv_outer_reduce_units",
    )(ustart, *parts)


def sum_slots(part, inv, *, G_pad: int, D_pad: int):
    """part [BH, P*G_pad, D_pad], inv [BH, Tc, top_k] -> float32 [BH, Tc, G_pad, D_pad]: per token
    the sum over its slots (in slot order) of the rows its slots wrote."""
    BH, Tc, top_k = inv.shape
    part = part.reshape(BH, -1, G_pad, D_pad)

    def row(p_r, inv_r):
        idx = jnp.maximum(inv_r, 0)
        acc = jnp.zeros((Tc, G_pad, D_pad), jnp.float32)
        for s in range(top_k):
            acc = acc + jnp.where(inv_r[:, s, None, None] >= 0, p_r[idx[:, s]].astype(jnp.float32), 0.0)
        return acc

    return jax.vmap(row)(part, inv)


# --------------------------------------------------------------------------------------- kernel


def _bwd_kernel(
    q0_ref,  # [16] int32: absolute position of the chunk's first token
    unit_ref,  # [3 * U] int32: (block, first tile, tile count) of every unit of this row
    tok_ref,  # [P] int32: chunk-local token of every padded position, -1 = padding
    q_ref, do_ref,  # [Tc * G_pad, D_pad]: the chunk's queries / output cotangents, token-major
    lse_ref, delta_ref,  # [Tc * G_pad] float32 (padded heads: lse = +inf, so P = 0)
    k_ref, v_ref,  # [T_kv_pad, D_pad]
    dq_ref,  # [P * G_pad, D_pad]: dq partial of every padded position (rows of its tile)
    dk_ref, dv_ref,  # [kv_tile, D_pad] float32: this unit's partial dK, dV
    *,
    scale: float,
    block_size: int,
    kv_tile: int,
    heads: int,  # G_pad: rows per token
    bq: int,  # query tokens per tile
    n_units: int,
):
    M = bq * heads
    u = pl.program_id(0)
    c = unit_ref[u]
    t0 = unit_ref[n_units + u]
    n = unit_ref[2 * n_units + u]
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    D_pad = k_ref.shape[1]
    zeros = jnp.zeros((kv_tile, D_pad), jnp.float32)

    @pl.when(n > 0)
    def _():
        m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
        start = pl.multiple_of(c * block_size, block_size)
        k = k_ref[pl.ds(start, kv_tile), :]
        v = v_ref[pl.ds(start, kv_tile), :]
        key_pos = start + lax.broadcasted_iota(jnp.int32, (kv_tile,), 0)
        q0 = q0_ref[0]

        def tile(j, carry):
            dk, dv = carry
            t = t0 + j
            row_tok = tok_ref[t * bq + m_iota // heads]
            live = row_tok >= 0
            rows = jnp.maximum(row_tok, 0) * heads + m_iota % heads
            q = q_ref[rows]
            do = do_ref[rows]
            lse = lse_ref[rows]
            delta = delta_ref[rows]
            s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
            mask = live[:, None] & (key_pos[None, :] <= (q0 + row_tok)[:, None])
            if kv_tile > block_size:
                mask = mask & (key_pos < start + block_size)[None, :]
            p = jnp.where(mask, jnp.exp2(s - (lse * _LOG2E)[:, None]), 0.0)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            dp = plgpu.dot(do, v, trans_b=True, precision=precision)
            ds = (p * (dp - delta[:, None])).astype(q.dtype)
            dk = dk + plgpu.dot(ds, q, trans_a=True, precision=precision) * scale
            dq = plgpu.dot(ds, k, precision=precision) * scale
            dq_ref[pl.ds(pl.multiple_of(t * M, M), M), :] = dq.astype(dq_ref.dtype)
            return dk, dv

        dk, dv = lax.fori_loop(0, n, tile, (zeros, zeros))
        dk_ref[...] = dk
        dv_ref[...] = dv

    @pl.when(n <= 0)
    def _():
        dk_ref[...] = zeros
        dv_ref[...] = zeros


# -------------------------------------------------------------------------------------- wrapper


def _rows(x, B, Tc, H_kv, G, G_pad, D_pad, fill=0.0):
    """[B, Tc, H_q(, D)] -> [B*H_kv, Tc*G_pad(, D_pad)]: token-major, head-minor rows of a group."""
    has_d = x.ndim == 4
    x = x.reshape(B, Tc, H_kv, G, *x.shape[3:])
    pad = [(0, 0), (0, 0), (0, 0), (0, G_pad - G)] + ([(0, D_pad - x.shape[-1])] if has_d else [])
    x = jnp.pad(x, pad, constant_values=fill)
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(B * H_kv, Tc * G_pad, *([D_pad] if has_d else []))


def _chunk_bwd(q0, qc, doc, lsec, deltac, idc, kg, vg, *, block_size, bq, n_blocks, n_tiles, n_units_,
               tiles_per_unit, G_pad, D_pad, kv_tile, interpret, num_warps, num_stages):
    """One query chunk -> dq [B, Tc, H_q, D] (q.dtype), dk, dv float32 [BH, n_blocks * bs, D_pad]."""
    B, Tc, H_q, D = qc.shape
    H_kv, top_k = idc.shape[2], idc.shape[3]
    G = H_q // H_kv
    BH = B * H_kv
    M = bq * G_pad
    P = n_tiles * bq
    U = n_units_
    layout = functools.partial(_rows, B=B, Tc=Tc, H_kv=H_kv, G=G, G_pad=G_pad, D_pad=D_pad)
    qg, dog = layout(qc), layout(doc)
    lseg, deltag = layout(lsec, fill=jnp.inf), layout(deltac)  # padded heads: P = exp(s - inf) = 0
    ids = idc.transpose(0, 2, 1, 3).reshape(BH, Tc, top_k)
    tiles, tok, inv = _reverse_index(ids, n_blocks=n_blocks, bq=bq, n_tiles=n_tiles)
    unit_tab, ustart = units(tiles, n_blocks=n_blocks, tiles_per_unit=tiles_per_unit, n_units=U)
    q0_arr = jnp.full((16,), q0, jnp.int32)

    kernel = functools.partial(
        _bwd_kernel, scale=D**-0.5, block_size=block_size, kv_tile=kv_tile, heads=G_pad, bq=bq, n_units=U
    )
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda u, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    dq_part, dk_part, dv_part = pl.pallas_call(
        kernel,
        grid=(U, BH),
        in_specs=[
            pl.BlockSpec((16,), lambda u, bh: (0,)),
            row(3 * U), row(P),
            row(Tc * G_pad, D_pad), row(Tc * G_pad, D_pad),
            row(Tc * G_pad), row(Tc * G_pad),
            row(kg.shape[1], D_pad), row(vg.shape[1], D_pad),
        ],
        out_specs=[
            row(P * G_pad, D_pad),  # every program writes the rows of its own tiles
            pl.BlockSpec((None, None, kv_tile, D_pad), lambda u, bh: (bh, u, 0, 0)),
            pl.BlockSpec((None, None, kv_tile, D_pad), lambda u, bh: (bh, u, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, P * G_pad, D_pad), qc.dtype),
            jax.ShapeDtypeStruct((BH, U, kv_tile, D_pad), jnp.float32),
            jax.ShapeDtypeStruct((BH, U, kv_tile, D_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            # 1 stage: the unit loop's gathers are not pipelined anyway, and 2 stages only take
            # shared memory (128K, paper heads: 119 vs 136 ms on an H200)
            num_warps=num_warps or (8 if M >= 128 else 4), num_stages=num_stages or 1,
        ),
        interpret=interpret,
        name=f"msa_sparse_attention_kv_bwd_bq{bq}_g{G_pad}_bs{block_size}_w{tiles_per_unit}",
    )(q0_arr, unit_tab, tok, qg, dog, lseg, deltag, kg, vg)

    dk, dv = reduce_units(ustart, [dk_part, dv_part], n_blocks=n_blocks, block_size=block_size, interpret=interpret)
    dq = sum_slots(dq_part, inv, G_pad=G_pad, D_pad=D_pad)  # [BH, Tc, G_pad, D_pad] f32
    dq = dq.reshape(B, H_kv, Tc, G_pad, D_pad)[:, :, :, :G, :D].transpose(0, 2, 1, 3, 4)
    return dq.reshape(B, Tc, H_q, D).astype(qc.dtype), dk, dv


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "bq", "t_chunk", "tiles_per_unit", "interpret", "num_warps", "num_stages"),
)
def _sparse_attention_bwd(q, k, v, block_idx, out, lse, dout, dlse, *, block_size, bq, t_chunk, tiles_per_unit,
                          interpret, num_warps=None, num_stages=None):
    sz = _sizes(q, k, block_idx, block_size, t_chunk)
    B, T, H_q, D, H_kv, n_blocks, n_chunks = sz.B, sz.T, sz.H_q, sz.D, sz.H_kv, sz.n_blocks, sz.n_chunks
    D_pad, BH, T_pad = sz.D_pad, sz.BH, sz.T_pad
    n_tiles = _n_tiles(t_chunk, sz.top_k, n_blocks, bq)
    U = n_units(n_tiles, n_blocks, tiles_per_unit)
    kg, vg = sz.kv_layout(k), sz.kv_layout(v)
    dout = dout.astype(q.dtype)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H_q]
    if dlse is not None:  # d lse / d s = P: the lse cotangent enters dS = P * (dP - delta + dlse)
        delta = delta - dlse.astype(jnp.float32)
    lse = lse.astype(jnp.float32)
    ids = _clean_ids(block_idx, block_size)
    pad_t = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, T_pad - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)  # noqa: E731
    qp, dop, lsep, deltap, ids = pad_t(q), pad_t(dout), pad_t(lse), pad_t(delta), pad_t(ids, -1)
    chunk = functools.partial(
        _chunk_bwd, kg=kg, vg=vg, block_size=block_size, bq=bq, n_blocks=n_blocks, n_tiles=n_tiles,
        n_units_=U, tiles_per_unit=tiles_per_unit, G_pad=sz.G_pad, D_pad=D_pad, kv_tile=sz.kv_tile,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages,
    )
    if n_chunks == 1:
        dq, dk, dv = chunk(0, qp, dop, lsep, deltap, ids)
    else:
        split = lambda x: x.reshape(B, n_chunks, t_chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
        starts = jnp.arange(n_chunks, dtype=jnp.int32) * t_chunk

        def step(acc, xs):  # dk, dv summed over the chunks in chunk order
            dq_c, dk_c, dv_c = chunk(*xs)
            return (acc[0] + dk_c, acc[1] + dv_c), dq_c

        zeros = jnp.zeros((BH, n_blocks * block_size, D_pad), jnp.float32)
        (dk, dv), dq = lax.scan(step, (zeros, zeros), (starts, *map(split, (qp, dop, lsep, deltap, ids))))
        dq = dq.swapaxes(0, 1).reshape(B, T_pad, H_q, D)

    def kv_back(x):  # [BH, n_blocks * bs, D_pad] -> [B, T, H_kv, D]
        x = x.reshape(B, H_kv, n_blocks * block_size, D_pad)[:, :, :T, :D]
        return x.transpose(0, 2, 1, 3).astype(k.dtype)

    return dq[:, :T], kv_back(dk), kv_back(dv)


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
    block_q: int | None = None,
    query_chunk: int | None = None,
    tiles_per_unit: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of sum(out * dout) (+ sum(lse * dlse)), where out, lse =
    `sparse_attention_fwd(q, k, v, block_idx)`.

    block_q, query_chunk, interpret, num_warps: as in the forward (same defaults, but float32
      inputs get 32-row tiles: shared memory). num_stages: default 1.
    tiles_per_unit: tiles (of block_q tokens) one program handles for one KV block (default 16);
      a block picked by more queries is split over several programs.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    interpret = bool(interpret)
    B, T, H_q, D, H_kv, top_k = check_attention_args(q, k, v, block_idx, block_size)
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(f"out, dout: expected shape {q.shape}, got {out.shape}, {dout.shape}")
    if lse.shape != q.shape[:3] or (dlse is not None and dlse.shape != q.shape[:3]):
        raise ValueError(f"lse, dlse: expected shape {q.shape[:3]}, got {lse.shape}, {getattr(dlse, 'shape', None)}")
    G_pad = _next_pow2(H_q // H_kv)
    D_pad = max(_MIN_DOT, _next_pow2(D))
    BH = B * H_kv
    n_blocks = -(-T // block_size)
    if block_q is None:
        # float32: 32-row tiles (the five [M, D] / [kv, D] float32 operands of 128-row tiles need
        # ~390 KiB of shared memory at D = 128; the H100 has 227 KiB)
        block_q = _default_block_q(T, G_pad, 128 if q.dtype != jnp.float32 else 32)
    elif not isinstance(block_q, int) or not _is_pow2(block_q):
        raise ValueError(f"block_q: expected a power of two, got {block_q!r}")
    if tiles_per_unit is None:
        tiles_per_unit = TILES_PER_UNIT
    elif not isinstance(tiles_per_unit, int) or tiles_per_unit < 1:
        raise ValueError(f"tiles_per_unit: expected an int >= 1, got {tiles_per_unit!r}")
    if query_chunk is None:
        t_chunk = _default_chunk(T, BH, top_k, n_blocks, block_q, G_pad, D_pad)
        if t_chunk < 1:
            raise ValueError(f"no query chunk fits the partial buffer (B*H_kv={BH}, n_blocks={n_blocks}): split the batch")
    elif not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk: expected an int >= 1, got {query_chunk!r}")
    else:
        t_chunk = min(query_chunk, T)
    if not interpret:
        n_t = _n_tiles(t_chunk, top_k, n_blocks, block_q)
        part_elems = BH * n_t * block_q * G_pad * D_pad
        kv_elems = BH * (n_blocks * block_size + max(block_size, _MIN_DOT)) * D_pad
        unit_elems = BH * n_units(n_t, n_blocks, tiles_per_unit) * max(block_size, _MIN_DOT) * D_pad
        if max(part_elems, kv_elems, unit_elems) >= _INT32_LIMIT:
            raise ValueError("an operand has >= 2**31 elements (Triton int32 offsets): use a smaller query_chunk")
        if not _is_pow2(block_size):
            raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
        if block_q * G_pad < _MIN_DOT:
            raise ValueError(f"block_q * G_pad = {block_q} * {G_pad} < {_MIN_DOT}: Triton dots need >= 16 rows")
    return _sparse_attention_bwd(
        q, k, v, block_idx, out, lse, dout, dlse, block_size=block_size, bq=block_q, t_chunk=t_chunk,
        tiles_per_unit=tiles_per_unit, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
    )
