"""MSA main-branch backward tile kernel on the Pallas Mosaic GPU backend (Hopper: TMA + wgmma), next to
the Triton kernel of `pallas.sparse_attention_bwd`. Experimental: not yet timed, not used by default.

    dq, dk, dv = sparse_attention_bwd_mgpu(q, k, v, block_idx, out, lse, dout, dlse=None, *, block_size)

Same contract as `pallas.sparse_attention_bwd.sparse_attention_bwd` (bf16) and the same machinery
(`prepare`, `kv_outer.chunk_index` units, `reduce_units` for dK / dV, `sum_slots` for dq): only the
unit kernel is new. Grid (units, B*H_kv); a program (CTA) handles one unit, up to `tiles_per_unit`
tiles of one selected KV block c, with three warpgroups:

* warpgroup 2, the producer: TMA-copies the unit's (block, first tile, count), its token ids, K_c and
  V_c once, then per tile the BQ token slabs [G_pad, D] of q and dout (M = BQ * G_pad = 64 rows) and
  the rows' query position, lse and delta, into a ring of `q_slots` buffers ("full" / "free"
  barriers, as the forward's).
* warpgroups 0 and 1, the consumers: warpgroup w owns key rows [64 w, 64 w + 64) of the block. With
  the keys as the wgmma M dimension (S^T = K_w Q^T, dP^T = V_w dout^T: 64 x 64 each), P^T and dS^T
  come out in registers already shaped as the A operands of dV_w += P^T dout and dK_w += dS^T Q, whose
  float32 accumulators stay in registers over the unit's tiles. dS^T also goes to SMEM: after a
  barrier between the two consumers, dq's columns [64 w, 64 w + 64) = sum_x (dS^T_x)^T K_x[:, cols]
  (D = 64: warpgroup 0 alone), stored to the per-slot dq partials as the Triton kernel's.
  Register budget at D = 128: dK, dV 128 + S^T, dP^T 64 (the dq product reuses the latter's).

G_pad = 4 (BQ = 16): 4-row token slabs cannot be copied into the 8-row tiles of a swizzled SMEM tile,
so the producer copies them into plain SMEM and each consumer rewrites the q and dout tiles into its
own swizzled copies (through registers) before its products, as the forward does for its q.

Limits: bf16; block_size 128 (two consumers of 64 key rows); G_pad 4, 8 or 16 (16-byte aligned
token-id copies of <= 256 ids per unit); D of 64 or 128 (G_pad 4: D 64, shared memory). Interpreted (the Mosaic GPU interpreter of jax 0.11.2 takes SMEM wgmma operands only),
P^T goes through SMEM (`regs_a=False`) as in the forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax.checks import check_int, check_shape
from pallas import kv_outer as kvo
from pallas.common import LOG2E, interpret_mode
from pallas.mgpu_sparse_attention import SMEM_LIMIT, SMEM_RESERVE, row_positions, smem_transforms
from pallas.sparse_attention_bwd import kv_back, prepare

__all__ = ["MGPUBwdConfig", "sparse_attention_bwd_mgpu", "unit_partials", "smem_bytes", "check_supported", "supported"]

ROWS = 64  # M: query rows per tile (BQ * G_pad)
KV_ROWS = 64  # key rows per consumer warpgroup (the wgmma M of S^T, dP^T, dK, dV)
N_CONSUMERS = 2
BLOCK = N_CONSUMERS * KV_ROWS  # the one block size this kernel takes
COLS = 64  # dq / epilogue column slice (one 128-byte swizzle tile of bf16)


@dataclasses.dataclass(frozen=True)
class MGPUBwdConfig:
    """tiles_per_unit: tiles of one block a CTA handles (`kv_outer.KVOuterConfig`); q_slots: SMEM
    ring depth of the q / dout tiles (None: 2 when it fits); query_chunk: as `KVOuterConfig`;
    regs_a: P^T as a register wgmma operand (None: on a GPU, not interpreted)."""

    tiles_per_unit: int = 16
    q_slots: int | None = None
    query_chunk: int | None = None
    regs_a: bool | None = None

    def __post_init__(self):
        check_int("tiles_per_unit", self.tiles_per_unit, 1)
        if self.q_slots is not None:
            check_int("q_slots", self.q_slots, 1)


def smem_bytes(D: int, bq: int, W: int, q_slots: int, regs_a: bool = True) -> int:
    """Shared memory of one CTA (buffers only)."""
    ring = q_slots * (2 * ROWS * D * 2 + 3 * ROWS * 4)  # q, dout tiles + position, lse, delta rows
    if ROWS // bq < 8:  # G_pad < 8: each consumer's swizzled copies of the q and dout tiles
        ring += N_CONSUMERS * 2 * ROWS * D * 2
    kv = 2 * BLOCK * D * 2
    ds = N_CONSUMERS * KV_ROWS * ROWS * 2
    pa = 0 if regs_a else N_CONSUMERS * KV_ROWS * ROWS * 2
    dq = N_CONSUMERS * ROWS * COLS * 2
    epi = N_CONSUMERS * KV_ROWS * COLS * 4
    return ring + kv + ds + pa + dq + epi + 16 + W * bq * 4


def default_q_slots(D: int, bq: int, W: int, regs_a: bool = True) -> int:
    return 2 if smem_bytes(D, bq, W, 2, regs_a) + SMEM_RESERVE <= SMEM_LIMIT else 1


def _unit_kernel(
    unit_ref,  # GMEM [BH, U, 4] int32: (block, first tile, tile count, 0) per unit
    tok_ref,  # GMEM [BH, (n_tiles + W) * BQ] int32: chunk-local token per padded position, -1 = padding
    rpos_ref, rlse_ref, rdelta_ref,  # GMEM [BH, n_tiles * 64]: per tile row position (int32), lse, delta
    q_ref, do_ref,  # GMEM [BH, Tc * G_pad, D] bf16: token-major per group
    k_ref, v_ref,  # GMEM [BH, T_kv_pad, D] bf16
    dq_ref,  # GMEM [BH, n_tiles * 64, D] bf16: per-slot dq partials
    dk_ref, dv_ref,  # GMEM [BH, U, 128, D] float32: per-unit partials
    unit_smem, tok_smem, q_smem, do_smem, rpos_smem, rlse_smem, rdelta_smem, k_smem, v_smem, ds_smem, pa_smem,
    dq_smem, epi_smem, qw_smem, dow_smem,
    unit_bar, tok_bar, kv_bar, q_bar, q_free, ds_full, ds_free,
    *, scale: float, heads: int, W: int, q_slots: int, D: int, regs_a: bool,
):
    bq = ROWS // heads
    u = lax.axis_index("u")
    bh = lax.axis_index("bh")
    wg = lax.axis_index("wg")
    i32 = jnp.int32
    n_dq = D // COLS  # consumers that compute dq columns
    swizzled = heads >= 8  # the producer's slabs land in swizzled tiles (else plain, rewritten per consumer)

    @pl.when(wg == N_CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        plgpu.copy_gmem_to_smem(unit_ref.at[bh, u], unit_smem, unit_bar)
        plgpu.barrier_wait(unit_bar)
        c, t0, n = unit_smem[0], unit_smem[1], unit_smem[2]
        plgpu.copy_gmem_to_smem(tok_ref.at[bh, pl.ds(t0 * bq, W * bq)], tok_smem, tok_bar)

        @pl.when(n > 0)
        def _():
            rows = pl.ds(c * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[bh, rows], k_smem, kv_bar)
            plgpu.copy_gmem_to_smem(v_ref.at[bh, rows], v_smem, kv_bar)

        plgpu.barrier_wait(tok_bar)

        @pl.loop(0, n)
        def _(j):
            qs = lax.rem(j, i32(q_slots))

            @pl.when(j >= q_slots)
            def _():
                plgpu.barrier_wait(q_free.at[qs])

            t = t0 + j
            for src, dst in ((rpos_ref, rpos_smem), (rlse_ref, rlse_smem), (rdelta_ref, rdelta_smem)):
                plgpu.copy_gmem_to_smem(src.at[bh, pl.ds(t * ROWS, ROWS)], dst.at[qs], q_bar.at[qs])
            for b in range(bq):  # one small TMA copy per token slab (padding: token 0, masked by position -1)
                tk = jnp.maximum(tok_smem[j * bq + b], 0)
                for src, dst in ((q_ref, q_smem), (do_ref, do_smem)):
                    plgpu.copy_gmem_to_smem(src.at[bh, pl.ds(tk * heads, heads)],
                                            dst.at[qs, pl.ds(b * heads, heads)], q_bar.at[qs])

        @pl.loop(jnp.maximum(n - q_slots, 0), n)  # observe the consumers' last releases of the ring
        def _(j):
            plgpu.barrier_wait(q_free.at[lax.rem(j, i32(q_slots))])

    @pl.when(wg < N_CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        plgpu.barrier_wait(unit_bar)
        c, t0, n = unit_smem[0], unit_smem[1], unit_smem[2]
        layout = plgpu.Layout.WGMMA
        col_layout = plgpu.Layout.WGMMA.reduce(0)  # a vector along the tile's columns (query rows)
        kv_rows = pl.ds(wg * KV_ROWS, KV_ROWS)

        @pl.when(n > 0)
        def _():
            plgpu.barrier_wait(kv_bar)

        def unit(dk_acc, dv_acc):
            @pl.loop(0, n)
            def _(j):
                qs = lax.rem(j, i32(q_slots))
                plgpu.barrier_wait(q_bar.at[qs])
                q_tile, do_tile = q_smem.at[qs], do_smem.at[qs]
                if not swizzled:  # plain SMEM -> registers -> this consumer's swizzled copies
                    for src, dst in ((q_tile, qw_smem), (do_tile, dow_smem)):
                        dst.at[wg][...] = plgpu.load(src, layout=layout, optimized=False)
                    plgpu.commit_smem()
                    q_tile, do_tile = qw_smem.at[wg], dow_smem.at[wg]

                def st(acc_ref):  # S^T = K_w Q^T: [64 keys, 64 query rows]
                    plgpu.wgmma(acc_ref, k_smem.at[kv_rows], q_tile.transpose((1, 0)))
                    return acc_ref[...]

                def dpt(acc_ref):  # dP^T = V_w dout^T
                    plgpu.wgmma(acc_ref, v_smem.at[kv_rows], do_tile.transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(st, plgpu.ACC((KV_ROWS, ROWS), jnp.float32))
                dp = pl.run_scoped(dpt, plgpu.ACC((KV_ROWS, ROWS), jnp.float32))
                shape = (KV_ROWS, ROWS)
                qpos = plgpu.load(rpos_smem.at[qs], layout=col_layout)
                lse = plgpu.load(rlse_smem.at[qs], layout=col_layout)
                delta = plgpu.load(rdelta_smem.at[qs], layout=col_layout)
                key_pos = c * BLOCK + wg * KV_ROWS + plgpu.broadcasted_iota(i32, shape, 0, layout=layout)
                mask = key_pos <= lax.broadcast_in_dim(qpos, shape, [1])
                logit = s * (scale * LOG2E) - lax.broadcast_in_dim(lse * LOG2E, shape, [1])
                p = jnp.where(mask, jnp.exp2(logit), 0.0)
                ds = p * (dp - lax.broadcast_in_dim(delta, shape, [1]))

                @pl.when(j > 0)  # both consumers are done reading the previous tile's dS^T
                def _():
                    plgpu.barrier_wait(ds_free)

                ds_smem.at[wg][...] = ds.astype(ds_smem.dtype)
                if regs_a:
                    p_a = p.astype(do_smem.dtype)
                else:
                    pa_smem.at[wg][...] = p.astype(pa_smem.dtype)
                    p_a = pa_smem.at[wg]
                plgpu.commit_smem()  # generic-proxy stores -> visible to wgmma (async proxy)
                plgpu.wgmma(dv_acc, p_a, do_tile)  # dV_w += P^T dout
                plgpu.wgmma(dk_acc, ds_smem.at[wg], q_tile)  # dK_w += dS^T Q (scaled at the end)
                plgpu.barrier_arrive(ds_full)
                plgpu.barrier_wait(ds_full)

                if n_dq == N_CONSUMERS:
                    dq_cols = [(w, pl.ds(w * COLS, COLS)) for w in range(N_CONSUMERS)]
                else:
                    dq_cols = [(0, pl.ds(0, COLS))]
                for w, cols in dq_cols:
                    @pl.when(wg == w)
                    def _():
                        def dq_prod(acc_ref):  # dq[:, cols] = sum_x dS_x K_x[:, cols]
                            for x in range(N_CONSUMERS):
                                plgpu.wgmma(acc_ref, ds_smem.at[x].transpose((1, 0)),
                                            k_smem.at[pl.ds(x * KV_ROWS, KV_ROWS), cols])
                            return acc_ref[...]

                        dq = pl.run_scoped(dq_prod, plgpu.ACC((ROWS, COLS), jnp.float32)) * scale
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store left SMEM
                        dq_smem.at[wg][...] = dq.astype(dq_smem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[bh, pl.ds((t0 + j) * ROWS, ROWS), cols])

                plgpu.wgmma_wait(0)  # this tile's products have read q, dout and dS^T
                plgpu.commit_smem()
                plgpu.barrier_arrive(q_free.at[qs])
                plgpu.barrier_arrive(ds_free)

            @pl.when(n > 0)  # observe the last tile's ds_free phase
            def _():
                plgpu.barrier_wait(ds_free)

            for acc, out_ref, f in ((dk_acc, dk_ref, scale), (dv_acc, dv_ref, 1.0)):
                val = acc[...] * f
                for h in range(D // COLS):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    epi_smem.at[wg][...] = val[:, h * COLS:(h + 1) * COLS]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(epi_smem.at[wg], out_ref.at[bh, u, kv_rows, pl.ds(h * COLS, COLS)])

        pl.run_scoped(unit, plgpu.ACC((KV_ROWS, D), jnp.float32), plgpu.ACC((KV_ROWS, D), jnp.float32))
        plgpu.wait_smem_to_gmem(0)


def unit_partials(unit4, tok, rpos, rlse, rdelta, qg, dog, kg, vg, *, G_pad: int, D_orig: int, W: int,
                  n_tiles: int, q_slots: int | None = None, regs_a: bool | None = None, interpret=False):
    """The Mosaic GPU unit kernel on one query chunk -> (dq_part bf16 [BH, n_tiles * 64, D], dk_part,
    dv_part float32 [BH, U, 128, D]). unit4 [BH, U, 4] (`units` as (block, first tile, count, 0)),
    tok [BH, (n_tiles + W) * BQ] (-1 padded), rpos / rlse / rdelta [BH, n_tiles * 64] (tile rows)."""
    BH, U, _ = unit4.shape
    D = qg.shape[-1]
    bq = ROWS // G_pad
    if regs_a is None:
        regs_a = not interpret
    if q_slots is None:
        q_slots = default_q_slots(D, bq, W, regs_a)
    tf = smem_transforms(D)
    tf64 = smem_transforms(ROWS)
    swizzled = G_pad >= 8
    q_tf = tf if swizzled else ()
    per_consumer = (plgpu.SMEM((N_CONSUMERS, ROWS, D), qg.dtype, transforms=tf) if not swizzled
                    else plgpu.SMEM((1,), jnp.int32))  # (a 4-byte placeholder)
    scratch = [
        plgpu.SMEM((4,), jnp.int32),  # unit_smem
        plgpu.SMEM((W * bq,), jnp.int32),  # tok_smem
        plgpu.SMEM((q_slots, ROWS, D), qg.dtype, transforms=q_tf),  # q_smem
        plgpu.SMEM((q_slots, ROWS, D), dog.dtype, transforms=q_tf),  # do_smem
        plgpu.SMEM((q_slots, ROWS), jnp.int32),  # rpos_smem
        plgpu.SMEM((q_slots, ROWS), jnp.float32),  # rlse_smem
        plgpu.SMEM((q_slots, ROWS), jnp.float32),  # rdelta_smem
        plgpu.SMEM((BLOCK, D), kg.dtype, transforms=tf),  # k_smem
        plgpu.SMEM((BLOCK, D), vg.dtype, transforms=tf),  # v_smem
        plgpu.SMEM((N_CONSUMERS, KV_ROWS, ROWS), qg.dtype, transforms=tf64),  # ds_smem: dS^T per consumer
        (plgpu.SMEM((1,), jnp.int32) if regs_a
         else plgpu.SMEM((N_CONSUMERS, KV_ROWS, ROWS), qg.dtype, transforms=tf64)),  # pa_smem: P^T staged
        plgpu.SMEM((N_CONSUMERS, ROWS, COLS), qg.dtype, transforms=smem_transforms(COLS)),  # dq_smem
        plgpu.SMEM((N_CONSUMERS, KV_ROWS, COLS), jnp.float32),  # epi_smem: dK / dV out, 64 columns at a time
        per_consumer, per_consumer,  # qw_smem, dow_smem: G_pad < 8, each consumer's swizzled q / dout tile
        plgpu.Barrier(),  # unit_bar
        plgpu.Barrier(),  # tok_bar
        plgpu.Barrier(num_arrivals=2),  # kv_bar
        plgpu.Barrier(num_arrivals=3 + 2 * bq, num_barriers=q_slots),  # q_bar
        plgpu.Barrier(num_arrivals=N_CONSUMERS, num_barriers=q_slots),  # q_free
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # ds_full
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # ds_free
    ]
    kernel = functools.partial(_unit_kernel, scale=D_orig**-0.5, heads=G_pad, W=W, q_slots=q_slots, D=D,
                               regs_a=regs_a)
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((BH, n_tiles * ROWS, D), qg.dtype),
            jax.ShapeDtypeStruct((BH, U, BLOCK, D), jnp.float32),
            jax.ShapeDtypeStruct((BH, U, BLOCK, D), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(U, BH),
        grid_names=("u", "bh"),
        num_threads=N_CONSUMERS + 1,
        thread_name="wg",
        interpret=interpret or None,
        kernel_name=f"msa_mgpu_bwd_g{G_pad}_d{D}_w{W}",
    )
    return call(unit4, tok, rpos, rlse, rdelta, qg, dog, kg, vg)


def tile_rows(x, tok, G_pad: int, fill):
    """x [BH, Tc * G_pad] (token-major rows) -> [BH, P * G_pad]: the value of every tile row (padding
    positions: fill)."""
    idx = jnp.maximum(tok, 0)[:, :, None] * G_pad + jnp.arange(G_pad, dtype=jnp.int32)
    vals = jnp.take_along_axis(x, idx.reshape(tok.shape[0], -1), axis=1)
    return jnp.where(jnp.repeat(tok >= 0, G_pad, axis=1), vals, fill)


def _chunk_bwd(posc, qc, doc, lsec, deltac, ix: kvo.ChunkIndex, *, kg, vg, sz: kvo.Sizes, plan: kvo.Plan,
               config: MGPUBwdConfig, interpret, acc):
    B, Tc, H_q, D = qc.shape
    G, G_pad, D_pad, H_kv = sz.G, sz.G_pad, sz.D_pad, sz.H_kv
    W, bq = plan.tiles_per_unit, plan.block_q
    layout = functools.partial(kvo.rows, n_groups=H_kv, G_pad=G_pad)
    qg, dog = layout(qc, width=D_pad), layout(doc, width=D_pad)
    lseg, deltag = layout(lsec, fill=jnp.inf), layout(deltac)
    rpos = row_positions(ix.tok, posc, H_kv=H_kv, G_pad=G_pad)
    rlse = tile_rows(lseg, ix.tok, G_pad, jnp.inf)
    rdelta = tile_rows(deltag, ix.tok, G_pad, 0.0)
    U = plan.n_units
    tab = ix.unit_tab.reshape(sz.BH, 3, U)
    unit4 = jnp.concatenate([jnp.moveaxis(tab, 1, 2), jnp.zeros((sz.BH, U, 1), jnp.int32)], axis=2)
    tok = jnp.pad(ix.tok, [(0, 0), (0, W * bq)], constant_values=-1)
    dq_part, dk_part, dv_part = unit_partials(
        unit4, tok, rpos, rlse, rdelta, qg, dog, kg, vg, G_pad=G_pad, D_orig=D, W=W, n_tiles=plan.n_tiles,
        q_slots=config.q_slots, regs_a=config.regs_a, interpret=interpret)
    sums = kvo.reduce_units(ix.ustart, [dk_part, dv_part], n_blocks=sz.n_blocks, block_size=sz.block_size,
                            interpret=plan.interpret, accs=acc)
    dq = kvo.sum_slots(dq_part, ix.inv, G_pad=G_pad, out_dtype=qc.dtype, interpret=plan.interpret)
    return kvo.ungroup(dq[:, :, :G, :D], B).reshape(B, Tc, H_q, D), tuple(sums)


@functools.partial(jax.jit, static_argnames=("block_size", "plan", "config", "interpret"))
def _bwd(q, k, v, block_idx, pos, out, lse, dout, dlse, *, block_size, plan, config, interpret):
    sz = kvo.sizes(q, k, block_idx, block_size)
    (kg, vg), xs, index, zeros = prepare(q, k, v, block_idx, pos, out, lse, dout, dlse, sz=sz, plan=plan)
    chunk = functools.partial(_chunk_bwd, kg=kg, vg=vg, sz=sz, plan=plan, config=config, interpret=interpret)
    dq, (dk, dv) = kvo.scan_chunks(chunk, xs, plan.n_chunks, plan.t_chunk, zeros, index)
    return dq[:, : sz.T], kv_back(dk, sz, k.dtype), kv_back(dv, sz, v.dtype)


def check_supported(sz: kvo.Sizes, dtype) -> None:
    """The kernel's limits (ValueError otherwise)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"the Mosaic GPU backward takes bfloat16 inputs, got {dtype}")
    if sz.block_size != BLOCK:
        raise ValueError(f"the Mosaic GPU backward takes block_size {BLOCK}, got {sz.block_size}")
    if sz.G_pad not in (4, 8, 16):
        raise ValueError(f"the Mosaic GPU backward takes 4, 8 or 16 query heads per group (padded), got {sz.G_pad}")
    if sz.D_pad not in (64, 128):
        raise ValueError(f"the Mosaic GPU backward takes D of 64 or 128, got D padded to {sz.D_pad}")
    if sz.G_pad < 8 and sz.D_pad > 64:  # the per-consumer q / dout copies: 235 KB of shared memory at D 128
        raise ValueError(f"the Mosaic GPU backward takes D 64 with {sz.G_pad} query heads per group (padded); "
                         f"D {sz.D_pad} needs G_pad 8 or 16 (shared memory)")


