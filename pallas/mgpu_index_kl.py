"""The fused KL teacher pass of `pallas.index_kl.index_kl_sum` on the Pallas Mosaic GPU backend
(Hopper: TMA + wgmma), next to its Triton kernel (`index_kl._bwd_kernel` with value=True); chosen by
`index_kl_sum(..., kl_kernel="mosaic" | "auto")`.

Same units as the Triton kernel (`kv_outer.units`: a program takes up to W tiles of one block c),
same math per tile (docs/algorithm.md §6.1): the teacher's P = exp(q k^T * scale - lse) per (token,
head) row, its per-token head sum, the student's logits z, dz = w1 softmax(z) - w2 sum_h P_h, d iq =
dz ik, d ik += dz^T iq, and the value sum_i w_i kl_i. The matmuls are laid out for wgmma, whose
tiles have 64 rows, when a tile holds only BQ = 128 // G_pad tokens (8 for the paper's G = 16):

* the teacher, as the forward (`pallas.mgpu_sparse_attention`): consumer warpgroup w of two takes
  rows [64 w, 64 w + 64) of the tile's 128 = BQ x G_pad rows; S = Q K_c^T per 64-key half; P in
  float32, written to SMEM as two bfloat16 terms (hi + lo: the head sum keeps ~2^-17 of precision,
  as the Triton kernel's) by whole 64 x 64 tiles;
* the student, with the tile's tokens as 64 rows (BQ real; the rest read the next positions' inputs,
  which are finite, and are masked): consumer w takes the block's keys [64 w, 64 w + 64): sum_h P =
  Sel P (Sel: token r <- rows r G_pad .. r G_pad + G_pad - 1, a 0/1 tile held in registers), z =
  iq ik_w^T, dz; the value's terms summed over its keys per token row;
* dz goes to SMEM by key halves: d ik_w += dz_w^T iq accumulates in registers over the unit's tiles
  (wgmma with a transposed A from SMEM), d iq [tokens, dims half w] = dz ik over both key halves
  (Di = 64: consumer 0 alone), staged in the consumer's own P tile and TMA-stored as BQ rows.

Two consumer barriers per tile order the SMEM exchanges (P written -> read; dz written -> read) and
guarantee that the other consumer is done with the previous tile's buffers; a third orders the
end (P's memory then stages d ik). A producer warpgroup streams each tile's q slabs (one TMA copy
per token, as the forward), its rows' positions and teacher lse, and the tokens' index queries
(`iqp`, one row per padded position) through rings of SMEM slots.

Found while building it (jax 0.11.2): Mosaic GPU layout inference rejects wgmma accumulators 16 or
32 wide (B tiles swizzled 32 / 64 bytes) and SMEM operands sliced along their columns; whole
64 x 64 tiles with a 128-byte swizzle lower. Limits (`check_supported`): bfloat16; G_pad 8 or 16
(the d iq store slices BQ >= 8 rows of a swizzled tile); block_size 128 (one key half per consumer);
D and D_idx padded to 64 or 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas import mgpu_sparse_attention as mg
from pallas.common import LOG2E

__all__ = ["fused_parts", "check_supported", "supported", "smem_bytes", "N_CONSUMERS"]

# the forward's tile geometry and limits (a tile's 128 teacher rows, two consumers of 64 rows)
ROWS, WG_ROWS, N_CONSUMERS = mg.ROWS, mg.WG_ROWS, mg.N_CONSUMERS
SMEM_LIMIT, SMEM_RESERVE, TMA_MAX = mg.SMEM_LIMIT, mg.SMEM_RESERVE, mg.TMA_MAX


def n_cols(bq: int) -> int:
    """Token rows of the student's tiles (one wgmma M; rows >= BQ are padding)."""
    return WG_ROWS


