"""MSA main-branch forward tile kernel on the Pallas Mosaic GPU backend (Hopper: TMA + wgmma), next to
the Triton kernel of `pallas.sparse_attention`, which runs it on Hopper GPUs for the shapes it takes
(`fwd_kernel="auto"`; `supported`, `on_hopper`).

    out, lse = sparse_attention_fwd_mgpu(q, k, v, block_idx, *, block_size)   # forward only, bf16

Same contract as `pallas.sparse_attention.sparse_attention_fwd` (q [B, T, H_q, D], k, v [B, L, H_kv,
D] bfloat16, block_idx [B, T, H_kv, top_k], q_pos; out [B, T, H_q, D] bf16, lse float32 [B, T, H_q])
and the same machinery (`pallas.kv_outer`: clean_ids, chunk_index, rows / kv_layout,
combine_outputs): only the tile kernel is new. docs/algorithm.md §7.2 and docs/design.md ("Mosaic
GPU forward") describe it; the API facts it relies on are collected there too.

Tile kernel (`tile_partials`): grid (programs, B*H_kv), a program (CTA) handles `tiles_per_program`
(nt) consecutive tiles of one row, with three warpgroups:

* warpgroup 2, the producer: TMA-copies the program's tile table and token ids into SMEM, then per
  live tile (block c >= 0) the BQ token slabs [G_pad, D] of q (from q's own [B, T, H_q, D] layout when
  G and D need no padding, `native_q`, else from the chunk's rows copy at offsets tok * G_pad;
  padding positions, tok = -1, copy token 0's slab; their rows are masked by position -1), the
  rows' query positions, and K_c, V_c at row offset c * block_size when c differs from the previous
  tile's block (the tiles of a row are sorted by block, so a block's K/V is loaded once per run of
  tiles). q (+ positions) and K/V live in rings of `q_slots` / `kv_slots` SMEM buffers guarded by
  "full" (TMA) and "free" (consumer arrival) barriers, so the loads of the next tiles run behind
  the current tile's matmuls.
* warpgroups 0 and 1, the consumers: rows [64 w, 64 w + 64) of the tile's M = BQ * G_pad = 128
  rows. S = Q K_c^T by wgmma (f32 accumulator in registers), the causal mask key <= row position
  (positions -1 for padding rows), softmax within the block in base 2, O = P V_c by wgmma (P bf16
  from registers), o / l and lse (natural log; o = 0, lse = -inf for empty rows) through SMEM to
  the per-slot partial buffers by TMA stores.

G_pad >= 8: q slabs land in a 128-byte-swizzled, (8, 64)-tiled SMEM tile that wgmma reads
directly. G_pad < 8 cannot slice an 8-row tile, so its slabs go to a plain SMEM buffer that each
consumer loads into registers (the wgmma A operand from registers). The Mosaic GPU interpreter of
jax 0.11.2 only takes SMEM wgmma operands: interpreted (`regs_a=False`), P (and the small-G q) go
through a swizzled SMEM tile per consumer instead; everything else is the same code.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax.checks import check_int
from pallas import kv_outer as kvo
from pallas.common import LN2, LOG2E, MASK_VALUE, interpret_mode

__all__ = ["MGPUConfig", "sparse_attention_fwd_mgpu", "tile_partials", "row_positions", "smem_bytes", "supported",
           "on_hopper"]

ROWS = 128  # M: MMA rows per tile (BQ * G_pad)
WG_ROWS = 64  # rows per consumer warpgroup (one wgmma M)
N_CONSUMERS = ROWS // WG_ROWS
SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block
SMEM_RESERVE = 4096  # on top of the buffers: barriers, Mosaic's reduction scratch, alignment
TMA_MAX = 256  # elements per dimension of one TMA copy


def _meta_copies(nt: int, bq: int) -> int:
    return -(-nt // TMA_MAX) + -(-(nt * bq) // TMA_MAX)


@dataclasses.dataclass(frozen=True)
class MGPUConfig:
    """Settings of the Mosaic GPU tile kernel.

    tiles_per_program: consecutive tiles one CTA handles (a multiple of 4: the tile table is
      TMA-copied, 16-byte units). q_slots / kv_slots: SMEM ring depths of the q tiles and of the K/V
      blocks (kv_slots None: 2 when it fits in shared memory, else 1). query_chunk: as
      `kv_outer.KVOuterConfig`. approx_math: Mosaic GPU's approximate exp2 / log. regs_a:
      `tile_partials` (None: P from registers on a GPU, through SMEM interpreted). pingpong: stagger
      the two consumers with a schedule barrier so that one's softmax and epilogue run while the other's
      matmuls do (`tile_partials`; on an H200 no faster end to end at 128K, so off). q_in_place: gather
      q slabs from q's own layout where `native_q` allows (False: always from a rows copy of each chunk;
      1.5 ms slower at 128K on an H200).
    """

    tiles_per_program: int = 16
    q_slots: int = 2
    kv_slots: int | None = None
    query_chunk: int | None = None
    approx_math: bool = False
    regs_a: bool | None = None
    pingpong: bool = False
    q_in_place: bool = True

    def __post_init__(self):
        check_int("tiles_per_program", self.tiles_per_program, 1)
        if self.tiles_per_program % 4:
            raise ValueError(f"tiles_per_program must be a multiple of 4, got {self.tiles_per_program}")
        check_int("q_slots", self.q_slots, 1)
        if self.kv_slots is not None:
            check_int("kv_slots", self.kv_slots, 1)


def _swizzle(D: int) -> int:
    """Bytes of the SMEM swizzle for bf16 rows of D elements (D * 2 bytes, at most 128)."""
    return min(128, 2 * D)


def smem_transforms(D: int):
    """Tiling + swizzle transforms of a bf16 SMEM tile with rows of D elements (a wgmma operand)."""
    sw = _swizzle(D)
    return (plgpu.TilingTransform((8, sw // 2)), plgpu.SwizzleTransform(sw))


def smem_bytes(G_pad: int, D: int, block_size: int, nt: int, q_slots: int, kv_slots: int,
               regs_a: bool = True) -> int:
    """Shared memory of one CTA (buffers only; barriers and Mosaic's scratch come on top)."""
    bq = ROWS // G_pad
    q = q_slots * (ROWS * D * 2 + ROWS * 4)  # q tile + row positions
    kv = kv_slots * 2 * block_size * D * 2
    out = ROWS * D * 2 + ROWS * 4  # o and lse staging
    meta = nt * 4 + nt * bq * 4
    staging = 0 if regs_a else ROWS * block_size * 2 + (ROWS * D * 2 if G_pad < 8 else 0)  # P (q) for wgmma
    return q + kv + out + meta + staging


def default_kv_slots(G_pad: int, D: int, block_size: int, nt: int, q_slots: int, regs_a: bool = True) -> int:
    """2 K/V buffers (the next block's load overlaps the current block's last tiles) when they fit."""
    fits = smem_bytes(G_pad, D, block_size, nt, q_slots, 2, regs_a) + SMEM_RESERVE <= SMEM_LIMIT
    return 2 if fits else 1


def _tile_kernel(
    tiles_ref,  # GMEM [BH, n_tiles] int32: block id per tile, -1 = unused (a suffix of the row)
    tok_ref,  # GMEM [BH, n_tiles * BQ] int32: chunk-local token per padded position, -1 = padding
    rpos_ref,  # GMEM [BH, n_tiles * M] int32: query position per tile row, -1 = padding row
    q_ref,  # GMEM bf16: [BH, Tc * G_pad, D] the chunk's queries, token-major per group (`kv_outer.rows`), or
    #        (kv_groups set) q itself, [B, T, H_kv * G_pad, D], a token's group heads one [G_pad, D] slab
    k_ref,  # GMEM [BH, T_kv_pad, D] bf16
    v_ref,  # GMEM [BH, T_kv_pad, D] bf16
    o_ref,  # GMEM [BH, n_tiles * M, D] bf16: per-slot partial outputs
    lse_ref,  # GMEM [BH, n_tiles * M] f32
    tiles_smem, tok_smem, q_smem, rpos_smem, k_smem, v_smem, o_smem, lse_smem, qa_smem, pa_smem,
    meta_bar, q_bar, k_bar, v_bar, q_free, kv_free, sched_bar,
    *, scale: float, block_size: int, heads: int, nt: int, q_slots: int, kv_slots: int, swizzled: bool,
    regs_a: bool, pingpong: bool, kv_groups: int | None,
):
    bq = ROWS // heads
    prog = lax.axis_index("t")
    bh = lax.axis_index("bh")
    wg = lax.axis_index("wg")
    t0 = prog * nt
    i32 = jnp.int32

    def slot_of(n, slots):
        return lax.rem(n, i32(slots))

    def next_block(j, carry):
        """(block, live, new block, K/V loads so far - 1) of tile j; carry = (the latter, previous block)."""
        kvn, c_prev = carry
        c = tiles_smem[j]
        live = c >= 0
        new = live & (c != c_prev)
        return c, live, new, kvn + new.astype(i32)

    @pl.when(wg == N_CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        for src, dst, n in ((tiles_ref, tiles_smem, nt), (tok_ref, tok_smem, nt * bq)):
            for a in range(0, n, TMA_MAX):  # a TMA copy moves <= 256 elements per dimension
                size = min(TMA_MAX, n - a)
                plgpu.copy_gmem_to_smem(src.at[bh, pl.ds(t0 * (n // nt) + a, size)], dst.at[pl.ds(a, size)],
                                        meta_bar)
        plgpu.barrier_wait(meta_bar)

        def body(j, carry):
            c, live, new, kvn = next_block(j, carry)

            @pl.when(live)
            def _():
                qs = slot_of(j, q_slots)

                @pl.when(j >= q_slots)
                def _():
                    plgpu.barrier_wait(q_free.at[qs])

                t = t0 + j
                plgpu.copy_gmem_to_smem(rpos_ref.at[bh, pl.ds(t * ROWS, ROWS)], rpos_smem.at[qs], q_bar.at[qs])
                for b in range(bq):  # the gather: one small TMA copy per token slab
                    # A padding position (tok -1) copies token 0's slab: its rows are masked by their
                    # position -1. (A predicated-off copy would save those bytes, but the interpreter
                    # of jax 0.11.2 rejects copy_gmem_to_smem(predicate=...); padding is a few % of
                    # the positions at 128K, bench_mgpu_fwd.py reports it.)
                    tk = jnp.maximum(tok_smem[j * bq + b], 0)
                    w, r0 = divmod(b * heads, WG_ROWS)
                    if kv_groups is None:
                        slab = q_ref.at[bh, pl.ds(tk * heads, heads)]
                    else:  # q's own layout: batch row bh // H_kv, token tk, the heads of group bh % H_kv
                        slab = q_ref.at[bh // kv_groups, tk, pl.ds(lax.rem(bh, kv_groups) * heads, heads)]
                    plgpu.copy_gmem_to_smem(slab, q_smem.at[qs, w, pl.ds(r0, heads)], q_bar.at[qs])

                # A new block: its K/V once the slot's previous block is done (after the q copies, which
                # need not wait for that).
                @pl.when(new)
                def _():
                    ks = slot_of(kvn, kv_slots)

                    @pl.when(kvn >= kv_slots)
                    def _():
                        plgpu.barrier_wait(kv_free.at[ks])

                    rows = pl.ds(c * block_size, block_size)
                    plgpu.copy_gmem_to_smem(k_ref.at[bh, rows], k_smem.at[ks], k_bar.at[ks])
                    plgpu.copy_gmem_to_smem(v_ref.at[bh, rows], v_smem.at[ks], v_bar.at[ks])

            return kvn, jnp.where(live, c, carry[1])

        kvn, _ = lax.fori_loop(0, nt, body, (i32(-1), i32(-1)))
        # Drain the consumers' last releases of each ring (the interpreter requires every completed
        # barrier phase to be observed before the barrier is freed; on a GPU this only waits for the
        # consumers to finish, which the CTA does anyway).
        n_live = lax.fori_loop(0, nt, lambda j, n: n + (tiles_smem[j] >= 0).astype(i32), i32(0))

        @pl.loop(jnp.maximum(n_live - q_slots, 0), n_live)
        def _(j):
            plgpu.barrier_wait(q_free.at[slot_of(j, q_slots)])

        @pl.loop(jnp.maximum(kvn + 1 - kv_slots, 0), kvn + 1)
        def _(n):
            plgpu.barrier_wait(kv_free.at[slot_of(n, kv_slots)])

    @pl.when(wg < N_CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        plgpu.barrier_wait(meta_bar)
        layout = plgpu.Layout.WGMMA
        row_layout = plgpu.Layout.WGMMA.reduce(1)

        # pingpong: the two consumers take turns on the tensor cores. sched_bar completes a phase when
        # both have arrived; consumer 1 starts one phase late (its extra arrival here, consumer 0's at
        # the end), so each consumer's Q K^T and P V are issued while the other one is in its softmax
        # or epilogue. Both consumers run the same tiles, so their arrivals pair up.
        def sched_sync():
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

        if pingpong:
            pl.when(wg == 1)(sched_sync)

        def a_operand(x, staging):
            """A wgmma A operand held in registers: itself (regs_a), or staged through this consumer's
            swizzled SMEM tile (the interpreter's wgmma reads SMEM operands only)."""
            if regs_a:
                return x
            staging.at[wg][...] = x
            plgpu.commit_smem()  # generic-proxy stores -> visible to wgmma (async proxy)
            return staging.at[wg]

        def body(j, carry):
            c, live, new, kvn = next_block(j, carry)
            c_next = jnp.where(j + 1 < nt, tiles_smem[jnp.minimum(j + 1, nt - 1)], -1)

            @pl.when(live)
            def _():
                qs = slot_of(j, q_slots)
                ks = slot_of(kvn, kv_slots)
                plgpu.barrier_wait(q_bar.at[qs])

                @pl.when(new)
                def _():
                    if pingpong:
                        # Arrive before waiting for a new block's K/V, not after issuing Q K^T: with one
                        # K/V buffer the producer loads this block only once the other consumer's P V of
                        # the last one is done, and that P V waits for this arrival (a deadlock otherwise).
                        plgpu.barrier_arrive(sched_bar)
                    plgpu.barrier_wait(k_bar.at[ks])

                row_pos = plgpu.load(rpos_smem.at[qs, pl.ds(wg * WG_ROWS, WG_ROWS)], layout=row_layout)
                q_tile = q_smem.at[qs, wg]
                if not swizzled:  # plain SMEM -> registers (-> a swizzled SMEM tile without regs_a)
                    q_tile = a_operand(plgpu.load(q_tile, layout=layout, optimized=False), qa_smem)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_smem.at[ks].transpose((1, 0)))
                    if pingpong:  # the other consumer's turn on the tensor cores
                        pl.when(~new)(lambda: plgpu.barrier_arrive(sched_bar))  # (a new block arrived above)
                        plgpu.barrier_wait(sched_bar)
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_size), jnp.float32))
                # The q slot may be refilled. The fence orders this warpgroup's generic-proxy reads of
                # the slot (positions; q for G_pad < 8) before the producer's TMA (async proxy) writes;
                # the interpreter's race detector flags the reuse without it.
                plgpu.commit_smem()
                plgpu.barrier_arrive(q_free.at[qs])

                key_pos = c * block_size + plgpu.broadcasted_iota(i32, (WG_ROWS, block_size), 1, layout=layout)
                mask = key_pos <= lax.broadcast_in_dim(row_pos, (WG_ROWS, block_size), [0])
                s = jnp.where(mask, s * (scale * LOG2E), MASK_VALUE)
                m = s.max(axis=1)
                # Masked logits are MASK_VALUE: exp2 of (MASK_VALUE - m) is 0 for a row that saw a key; an
                # empty row (m = MASK_VALUE) gets p = 1 everywhere and is zeroed below.
                p = jnp.exp2(s - lax.broadcast_in_dim(m, s.shape, [0]))
                l = p.sum(axis=1)
                if pingpong:
                    plgpu.barrier_arrive(sched_bar)  # this softmax is done

                @pl.when(new)
                def _():
                    plgpu.barrier_wait(v_bar.at[ks])

                if pingpong:
                    plgpu.barrier_wait(sched_bar)  # the tensor cores are free: P V

                p_tile = a_operand(p.astype(v_smem.dtype), pa_smem)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_tile, v_smem.at[ks])
                    return acc_ref[...]

                # (run_scoped, not run_state(ACC.init(...)): the jax 0.11.2 interpreter lacks run_state)
                o = pl.run_scoped(pv, plgpu.ACC((WG_ROWS, v_smem.shape[-1]), jnp.float32))

                @pl.when(c_next != c)  # the block's last tile here: its K/V slot may be refilled
                def _():
                    plgpu.barrier_arrive(kv_free.at[ks])

                seen = m > 0.5 * MASK_VALUE
                inv_l = jnp.where(seen, 1.0 / l, 0.0)
                o = o * lax.broadcast_in_dim(inv_l, o.shape, [0])
                lse = jnp.where(seen, m * LN2 + jnp.log(l), -jnp.inf)

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores left SMEM
                o_smem.at[wg][...] = o.astype(o_smem.dtype)
                lse_smem.at[wg][...] = lse
                plgpu.commit_smem()
                row0 = (t0 + j) * ROWS + wg * WG_ROWS
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[bh, pl.ds(row0, WG_ROWS)])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bh, pl.ds(row0, WG_ROWS)])

            return kvn, jnp.where(live, c, carry[1])

        lax.fori_loop(0, nt, body, (i32(-1), i32(-1)))
        if pingpong:
            pl.when(wg == 0)(sched_sync)  # pairs consumer 1's extra arrival at the start
        plgpu.wait_smem_to_gmem(0)


