"""MSA index branch (docs/algorithm.md §3): fused indexer, scores + causal block max + streaming top-k.

    block_idx = select_blocks(iq, ik, *, block_size, top_k, sink_blocks=0, local_blocks=1)

iq [B, T, H_kv, D_idx], ik [B, T, D_idx] (one dtype: bfloat16, float16 or float32). Per (token i,
group r): s_j = <iq[i, r], ik[j]> / sqrt(D_idx) (float32, j <= i), block score = max over the
visible tokens of the block; selected: the local block i // block_size (and the local_blocks - 1 before
it), then the sink blocks (lower id first), then the other visible blocks by score (ties: lower id),
top_k in all. Returns int32 [B, T, H_kv, top_k], ids ascending, -1 padding after: exactly
`msa_jax.ops.reference.select_blocks` (given the same float32 scores).

Design: iq is viewed as [B, T*H_kv, D] (row t*H_kv + r), and one program owns block_q consecutive
rows (all groups of block_q / H_kv tokens), so one key tile serves every group; row tiles launch in
reverse (longest causal rows first). The program loops over key tiles of bk rows (whole blocks; several
blocks per tile below 16 tokens), computes S = iq_tile ik_tile^T (float32; IEEE precision for f32
inputs), the causal mask only on tiles that reach the diagonal, the per-block row max times the
scale (after the max: bit-identical to the oracle's max of scaled scores), and keeps a streaming
top-(top_k - local_blocks) in registers (values and ids; replace the worst slot on a STRICTLY greater
score, so equal scores keep the lower id; sinks enter at +inf, the local blocks never enter). The
wrapper adds the local blocks and sorts. Neither the [T, T] scores nor the block scores reach
memory. The batch is split over several calls when an operand would reach 2**31 elements (int32
offsets).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import check_index, check_int, check_local_blocks, check_pow2
from pallas.common import INT32_LIMIT, MIN_DOT, cdiv, interpret_mode, local_block_ids, next_pow2

__all__ = ["IndexTopkConfig", "select_blocks"]

_INF = float("inf")
_MAX_CALL_ELEMS = INT32_LIMIT - 1  # per operand of one pallas_call (int32 offsets in the lowering)
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _key_tile(block_size: int) -> tuple[int, int]:
    """(nsub, bk): whole index blocks per key tile (several when block_size < 16: Triton dots need
    >= 16 columns) and the key tile's rows (a power of two, extra columns masked)."""
    nsub = max(1, MIN_DOT // block_size)
    return nsub, max(MIN_DOT, next_pow2(nsub * block_size))


@dataclasses.dataclass(frozen=True)
class IndexTopkConfig:
    """Tuning options of the fused indexer; None = the default (`resolve`).

    block_q: rows per program along the flattened (token, group) axis T * H_kv (a power of two >= 16;
      one program covers block_q / H_kv tokens, all groups). Default 64, smaller for tiny inputs.
    num_warps, num_stages: Triton compiler parameters (default 4 warps when block_q * bk <= 64 * 128,
      else 8; 2 stages).
    """

    block_q: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if self.block_q is not None:
            check_pow2("block_q", self.block_q, MIN_DOT)
        for name in ("num_warps", "num_stages"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)

    def resolve(self, T: int, H_kv: int, block_size: int) -> IndexTopkConfig:
        """Every option filled in for one call."""
        block_q = self.block_q or min(64, max(MIN_DOT, next_pow2(T * H_kv)))
        bk = _key_tile(block_size)[1]
        return IndexTopkConfig(
            block_q=block_q,
            num_warps=self.num_warps or (4 if block_q * bk <= 64 * 128 else 8),
            num_stages=self.num_stages or 2,
        )


def _index_topk_kernel(iq_ref, ik_ref, o_ref, *, seq_len: int, n_kv: int, block_size: int,
                       nsub: int, bk: int, block_q: int, n_slots: int, n_pad_slots: int,
                       sink_blocks: int, local_blocks: int, scale: float, n_row_tiles: int, precision):
    """One program: rows [m0, m0 + block_q) of the flattened (token, group) axis of one batch."""
    tile = n_row_tiles - 1 - pl.program_id(0)  # heavy (late) tiles launch first
    m0 = tile * block_q
    rows = m0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    tok = lax.div(rows, jnp.int32(n_kv))  # query token of each row
    local = lax.div(tok, jnp.int32(block_size))  # its local block
    tok_col = tok[:, None]

    # Last key tile any row of this program can see (rows past the end of the sequence are
    # padding: clamp so that they never make the loop read past the padded keys).
    t_last = jnp.minimum(lax.div(m0 + (block_q - 1), n_kv), seq_len - 1)
    n_key_tiles = lax.div(lax.div(t_last, block_size), nsub) + 1

    q = iq_ref[...]  # [block_q, D]

    slot = lax.broadcasted_iota(jnp.int32, (block_q, n_pad_slots), 1)
    vals0 = jnp.where(slot < n_slots, -_INF, _INF).astype(jnp.float32)
    ids0 = -1 - slot  # distinct negatives: "empty", never a block id
    col = lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    col_blk = lax.div(col, jnp.int32(block_size))  # sub-block of each key column
    tile_keys = nsub * block_size  # keys of the whole blocks in one key tile

    def insert(vals, ids, v, c):
        worst = jnp.min(vals, axis=1)  # [block_q]
        worst_id = jnp.max(jnp.where(vals == worst[:, None], ids, jnp.iinfo(jnp.int32).min),
                           axis=1)
        rep = (ids == worst_id[:, None]) & (v > worst)[:, None]
        return jnp.where(rep, v[:, None], vals), jnp.where(rep, c, ids)

    def body(kt, carry, *, causal: bool):
        vals, ids = carry
        k0 = kt * tile_keys
        k = ik_ref[pl.ds(k0, bk), :]  # [bk, D]
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [block_q, bk] f32
        if causal:  # also hides the padded keys
            s = jnp.where(k0 + col <= tok_col, s, -_INF)
        for sub in range(nsub):
            c = kt * nsub + sub  # block id, ascending over the whole loop
            if nsub == 1 and bk == block_size:
                bmax = jnp.max(s, axis=1)
            else:
                bmax = jnp.max(jnp.where(col_blk == sub, s, -_INF), axis=1)
            v = bmax * scale
            if sink_blocks > 0:
                v = jnp.where((c < sink_blocks) & (c < local), _INF, v)
            v = jnp.where((c <= local) & (c > local - local_blocks), -_INF, v)  # added by the wrapper
            vals, ids = insert(vals, ids, v, c)
        return vals, ids

    # Key tiles entirely at or before the first token of this program need no causal mask.
    n_full = jnp.minimum(lax.div(lax.div(m0, n_kv) + 1, tile_keys), n_key_tiles)
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False), (vals0, ids0))
    _, ids = lax.fori_loop(n_full, n_key_tiles, functools.partial(body, causal=True), carry)
    o_ref[...] = ids