def supported(sz: kvo.Sizes, dtype) -> bool:
    """Whether `check_supported` passes."""
    try:
        check_supported(sz, dtype)
    except ValueError:
        return False
    return True


def sparse_attention_bwd_mgpu(q, k, v, block_idx, out, lse, dout, dlse=None, *, block_size: int, q_pos=None,
                              config: MGPUBwdConfig | None = None, interpret=None):
    """(dq, dk, dv) as `sparse_attention_bwd.sparse_attention_bwd`, with the unit kernel on Mosaic GPU.
    interpret: None = the Mosaic GPU interpreter unless jax.default_backend() == "gpu"; True; False; or
    a `plgpu.InterpretGPUParams`."""
    sz = kvo.check_attention(q, k, v, block_idx, block_size, q_pos, (jnp.bfloat16,))
    check_supported(sz, q.dtype)
    for name, x in (("out", out), ("dout", dout)):
        check_shape(name, x, q.shape, "[B, T, H_q, D], as q")
    check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
    config = config or MGPUBwdConfig()
    if interpret is None or isinstance(interpret, bool):
        interpret = interpret_mode(interpret)
    kconf = kvo.KVOuterConfig(block_q=ROWS // sz.G_pad, query_chunk=config.query_chunk,
                              tiles_per_unit=config.tiles_per_unit)
    plan = kconf.resolve("bwd", sz, f32=False, interpret=bool(interpret))
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _bwd(q, k, v, block_idx, pos, out, lse, dout, dlse, block_size=block_size, plan=plan, config=config,
                interpret=interpret)