def row_positions(tok, posc, *, H_kv: int, G_pad: int):
    """tok [BH, P] (chunk-local token per padded position, -1 padding), posc [B, Tc] -> int32 [BH, P *
    G_pad]: the query position of every tile row (-1 for padding positions)."""
    BH, P = tok.shape
    pos_rows = jnp.repeat(posc, H_kv, axis=0)  # [BH, Tc]: row bh belongs to batch row bh // H_kv
    pp = jnp.take_along_axis(pos_rows, jnp.maximum(tok, 0), axis=1)
    pp = jnp.where(tok >= 0, pp, -1).astype(jnp.int32)
    return jnp.repeat(pp, G_pad, axis=1)


def tile_partials(tiles, tok, rpos, qg, kg, vg, *, block_size: int, G_pad: int, D_orig: int, nt: int,
                  q_slots: int = 2, kv_slots: int | None = None, approx_math: bool = False,
                  regs_a: bool | None = None, pingpong: bool = False, interpret=False):
    """The Mosaic GPU tile kernel on one query chunk: tiles [BH, n_tiles], tok [BH, n_tiles * BQ],
    rpos [BH, n_tiles * 128] (`row_positions`), qg [BH, Tc * G_pad, D] (`kv_outer.rows`; tok indexes
    its tokens) or q itself [B, T, H_kv * G_pad, D] (no copy; tok indexes T: chunk-local tokens plus
    the chunk's start), kg, vg [BH, T_kv_pad, D] (`kv_outer.kv_layout`), all bf16 -> (o_part bf16
    [BH, n_tiles * 128, D],
    lse_part f32 [BH, n_tiles * 128]) as the Triton kernel's per-slot partials. interpret: False (a
    GPU), True or a `plgpu.InterpretGPUParams` (the Mosaic GPU interpreter on CPU). regs_a: wgmma A
    operands held in registers (P; q for G_pad < 8) feed wgmma from registers; False stages them
    through SMEM, as the interpreter needs (default: True on a GPU, False interpreted)."""
    BH, n_tiles = tiles.shape
    D = qg.shape[-1]
    bq = ROWS // G_pad
    kv_groups = None
    if qg.ndim == 4:
        kv_groups = BH // qg.shape[0]
        if qg.shape[0] * kv_groups != BH or qg.shape[2] != kv_groups * G_pad:
            raise ValueError(f"q {qg.shape}: expected [B, T, H_kv * G_pad, D] with B * H_kv = {BH}, G_pad = {G_pad}")
    if n_tiles % nt:
        raise ValueError(f"n_tiles {n_tiles} is not a multiple of tiles_per_program {nt}")
    if regs_a is None:
        regs_a = not interpret
    if kv_slots is None:
        kv_slots = default_kv_slots(G_pad, D, block_size, nt, q_slots, regs_a)
    swizzled = G_pad >= 8
    tf = smem_transforms(D)
    q_tf = tf if swizzled else ()
    staging = lambda cols, need: (  # noqa: E731
        plgpu.SMEM((N_CONSUMERS, WG_ROWS, cols), qg.dtype, transforms=smem_transforms(cols)) if need
        else plgpu.SMEM((1,), jnp.int32))  # (a 4-byte placeholder)
    scratch = [
        plgpu.SMEM((nt,), jnp.int32),  # tiles_smem
        plgpu.SMEM((nt * bq,), jnp.int32),  # tok_smem
        plgpu.SMEM((q_slots, N_CONSUMERS, WG_ROWS, D), qg.dtype, transforms=q_tf),  # q_smem
        plgpu.SMEM((q_slots, ROWS), jnp.int32),  # rpos_smem
        plgpu.SMEM((kv_slots, block_size, D), kg.dtype, transforms=tf),  # k_smem
        plgpu.SMEM((kv_slots, block_size, D), vg.dtype, transforms=tf),  # v_smem
        plgpu.SMEM((N_CONSUMERS, WG_ROWS, D), qg.dtype, transforms=tf),  # o_smem
        plgpu.SMEM((N_CONSUMERS, WG_ROWS), jnp.float32),  # lse_smem
        staging(D, not regs_a and not swizzled),  # qa_smem: q tiles of G_pad < 8 for wgmma
        staging(block_size, not regs_a),  # pa_smem: P for wgmma
        plgpu.Barrier(num_arrivals=_meta_copies(nt, bq)),  # meta_bar: tiles + tok
        plgpu.Barrier(num_arrivals=bq + 1, num_barriers=q_slots),  # q_bar: BQ slabs + positions
        plgpu.Barrier(num_barriers=kv_slots),  # k_bar
        plgpu.Barrier(num_barriers=kv_slots),  # v_bar
        plgpu.Barrier(num_arrivals=N_CONSUMERS, num_barriers=q_slots),  # q_free
        plgpu.Barrier(num_arrivals=N_CONSUMERS, num_barriers=kv_slots),  # kv_free
        plgpu.Barrier(num_arrivals=N_CONSUMERS),  # sched_bar (pingpong)
    ]
    kernel = functools.partial(
        _tile_kernel, scale=D_orig**-0.5, block_size=block_size, heads=G_pad, nt=nt, q_slots=q_slots,
        kv_slots=kv_slots, swizzled=swizzled, regs_a=regs_a, pingpong=pingpong, kv_groups=kv_groups,
    )
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((BH, n_tiles * ROWS, D), qg.dtype),
            jax.ShapeDtypeStruct((BH, n_tiles * ROWS), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(n_tiles // nt, BH),
        grid_names=("t", "bh"),
        num_threads=N_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=approx_math),
        interpret=interpret or None,
        kernel_name=f"msa_mgpu_fwd_g{G_pad}_bs{block_size}_nt{nt}",
    )
    return call(tiles, tok, rpos, qg, kg, vg)