def smem_bytes(G_pad: int, D: int, Di: int, block_size: int, W: int, q_slots: int, iq_slots: int,
               regs_a: bool = True) -> int:
    """Shared memory of one CTA (buffers only)."""
    bq = ROWS // G_pad
    tile = WG_ROWS * WG_ROWS * 2  # one [64, 64] bf16 tile
    unit = 16 + 5 * (W * bq + WG_ROWS) * 4  # unit row, 5 per-position arrays
    q = q_slots * ROWS * (D * 2 + 8)  # q tile, rows' positions and lse
    kv = block_size * (D + Di) * 2
    p = max(2 * N_CONSUMERS * 2 * tile, N_CONSUMERS * Di * WG_ROWS * 4)  # P hi, lo | d ik staging
    iq = iq_slots * (Di // WG_ROWS) * tile
    rest = N_CONSUMERS * tile + N_CONSUMERS * WG_ROWS * 4  # dz, value staging (d iq: staged in P)
    sel = 0 if regs_a else N_CONSUMERS * 2 * tile
    return unit + q + kv + p + iq + rest + sel


def default_slots(G_pad: int, D: int, Di: int, block_size: int, W: int, regs_a: bool = True) -> tuple[int, int]:
    """(q_slots, iq_slots): the deepest rings that fit in shared memory."""
    for q_slots, iq_slots in ((2, 2), (1, 2), (1, 1)):
        if smem_bytes(G_pad, D, Di, block_size, W, q_slots, iq_slots, regs_a) + SMEM_RESERVE <= SMEM_LIMIT:
            return q_slots, iq_slots
    return 1, 1


def _kernel(
    units_ref,  # GMEM [BH, U, 4] int32: (block, first tile, tile count, 0) per unit
    tok_ref,  # GMEM [BH, P + W*BQ + N] int32: chunk-local token per padded position (-1 padding)
    tpos_ref, zlse_ref, w1_ref, w2_ref,  # GMEM [BH, P + W*BQ + N] per position: position (-1), student lse
    # (0 for an empty support), w1, w2
    rpos_ref, lse_ref,  # GMEM [BH, (n_tiles + W) * 128]: per tile row its query position (-1) / teacher lse
    q_ref,  # GMEM [BH, Tc * G_pad, D] bf16
    iqp_ref,  # GMEM [BH, P + W*BQ + N, Di] bf16: the index query of every padded position
    k_ref,  # GMEM [BH, T_kv_pad, D] bf16
    ik_ref,  # GMEM [B, T_kv_pad, Di] bf16 (shared by the groups)
    diq_ref,  # GMEM [BH, n_tiles * BQ, Di] bf16: d iq per padded position
    dik_ref,  # GMEM [BH, U, block_size, Di] f32: the unit's d ik
    val_ref,  # GMEM [BH, U, block_size] f32: per key of the unit, sum over its tokens of w1 * kl terms
    unit_smem, tok_smem, tpos_smem, zlse_smem, w1_smem, w2_smem, rpos_smem, lse_smem,
    q_smem, iq_smem, k_smem, ik_smem, sel_stage, p_union, dz_smem, val_stage,
    meta_bar, unit_bar, kv_bar, q_bar, q_free, iq_bar, iq_free, p_bar, dz_bar, end_bar,
    *, scale: float, scale_idx: float, block_size: int, heads: int, groups: int, W: int, q_slots: int,
    iq_slots: int, H_kv: int, regs_a: bool,
):
    bq = ROWS // heads
    N = n_cols(bq)
    u = lax.axis_index("u")
    bh = lax.axis_index("bh")
    wg = lax.axis_index("wg")
    i32, f32, bf16 = jnp.int32, jnp.float32, jnp.bfloat16
    n_dh = ik_smem.shape[0]  # 64-wide halves of the index dims (1 or 2)
    (p_hi, p_lo), dik_stage = p_union  # (a RefUnion iterates over its groups)

    def slot(n, slots):
        return lax.rem(n, i32(slots))

    def copy_rows(src, start, dst, count, bar):
        """TMA copies of `count` consecutive elements src[bh, start:] -> dst[:count], <= 256 per copy."""
        for a in range(0, count, TMA_MAX):
            size = min(TMA_MAX, count - a)
            plgpu.copy_gmem_to_smem(src.at[bh, pl.ds(start + a, size)], dst.at[pl.ds(a, size)], bar)

    @pl.when(wg == N_CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        plgpu.copy_gmem_to_smem(units_ref.at[bh, u], unit_smem, meta_bar)
        plgpu.barrier_wait(meta_bar)
        c, t0, n = unit_smem[0], unit_smem[1], unit_smem[2]

        @pl.when(n > 0)
        def _():
            per_pos = W * bq + N
            for src, dst in ((tok_ref, tok_smem), (tpos_ref, tpos_smem), (zlse_ref, zlse_smem), (w1_ref, w1_smem),
                             (w2_ref, w2_smem)):
                copy_rows(src, t0 * bq, dst, per_pos, unit_bar)
            rows = pl.ds(c * block_size, block_size)
            plgpu.copy_gmem_to_smem(k_ref.at[bh, rows], k_smem, kv_bar)
            for d in range(n_dh):  # ik in 64-wide column halves (wgmma takes whole SMEM tiles)
                plgpu.copy_gmem_to_smem(ik_ref.at[bh // H_kv, rows, pl.ds(d * WG_ROWS, WG_ROWS)], ik_smem.at[d],
                                        kv_bar)
            plgpu.barrier_wait(unit_bar)  # the token ids, for the gathers below

            @pl.loop(0, n)
            def _(j):
                qs, js = slot(j, q_slots), slot(j, iq_slots)

                @pl.when(j >= q_slots)
                def _():
                    plgpu.barrier_wait(q_free.at[qs])

                rows_t = pl.ds((t0 + j) * ROWS, ROWS)  # the tile's rows' positions and teacher lse
                plgpu.copy_gmem_to_smem(rpos_ref.at[bh, rows_t], rpos_smem.at[qs], q_bar.at[qs])
                plgpu.copy_gmem_to_smem(lse_ref.at[bh, rows_t], lse_smem.at[qs], q_bar.at[qs])
                for b in range(bq):  # the gather: one TMA copy per token slab (padding: token 0's, masked)
                    tk = jnp.maximum(tok_smem[j * bq + b], 0)
                    w, r0 = divmod(b * heads, WG_ROWS)
                    plgpu.copy_gmem_to_smem(q_ref.at[bh, pl.ds(tk * heads, heads)], q_smem.at[qs, w, pl.ds(r0, heads)],
                                            q_bar.at[qs])

                @pl.when(j >= iq_slots)
                def _():
                    plgpu.barrier_wait(iq_free.at[js])

                for d in range(n_dh):
                    plgpu.copy_gmem_to_smem(iqp_ref.at[bh, pl.ds((t0 + j) * bq, N), pl.ds(d * WG_ROWS, WG_ROWS)],
                                            iq_smem.at[js, d], iq_bar.at[js])

            # Observe the consumers' last releases (the interpreter frees barriers only then).
            @pl.loop(jnp.maximum(n - q_slots, 0), n)
            def _(j):
                plgpu.barrier_wait(q_free.at[slot(j, q_slots)])

            @pl.loop(jnp.maximum(n - iq_slots, 0), n)
            def _(j):
                plgpu.barrier_wait(iq_free.at[slot(j, iq_slots)])

    def _consumer(w: int):  # consumer warpgroup w (static: every SMEM slice below is static)
        plgpu.set_max_registers(232, action="increase")
        layout = plgpu.Layout.WGMMA
        row_layout = layout.reduce(1)  # one value per row
        plgpu.barrier_wait(meta_bar)
        c, t0, n = unit_smem[0], unit_smem[1], unit_smem[2]
        half = pl.ds(w * WG_ROWS, WG_ROWS)  # this consumer's teacher rows; also its keys (student side)
        sq = (WG_ROWS, WG_ROWS)

        def a_operand(x, stage):
            """A wgmma A operand in registers: itself, or staged through SMEM for the interpreter."""
            if regs_a:
                return x
            stage[...] = x
            plgpu.commit_smem()
            return stage

        def mm(pairs, shape=sq):
            """sum of a @ b over the (a, b) pairs, one float32 accumulator."""
            def f(acc):
                for a, b in pairs:
                    plgpu.wgmma(acc, a, b)
                return acc[...]

            return pl.run_scoped(f, plgpu.ACC(shape, f32))

        @pl.when(n > 0)
        def _():
            # Sel [64 token rows, 128 teacher rows] as two 64-column halves: teacher row m is token m // G_pad.
            tok_row = plgpu.broadcasted_iota(i32, sq, 0, layout=layout)
            sel = [((r * WG_ROWS + plgpu.broadcasted_iota(i32, sq, 1, layout=layout)) // heads == tok_row).astype(bf16)
                   for r in range(2)]
            if not regs_a:
                for r in range(2):
                    sel_stage.at[w, r][...] = sel[r]
                plgpu.commit_smem()
                sel = [sel_stage.at[w, r] for r in range(2)]
            plgpu.barrier_wait(unit_bar)
            plgpu.barrier_wait(kv_bar)
            kpos = c * block_size + plgpu.broadcasted_iota(i32, sq, 1, layout=layout)  # + h * 64: key half h
            row_ok = tok_row < bq  # token rows >= BQ are padding (their inputs: the next tile's, finite)

            def tile(j, dik, val):
                qs, js = slot(j, q_slots), slot(j, iq_slots)
                t = t0 + j
                plgpu.barrier_wait(q_bar.at[qs])
                # The teacher: S = Q K^T for this consumer's 64 rows, per 64-key half (P goes to SMEM by
                # halves: whole wgmma tiles for the other consumer).
                s = [mm([(q_smem.at[qs, w], k_smem.at[pl.ds(h * WG_ROWS, WG_ROWS)].transpose((1, 0)))])
                     for h in range(2)]
                row_pos = plgpu.load(rpos_smem.at[qs, half], layout=row_layout)
                lse = plgpu.load(lse_smem.at[qs, half], layout=row_layout)
                plgpu.commit_smem()  # (as the forward: order the slot's reads before the producer's refill)
                plgpu.barrier_arrive(q_free.at[qs])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's d iq (staged in P) left SMEM
                for h in range(2):
                    mask = (kpos + h * WG_ROWS) <= lax.broadcast_in_dim(row_pos, sq, [0])
                    p = jnp.where(mask, jnp.exp2(s[h] * (scale * LOG2E) - lax.broadcast_in_dim(lse * LOG2E, sq, [0])),
                                  0.0)
                    hi = p.astype(bf16)
                    p_hi.at[w, h][...] = hi
                    p_lo.at[w, h][...] = (p - hi.astype(f32)).astype(bf16)
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_bar)
                plgpu.barrier_wait(p_bar)  # both consumers' rows of P are in SMEM

                # The student, on this consumer's 64 keys, tokens as rows: sum_h P = Sel P (hi + lo terms)
                psum = mm([(sel[r], buf.at[r, w]) for r in range(2) for buf in (p_hi, p_lo)])
                plgpu.barrier_wait(iq_bar.at[js])
                z = mm([(iq_smem.at[js, d], ik_smem.at[d, half].transpose((1, 0))) for d in range(n_dh)]) * scale_idx

                def row_vec(ref):
                    v = plgpu.load(ref.at[pl.ds(j * bq, WG_ROWS)], layout=row_layout)
                    return lax.broadcast_in_dim(v, sq, [0])

                zmask = row_ok & ((kpos + w * WG_ROWS) <= row_vec(tpos_smem))
                zlse = row_vec(zlse_smem)
                dz = jnp.where(zmask, row_vec(w1_smem) * jnp.exp(z - zlse) - row_vec(w2_smem) * psum, 0.0)
                # The value's terms, weighted per token, summed over this consumer's keys; rows of the
                # same index add up over the tiles (only the total over rows is used).
                pbar = psum * (1.0 / groups)
                pos = pbar > 0.0
                kl = (jnp.where(pos, pbar * jnp.log(jnp.where(pos, pbar, 1.0)), 0.0)
                      - pbar * jnp.where(zmask, z, 0.0) + zlse * pbar)
                val = val + jnp.sum(jnp.where(row_ok, row_vec(w1_smem) * kl, 0.0), axis=1)
                dz_smem.at[w][...] = dz.astype(bf16)
                plgpu.commit_smem()
                plgpu.barrier_arrive(dz_bar)
                plgpu.barrier_wait(dz_bar)  # both halves of dz are in SMEM
                for d in range(n_dh):  # d ik_w += dz_w^T iq (accumulates over the unit's tiles)
                    plgpu.wgmma(dik[d], dz_smem.at[w].transpose((1, 0)), iq_smem.at[js, d])
                diq_stage = p_hi.at[w, 0]  # free now (P read by both), written by this consumer only
                if w < n_dh:  # d iq [tokens, dims half w] = dz ik[:, half w], over both key halves
                    diq = mm([(dz_smem.at[h], ik_smem.at[w, pl.ds(h * WG_ROWS, WG_ROWS)]) for h in range(2)])
                    diq_stage[...] = (diq * scale_idx).astype(bf16)
                plgpu.wgmma_wait(0)  # the d ik wgmmas have read iq and dz: both may be refilled
                plgpu.barrier_arrive(iq_free.at[js])
                plgpu.commit_smem()
                if w < n_dh:
                    plgpu.copy_smem_to_gmem(diq_stage.at[pl.ds(0, bq)],
                                            diq_ref.at[bh, pl.ds(t * bq, bq), half])
                return val

            def run(*dik):
                zero = plgpu.layout_cast(jnp.zeros((WG_ROWS,), f32), row_layout)
                val = lax.fori_loop(0, n, lambda j, v: tile(j, dik, v), zero)
                plgpu.wgmma_wait(0)
                return [x[...] for x in dik], val

            dik, val = pl.run_scoped(run, *[plgpu.ACC(sq, f32) for _ in range(n_dh)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this consumer's last d iq left its P tile
            plgpu.barrier_arrive(end_bar)
            plgpu.barrier_wait(end_bar)  # both are done with P: its memory takes d ik now
            for d in range(n_dh):
                dik_stage.at[w, d][...] = dik[d] * scale_idx
            val_stage.at[w][...] = val
            plgpu.commit_smem()
            for d in range(n_dh):
                plgpu.copy_smem_to_gmem(dik_stage.at[w, d], dik_ref.at[bh, u, half, pl.ds(d * WG_ROWS, WG_ROWS)])
            plgpu.copy_smem_to_gmem(val_stage.at[w], val_ref.at[bh, u, half])
            plgpu.wait_smem_to_gmem(0)

    for w in range(N_CONSUMERS):
        pl.when(wg == w)(functools.partial(_consumer, w))


def check_supported(G_pad: int, D_pad: int, Di_pad: int, block_size: int, dtype) -> None:
    """The Mosaic GPU KL kernel's limits (ValueError otherwise)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"the Mosaic GPU KL pass takes bfloat16 inputs, got {jnp.dtype(dtype).name}")
    if G_pad not in (8, 16):
        raise ValueError(f"G_pad must be 8 or 16 for the Mosaic GPU KL pass (BQ >= 8 token rows), got {G_pad}")
    if block_size != 2 * WG_ROWS:
        raise ValueError(f"block_size must be {2 * WG_ROWS} (one key half per consumer), got {block_size}")
    for name, d in (("D", D_pad), ("D_idx", Di_pad)):
        if d not in (64, 128):
            raise ValueError(f"{name} padded to {d}: the Mosaic GPU KL pass takes 64 or 128")


def supported(G_pad: int, D_pad: int, Di_pad: int, block_size: int, dtype) -> bool:
    try:
        check_supported(G_pad, D_pad, Di_pad, block_size, dtype)
    except ValueError:
        return False
    return True


def fused_parts(units, tok, tpos, zlse, w1, w2, rpos, lse_rows, qg, iqp, kg, ikg, *, block_size: int, G_pad: int,
                groups: int, H_kv: int, n_tiles: int, W: int, D_orig: int, Di_orig: int, q_slots: int | None = None,
                regs_a: bool | None = None, interpret=False):
    """The Mosaic GPU tile kernel on one query chunk (layouts: `_kernel`'s arguments) -> (d iq
    bf16 [BH, n_tiles * BQ, Di] (a row per padded position), d ik f32 [BH, U, block_size, Di], value terms f32 [BH, U, block_size]:
    per unit and key, the sum over the unit's tokens of w1 * (their KL terms at that key); the sum
    over units and keys is sum_i w1_i kl_i of the row). interpret: False (a GPU), True or a `plgpu.InterpretGPUParams`."""
    BH, U, _ = units.shape
    D, Di = qg.shape[-1], iqp.shape[-1]
    bq = ROWS // G_pad
    N = n_cols(bq)
    if regs_a is None:
        regs_a = not interpret
    q_slots, iq_slots = default_slots(G_pad, D, Di, block_size, W, regs_a) if q_slots is None else (q_slots, 2)
    tf = mg.smem_transforms
    unit_n = W * bq + N
    t64 = lambda *lead: plgpu.SMEM((*lead, WG_ROWS, WG_ROWS), jnp.bfloat16, transforms=tf(WG_ROWS))  # noqa: E731
    n_dh = Di // WG_ROWS
    scratch = [
        plgpu.SMEM((4,), jnp.int32),  # unit_smem
        *(plgpu.SMEM((unit_n,), dt) for dt in (jnp.int32, jnp.int32, jnp.float32, jnp.float32, jnp.float32)),
        plgpu.SMEM((q_slots, ROWS), jnp.int32),  # rpos_smem (with the q ring)
        plgpu.SMEM((q_slots, ROWS), jnp.float32),  # lse_smem
        plgpu.SMEM((q_slots, N_CONSUMERS, WG_ROWS, D), jnp.bfloat16, transforms=tf(D)),  # q_smem
        t64(iq_slots, n_dh),  # iq_smem: [slot, dims half, token row, dim]
        plgpu.SMEM((block_size, D), jnp.bfloat16, transforms=tf(D)),  # k_smem
        plgpu.SMEM((n_dh, block_size, WG_ROWS), jnp.bfloat16, transforms=tf(WG_ROWS)),  # ik_smem: [dims half, key, dim]
        t64(N_CONSUMERS, 2) if not regs_a else plgpu.SMEM((1,), jnp.int32),  # sel_stage (interpreted: Sel)
        # P hi, lo [consumer (its 64 teacher rows), key half, row, key] | d ik [consumer, dims half, key, dim]
        plgpu.RefUnion((t64(N_CONSUMERS, 2), t64(N_CONSUMERS, 2)),
                       plgpu.SMEM((N_CONSUMERS, n_dh, WG_ROWS, WG_ROWS), jnp.float32)),
        t64(N_CONSUMERS),  # dz_smem: [key half, token row, key]
        plgpu.SMEM((N_CONSUMERS, WG_ROWS), jnp.float32),  # val_stage
        plgpu.Barrier(),  # meta_bar
        plgpu.Barrier(num_arrivals=5 * -(-unit_n // TMA_MAX)),  # unit_bar
        plgpu.Barrier(num_arrivals=1 + Di // WG_ROWS),  # kv_bar: K_c, ik_c halves
        plgpu.Barrier(num_arrivals=bq + 2, num_barriers=q_slots),  # q_bar: slabs, positions, lse
        plgpu.Barrier(num_arrivals=N_CONSUMERS, num_barriers=q_slots),  # q_free
        plgpu.Barrier(num_arrivals=Di // WG_ROWS, num_barriers=iq_slots),  # iq_bar
        plgpu.Barrier(num_arrivals=N_CONSUMERS, num_barriers=iq_slots),  # iq_free
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # p_bar
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # dz_bar
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # end_bar
    ]
    kernel = functools.partial(
        _kernel, scale=D_orig**-0.5, scale_idx=Di_orig**-0.5, block_size=block_size, heads=G_pad, groups=groups, W=W,
        q_slots=q_slots, iq_slots=iq_slots, H_kv=H_kv, regs_a=regs_a,
    )
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((BH, n_tiles * bq, Di), jnp.bfloat16),
            jax.ShapeDtypeStruct((BH, U, block_size, Di), jnp.float32),
            jax.ShapeDtypeStruct((BH, U, block_size), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(U, BH),
        grid_names=("u", "bh"),
        num_threads=N_CONSUMERS + 1,
        thread_name="wg",
        interpret=interpret or None,
        kernel_name=f"msa_mgpu_index_kl_g{G_pad}_bs{block_size}_w{W}",
    )
    return call(units, tok, tpos, zlse, w1, w2, rpos, lse_rows, qg, iqp, kg, ikg)