@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "sink_blocks", "local_blocks", "config",
                                             "interpret"))
def _select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int, local_blocks: int,
                   config: IndexTopkConfig, interpret: bool):
    B, T, H, D = iq.shape
    nb = cdiv(T, block_size)
    local = local_block_ids(jnp.arange(T, dtype=jnp.int32) // block_size, local_blocks)  # [T, local_blocks]
    local = jnp.broadcast_to(local[None, :, None, :], (B, T, H, local_blocks))
    n_slots = max(0, min(top_k - local_blocks, nb - local_blocks))  # non-local blocks that can ever be selected

    if n_slots == 0:  # only the local blocks are ever selected: nothing to rank
        out = local
    else:
        R = T * H
        block_q = config.block_q
        n_row_tiles = cdiv(R, block_q)
        n_pad_slots = max(2, next_pow2(n_slots))
        d_pad = max(MIN_DOT, next_pow2(D))
        nsub, bk = _key_tile(block_size)
        # Keys the loop may read: tiles up to the one holding the last block, each bk rows.
        n_keys = (cdiv(nb, nsub) - 1) * nsub * block_size + bk

        q2 = iq.reshape(B, R, D)
        pad_r = n_row_tiles * block_q - R
        if pad_r or d_pad != D:
            q2 = jnp.pad(q2, ((0, 0), (0, pad_r), (0, d_pad - D)))
        k2 = ik
        if n_keys > T or d_pad != D:
            k2 = jnp.pad(k2, ((0, 0), (0, max(0, n_keys - T)), (0, d_pad - D)))
        n_keys_arr = k2.shape[1]

        precision = lax.Precision.HIGHEST if iq.dtype == jnp.float32 else None
        kernel = functools.partial(
            _index_topk_kernel, seq_len=T, n_kv=H, block_size=block_size, nsub=nsub, bk=bk,
            block_q=block_q, n_slots=n_slots, n_pad_slots=n_pad_slots, sink_blocks=sink_blocks,
            local_blocks=local_blocks, scale=D ** -0.5, n_row_tiles=n_row_tiles, precision=precision)

        def call(q_chunk, k_chunk):
            nbatch = q_chunk.shape[0]
            return pl.pallas_call(
                kernel,
                grid=(n_row_tiles, nbatch),
                in_specs=[
                    pl.BlockSpec((None, block_q, d_pad),
                                 lambda i, b: (b, n_row_tiles - 1 - i, 0)),
                    pl.BlockSpec((None, n_keys_arr, d_pad), lambda i, b: (b, 0, 0)),
                ],
                out_specs=pl.BlockSpec((None, block_q, n_pad_slots),
                                       lambda i, b: (b, n_row_tiles - 1 - i, 0)),
                out_shape=jax.ShapeDtypeStruct((nbatch, n_row_tiles * block_q, n_pad_slots),
                                               jnp.int32),
                compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                     num_stages=config.num_stages),
                interpret=interpret,
                name="msa_index_topk",
            )(q_chunk, k_chunk)

        # Keep each call's operands below 2**31 elements by splitting the batch (B * T * H_kv *
        # D_idx reaches 2**31 at T = 1M, H_kv = 4, D_idx = 128, B = 4).
        per_batch = max(q2.shape[1] * d_pad, n_keys_arr * d_pad,
                        n_row_tiles * block_q * n_pad_slots)
        if per_batch > _MAX_CALL_ELEMS:
            raise ValueError(f"one sequence needs {per_batch} elements in one operand, more than "
                             f"the int32 offsets of the Triton lowering allow")
        chunk = _MAX_CALL_ELEMS // per_batch
        if chunk >= B:
            slots = call(q2, k2)
        else:
            slots = jnp.concatenate([call(q2[b0:b0 + chunk], k2[b0:b0 + chunk])
                                     for b0 in range(0, B, chunk)], axis=0)
        slots = slots[:, :R, :n_slots].reshape(B, T, H, n_slots)
        slots = jnp.where(slots < 0, -1, slots)
        out = jnp.concatenate([slots, local], axis=-1)  # [B, T, H, n_slots + local_blocks]

    # Canonical layout: ascending ids, -1 last, width top_k.
    big = jnp.iinfo(jnp.int32).max
    out = jnp.sort(jnp.where(out < 0, big, out), axis=-1)
    out = jnp.where(out == big, -1, out)
    if out.shape[-1] < top_k:
        out = jnp.pad(out, ((0, 0), (0, 0), (0, 0), (0, top_k - out.shape[-1])),
                      constant_values=-1)
    return out.astype(jnp.int32)


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0, local_blocks: int = 1,
                  block_q: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """int32 [B, T, H_kv, top_k]: the selected block ids ascending, then -1 padding (module docstring).

    sink_blocks: the first sink_blocks blocks are always selected when visible (ablation).
    local_blocks: the query's own block and the local_blocks - 1 before it are always selected (the
      paper: 1; 1 <= local_blocks <= top_k).
    block_q, num_warps, num_stages: see `IndexTopkConfig`.
    interpret: None = the Pallas interpreter unless jax.default_backend() == "gpu".
    """
    check_index(iq, ik, dtypes=_DTYPES)
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    check_int("sink_blocks", sink_blocks, 0)
    check_local_blocks(local_blocks, top_k)
    config = IndexTopkConfig(block_q=block_q, num_warps=num_warps, num_stages=num_stages)
    B, T, H, _ = iq.shape
    if T == 0:
        return jnp.zeros((B, 0, H, top_k), jnp.int32)
    return _select_blocks(iq, ik, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks,
                          local_blocks=local_blocks, config=config.resolve(T, H, block_size),
                          interpret=interpret_mode(interpret))