# ------------------------------------------------------------------------------------- wrapper


def _chunk_fwd(posc, ix: kvo.ChunkIndex, qg, tok, kg, vg, *, sz: kvo.Sizes, plan: kvo.Plan, config: MGPUConfig,
               interpret):
    """One query chunk: positions posc [B, Tc], ix its reverse index, qg / tok the tile kernel's q and the
    token of each position in it (`tile_partials`) -> out [B, Tc, H_q, D], lse [B, Tc, H_q]."""
    B, Tc = posc.shape
    G, G_pad = sz.G, sz.G_pad
    rpos = row_positions(ix.tok, posc, H_kv=sz.H_kv, G_pad=G_pad)
    o_part, lse_part = tile_partials(
        ix.tiles, tok, rpos, qg, kg, vg, block_size=sz.block_size, G_pad=G_pad, D_orig=sz.D,
        nt=plan.tiles_per_program, q_slots=config.q_slots, kv_slots=config.kv_slots,
        approx_math=config.approx_math, regs_a=config.regs_a, pingpong=config.pingpong, interpret=interpret,
    )
    out, lse = kvo.combine_outputs(o_part, lse_part, ix.inv, G_pad=G_pad, out_dtype=qg.dtype,
                                   interpret=plan.interpret)
    out = kvo.ungroup(out[:, :, :G, :sz.D], B).reshape(B, Tc, sz.H_q, sz.D)
    lse = kvo.ungroup(lse[..., :G], B).reshape(B, Tc, sz.H_q)
    return out, lse


