"""MSA index branch, KL alignment loss over the FULL causal support (the dense warmup, docs/algorithm.md
§6.3): query-outer, flash-attention-style Triton-Pallas kernels, O(T) memory, no selection and no
reverse index.

    value = index_kl_full_sum(q, k, iq, ik, weights, *, lse=None, q_pos=None)  # float32 [B, H_kv]

q [B, T, H_q, D], k [B, L, H_kv, D] (the teacher, one dtype); iq [B, T, H_kv, D_idx], ik [B, L, D_idx]
(the student, one dtype, ik shared by the groups); bfloat16 or float32. weights float [B, T]. Per
(b, query token i, group r), with U the keys j <= pos[i] (all of them: no selection), G = H_q // H_kv:

    Pbar_j = (1/G) sum_{h in r} exp(q[i,h].k[j,r] / sqrt(D) - lse[i,h]),  z_j = iq[i,r].ik[j] / sqrt(D_idx)
    kl[b, i, r] = sum_U Pbar log Pbar - sum_U Pbar z + logsumexp_U(z) * S,   S = sum_U Pbar
    value[b, r] = sum_i weights[b, i] kl[b, i, r]

as `pallas.index_kl.index_kl_sum` with the selection "every visible block" (same contract: only iq
and ik get gradients, d kl / d z_j = softmax_U(z)_j - Pbar_j with the teacher's mass S taken as 1,
exact when lse is the teacher's normaliser over U; a query with an empty support, i.e. a padding
query pos < 0, has kl 0 and no gradient). lse float32 [B, T, H_q]: the teacher's per-head LSE over U
(the dense main branch's); None: computed here (pass A). q_pos int32 [B, T]: the queries' positions
against L >= 1 keys (a context-parallel slice; -1 = padding query); None: 0..T-1 with L = T.

Layout (as `pallas.kv_outer`): per row bh = b * H_kv + r of the grids, the queries are token-major
rows, G_pad = next_pow2(G) head rows per token (padded heads: lse = +inf, so P = 0). A query tile is
BQ tokens = M = BQ * G_pad teacher rows (<= 128; 64 for float32) and R = max(BQ, 16) student rows
(one per token; Triton dots need 16 rows, rows >= BQ are ignored); a key tile is BK keys (64).
Per token, Pbar is the sum of its head rows by a 0/1 matmul (`kv_outer.head_sum`; skipped for G = 1).

Passes (all Triton-Pallas). Cost per visited (query token, key) pair (the causal triangle, T^2 / 2
pairs per row bh for prefill, plus the diagonal tiles' waste): FLOPs (a multiply-add = 2) and
transcendentals (exp / log per element):
  A  query-outer, grid (query tiles, B * H_kv), a loop over the key tiles up to the tile's largest
     position: online max / sum of the student's z per token -> its lse; with lse=None also the
     teacher's per head row (base 2) -> lse.  FLOPs: 2 Di R/BQ (z) [+ 2 G_pad D (q k^T), lse=None];
     exps: R/BQ [+ G_pad].
  B  query-outer, same grid and loop, lse and the student's lse known: Pbar, the value terms
     (A = sum Pbar log Pbar, Bz = sum Pbar z, S) -> kl per token; under differentiation also
     d iq_i = w_i sum_j (softmax(z) - Pbar)_ij ik_j / sqrt(Di).
     FLOPs: 2 G_pad D (q k^T) + 4 R G_pad (bfloat16 head sum: hi + lo terms; float32: 2 R G_pad;
     G = 1: none) + 2 Di R/BQ (z) [+ 2 Di R/BQ (d iq)]; exps: G_pad + R/BQ (log) [+ R/BQ].
  C  key-outer, only under differentiation, grid (key tiles, B * H_kv), a loop over the query tiles
     that can see the key tile (a range from the running max of the tiles' positions: exact for
     sorted positions, unsorted ones only visit more tiles, masked): P, Pbar, z and dz recomputed,
     d ik_j (per group) = sum_i w_i (softmax(z) - Pbar)_ij iq_i / sqrt(Di), accumulated in float32
     in registers, written once: deterministic, no atomics. The sum over the groups (ik is shared)
     happens in the backward, scaled by the cotangent per group.
     FLOPs: 2 G_pad D + 4 R G_pad (head sum, as B) + 2 Di R/BQ (z) + 2 Di R/BQ (d ik); exps:
     G_pad + R/BQ.
So a value costs A + B (teacher q k^T once or twice), value and gradients A + B + C (2 or 3 q k^T
products per pair: 6 G_pad D with lse=None, against the 14 G D of a dense attention forward and
backward). The tiles whose keys every row of the query tile sees run without masks. Masked logits
are MASK_VALUE (never NaN); empty rows give lse -inf (student, then 0) / +inf (teacher: P = 0).

Under differentiation (`jax.custom_vjp`) the forward computes the value and the gradients (A, B with
d iq, C), its residuals are the gradients (d iq float32 [B, T, H_kv, Di], d ik per group float32
[B, H_kv, L, Di]), scaled by the cotangent [B, H_kv] in the backward; without, only A and B.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import check_floating, check_index, check_pow2, check_q_pos, check_qkv, check_shape, fail
from pallas import kv_outer as kvo
from pallas.common import INT32_LIMIT, KERNEL_DTYPES, LN2, LOG2E, MASK_VALUE, MIN_DOT, cdiv, interpret_mode, \
    next_pow2, pad_dim

__all__ = ["index_kl_full_sum", "BLOCK_K", "TARGET_ROWS", "F32_ROWS"]

TARGET_ROWS = 128  # teacher rows per query tile (BQ * G_pad), 16-bit teacher inputs
F32_ROWS = 64  # the same for float32 inputs (shared memory at D = 128)
BLOCK_K = 64  # keys per key tile


class Plan(NamedTuple):
    """The static settings of one call."""

    interpret: bool
    block_q: int  # BQ: query tokens per query tile
    block_k: int  # BK: keys per key tile
    n_q: int  # query tiles per row
    n_k: int  # key tiles per row
    num_warps: int
    num_stages: int

    @property
    def rows(self) -> int:  # R: student rows of a query tile
        return max(self.block_q, MIN_DOT)


def _plan(q, k, iq, block_q, block_k, interpret) -> Plan:
    B, T, H_q, D = q.shape
    L, H_kv = k.shape[1], k.shape[2]
    G_pad = next_pow2(H_q // H_kv)
    interp = interpret_mode(interpret)
    f32 = jnp.float32 in (q.dtype, iq.dtype)
    if block_q is None:
        block_q = kvo.default_block_q(T, G_pad, F32_ROWS if f32 else TARGET_ROWS)
    else:
        check_pow2("block_q", block_q)
    if block_k is None:
        block_k = min(BLOCK_K, max(MIN_DOT, next_pow2(L)))
    else:
        check_pow2("block_k", block_k, MIN_DOT)
    M = block_q * G_pad
    n_q, n_k = cdiv(T, block_q), cdiv(L, block_k)
    if not interp:
        if M < MIN_DOT:
            raise ValueError(f"block_q * G_pad = {block_q} * {G_pad} < {MIN_DOT}: Triton dots need >= 16 rows")
        width = max(pad_dim(D), pad_dim(iq.shape[3]))  # q rows, k, d ik per group, d iq rows
        biggest = max(B * H_kv * n_q * block_q * G_pad * width, B * H_kv * n_k * block_k * width)
        if biggest >= INT32_LIMIT:
            raise ValueError(f"{biggest} elements in one operand, but the Triton kernels index with int32 "
                             "offsets (< 2**31): split the batch")
    return Plan(interpret=interp, block_q=block_q, block_k=block_k, n_q=n_q, n_k=n_k,
                num_warps=8 if M >= 128 else 4, num_stages=2)


# --------------------------------------------------------------------------------------- kernels


def _dot(a, b, *, trans_a=False, trans_b=False):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _pbar(p, heads: int, groups: int, rows: int, f32_sums: bool):
    """[M, BK] teacher P (head rows) -> [R, BK] Pbar per token (rows >= BQ: 0)."""
    if heads == 1 and p.shape[0] == rows:
        return p  # one head per token: the rows are the tokens
    return kvo.head_sum(p, heads, rows, f32_sums) * (1.0 / groups)


def _tile_rows(pos_ref, t, bq: int, R: int, heads: int):
    """Positions of a query tile's teacher rows [M] and student rows [R] (rows >= BQ: -1)."""
    m_iota = lax.broadcasted_iota(jnp.int32, (bq * heads,), 0)
    row_pos = pos_ref[t * bq + m_iota // heads]  # [M]: gather of the rows' tokens' positions
    r_iota = lax.broadcasted_iota(jnp.int32, (R,), 0)
    r_pos = jnp.where(r_iota < bq, pos_ref[pl.ds(t * bq, R)], -1)  # [R]
    return row_pos, r_pos


def _lse_kernel(hi_ref, full_ref, pos_ref, iq_ref, ik_ref, *refs, scale: float, scale_idx: float, heads: int,
                groups: int, bq: int, bk: int, n_q: int, teacher: bool):
    """Pass A: the student's lse per token (R rows), and with `teacher` the teacher's per head row."""
    if teacher:
        q_ref, k_ref, zlse_ref, lse_ref = refs
    else:
        (zlse_ref,) = refs
    R = zlse_ref.shape[0]
    t = n_q - 1 - pl.program_id(0)  # the longest tiles first
    n_hi, n_full = hi_ref[t], full_ref[t]
    row_pos, r_pos = _tile_rows(pos_ref, t, bq, R, heads)
    iq = iq_ref[pl.ds(t * bq, R), :]
    if teacher:
        q = q_ref[...]
        M = q.shape[0]

    def body(j, carry, masked: bool):
        start = pl.multiple_of(j * bk, bk)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        def online(x, pos, m, l, exp):
            """One key tile of a running (max, sum of exp) per row; masked keys (after pos) count 0."""
            if masked:
                mask = key_pos[None, :] <= pos[:, None]
                x = jnp.where(mask, x, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(x, axis=1))
            e = exp(x - m_new[:, None])
            if masked:
                e = jnp.where(mask, e, 0.0)
            return m_new, l * exp(m - m_new) + jnp.sum(e, axis=1)

        z = _dot(iq, ik_ref[pl.ds(start, bk), :], trans_b=True) * scale_idx  # [R, BK]
        out = online(z, r_pos, *carry[:2], jnp.exp)
        if teacher:
            s = _dot(q, k_ref[pl.ds(start, bk), :], trans_b=True) * (scale * LOG2E)  # [M, BK], base 2
            out += online(s, row_pos, *carry[2:], jnp.exp2)
        return out

    init = (jnp.full((R,), MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32))
    if teacher:
        init += (jnp.full((M,), MASK_VALUE, jnp.float32), jnp.zeros((M,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init)
    carry = lax.fori_loop(n_full, n_hi, functools.partial(body, masked=True), carry)
    zm, zl = carry[:2]
    ok = zl > 0.0
    zlse_ref[...] = jnp.where(ok, zm + jnp.log(jnp.where(ok, zl, 1.0)), -jnp.inf)
    if teacher:
        m, l = carry[2:]
        head = lax.broadcasted_iota(jnp.int32, (M,), 0) % heads
        ok = (l > 0.0) & (head < groups)  # padded heads, empty rows: +inf, so P = 0
        lse_ref[...] = jnp.where(ok, (m + jnp.log2(jnp.where(ok, l, 1.0))) * LN2, jnp.inf)


def _value_kernel(hi_ref, full_ref, pos_ref, q_ref, lse_ref, iq_ref, zlse_ref, w_ref, k_ref, ik_ref, kl_ref,
                  *diq_ref, scale: float, scale_idx: float, heads: int, groups: int, bq: int, bk: int, n_q: int,
                  f32_sums: bool):
    """Pass B: kl per token (R rows); with a d iq output also d iq (R rows)."""
    grad = bool(diq_ref)
    R = kl_ref.shape[0]
    t = n_q - 1 - pl.program_id(0)
    n_hi, n_full = hi_ref[t], full_ref[t]
    row_pos, r_pos = _tile_rows(pos_ref, t, bq, R, heads)
    q = q_ref[...]  # [M, D_pad]
    lse2 = lse_ref[...] * LOG2E  # [M]
    toks = pl.ds(t * bq, R)
    iq = iq_ref[toks, :]  # [R, Di_pad]
    zlse = zlse_ref[toks]  # [R]: 0 for an empty support
    w = w_ref[toks] if grad else None

    def body(j, carry, masked: bool):
        start = pl.multiple_of(j * bk, bk)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        ik = ik_ref[pl.ds(start, bk), :]
        s = _dot(q, k_ref[pl.ds(start, bk), :], trans_b=True) * (scale * LOG2E)
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            p = jnp.where(key_pos[None, :] <= row_pos[:, None], p, 0.0)
        pbar = _pbar(p, heads, groups, R, f32_sums)  # [R, BK]
        z = _dot(iq, ik, trans_b=True) * scale_idx  # [R, BK]
        a, bz, sm = carry[:3]
        pos = pbar > 0.0
        a = a + jnp.sum(jnp.where(pos, pbar * jnp.log(jnp.where(pos, pbar, 1.0)), 0.0), axis=1)
        bz = bz + jnp.sum(pbar * z, axis=1)  # z is finite; Pbar = 0 off the support
        sm = sm + jnp.sum(pbar, axis=1)
        if not grad:
            return a, bz, sm
        dz = w[:, None] * (jnp.exp(z - zlse[:, None]) - pbar)
        if masked:
            dz = jnp.where(key_pos[None, :] <= r_pos[:, None], dz, 0.0)
        return a, bz, sm, carry[3] + _dot(dz.astype(ik.dtype), ik)

    zeros = jnp.zeros((R,), jnp.float32)
    init = (zeros, zeros, zeros)
    if grad:
        init += (jnp.zeros((R, iq.shape[1]), jnp.float32),)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init)
    carry = lax.fori_loop(n_full, n_hi, functools.partial(body, masked=True), carry)
    a, bz, sm = carry[:3]
    kl_ref[...] = a - bz + zlse * sm
    if grad:
        diq_ref[0][...] = carry[3] * scale_idx


def _dik_kernel(lo_ref, mid_ref, hi_ref, pos_ref, q_ref, lse_ref, iq_ref, zlse_ref, w_ref, k_ref, ik_ref, dik_ref,
                *, scale: float, scale_idx: float, heads: int, groups: int, bq: int, f32_sums: bool):
    """Pass C: d ik of one key tile and group, over the query tiles that see it: tiles [lo, mid)
    masked, [mid, hi) (every row sees every key of the tile) without masks."""
    kt = pl.program_id(0)
    bk = k_ref.shape[0]
    R = max(bq, MIN_DOT)
    M = bq * heads
    key_pos = kt * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k = k_ref[...]
    ik = ik_ref[...]
    r_iota = lax.broadcasted_iota(jnp.int32, (R,), 0)

    def body(t, acc, masked: bool):
        rows = pl.ds(pl.multiple_of(t * M, M), M)
        s = _dot(q_ref[rows, :], k, trans_b=True) * (scale * LOG2E)
        p = jnp.exp2(s - (lse_ref[rows] * LOG2E)[:, None])
        if masked:
            row_pos, r_pos = _tile_rows(pos_ref, t, bq, R, heads)
            p = jnp.where(key_pos[None, :] <= row_pos[:, None], p, 0.0)
        pbar = _pbar(p, heads, groups, R, f32_sums)
        toks = pl.ds(t * bq, R)
        iq = iq_ref[toks, :]
        z = _dot(iq, ik, trans_b=True) * scale_idx
        dz = w_ref[toks][:, None] * (jnp.exp(z - zlse_ref[toks][:, None]) - pbar)
        if masked:
            dz = jnp.where(key_pos[None, :] <= r_pos[:, None], dz, 0.0)
        elif R > bq:  # rows >= BQ: the next tile's tokens
            dz = jnp.where((r_iota < bq)[:, None], dz, 0.0)
        return acc + _dot(dz.astype(iq.dtype), iq, trans_a=True)

    acc = jnp.zeros(dik_ref.shape, jnp.float32)
    acc = lax.fori_loop(lo_ref[kt], mid_ref[kt], functools.partial(body, masked=True), acc)
    acc = lax.fori_loop(mid_ref[kt], hi_ref[kt], functools.partial(body, masked=False), acc)
    dik_ref[...] = acc * scale_idx


# -------------------------------------------------------------------------------------- wrapper


def _per_token(x, plan: Plan, T_ext: int):
    """A per-tile output [BH, n_q * R] -> per token [BH, T_ext] (rows >= BQ of each tile dropped, 0
    padding past the tiles)."""
    BH = x.shape[0]
    bq, R = plan.block_q, plan.rows
    x = x.reshape(BH, plan.n_q, R, *x.shape[2:])[:, :, :bq].reshape(BH, plan.n_q * bq, *x.shape[2:])
    return kvo.pad_time(x, T_ext)


@functools.partial(jax.jit, static_argnames=("plan", "grad"))
def _run(q, k, iq, ik, lse, pos, w, *, plan: Plan, grad: bool):
    """-> value float32 [B, H_kv] (+ d iq float32 [B, T, H_kv, Di], d ik float32 [B, H_kv, L, Di] of
    it when grad). lse None: pass A computes it."""
    B, T, H_q, D = q.shape
    L, H_kv = k.shape[1], k.shape[2]
    Di = iq.shape[3]
    G = H_q // H_kv
    G_pad, D_pad, Di_pad = next_pow2(G), pad_dim(D), pad_dim(Di)
    BH = B * H_kv
    bq, bk, R, n_q, n_k = plan.block_q, plan.block_k, plan.rows, plan.n_q, plan.n_k
    M = bq * G_pad
    T_pad, L_pad = n_q * bq, n_k * bk
    T_ext = T_pad + R - bq  # the last tile's R student rows stay in bounds

    pos = jnp.where(pos >= 0, jnp.minimum(pos, L - 1), -1).astype(jnp.int32)  # keys j <= pos, j < L
    pos_ext = kvo.pad_time(pos, T_ext, -1)  # [B, T_ext]
    real = pos_ext >= 0
    w_ext = jnp.where(real, kvo.pad_time(w.astype(jnp.float32), T_ext), 0.0)  # padding queries: no gradient
    tile_pos = pos_ext[:, :T_pad].reshape(B, n_q, bq)
    t_max, t_min = tile_pos.max(-1), tile_pos.min(-1)
    n_hi = jnp.where(t_max >= 0, t_max // bk + 1, 0).astype(jnp.int32)  # key tiles a query tile visits
    n_full = jnp.minimum((t_min + 1) // bk, n_hi).astype(jnp.int32)  # ... of which every row sees all keys

    qg = kvo.rows(kvo.pad_time(q, T_pad), H_kv, G_pad, D_pad)  # [BH, T_pad * G_pad, D_pad]
    iqg = kvo.rows(kvo.pad_time(iq, T_ext), H_kv, width=Di_pad)  # [BH, T_ext, Di_pad]
    kg = kvo.kv_layout(k, L_pad, D_pad)  # [BH, L_pad, D_pad]
    ikg = kvo.kv_layout(ik, L_pad, Di_pad)  # [B, L_pad, Di_pad]
    f32_sums = q.dtype == jnp.float32
    consts = dict(scale=D**-0.5, scale_idx=Di**-0.5, heads=G_pad, groups=G)
    params = plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)

    rev = lambda *block: lambda i, bh: (bh, n_q - 1 - i) + (0,) * len(block)  # noqa: E731
    per_b = lambda n: pl.BlockSpec((None, n), lambda i, bh: (bh // H_kv, 0))  # noqa: E731
    row_bh = lambda *shape: pl.BlockSpec((None, *shape), lambda i, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    ik_spec = pl.BlockSpec((None, L_pad, Di_pad), lambda i, bh: (bh // H_kv, 0, 0))
    q_tile = pl.BlockSpec((None, M, D_pad), rev(0))
    lse_tile = pl.BlockSpec((None, M), lambda i, bh: (bh, n_q - 1 - i))
    part = pl.BlockSpec((None, R), lambda i, bh: (bh, n_q - 1 - i))
    tiles_in = [per_b(n_q), per_b(n_q), per_b(T_ext)]  # n_hi, n_full, positions

    # pass A: the student's lse (and the teacher's)
    teacher = lse is None
    in_specs = tiles_in + [row_bh(T_ext, Di_pad), ik_spec]
    args = [n_hi, n_full, pos_ext, iqg, ikg]
    out_specs = [part]
    out_shape = [jax.ShapeDtypeStruct((BH, n_q * R), jnp.float32)]
    if teacher:
        in_specs += [q_tile, row_bh(L_pad, D_pad)]
        args += [qg, kg]
        out_specs.append(lse_tile)
        out_shape.append(jax.ShapeDtypeStruct((BH, T_pad * G_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_lse_kernel, **consts, bq=bq, bk=bk, n_q=n_q, teacher=teacher),
        grid=(n_q, BH), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, compiler_params=params,
        interpret=plan.interpret, name=f"msa_index_kl_full_lse{'_teacher' if teacher else ''}_bq{bq}_g{G_pad}",
    )(*args)
    zlse = _per_token(outs[0], plan, T_ext)
    zlse = jnp.where(jnp.isfinite(zlse), zlse, 0.0)  # empty support: no term reads it
    if teacher:
        lseg = outs[1]
    else:
        lse = jnp.where((pos >= 0)[..., None], lse.astype(jnp.float32), jnp.inf)  # padding queries: P = 0
        lseg = kvo.rows(kvo.pad_time(lse, T_pad, jnp.inf), H_kv, G_pad, fill=jnp.inf)  # [BH, T_pad * G_pad]

    # pass B: kl per token (and d iq)
    outs = pl.pallas_call(
        functools.partial(_value_kernel, **consts, bq=bq, bk=bk, n_q=n_q, f32_sums=f32_sums),
        grid=(n_q, BH),
        in_specs=tiles_in + [q_tile, lse_tile, row_bh(T_ext, Di_pad), row_bh(T_ext), per_b(T_ext),
                             row_bh(L_pad, D_pad), ik_spec],
        out_specs=[part] + ([pl.BlockSpec((None, R, Di_pad), rev(0))] if grad else []),
        out_shape=[jax.ShapeDtypeStruct((BH, n_q * R), jnp.float32)]
        + ([jax.ShapeDtypeStruct((BH, n_q * R, Di_pad), jnp.float32)] if grad else []),
        compiler_params=params, interpret=plan.interpret,
        name=f"msa_index_kl_full_{'grad_iq' if grad else 'value'}_bq{bq}_g{G_pad}",
    )(n_hi, n_full, pos_ext, qg, lseg, iqg, zlse, w_ext, kg, ikg)
    kl = kvo.ungroup(_per_token(outs[0], plan, T_ext)[:, :T], B)  # [B, T, H_kv]
    value = jnp.einsum("btr,bt->br", kl, w_ext[:, :T], precision=lax.Precision.HIGHEST)
    if not grad:
        return value
    diq = kvo.ungroup(_per_token(outs[1], plan, T_ext)[:, :T, :Di], B)  # [B, T, H_kv, Di]

    # pass C: d ik per group, key-outer. The query tiles that can see key tile c: from the first whose
    # running max position reaches it to the last whose suffix max does (exact for sorted positions;
    # others only visit more tiles, masked); from the first whose suffix min passes its last key on,
    # every row sees all its keys (no masks).
    starts = jnp.arange(n_k, dtype=jnp.int32) * bk
    search = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="left"), in_axes=(0, None))
    t_lo = search(lax.cummax(t_max, axis=1), starts)
    t_hi = jnp.maximum(n_q - search(lax.cummax(t_max, axis=1, reverse=True)[:, ::-1], starts), t_lo)
    t_mid = jnp.clip(search(lax.cummin(t_min, axis=1, reverse=True), starts + bk - 1), t_lo, t_hi)
    t_lo, t_mid, t_hi = (x.astype(jnp.int32) for x in (t_lo, t_mid, t_hi))
    key_b = lambda n: pl.BlockSpec((None, n), lambda c, bh: (bh // H_kv, 0))  # noqa: E731
    full = lambda *shape: pl.BlockSpec((None, *shape), lambda c, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    dik = pl.pallas_call(
        functools.partial(_dik_kernel, **consts, bq=bq, f32_sums=f32_sums),
        grid=(n_k, BH),
        in_specs=[key_b(n_k), key_b(n_k), key_b(n_k), key_b(T_ext), full(T_pad * G_pad, D_pad), full(T_pad * G_pad),
                  full(T_ext, Di_pad), full(T_ext), key_b(T_ext),
                  pl.BlockSpec((None, bk, D_pad), lambda c, bh: (bh, c, 0)),
                  pl.BlockSpec((None, bk, Di_pad), lambda c, bh: (bh // H_kv, c, 0))],
        out_specs=pl.BlockSpec((None, bk, Di_pad), lambda c, bh: (bh, c, 0)),
        out_shape=jax.ShapeDtypeStruct((BH, L_pad, Di_pad), jnp.float32),
        compiler_params=params, interpret=plan.interpret, name=f"msa_index_kl_full_grad_ik_bq{bq}_g{G_pad}",
    )(t_lo, t_mid, t_hi, pos_ext, qg, lseg, iqg, zlse, w_ext, kg, ikg)
    dik = dik.reshape(B, H_kv, L_pad, Di_pad)[:, :, :L, :Di]
    return value, diq, dik


# ----------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _kl_full_sum(q, k, iq, ik, lse, pos, w, plan):
    return _run(q, k, iq, ik, lse, pos, w, plan=plan, grad=False)


def _vjp_fwd(q, k, iq, ik, lse, pos, w, plan):
    value, diq, dik = _run(q, k, iq, ik, lse, pos, w, plan=plan, grad=True)
    return value, (diq, dik, jnp.zeros((0,), iq.dtype), jnp.zeros((0,), ik.dtype))


def _vjp_bwd(plan, saved, c):
    diq, dik, iq_dtype, ik_dtype = saved
    c = c.astype(jnp.float32)  # [B, H_kv]: one cotangent per (batch row, group)
    d_iq = (diq * c[:, None, :, None]).astype(iq_dtype.dtype)
    dik = dik * c[:, :, None, None]
    d_ik = dik[:, 0]
    for r in range(1, dik.shape[1]):  # ik is shared by the groups: their sum, in group order
        d_ik = d_ik + dik[:, r]
    return None, None, d_iq, d_ik.astype(ik_dtype.dtype), None, None, None  # the teacher is detached


_kl_full_sum.defvjp(_vjp_fwd, _vjp_bwd)


def index_kl_full_sum(
    q: jax.Array,
    k: jax.Array,
    iq: jax.Array,
    ik: jax.Array,
    weights: jax.Array,
    *,
    lse: jax.Array | None = None,
    q_pos: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """float32 [B, H_kv]: sum_i weights[b, i] * kl[b, i, r] over the full causal support (module
    docstring), differentiable in iq and ik (q, k, lse, weights, q_pos get no gradient).

    lse: float32 [B, T, H_q], the teacher's LSE over the full causal support (the dense main
    branch's); None: computed here (one more teacher product per pair). q_pos: int32 [B, T] query
    positions against L keys (-1: padding query, kl 0); None: 0..T-1 with L = T.
    block_q: query tokens per tile (a power of two; default 128 // G_pad, 64 // G_pad for float32,
    shrunk for short T, never below 16 // G_pad); block_k: keys per tile (a power of two >= 16,
    default 64, shrunk for short L). interpret: None = the Pallas interpreter unless
    jax.default_backend() == "gpu".
    """
    cached = q_pos is not None
    check_qkv(q, k, dtypes=KERNEL_DTYPES, cached=cached)
    check_index(iq, ik, k, dtypes=KERNEL_DTYPES, cached=cached)
    B, T = q.shape[:2]
    if cached:
        check_q_pos(q_pos, B, T)
    elif k.shape[1] != T:
        fail("k", f"T={T} keys without q_pos", k.shape)
    if lse is not None:
        check_shape("lse", lse, q.shape[:3], "[B, T, H_q]")
        check_floating("lse", lse)
        lse = lax.stop_gradient(lse.astype(jnp.float32))
    check_shape("weights", weights, (B, T), f"[B={B}, T={T}]")
    check_floating("weights", weights)
    plan = _plan(q, k, iq, block_q, block_k, interpret)
    q, k, w = (lax.stop_gradient(x) for x in (q, k, weights))
    return _kl_full_sum(q, k, iq, ik, lse, kvo.positions(q_pos, B, T), w.astype(jnp.float32), plan)
