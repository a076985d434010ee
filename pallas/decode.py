"""MSA decoding against a KV + index-key cache: block selection, sparse and dense attention (Pallas).

Contract ("queries at an offset"). Each sequence b of a batch brings S new query tokens at positions
q_pos int32 [B, S] (q_pos = -1: a padding query; its outputs are -1 ids / zeros, lse -inf) against
caches of capacity L: k, v [B, L, H_kv, D], index keys ik [B, L, D_idx]. Cache entries past a
query's position are junk and invisible (key j is visible iff j <= p). A query at position p is
exactly row p of the full-sequence ops of `msa_jax.ops.reference`: `decode_select_blocks` =
`select_blocks` (local block p // block_size and the local_blocks - 1 before it, then sinks, then the
best other visible blocks by max-pooled index score, top_k in all, ties to the lower id; ascending
ids, -1 padding),
`decode_sparse_attention` = `sparse_attention` (+ lse), `decode_dense_attention` = causal attention.

Design. The caches are used in their natural layout (no relayout per step) and read as pages of
block_size tokens: with L % block_size == 0, k viewed as [B * L, H_kv, D] holds block c of sequence b
at rows page * block_size + [0, block_size), page = `_page(b, c)` (identity page table; a real
page table [B, max_blocks] replaces that one function). A block of group r is a [block_size, D]
tile with row stride H_kv * D.
* Index scan (`decode_select_blocks`), grid (row tiles, n_splits, B): one program reads its share
  of the blocks a sequence's queries can rank (blocks below the largest local block of its rows:
  no junk is read) ONCE for all S * H_kv rows (padded to >= 16), in a fori_loop over whole
  [block_size, D_idx] tiles: one dot, a row max, a streaming top-(top_k - local_blocks) over the
  non-local blocks (strictly-greater replacement in ascending id order = ties to the lower id; sinks
  enter with +inf). The per-split candidates (f32 values, int32 ids) are merged by a second kernel,
  one program per (query, group) row: top_k - local_blocks rounds of "the best candidate below the
  previous pick", then the picks sorted, the local blocks appended, -1 padding. No XLA sort: at batch
  1 a decode step is a chain of small launches, and a multi-pass sort of a few thousand candidates
  was a third of the selection's time (H200, 1M tokens).
* Attention: flash-decoding, grid (B * S * H_kv, n_splits); a program holds the G heads of one
  (query, group) (padded to >= 16 rows), walks a balanced share of the row's block list (the ids
  cleaned in the kernel: out-of-range, -1 and repeated ids dropped, the rest visited in ascending
  order by their rank; dense: every visible block) with an online softmax (only the last block may
  need the causal mask), and writes a float32 partial output and LSE; splits are combined by their
  LSEs in plain JAX.
Operands whose flat element offsets would overflow the lowering's int32 offsets are split over
batch chunks (see `_offsets_fit`); larger-than-4-GiB operands get 64-bit offsets and are not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import check_block_idx, check_index, check_int, check_local_blocks, check_q_pos, check_qkv
from pallas.common import KERNEL_DTYPES, LN2, LOG2E, MASK_VALUE, MIN_DOT, is_pow2, local_block_ids, next_pow2

__all__ = [
    "decode_select_blocks",
    "decode_sparse_attention",
    "decode_dense_attention",
    "default_scan_splits",
    "default_attention_splits",
]

_INF = float("inf")
_INT_MAX = 2**31 - 1
_H200_SMS = 132
# Default split rule: B * n_splits (* row tiles) ~ 4 programs per SM, i.e. ~2 waves at the 2
# programs that fit on an SM at the default shared-memory use.
_TARGET_PROGRAMS = 4 * _H200_SMS
_MIN_SCAN_BLOCKS = 8  # index-scan blocks per split, at least (default n_splits)
_MIN_DENSE_BLOCKS = 4  # dense-attention blocks per split, at least (default n_splits)
_MAX_SCAN_ROWS = 64  # rows (query tokens x groups) per index-scan program
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (num_stages default)
# The Pallas Triton lowering computes flat element offsets per operand in int32, or in int64 when
# the operand has more than 2**32 bytes (jax 0.11 `_compute_offsets_from_indices`).
_I64_OFFSETS_ABOVE_BYTES = 2**32
_INT32_ELEMS = 2**31


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _page(b, c, n_blocks: int):
    """Cache page of block c of sequence b (batch-chunk local): the one place that maps blocks to
    memory. Identity page table: sequence b owns pages [b * n_blocks, (b + 1) * n_blocks) of the cache
    viewed as [B * n_blocks, block_size, ...]. A paged cache replaces this by page_table[b, c]."""
    return b * n_blocks + c


def _offsets_fit(n_elements: int, itemsize: int) -> bool:
    """Whether the lowering's flat element offsets of an operand of this size cannot overflow:
    int32 offsets reach n_elements - 1 <= 2**31 - 1, or the operand gets int64 offsets."""
    return n_elements <= _INT32_ELEMS or n_elements * itemsize > _I64_OFFSETS_ABOVE_BYTES


def _batch_chunk(B: int, per_batch: list[tuple[int, int]]) -> int:
    """Sequences per pallas_call: B when every operand (elements per sequence, itemsize) fits,
    else the most sequences whose operands stay below 2**31 elements."""
    if all(_offsets_fit(B * n, s) for n, s in per_batch):
        return B
    biggest = max(n for n, _ in per_batch)
    chunk = (_INT32_ELEMS - 1) // biggest
    if chunk < 1:
        raise ValueError(f"one sequence needs {biggest} elements in one operand: more than the "
                         "int32 offsets of the Triton lowering allow (< 2**31)")
    return chunk


def _in_chunks(B: int, chunk: int, fn):
    """Concatenate fn(sl) over batch chunks, sl(x) = the chunk's sequences of x (a tuple of
    arrays per chunk). One chunk: sl is the identity (no slice of the caches at all)."""
    if chunk >= B:
        return fn(lambda x: x)
    parts = [fn(lambda x, b0=b0: x[b0:b0 + chunk]) for b0 in range(0, B, chunk)]
    return tuple(jnp.concatenate(p, axis=0) for p in zip(*parts))


def _pad_last(x, n: int):
    return x if x.shape[-1] == n else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _dim_pad(d: int) -> int:
    return max(MIN_DOT, next_pow2(d))


def _stages(bytes_per_stage: int) -> int:
    return int(max(1, min(3, _SMEM_BUDGET // max(1, bytes_per_stage))))


def default_scan_splits(batch: int, n_blocks: int, row_tiles: int = 1) -> int:
    """Default n_splits of the index scan: about one per SM of an H200 per sequence, a power of two (the
    merge kernel's tile holds the splits padded to one: 128, not 132, wastes nothing), with >= 8 blocks
    per split. Measured at 1M tokens (H200, batch 1 / 8, with the XLA merge the kernel replaced): 131
    splits 0.127 / 0.565 ms against 0.142 / 0.591 with 66 and 0.200 / 0.643 with 528 (more splits
    cost more in the merge of their candidates than they gain in parallelism)."""
    del batch, row_tiles  # the rule above held at batch 1 and 8 alike
    n = max(1, min(_H200_SMS, _cdiv(n_blocks, _MIN_SCAN_BLOCKS)))
    return 1 << (n.bit_length() - 1)  # the kernel balances the blocks over the splits itself


def default_attention_splits(n_rows: int, max_blocks: int, min_blocks: int = 1) -> int:
    """Default n_splits of the attention kernels: n_rows (= B * S * H_kv) * n_splits ~ 4 * 132
    programs, with >= min_blocks of the at most max_blocks blocks of a row per split."""
    return max(1, min(_cdiv(_TARGET_PROGRAMS, n_rows), _cdiv(max_blocks, min_blocks)))


# ------------------------------------------------------------------------------------- checks


def _check_cache_rows(B, L):
    if B * L >= 2**31:
        raise ValueError(f"B * L = {B} * {L}: the kernels index cache rows with int32 (< 2**31)")


def _check_block_size(block_size, L, interpret):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not is_pow2(block_size):
        raise ValueError(f"block_size: expected a power of two, got {block_size!r}")
    if not interpret and block_size < MIN_DOT:
        raise ValueError(f"block_size: the Triton kernels need a power of two >= {MIN_DOT}, got "
                         f"{block_size}")
    if L % block_size:
        raise ValueError(f"cache length L={L} must be a multiple of block_size={block_size} (the "
                         "cache is read as pages of block_size tokens)")


def _resolve_interpret(interpret):
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def _clean_pos(q_pos, L):
    """Positions as int32: < 0 -> -1 (padding), >= L clamped to L - 1 (never read past the cache)."""
    p = q_pos.astype(jnp.int32)
    return jnp.where(p < 0, -1, jnp.minimum(p, L - 1))


# -------------------------------------------------------------------------------- index scan


def _scan_kernel(pos_ref, iq_ref, ik_ref, *rest, block_size: int, n_blocks: int, n_splits: int,
                 n_slots: int, n_pad_slots: int, sink_blocks: int, local_blocks: int, sm_scale: float,
                 scale_mode: str | None, precision):
    """One program: (row tile, split, sequence b). Ranks blocks [c0, c1) of sequence b for its rows.

    pos_ref [R]: position of each row (-1: padding row); iq_ref [R, D]; ik_ref [B_chunk * L, D]
    (the whole chunk: pages); scale_ref: [B_chunk * L] (per token) or [B_chunk * n_blocks] (per
    block); outputs vals_ref f32 / ids_ref int32 [R, n_pad_slots].
    """
    if scale_mode is None:
        scale_ref = None
        vals_ref, ids_ref = rest
    else:
        scale_ref, vals_ref, ids_ref = rest
    split = pl.program_id(1)
    b = pl.program_id(2)

    pos = pos_ref[...]
    local = jnp.where(pos >= 0, lax.div(jnp.maximum(pos, 0), jnp.int32(block_size)), -1)
    first_local = local - (local_blocks - 1)  # the local blocks [first_local, local] are added later
    # Rows rank blocks c < first_local only (the local blocks are added after the merge): blocks at
    # or past the largest local block are never read, so no key past any row's position is read.
    need = jnp.maximum(jnp.max(local), 0)
    c0 = lax.div(split * need, jnp.int32(n_splits))  # balanced share of [0, need)
    c1 = lax.div((split + 1) * need, jnp.int32(n_splits))

    q = iq_ref[...]
    rows = q.shape[0]
    slot = lax.broadcasted_iota(jnp.int32, (rows, n_pad_slots), 1)
    vals0 = jnp.where(slot < n_slots, -_INF, _INF).astype(jnp.float32)  # pad slots: never evicted
    ids0 = -1 - slot  # distinct negative ids: empty slots

    def body(c, carry):
        vals, ids = carry
        page = _page(b, c, n_blocks)
        start = pl.multiple_of(page * block_size, block_size)
        k = ik_ref[pl.ds(start, block_size), :]
        if k.dtype != q.dtype:
            k = k.astype(q.dtype)  # float8 keys: dequantised below by their scale
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [R, block_size] f32
        if scale_mode == "token":
            s = s * scale_ref[pl.ds(start, block_size)][None, :]
        v = jnp.max(s, axis=1)
        if scale_mode == "block":  # max(s * c) = c * max(s) for c >= 0
            v = v * scale_ref[page]
        v = v * sm_scale  # after the max: rounding is monotone, same as max(s * sm_scale)
        ranked = (c < first_local) & (jnp.abs(v) < _INF)  # finite scores of visible non-local blocks
        if sink_blocks > 0:
            v = jnp.where((c < sink_blocks) & (c < first_local), _INF, v)
            ranked = ranked | ((c < sink_blocks) & (c < first_local))
        v = jnp.where(ranked, v, -_INF)  # -inf never enters (strict >)
        # Replace the worst slot (minimum value; among equal minima the highest id) iff strictly
        # better: blocks arrive in ascending id order, so equal scores keep the lower id.
        worst = jnp.min(vals, axis=1)
        worst_id = jnp.max(jnp.where(vals == worst[:, None], ids, -_INT_MAX - 1), axis=1)
        rep = (ids == worst_id[:, None]) & (v > worst)[:, None]
        return jnp.where(rep, v[:, None], vals), jnp.where(rep, c, ids)

    vals, ids = lax.fori_loop(c0, jnp.maximum(c0, c1), body, (vals0, ids0))
    vals_ref[...] = vals
    ids_ref[...] = ids


def _scan_call(iq_rows, pos_rows, ik2, scale, *, d_real, block_size, n_blocks, n_splits, n_slots,
               n_pad_slots, sink_blocks, local_blocks, scale_mode, block_r, interpret, num_warps, num_stages):
    """iq_rows [Bc, R_pad, D]; pos_rows [Bc, R_pad]; ik2 [Bc * L, D]; scale 1-d or None."""
    Bc, R_pad, D = iq_rows.shape
    n_row_tiles = R_pad // block_r
    precision = lax.Precision.HIGHEST if iq_rows.dtype == jnp.float32 else None
    kernel = functools.partial(
        _scan_kernel, block_size=block_size, n_blocks=n_blocks, n_splits=n_splits,
        n_slots=n_slots, n_pad_slots=n_pad_slots, sink_blocks=sink_blocks, local_blocks=local_blocks,
        sm_scale=d_real ** -0.5, scale_mode=scale_mode, precision=precision)
    in_specs = [
        pl.BlockSpec((None, block_r), lambda t, p, b: (b, t)),
        pl.BlockSpec((None, block_r, D), lambda t, p, b: (b, t, 0)),
        pl.BlockSpec(ik2.shape, lambda t, p, b: (0, 0)),  # the whole cache: pages
    ]
    args = [pos_rows, iq_rows, ik2]
    if scale is not None:
        in_specs.append(pl.BlockSpec(scale.shape, lambda t, p, b: (0,)))
        args.append(scale)
    # [Bc, R_pad, S_pad, P]: a row's candidates of every split contiguous for the merge kernel; splits
    # padded to a power of two (the merge's tile), the pad never written (masked there)
    s_pad = next_pow2(n_splits)
    out_spec = pl.BlockSpec((None, block_r, None, n_pad_slots), lambda t, p, b: (b, t, p, 0))
    if num_warps is None:
        num_warps = 4 if block_r * block_size <= 16 * 128 else 8
    if num_stages is None:
        num_stages = _stages(block_size * D * ik2.dtype.itemsize)
    return pl.pallas_call(
        kernel,
        grid=(n_row_tiles, n_splits, Bc),  # row tiles innermost: they share the key tiles in L2
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((Bc, R_pad, s_pad, n_pad_slots), jnp.float32),
                   jax.ShapeDtypeStruct((Bc, R_pad, s_pad, n_pad_slots), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="msa_decode_index_scan",
    )(*args)


def _merge_kernel(pos_ref, vals_ref, ids_ref, out_ref, *, n_splits: int, n_slots: int, block_size: int,
                  local_blocks: int, r_pad: int):
    """One program: row r (a (query, group)) of sequence b. The splits' candidates -> the row's final ids.

    pos_ref [Bc * r_pad] (whole); vals_ref f32 / ids_ref int32 [S_pad, P]: the row's candidates of every
    split (rows s >= n_splits: padding, never written; ids < 0: empty slots); out_ref int32 [O_pad].
    n_slots rounds, each picking the best candidate strictly below the previous pick in the total order
    (value descending, then id ascending: ties to the lower id; ids are unique, so the order is strict
    and no candidate is picked twice). The picks are non-local blocks below the first local block, so
    the ascending result is the picks sorted, then the local blocks, then -1."""
    r = pl.program_id(0)
    b = pl.program_id(1)
    pos = pos_ref[b * r_pad + r]
    local = jnp.where(pos >= 0, lax.div(jnp.maximum(pos, 0), jnp.int32(block_size)), -1)
    first_local = local - (local_blocks - 1)

    ids = ids_ref[...]
    ok = (ids >= 0) & (lax.broadcasted_iota(jnp.int32, ids.shape, 0) < n_splits)
    ids = jnp.where(ok, ids, _INT_MAX)
    vals = jnp.where(ok, vals_ref[...], -_INF)
    P = ids.shape[1]
    slot = lax.broadcasted_iota(jnp.int32, (P,), 0)

    def pick(k, carry):
        pv, pid, picks = carry
        below = ok & ((vals < pv) | ((vals == pv) & (ids > pid)))
        bv = jnp.max(jnp.max(jnp.where(below, vals, -_INF), axis=1), axis=0)
        bid = jnp.min(jnp.min(jnp.where(below & (vals == bv), ids, _INT_MAX), axis=1), axis=0)
        return bv, bid, jnp.where(slot == k, bid, picks)  # none left: bid = INT_MAX, and so on

    _, _, picks = lax.fori_loop(0, n_slots, pick, (jnp.float32(_INF), jnp.int32(-1),
                                                   jnp.full((P,), _INT_MAX, jnp.int32)))
    # ascending: a pick's place is the number of smaller picks (unique ids; INT_MAX = none, last)
    real = picks < _INT_MAX
    n_pick = jnp.sum(real.astype(jnp.int32))
    rank = jnp.sum((picks[None, :] < picks[:, None]).astype(jnp.int32), axis=1)  # [P]
    o = lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    at = (rank[None, :] == o[:, None]) & real[None, :]  # [O_pad, P]: pick i goes to place o
    sorted_picks = jnp.sum(jnp.where(at, picks[None, :], 0), axis=1)
    lo = jnp.maximum(first_local, 0)  # the local blocks lo .. local (none for a padding query)
    n_local = jnp.where(pos >= 0, local - lo + 1, 0)
    out_ref[...] = jnp.where(o < n_pick, sorted_picks, jnp.where(o < n_pick + n_local, lo + o - n_pick, -1))


def _merge_call(pos_rows, vals, ids, *, R, n_splits, n_slots, top_k, block_size, local_blocks, interpret):
    """pos_rows [Bc, R_pad]; vals, ids [Bc, R_pad, S_pad, P] (`_scan_call`) -> int32 [Bc, R, O_pad]:
    per row the final selection (ascending, -1 padding) in its first top_k entries."""
    Bc, r_pad, s_pad, P = vals.shape
    o_pad = max(MIN_DOT, next_pow2(top_k))
    kernel = functools.partial(_merge_kernel, n_splits=n_splits, n_slots=n_slots, block_size=block_size,
                               local_blocks=local_blocks, r_pad=r_pad)
    tile = pl.BlockSpec((None, None, s_pad, P), lambda r, b: (b, r, 0, 0))
    flat = pos_rows.reshape(-1)
    return pl.pallas_call(
        kernel,
        grid=(R, Bc),
        in_specs=[pl.BlockSpec(flat.shape, lambda r, b: (0,)), tile, tile],
        out_specs=pl.BlockSpec((None, None, o_pad), lambda r, b: (b, r, 0)),
        out_shape=jax.ShapeDtypeStruct((Bc, R, o_pad), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=4 if s_pad * P <= 4096 else 8, num_stages=1),
        interpret=interpret,
        name="msa_decode_merge",
    )(flat, vals, ids)


def _finish_ids(ranked, local, top_k, local_blocks=1):
    """ranked [B, S, H, n] (-1: none) + local [B, S] (-1: padding query) and the local_blocks - 1
    blocks before it -> ascending ids, -1 last, width top_k."""
    B, S, H = ranked.shape[:3]
    loc = jnp.broadcast_to(local_block_ids(local, local_blocks)[:, :, None, :], (B, S, H, local_blocks))
    out = jnp.concatenate([ranked, loc], axis=-1)
    out = jnp.sort(jnp.where(out < 0, _INT_MAX, out), axis=-1)
    out = jnp.where(out == _INT_MAX, -1, out)
    if out.shape[-1] < top_k:
        out = jnp.pad(out, ((0, 0), (0, 0), (0, 0), (0, top_k - out.shape[-1])),
                      constant_values=-1)
    return out[..., :top_k].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "top_k", "sink_blocks", "local_blocks", "n_splits", "scale_mode", "interpret", "num_warps",
    "num_stages"))
def _decode_select(iq, ik, q_pos, ik_scale, *, block_size, top_k, sink_blocks, local_blocks, n_splits,
                   scale_mode, interpret, num_warps, num_stages):
    B, S, H, D = iq.shape
    L = ik.shape[1]
    n_blocks = L // block_size
    pos = _clean_pos(q_pos, L)
    local = jnp.where(pos >= 0, pos // block_size, -1)  # [B, S]
    n_slots = min(top_k - local_blocks, n_blocks - local_blocks)  # non-local blocks that can ever be selected
    if n_slots <= 0:  # only the local blocks are ever selected: nothing to rank
        return _finish_ids(jnp.zeros((B, S, H, 0), jnp.int32), local, top_k, local_blocks)

    R = S * H
    R_pad = max(MIN_DOT, next_pow2(R))
    block_r = min(R_pad, _MAX_SCAN_ROWS)
    D_pad = _dim_pad(D)
    n_pad_slots = max(2, next_pow2(n_slots))
    iq_rows = jnp.pad(iq.reshape(B, R, D), ((0, 0), (0, R_pad - R), (0, D_pad - D)))
    pos_rows = jnp.pad(jnp.repeat(pos, H, axis=1), ((0, 0), (0, R_pad - R)), constant_values=-1)
    ik_p = _pad_last(ik, D_pad)  # a copy only when D_idx is not a power of two >= 16

    per_batch = [(L * D_pad, ik.dtype.itemsize), (R_pad * D_pad, iq.dtype.itemsize)]
    if scale_mode is not None:
        per_batch.append((ik_scale.shape[1], 4))
    if n_splits is None:
        n_splits = default_scan_splits(min(_batch_chunk(B, per_batch), B), n_blocks,
                                       R_pad // block_r)
    chunk = _batch_chunk(B, per_batch + [(next_pow2(n_splits) * R_pad * n_pad_slots, 4)])  # + candidates

    def call(sl):
        sc = None if scale_mode is None else sl(ik_scale).reshape(-1)
        v, i = _scan_call(
            sl(iq_rows), sl(pos_rows), sl(ik_p).reshape(-1, D_pad), sc, d_real=D,
            block_size=block_size, n_blocks=n_blocks, n_splits=n_splits, n_slots=n_slots,
            n_pad_slots=n_pad_slots, sink_blocks=sink_blocks, local_blocks=local_blocks, scale_mode=scale_mode,
            block_r=block_r, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
        return (_merge_call(sl(pos_rows), v, i, R=R, n_splits=n_splits, n_slots=n_slots, top_k=top_k,
                            block_size=block_size, local_blocks=local_blocks, interpret=interpret),)

    (out,) = _in_chunks(B, chunk, call)  # [B, R, O_pad]
    return out[..., :top_k].reshape(B, S, H, top_k)


def decode_select_blocks(iq, ik, q_pos, *, block_size: int, top_k: int, sink_blocks: int = 0,
                         local_blocks: int = 1, ik_scale=None, n_splits: int | None = None, interpret: bool | None = None,
                         num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
    """MSA block selection for S new queries per sequence against an index-key cache.

    Args:
      iq: [B, S, H_kv, D_idx] index queries (bfloat16 or float32).
      ik: [B, L, D_idx] index-key cache: iq's dtype, or float8_e4m3fn (dequantised key =
        ik.astype(f32) * ik_scale). Entries past a query's position are never used.
      q_pos: int32 [B, S] query positions; -1 marks a padding query (all -1 ids). Positions >= L
        are clamped to L - 1.
      block_size: KV block size, a power of two (>= 16 on GPU); L % block_size == 0.
      top_k: blocks per (query, group), local block included (>= 1; may exceed the visible blocks).
      sink_blocks: the first sink_blocks visible blocks are always selected (ablation).
      local_blocks: the local block and the local_blocks - 1 before it are always selected (the
        paper: 1; 1 <= local_blocks <= top_k).
      ik_scale: None (scale 1), or float32 [B, L] (per token) or [B, L // block_size] (per block,
        must be >= 0) dequantisation scales.
      n_splits: programs per sequence along the key range (default: `default_scan_splits`).
      interpret: Pallas interpreter; None = interpret unless the default backend is "gpu".
      num_warps, num_stages: Triton tuning (default 4 warps for 16-row programs, else 8; stages
        by shared memory, <= 3).

    Returns:
      int32 [B, S, H_kv, top_k]: selected ids ascending, -1 padding, equal to the rows q_pos of
      `msa_jax.ops.reference.select_blocks` on the full sequence.
    """
    interpret = _resolve_interpret(interpret)
    check_index(iq, ik, cached=True, scaled=True, dtypes=KERNEL_DTYPES)
    B, S, H, D = iq.shape
    L = ik.shape[1]
    _check_block_size(block_size, L, interpret)
    _check_cache_rows(B, L)
    check_int("top_k", top_k, 1)
    check_int("sink_blocks", sink_blocks, 0)
    check_local_blocks(local_blocks, top_k)
    if n_splits is not None:
        check_int("n_splits", n_splits, 1)
    check_q_pos(q_pos, B, S)
    scale_mode = None
    if ik_scale is not None:
        if getattr(ik_scale, "dtype", None) != jnp.float32:
            raise ValueError(f"ik_scale: expected float32, got {getattr(ik_scale, 'dtype', None)}")
        if ik_scale.shape == (B, L):
            scale_mode = "token"
        elif ik_scale.shape == (B, L // block_size):
            scale_mode = "block"
        else:
            raise ValueError(f"ik_scale: expected [B={B}, L={L}] (per token) or [B={B}, "
                             f"L // block_size={L // block_size}] (per block), got {ik_scale.shape}")
    if L == 0 or S == 0:
        return jnp.full((B, S, H, top_k), -1, jnp.int32)
    return _decode_select(iq, ik, q_pos, ik_scale, block_size=block_size, top_k=top_k,
                          sink_blocks=sink_blocks, local_blocks=local_blocks, n_splits=n_splits, scale_mode=scale_mode,
                          interpret=interpret, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------- attention


def _attn_kernel(pos_ref, *refs, dense: bool, S: int, n_kv: int, group: int, g_pad: int,
                 block_size: int, n_blocks: int, n_splits: int, sm_scale: float, precision):
    """One program: (query b, s, group r) = program 0, split = program 1.

    pos_ref [Bc * S]; sparse only: ids_ref [K_pad] (the row's ids as given, -1 padded: any order,
    repeats, -1 and ids past the query's block allowed); q_ref [group, D]; k_ref, v_ref
    [Bc * L, H_kv, D] (the whole chunk: pages); o_ref [g_pad, D] f32, lse_ref [g_pad] f32.
    """
    if dense:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        ids_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    i = pl.program_id(0)
    split = pl.program_id(1)
    b = lax.div(i, jnp.int32(S * n_kv))
    r = lax.rem(i, jnp.int32(n_kv))
    pos = pos_ref[lax.div(i, jnp.int32(n_kv))]
    local = jnp.where(pos >= 0, lax.div(jnp.maximum(pos, 0), jnp.int32(block_size)), -1)
    if dense:
        n = local + 1
    else:
        # Clean the ids here (a few [K_pad, K_pad] compares, no XLA sort): keep the first of each
        # visible id, and visit the kept ones in ascending order, the j-th being the one of rank j.
        raw = ids_ref[...]
        kk = lax.broadcasted_iota(jnp.int32, raw.shape, 0)
        valid = (raw >= 0) & (raw <= local)
        repeat = (raw[None, :] == raw[:, None]) & valid[None, :] & (kk[None, :] < kk[:, None])
        keep = valid & (jnp.sum(repeat.astype(jnp.int32), axis=1) == 0)
        n = jnp.sum(keep.astype(jnp.int32))
        smaller = keep[None, :] & (raw[None, :] < raw[:, None])
        rank = jnp.where(keep, jnp.sum(smaller.astype(jnp.int32), axis=1), -1)
    j0 = lax.div(split * n, jnp.int32(n_splits))  # balanced share [j0, j1) of the row's blocks
    j1 = lax.div((split + 1) * n, jnp.int32(n_splits))

    if g_pad == group:
        q = q_ref[...]
    else:  # pad to >= 16 rows for the dots by repeating the last head (rows dropped later)
        q = q_ref[jnp.minimum(lax.broadcasted_iota(jnp.int32, (g_pad,), 0), group - 1)]
    D = q.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (block_size,), 0)
    qk_scale = sm_scale * LOG2E

    def body(j, carry, *, masked):
        m, l, acc = carry
        c = j if dense else jnp.sum(jnp.where(rank == j, raw, 0))
        page = _page(b, c, n_blocks)
        start = pl.multiple_of(page * block_size, block_size)
        k = k_ref[pl.ds(start, block_size), r, :]  # [block_size, D], row stride H_kv * D
        v = v_ref[pl.ds(start, block_size), r, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale  # [g_pad, bs] f32
        if masked:  # keys past the query position: junk, invisible (NaN-safe: select, no multiply)
            vis = c * block_size + col <= pos
            s = jnp.where(vis[None, :], s, MASK_VALUE)
            v = jnp.where(vis[:, None], v, jnp.zeros_like(v))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l, acc

    carry = (jnp.full((g_pad,), MASK_VALUE, jnp.float32), jnp.zeros((g_pad,), jnp.float32),
             jnp.zeros((g_pad, D), jnp.float32))
    # Blocks are in ascending id order and all ids are <= the local block: only the last block
    # of the row can hold keys past the query position.
    carry = lax.fori_loop(j0, jnp.maximum(j0, jnp.minimum(j1, n - 1)),
                          functools.partial(body, masked=False), carry)
    m, l, acc = lax.fori_loop(jnp.maximum(j0, n - 1), j1, functools.partial(body, masked=True),
                              carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -_INF)


def _attn_call(pos, ids, q3, k3, v3, *, d_real, dense, S, n_kv, group, block_size, n_blocks,
               n_splits, interpret, num_warps, num_stages):
    """pos [Bc*S]; ids [n_q, K_pad] (sparse); q3 [n_q, G, D]; k3, v3 [Bc*L, H_kv, D]."""
    n_q, _, D = q3.shape
    g_pad = max(MIN_DOT, next_pow2(group))
    precision = lax.Precision.HIGHEST if q3.dtype == jnp.float32 else None
    kernel = functools.partial(
        _attn_kernel, dense=dense, S=S, n_kv=n_kv, group=group, g_pad=g_pad,
        block_size=block_size, n_blocks=n_blocks, n_splits=n_splits,
        sm_scale=d_real ** -0.5, precision=precision)
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, p: (0,) * x.ndim)
    in_specs, args = [whole(pos)], [pos]
    if not dense:
        in_specs.append(pl.BlockSpec((None, ids.shape[1]), lambda i, p: (i, 0)))
        args.append(ids)
    in_specs += [pl.BlockSpec((None, group, D), lambda i, p: (i, 0, 0)), whole(k3), whole(v3)]
    args += [q3, k3, v3]
    if num_warps is None:
        num_warps = 4 if g_pad <= 16 else 8
    if num_stages is None:
        num_stages = _stages(2 * block_size * D * k3.dtype.itemsize)
    return pl.pallas_call(
        kernel,
        grid=(n_q, n_splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, g_pad, D), lambda i, p: (i, p, 0, 0)),
                   pl.BlockSpec((None, None, g_pad), lambda i, p: (i, p, 0))],
        out_shape=[jax.ShapeDtypeStruct((n_q, n_splits, g_pad, D), jnp.float32),
                   jax.ShapeDtypeStruct((n_q, n_splits, g_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="msa_decode_dense_attention" if dense else "msa_decode_sparse_attention",
    )(*args)


def _combine(o_part, lse_part):
    """Partials [n_q, n_splits, g, D], [n_q, n_splits, g] -> out f32 [n_q, g, D], lse [n_q, g]."""
    m = jnp.max(lse_part, axis=1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m[:, None])  # 0 for empty splits
    den = jnp.sum(w, axis=1)
    ok = den > 0.0
    den_safe = jnp.where(ok, den, 1.0)
    # a weighted sum over the splits (elementwise f32: one reduction fusion, not a batched matmul)
    out = jnp.sum((w / den_safe[:, None])[..., None] * o_part, axis=1)
    return out, jnp.where(ok, m + jnp.log(den_safe), -_INF)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "dense", "n_splits", "interpret", "num_warps", "num_stages"))
def _decode_attention(q, k, v, block_idx, q_pos, *, block_size, dense, n_splits, interpret,
                      num_warps, num_stages):
    B, S, H_q, D = q.shape
    L, H_kv = k.shape[1], k.shape[2]
    G = H_q // H_kv
    n_blocks = L // block_size
    D_pad = _dim_pad(D)
    g_pad = max(MIN_DOT, next_pow2(G))
    pos = _clean_pos(q_pos, L)
    if dense:
        top_k, ids = n_blocks, None
    else:
        top_k = block_idx.shape[-1]
        k_pad = max(MIN_DOT, next_pow2(top_k))  # the kernel's id vector (a pad only for other top_k)
        ids = block_idx.astype(jnp.int32).reshape(B, S * H_kv, top_k)
        if k_pad != top_k:
            ids = jnp.pad(ids, ((0, 0), (0, 0), (0, k_pad - top_k)), constant_values=-1)
    # D_pad != D: a padded copy of the cache (only for head dims that are not a power of two).
    q3 = _pad_last(q, D_pad).reshape(B, S * H_kv, G, D_pad)
    k3, v3 = _pad_last(k, D_pad), _pad_last(v, D_pad)

    n_q_seq = S * H_kv
    if n_splits is None:
        chunk0 = _batch_chunk(B, [(L * H_kv * D_pad, k.dtype.itemsize)])
        n_splits = default_attention_splits(min(chunk0, B) * n_q_seq, min(top_k, n_blocks),
                                            _MIN_DENSE_BLOCKS if dense else 1)
    chunk = _batch_chunk(B, [(L * H_kv * D_pad, k.dtype.itemsize),
                             (n_q_seq * n_splits * g_pad * D_pad, 4)])

    def call(sl):
        o, lse = _attn_call(
            sl(pos).reshape(-1), None if dense else sl(ids).reshape(-1, ids.shape[-1]),
            sl(q3).reshape(-1, G, D_pad),
            sl(k3).reshape(-1, H_kv, D_pad), sl(v3).reshape(-1, H_kv, D_pad), d_real=D,
            dense=dense, S=S, n_kv=H_kv, group=G, block_size=block_size, n_blocks=n_blocks,
            n_splits=n_splits, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
        return o, lse

    o_part, lse_part = _in_chunks(B, chunk, call)
    out, lse = _combine(o_part, lse_part)  # [B*S*H_kv, g_pad, D_pad], [B*S*H_kv, g_pad]
    out = out[:, :G, :D].reshape(B, S, H_q, D).astype(q.dtype)
    lse = lse[:, :G].reshape(B, S, H_q)
    return out, lse


def _check_attention(q, k, v, q_pos, block_size, n_splits, interpret):
    check_qkv(q, k, v, dtypes=KERNEL_DTYPES, cached=True)
    B, S, H_q, D = q.shape
    H_kv = k.shape[2]
    _check_block_size(block_size, k.shape[1], interpret)
    _check_cache_rows(B, k.shape[1])
    check_q_pos(q_pos, B, S)
    if n_splits is not None:
        check_int("n_splits", n_splits, 1)
    return B, S, H_q, D, k.shape[1], H_kv


def _empty(q):
    B, S, H_q, D = q.shape
    return jnp.zeros(q.shape, q.dtype), jnp.full((B, S, H_q), -_INF, jnp.float32)


def decode_sparse_attention(q, k, v, block_idx, q_pos, *, block_size: int,
                            n_splits: int | None = None, interpret: bool | None = None,
                            num_warps: int | None = None, num_stages: int | None = None):
    """MSA main branch for S new queries per sequence over the selected blocks of a KV cache.

    Args:
      q: [B, S, H_q, D] (bfloat16 or float32); head h belongs to group h // (H_q // H_kv).
      k, v: [B, L, H_kv, D] KV cache, q's dtype; entries past a query's position are never used.
      block_idx: integer [B, S, H_kv, top_k] selected block ids per (query, group): any order, -1
        padding; ids outside [0, q_pos // block_size] are ignored, duplicates count once.
      q_pos: int32 [B, S] query positions; -1 marks a padding query (out 0, lse -inf).
      block_size: a power of two (>= 16 on GPU); L % block_size == 0.
      n_splits: programs per (query, group) over its blocks (default: `default_attention_splits`).
      interpret, num_warps, num_stages: as `decode_select_blocks` (default 4 warps for <= 16
        rows; stages by shared memory).

    Returns:
      (out [B, S, H_q, D] in q.dtype, lse float32 [B, S, H_q]): exact softmax attention over the
      keys j <= q_pos of the selected blocks, logits q.k / sqrt(D), float32 accumulation.
    """
    interpret = _resolve_interpret(interpret)
    B, S, H_q, D, L, H_kv = _check_attention(q, k, v, q_pos, block_size, n_splits, interpret)
    check_block_idx(block_idx, k, n_queries=S)
    if L == 0 or S == 0:
        return _empty(q)
    return _decode_attention(q, k, v, block_idx, q_pos, block_size=block_size, dense=False,
                             n_splits=n_splits, interpret=interpret, num_warps=num_warps,
                             num_stages=num_stages)


def decode_dense_attention(q, k, v, q_pos, *, block_size: int = 128, n_splits: int | None = None,
                           interpret: bool | None = None, num_warps: int | None = None,
                           num_stages: int | None = None):
    """Causal attention of S new queries per sequence over a KV cache (keys j <= q_pos): the same
    flash-decoding kernel as `decode_sparse_attention`, over every visible block 0 .. q_pos //
    block_size (the split-K dense decode baseline). Arguments and results as there."""
    interpret = _resolve_interpret(interpret)
    B, S, H_q, D, L, H_kv = _check_attention(q, k, v, q_pos, block_size, n_splits, interpret)
    if L == 0 or S == 0:
        return _empty(q)
    return _decode_attention(q, k, v, None, q_pos, block_size=block_size, dense=True,
                             n_splits=n_splits, interpret=interpret, num_warps=num_warps,
                             num_stages=num_stages)