def native_q(sz: kvo.Sizes) -> bool:
    """Whether the tile kernel gathers q slabs from q's own [B, T, H_q, D] layout (a token's G heads of a group
    are one contiguous [G, D] slab when G and D need no padding), saving the copy of q into rows."""
    return sz.G == sz.G_pad and sz.D == sz.D_pad


@functools.partial(jax.jit, static_argnames=("block_size", "plan", "config", "interpret"))
def _fwd(q, k, v, block_idx, pos, *, block_size: int, plan: kvo.Plan, config: MGPUConfig, interpret):
    sz = kvo.sizes(q, k, block_idx, block_size)
    T_pad = plan.n_chunks * plan.t_chunk
    kg, vg = (kvo.kv_layout(x, sz.T_kv_pad, sz.D_pad) for x in (k, v))
    ids = kvo.clean_ids(block_idx, block_size, pos)
    index = kvo.chunk_index(kvo.pad_time(ids, T_pad, -1), sz=sz, plan=plan)
    starts = jnp.arange(plan.n_chunks, dtype=jnp.int32) * plan.t_chunk
    chunk = functools.partial(_chunk_fwd, kg=kg, vg=vg, sz=sz, plan=plan, config=config, interpret=interpret)
    pos_pad = kvo.pad_time(pos, T_pad, -1)
    if config.q_in_place and native_q(sz):
        def native(posc, ix_start):
            ix, start = ix_start
            return chunk(posc, ix, q, jnp.where(ix.tok >= 0, ix.tok + start, -1))

        out, lse = kvo.map_chunks(native, (pos_pad,), plan.n_chunks, plan.t_chunk, (index, starts))
    else:
        def rows(posc, qc, ix_start):
            ix, _ = ix_start
            return chunk(posc, ix, kvo.rows(qc, sz.H_kv, sz.G_pad, sz.D_pad), ix.tok)

        out, lse = kvo.map_chunks(rows, (pos_pad, kvo.pad_time(q, T_pad)), plan.n_chunks, plan.t_chunk,
                                  (index, starts))
    return out[:, : sz.T], lse[:, : sz.T]


def check_supported(sz: kvo.Sizes, dtype) -> None:
    """The Mosaic GPU kernel's limits (ValueError otherwise)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"the Mosaic GPU forward takes bfloat16 inputs (float32 stays on Triton), got {dtype}")
    if sz.G_pad > WG_ROWS:
        raise ValueError(f"G_pad = {sz.G_pad} > {WG_ROWS}: a token's heads must fit one consumer's rows")
    if sz.block_size % 64 or sz.block_size > 256:
        raise ValueError(f"block_size must be 64, 128, 192 or 256 (wgmma N and K tiles), got {sz.block_size}")
    if sz.D_pad % 64 or sz.D_pad > 256:
        raise ValueError(f"D padded to {sz.D_pad}: the Mosaic GPU forward takes D of 64, 128 or 256 (wgmma tiles)")


def supported(sz: kvo.Sizes, dtype) -> bool:
    """Whether `check_supported` passes."""
    try:
        check_supported(sz, dtype)
    except ValueError:
        return False
    return True


def on_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100 / H200), the only target of this kernel."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def plan_for(sz: kvo.Sizes, config: MGPUConfig, interpret) -> kvo.Plan:
    """The kv_outer plan of the Mosaic GPU forward: BQ = 128 // G_pad (M = 128 rows always), the config's tiles
    per program and query chunk; the combine runs in the Pallas interpreter when interpret is set."""
    kconf = kvo.KVOuterConfig(block_q=ROWS // sz.G_pad, query_chunk=config.query_chunk,
                              tiles_per_program=config.tiles_per_program)
    return kconf.resolve("fwd", sz, f32=False, interpret=bool(interpret))


def sparse_attention_fwd_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_pos: jax.Array | None = None,
    config: MGPUConfig | None = None,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, H_q, D] bf16, lse float32 [B, T, H_q]) as `sparse_attention.sparse_attention_fwd`,
    with the tile kernel on Mosaic GPU (no gradient rule). interpret: None = the Mosaic GPU
    interpreter (and the Pallas interpreter for the combine) unless jax.default_backend() == "gpu";
    True; False; or a `plgpu.InterpretGPUParams`."""
    sz = kvo.check_attention(q, k, v, block_idx, block_size, q_pos, (jnp.bfloat16,))
    check_supported(sz, q.dtype)
    config = config or MGPUConfig()
    if interpret is None or isinstance(interpret, bool):
        interpret = interpret_mode(interpret)
    plan = plan_for(sz, config, interpret)
    pos = kvo.positions(q_pos, sz.B, sz.T)
    return _fwd(q, k, v, block_idx, pos, block_size=block_size, plan=plan, config=config, interpret=interpret)
