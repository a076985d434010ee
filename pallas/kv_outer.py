"""The KV-outer substrate of the training kernels (main forward, main backward, KL forward / backward).

docs/algorithm.md §7. A program works on ONE selected KV block c of one (batch row, KV group) = row
of B*H_kv and multiplies it only with the (token, head) rows that selected it:

* `clean_ids`: ids outside [0, i // block_size] -> -1, each token's ids sorted, repeats -> -1.
* `reverse_index`: per row, the valid (token, slot) pairs sorted by (block, token), every block's
  segment padded to a multiple of BQ tokens. Tile t covers padded positions [t*BQ, (t+1)*BQ) of one
  block: `tiles` (block per tile, -1 unused), `tok` (token per position, -1 padding), `inv`
  ((token, slot) -> position, -1 empty). A tile is M = BQ * G_pad MMA rows (tokens x group heads).
* `units`: the backward grids run over units of <= tiles_per_unit consecutive tiles of one block (a
  hot block becomes many units); `reduce_units` sums a block's unit partials in unit order.
* The kernels write one partial per padded position; `combine_outputs` (softmax-weighted),
  `combine_scalars` and `sum_slots` gather them back per token through `inv`, in slot order.
  Fixed summation orders everywhere, no atomics: runs are bit-identical.
* `chunk_index`: the reverse index (and units) of every query chunk, built in one batched call.
* Queries run in chunks of t_chunk tokens (`map_chunks` / `scan_chunks`) so that the per-slot
  partial buffer of one call stays bounded; every query's position (`positions`) reaches the
  kernels as an operand, so the queries may be any S positions against L >= S keys (a slice of a
  sequence under context parallelism, a prompt chunk against a cache).
* `KVOuterConfig`: the tuning options and their defaults, resolved per call into a `Plan`.
Limits (Triton path): every operand of one call < 2**31 elements (int32 offsets), checked by
`KVOuterConfig.resolve` (a vmapped batch axis multiplies the sizes unseen); block_size a power of
two; M >= 16 rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from msa_jax.checks import check_block_idx, check_int, check_pow2, check_q_pos, check_qkv
from pallas.common import INT32_LIMIT, MIN_DOT, cdiv, interpret_mode, is_pow2, next_pow2, pad_dim

__all__ = [
    "TARGET_ROWS",
    "PARTIAL_ELEMENTS",
    "TILES_PER_UNIT",
    "Sizes",
    "sizes",
    "Plan",
    "KVOuterConfig",
    "default_block_q",
    "default_chunk",
    "positions",
    "clean_ids",
    "n_tiles",
    "reverse_index",
    "ChunkIndex",
    "chunk_index",
    "n_units",
    "units",
    "reduce_units",
    "slot_loop",
    "combine_outputs",
    "combine_scalars",
    "sum_slots",
    "rows",
    "ungroup",
    "kv_layout",
    "pad_time",
    "map_chunks",
    "scan_chunks",
]

TARGET_ROWS = 128  # MMA rows per tile (BQ * G_pad) for 16-bit inputs
PARTIAL_ELEMENTS = 2**30  # default cap on the partial buffer of one query chunk (elements)
TILES_PER_UNIT = 16  # backward kernels: tiles one program handles for one KV block
KV_TILE = 128  # K/V rows per block up to which the backward kernels keep the full M rows
MAX_BWD_KV_TILE = 256  # the largest block the backward kernels take (shared memory: block 512 needs 260-460 KiB)
COMBINE_ROWS, COMBINE_WARPS = 16, 8  # slot reduction kernel: output rows per program, warps (fastest at 128K on an H200)
SLOT_UNROLL = 16  # slot loops: unrolled up to this many slots, a loop over groups of them beyond


# ---------------------------------------------------------------------------------------- sizes


class Sizes(NamedTuple):
    """Sizes of one call, padded for the kernels."""

    B: int
    T: int  # query tokens
    L: int  # key tokens (L >= T; L = T but for queries at positions, `clean_ids`)
    H_q: int
    D: int
    H_kv: int
    top_k: int
    G: int  # query heads per KV group
    BH: int  # rows of the kernels' grids: B * H_kv
    G_pad: int  # G padded to a power of two
    D_pad: int
    block_size: int
    kv_tile: int  # K/V rows loaded per block (>= 16 for the dots)
    n_blocks: int
    T_kv_pad: int  # K/V rows of the padded layout


def sizes(q, k, block_idx, block_size: int) -> Sizes:
    B, T, H_q, D = q.shape
    L, H_kv = k.shape[1], k.shape[2]
    kv_tile = max(block_size, MIN_DOT)
    n_blocks = cdiv(L, block_size)
    return Sizes(B, T, L, H_q, D, H_kv, block_idx.shape[-1], H_q // H_kv, B * H_kv, next_pow2(H_q // H_kv),
                 pad_dim(D), block_size, kv_tile, n_blocks, n_blocks * block_size + kv_tile - block_size)


def default_block_q(T: int, G_pad: int, target_rows: int = TARGET_ROWS) -> int:
    """target_rows // G_pad query tokens per tile, shrunk for short T, never below 16 // G_pad."""
    bq = max(1, target_rows // G_pad)
    floor = max(1, MIN_DOT // G_pad)  # keep M >= 16
    return max(floor, min(bq, next_pow2(T)))


def default_chunk(T, BH, top_k, n_blocks, bq, G_pad, width, cap=PARTIAL_ELEMENTS) -> int:
    """Largest balanced query chunk whose partial buffer ([BH, positions * G_pad, width]) has <= cap
    elements (0: none fits); a chunk that divides T when there is one nearby (no padded copy of q)."""
    per_row = cap // (BH * G_pad * width)  # padded positions a chunk may use
    t_max = (per_row - n_blocks * (bq - 1) - bq) // min(top_k, n_blocks)
    if t_max >= T:
        return T
    if t_max < 1:
        return 0
    n_chunks = -(-T // t_max)
    for n in range(n_chunks, 2 * n_chunks + 1):
        if T % n == 0:
            return T // n
    return -(-T // n_chunks)


# --------------------------------------------------------------------------------------- config


class _Kernel(NamedTuple):
    f32_rows: int | None  # target MMA rows for float32 inputs (None: half the 16-bit default tile)
    num_stages: int
    units: bool  # grid over units of tiles (the backward kernels)


# float32 tiles are smaller because of the H100's 227 KiB of shared memory at D = 128: the forward's
# 128-row tiles, the main backward's five [M, D] / [kv, D] operands (~390 KiB at 128 rows). The
# backward kernels use 1 pipeline stage: their unit loop's gathers are not pipelined anyway, and a
# second stage only takes shared memory (the KL backward's exceeds it at the paper heads).
_KERNELS = {
    "fwd": _Kernel(f32_rows=64, num_stages=2, units=False),
    "bwd": _Kernel(f32_rows=32, num_stages=1, units=True),
    "kl_fwd": _Kernel(f32_rows=None, num_stages=2, units=False),
    "kl_bwd": _Kernel(f32_rows=None, num_stages=1, units=True),
}


class Plan(NamedTuple):
    """The resolved settings of one call (a static argument of the jitted wrappers)."""

    interpret: bool
    block_q: int  # BQ: query tokens per tile
    t_chunk: int  # query tokens per kernel call
    n_chunks: int
    n_tiles: int  # static bound on the tiles of one row and chunk
    tiles_per_program: int  # 1 but for the main forward
    tiles_per_unit: int  # 0 for the kernels without units (the forward kernels)
    n_units: int  # static bound on the units of one row and chunk (0: no units)
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KVOuterConfig:
    """Tuning options of the KV-outer kernels; None = the default of the call (`resolve`).

    block_q: query tokens per tile (a power of two; M = block_q * G_pad MMA rows). Default
      128 // G_pad, shrunk for short T, never below 16 // G_pad; float32 inputs: 64 // G_pad (main
      forward), 32 // G_pad (main backward), half the default (KL); the backward kernels divide it
      by block_size / 128 for blocks over 128 keys (shared memory; they take blocks up to 256).
    query_chunk: query tokens per kernel call (the per-slot partial buffer holds one chunk). Default:
      the largest balanced chunk whose partial buffer has <= 2**30 elements.
    tiles_per_unit: backward kernels, tiles one program handles for one KV block (default 16).
    tiles_per_program: main forward, consecutive tiles one program handles in a loop (default 1), so
      that Triton can pipeline the next tile's loads behind the current matmuls.
    num_warps, num_stages: Triton compiler parameters (default 8 warps for M >= 128 or blocks over
      128 keys, else 4; 2 stages for the forward kernels, 1 for the backward kernels).
    """

    block_q: int | None = None
    query_chunk: int | None = None
    tiles_per_unit: int | None = None
    tiles_per_program: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if self.block_q is not None:
            check_pow2("block_q", self.block_q)
        for name in ("query_chunk", "tiles_per_unit", "tiles_per_program", "num_warps", "num_stages"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)

    def resolve(self, kernel: str, sz: Sizes, *, f32: bool, width: int | None = None,
                interpret: bool | None = None) -> Plan:
        """The settings of one call of `kernel` ("fwd", "bwd", "kl_fwd", "kl_bwd") on inputs of sizes
        `sz` (f32: float32 inputs); width: columns of its per-slot partial rows (default D_pad). On
        the Triton path (interpret False) also checks the GPU limits."""
        spec = _KERNELS[kernel]
        interpret = interpret_mode(interpret)
        width = sz.D_pad if width is None else width
        bq = self.block_q
        if bq is None:
            bq = default_block_q(sz.T, sz.G_pad)
            if f32 and spec.f32_rows is not None:
                bq = default_block_q(sz.T, sz.G_pad, spec.f32_rows)
            elif f32:
                bq = max(max(1, MIN_DOT // sz.G_pad), bq // 2)
            if spec.units and sz.kv_tile > KV_TILE:
                # the backward kernels' [M, kv_tile] tiles and [kv_tile, D] accumulators: at block 256 and M = 128
                # the fused KL backward needs 228 KiB of shared memory (Triton for sm_90, experiments/kernel_smem.py),
                # at M = 64 162 KiB; with index rows over 64 wide (D_idx 128) it needs M = 32 (260 -> 204 KiB)
                shrink = sz.kv_tile // KV_TILE * (2 if kernel == "kl_bwd" and width > 64 else 1)
                bq = max(max(1, MIN_DOT // sz.G_pad), bq // shrink)
        if self.query_chunk is None:
            t_chunk = default_chunk(sz.T, sz.BH, sz.top_k, sz.n_blocks, bq, sz.G_pad, max(sz.D_pad, width))
            if t_chunk < 1:
                raise ValueError(
                    f"no query chunk fits {PARTIAL_ELEMENTS} partial elements (B*H_kv={sz.BH}, "
                    f"n_blocks={sz.n_blocks}, block_q={bq}): split the batch"
                )
        else:
            t_chunk = min(self.query_chunk, sz.T)
        nt = (self.tiles_per_program or 1) if kernel == "fwd" else 1
        n_t = n_tiles(t_chunk, sz.top_k, sz.n_blocks, bq, nt)
        w = (self.tiles_per_unit or TILES_PER_UNIT) if spec.units else 0
        n_u = n_units(n_t, sz.n_blocks, w) if spec.units else 0
        M = bq * sz.G_pad
        if not interpret:
            elems = {
                "per-slot partials": sz.BH * n_t * bq * sz.G_pad * width,
                "q chunk": sz.BH * t_chunk * sz.G_pad * sz.D_pad,
                "k": sz.BH * sz.T_kv_pad * sz.D_pad,
                "unit partials": sz.BH * n_u * sz.kv_tile * width,
            }
            name, n = max(elems.items(), key=lambda item: item[1])
            if n >= INT32_LIMIT:
                raise ValueError(
                    f"{name}: {n} elements in one operand, but the Triton kernel indexes with int32 offsets "
                    "(< 2**31): use a smaller query_chunk or split the batch"
                )
            if not is_pow2(sz.block_size):
                raise ValueError(f"block_size: the Triton kernel needs a power of two, got {sz.block_size}")
            if M < MIN_DOT:
                raise ValueError(f"block_q * G_pad = {bq} * {sz.G_pad} < {MIN_DOT}: Triton dots need >= 16 rows")
            if spec.units and sz.kv_tile > MAX_BWD_KV_TILE:
                raise ValueError(
                    f"block_size {sz.block_size}: the backward kernels hold a whole K/V block in shared memory "
                    f"(227 KiB on an H100 / H200), which fits up to block_size {MAX_BWD_KV_TILE}"
                )
        return Plan(
            interpret=interpret, block_q=bq, t_chunk=t_chunk, n_chunks=cdiv(sz.T, t_chunk), n_tiles=n_t,
            tiles_per_program=nt, tiles_per_unit=w, n_units=n_u,
            # 8 warps also for the smaller M of big blocks: their [kv_tile, D] accumulators spill less
            num_warps=self.num_warps or (8 if M >= 128 or sz.kv_tile > KV_TILE else 4),
            num_stages=self.num_stages or spec.num_stages,
        )


# -------------------------------------------------------------------------------- reverse index


def check_attention(q, k, v, block_idx, block_size, q_pos, dtypes) -> Sizes:
    """The main branch's operand checks (ValueError), then `sizes`: q, k, v of one dtype in `dtypes`,
    block_idx for q's tokens, block_size >= 1, q_pos [B, T] when given."""
    check_qkv(q, k, v, dtypes=dtypes, cached=q_pos is not None)
    check_block_idx(block_idx, k, n_queries=q.shape[1])
    check_int("block_size", block_size, 1)
    if q_pos is not None:
        check_q_pos(q_pos, *q.shape[:2])
    return sizes(q, k, block_idx, block_size)


def positions(q_pos, B: int, T: int) -> jax.Array:
    """int32 [B, T]: the queries' positions (q_pos, -1 = padding query), or 0..T-1 without q_pos."""
    if q_pos is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return jnp.asarray(q_pos, jnp.int32)


def visible_blocks(pos: jax.Array, block_size: int, n_blocks: int, n_groups: int) -> jax.Array:
    """int32 [B, T, n_groups, n_blocks]: the selection of every block a query can see (ids 0 to
    p // block_size for a query at position p, then -1; a padding query, p = -1, keeps none): the
    full causal support of the dense warmup as a selection the sparse kernels take."""
    ids = jnp.arange(n_blocks, dtype=jnp.int32)
    ids = jnp.where(ids <= (pos // block_size)[..., None], ids, -1)
    return jnp.broadcast_to(ids[:, :, None, :], (*pos.shape, n_groups, n_blocks))


def clean_ids(block_idx: jax.Array, block_size: int, pos: jax.Array | None = None) -> jax.Array:
    """Ids outside [0, p // block_size] (p = the query's position, `positions`, default 0..T-1; a
    padding query keeps none) -> -1; sort each row; repeated ids -> -1."""
    ids = block_idx.astype(jnp.int32)
    if pos is None:
        pos = positions(None, *ids.shape[:2])
    local = jnp.where(pos >= 0, pos // block_size, -1)[:, :, None, None]
    ids = jnp.where((ids >= 0) & (ids <= local), ids, -1)
    ids = jnp.sort(ids, axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], -1)
    return jnp.where(dup, -1, ids)


def n_tiles(t_chunk: int, top_k: int, n_blocks: int, bq: int, nt: int = 1) -> int:
    """Static bound on the tiles of one row (every segment padded to a multiple of bq), rounded up
    to a multiple of nt (tiles per program)."""
    n_valid = t_chunk * min(top_k, n_blocks)
    n = max(1, -(-(n_valid + n_blocks * (bq - 1)) // bq))
    return -(-n // nt) * nt


def reverse_index(ids: jax.Array, *, n_blocks: int, bq: int, n_tiles: int):
    """ids [BH, Tc, top_k] (cleaned, -1 = none) -> tiles [BH, n_tiles], tok [BH, P], inv [BH, Tc, top_k]
    (P = n_tiles * bq). Per row one sort of the unique int32 keys c * N + pair (pair = i * top_k + s,
    N = Tc * top_k: a plain sort, no permutation operand), or a stable argsort of c when that key
    would overflow int32."""
    BH, Tc, top_k = ids.shape
    N = Tc * top_k
    P = n_tiles * bq
    combined_key = (n_blocks + 1) * N < INT32_LIMIT

    def row(x):
        c = x.reshape(N)
        ckey = jnp.where(c >= 0, c, n_blocks)  # invalid pairs sort last
        pair = jnp.arange(N, dtype=jnp.int32)
        if combined_key:
            key = jnp.sort(ckey * N + pair)
            perm, cs = key % N, key // N  # sorted pairs and their block ids
        else:
            perm = jnp.argsort(ckey, stable=True).astype(jnp.int32)  # pairs are token-major: sorted by i
            cs = ckey[perm]
        toks = perm // top_k  # sorted tokens
        counts = jnp.zeros((n_blocks + 1,), jnp.int32).at[ckey].add(1)
        ustart = jnp.cumsum(counts) - counts  # segment starts in the sorted list
        pcounts = (counts[:n_blocks] + bq - 1) // bq * bq
        pstart = jnp.cumsum(pcounts) - pcounts  # segment starts in the padded list
        valid = cs < n_blocks
        cc = jnp.minimum(cs, n_blocks - 1)
        pos = jnp.where(valid, pstart[cc] + pair - ustart[cc], -1)  # padded position
        tok = jnp.full((P,), -1, jnp.int32).at[jnp.where(valid, pos, P)].set(toks, mode="drop")
        first = valid & (pos % bq == 0)
        tiles = jnp.full((n_tiles,), -1, jnp.int32)
        tiles = tiles.at[jnp.where(first, pos // bq, n_tiles)].set(cs, mode="drop")
        inv = jnp.zeros((N,), jnp.int32).at[perm].set(pos, unique_indices=True)
        return tiles, tok, inv.reshape(Tc, top_k)

    return jax.vmap(row)(ids)


# ---------------------------------------------------------------------------------------- units


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


class ChunkIndex(NamedTuple):
    """Every query chunk's reverse index (and units), leading axis n_chunks (`chunk_index`)."""

    tiles: jax.Array  # [n_chunks, BH, n_tiles]
    tok: jax.Array  # [n_chunks, BH, P]
    inv: jax.Array  # [n_chunks, BH, t_chunk, top_k]
    unit_tab: jax.Array | None  # [n_chunks, BH, 3 * n_units] (kernels with units)
    ustart: jax.Array | None  # [n_chunks, BH, n_blocks + 1]


def chunk_index(ids: jax.Array, *, sz: Sizes, plan: Plan) -> ChunkIndex:
    """ids: cleaned [B, n_chunks * t_chunk, H_kv, top_k] -> the reverse index of every chunk, built in
    one batched call before the chunk loop (one sort for all chunks and rows: built per chunk inside
    the loop, its ~15 small XLA ops cost ~0.4 ms per chunk at 128K, latency rather than work)."""
    nc, B = plan.n_chunks, ids.shape[0]
    x = _split(ids, nc).reshape(nc * B, plan.t_chunk, *ids.shape[2:])
    tiles, tok, inv = reverse_index(rows(x, sz.H_kv), n_blocks=sz.n_blocks, bq=plan.block_q, n_tiles=plan.n_tiles)
    unit_tab = ustart = None
    if plan.n_units:
        unit_tab, ustart = units(tiles, n_blocks=sz.n_blocks, tiles_per_unit=plan.tiles_per_unit, n_units=plan.n_units)
    return jax.tree.map(lambda a: a.reshape(nc, sz.BH, *a.shape[1:]), ChunkIndex(tiles, tok, inv, unit_tab, ustart))


def read_unit(unit_ref, u, n_units: int):
    """Inside a kernel: (block id, first tile, tile count) of unit u from a `units` table row."""
    return unit_ref[u], unit_ref[n_units + u], unit_ref[2 * n_units + u]


def _reduce_kernel(ustart_ref, *refs, block_size: int, accumulate: bool):
    """One block c: sum its units' partials in unit order (accumulate: onto the running sums, which
    alias the outputs; a block without units is left as it is, unread and unwritten)."""
    n_in = len(refs) // (3 if accumulate else 2)
    ins, outs = refs[:n_in], refs[-n_in:]
    c = pl.program_id(0)
    u0, u1 = ustart_ref[c], ustart_ref[c + 1]
    shape = outs[0].shape

    def body(u, accs):
        return tuple(a + x[u, pl.ds(0, block_size), :] for a, x in zip(accs, ins))

    if not accumulate:
        accs = lax.fori_loop(u0, u1, body, tuple(jnp.zeros(shape, jnp.float32) for _ in ins))
        for o, a in zip(outs, accs):
            o[...] = a
        return

    @pl.when(u1 > u0)
    def _():
        accs = lax.fori_loop(u0, u1, body, tuple(r[...] for r in refs[n_in:2 * n_in]))
        for o, a in zip(outs, accs):
            o[...] = a


def reduce_units(ustart, parts, *, n_blocks: int, block_size: int, interpret: bool, accs=None):
    """ustart [BH, n_blocks + 1]; parts: float32 [BH, n_units, kv_tile, D] each -> [BH, n_blocks *
    block_size, D] each: per block, the sum of its units (a fixed order: deterministic). accs (same
    shapes as the outputs): add onto these running sums in place (the query chunks' loop: only the
    blocks with units are read and written)."""
    BH, U, kv_tile, D = parts[0].shape
    n = len(parts)
    out_spec = pl.BlockSpec((None, block_size, D), lambda c, bh: (bh, c, 0))
    extra = [] if accs is None else list(accs)
    return pl.pallas_call(
        functools.partial(_reduce_kernel, block_size=block_size, accumulate=accs is not None),
        grid=(n_blocks, BH),
        in_specs=[pl.BlockSpec((None, n_blocks + 1), lambda c, bh: (bh, 0))]
        + [pl.BlockSpec((None, U, kv_tile, D), lambda c, bh: (bh, 0, 0, 0)) for _ in parts]
        + [out_spec for _ in extra],
        out_specs=[out_spec for _ in parts],
        out_shape=[jax.ShapeDtypeStruct((BH, n_blocks * block_size, D), jnp.float32) for _ in parts],
        input_output_aliases={1 + n + i: i for i in range(len(extra))},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="msa_kv_outer_reduce_units" + ("_acc" if extra else ""),
    )(ustart, *parts, *extra)


# ------------------------------------------------------------------------- the KL's tile pieces


def head_sum(p, heads: int, rows: int, f32: bool):
    """[M, kv] float32 rows (token-major, `heads` rows per token) -> [rows, kv] float32: per token the
    sum of its rows (rows >= M / heads: 0), as a 0/1 matmul (a [M] -> [BQ, heads] reshape of a 2-d
    tile goes through shared memory, which the KL kernels lack). bfloat16 kernels: p goes in as two
    bfloat16 terms, hi + lo (~2^-17 relative, exact products, float32 sums); float32 kernels
    (f32): one IEEE float32 dot."""
    M = p.shape[0]
    sel = lax.broadcasted_iota(jnp.int32, (rows, M), 1) // heads == lax.broadcasted_iota(jnp.int32, (rows, M), 0)
    if f32:
        return plgpu.dot(sel.astype(jnp.float32), p, precision=lax.Precision.HIGHEST)
    hi = p.astype(jnp.bfloat16)
    lo = (p - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    sel = sel.astype(jnp.bfloat16)
    return plgpu.dot(sel, hi) + plgpu.dot(sel, lo)


class IndexTile(NamedTuple):
    """The KL's pieces of one tile of a units kernel (`index_grad_tile`)."""

    psum: jax.Array  # [R, kv_tile] float32: per token the sum of its heads' teacher P
    z: jax.Array  # [R, kv_tile] float32: the student's logits
    zmask: jax.Array  # [R, kv_tile] bool: keys in the token's support (rows >= BQ, padding: none)
    diq: jax.Array  # [R, Di_pad] float32: the tile's d iq rows
    dik: jax.Array  # [kv_tile, Di_pad] float32: the tile's d IK_c


def index_grad_tile(p, t, start, key_pos, ik, tok_ref, pos_ref, iq_ref, zlse_ref, w1_ref, w2_ref, *, bq: int,
                    heads: int, block_size: int, kv_tile: int, scale_idx: float, f32_sums: bool) -> IndexTile:
    """The index KL's gradient from tile t of a units kernel, given its rows' teacher P ([BQ * heads,
    kv_tile] float32, masked): per token (R = max(BQ, 16) rows: Triton dots need 16; rows >= BQ are
    empty) the student's logits z = iq ik^T * scale_idx and dz = w1 softmax_U(z) - w2 sum_h P_h (dz is
    linear in the heads), then d iq = dz ik * scale_idx and d IK_c = dz^T iq * scale_idx. The KL's
    own backward (`pallas.index_kl`) and the main backward with the KL fused in
    (`pallas.sparse_attention_bwd`) share it. zlse, w1, w2: per token the student's LSE over the
    support, g S and g / G (g the token's weight)."""
    R = max(bq, MIN_DOT)
    r_iota = lax.broadcasted_iota(jnp.int32, (R,), 0)
    r_tok = jnp.where(r_iota < bq, tok_ref[t * bq + jnp.minimum(r_iota, bq - 1)], -1)
    tok = jnp.maximum(r_tok, 0)
    iq = iq_ref[tok]  # [R, Di_pad]: one row per token
    prec = lax.Precision.HIGHEST if iq_ref.dtype == jnp.float32 else None
    z = plgpu.dot(iq, ik, trans_b=True, precision=prec) * scale_idx  # [R, kv_tile]
    zmask = (r_tok >= 0)[:, None] & (key_pos[None, :] <= pos_ref[tok][:, None])
    if kv_tile > block_size:  # 16-row K tile for block_size 8: drop the rows of block c + 1
        zmask = zmask & (key_pos < start + block_size)[None, :]
    psum = head_sum(p, heads, R, f32_sums)
    qz = jnp.exp(z - zlse_ref[tok][:, None])
    dz = jnp.where(zmask, w1_ref[tok][:, None] * qz - w2_ref[tok][:, None] * psum, 0.0).astype(iq.dtype)
    diq = plgpu.dot(dz, ik, precision=prec) * scale_idx
    dik = plgpu.dot(dz, iq, trans_a=True, precision=prec) * scale_idx
    return IndexTile(psum, z, zmask, diq, dik)


# -------------------------------------------------------------------------------------- combine


def slot_loop(top_k: int, body, carry, unroll: int = SLOT_UNROLL):
    """carry = body(s, carry) for s = 0 .. top_k - 1, in order. Unrolled for top_k <= unroll (MSA's
    16 slots: straight-line code); beyond, a loop over groups of `unroll` unrolled slots, so that a
    selection of every block (top_k = n_blocks, thousands at 1M tokens) compiles
    in bounded time (128 slots: a KL's lowering + compile 27 s -> 5 s in interpret mode).
    The same operations in the same order either way (beyond `unroll`, a compiler may contract a
    multiply-add differently: within an ulp of the unrolled sums; still the same bits run to run)."""
    n_groups = top_k // unroll if top_k > unroll else 0

    def group(g, c):
        for j in range(unroll):
            c = body(g * unroll + j, c)
        return c

    if n_groups:
        carry = lax.fori_loop(0, n_groups, group, carry)
    for s in range(n_groups * unroll, top_k):
        carry = body(s, carry)
    return carry


def _gather_slots_kernel(inv_ref, *refs, heads: int, top_k: int, weighted: bool):
    """A tile of tokens x `heads` rows: gather each token's slot partials (rows of its padded
    positions) and reduce them in slot order, in float32. weighted: softmax weights from the
    per-slot lse."""
    if weighted:
        part_ref, lse_ref, out_ref, lse_out_ref = refs
    else:
        part_ref, out_ref = refs
    M = out_ref.shape[0]
    m_iota = lax.broadcasted_iota(jnp.int32, (M,), 0)
    slot0 = (m_iota // heads) * top_k  # the row's token's first slot in the flat inv block
    head = m_iota % heads

    def slot_rows(s):
        pos = inv_ref[slot0 + s]  # [M]: gather of the row's padded position in slot s (-1: none)
        return pos >= 0, jnp.maximum(pos, 0) * heads + head

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    if not weighted:
        def add(s, acc):
            valid, r = slot_rows(s)
            return acc + jnp.where(valid[:, None], part_ref[r].astype(jnp.float32), 0.0)

        out_ref[...] = slot_loop(top_k, add, acc).astype(out_ref.dtype)
        return

    def row_max(s, m):  # the row's largest slot lse (cheap [M] gathers)
        valid, r = slot_rows(s)
        return jnp.maximum(m, jnp.where(valid, lse_ref[r], -jnp.inf))

    m = slot_loop(top_k, row_max, jnp.full((M,), -jnp.inf, jnp.float32))
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)

    def add(s, carry):
        den, acc = carry
        valid, r = slot_rows(s)
        w = jnp.where(valid, jnp.exp(lse_ref[r] - m_safe), 0.0)  # 0 for empty slots and lse = -inf
        return den + w, acc + w[:, None] * part_ref[r].astype(jnp.float32)

    den, acc = slot_loop(top_k, add, (jnp.zeros((M,), jnp.float32), acc))
    ok = den > 0.0
    den_safe = jnp.where(ok, den, 1.0)
    out_ref[...] = (acc / den_safe[:, None]).astype(out_ref.dtype)
    lse_out_ref[...] = jnp.where(ok, m_safe + jnp.log(den_safe), -jnp.inf)


def _gather_slots(part, lse_part, inv, *, G_pad: int, out_dtype, interpret: bool, rows: int | None = None,
                  num_warps: int | None = None):
    """The Pallas slot reduction behind `combine_outputs` (lse_part given) and `sum_slots` (None):
    grid (token tiles, BH), `rows` output rows per program (one [rows, D_pad] float32 accumulator).
    part [BH, P*G_pad, D_pad] -> out [BH, Tc, G_pad, D_pad] in out_dtype (+ lse float32 [BH, Tc,
    G_pad] when weighted)."""
    BH, Tc, top_k = inv.shape
    D_pad = part.shape[-1]
    # The interpreter's cost is per program: there, few large programs (same sums, same order).
    rows, num_warps = rows or (TARGET_ROWS if interpret else COMBINE_ROWS), num_warps or COMBINE_WARPS
    tb = max(1, rows // G_pad)
    Tc_pad = -(-Tc // tb) * tb
    inv_flat = jnp.pad(inv, [(0, 0), (0, Tc_pad - Tc), (0, 0)], constant_values=-1).reshape(BH, Tc_pad * top_k)
    M = tb * G_pad
    weighted = lse_part is not None
    full = lambda *shape: pl.BlockSpec((None, *shape), lambda t, bh: (bh,) + (0,) * len(shape))  # noqa: E731
    in_specs = [pl.BlockSpec((None, tb * top_k), lambda t, bh: (bh, t)), full(*part.shape[1:])]
    out_specs = [pl.BlockSpec((None, M, D_pad), lambda t, bh: (bh, t, 0))]
    out_shape = [jax.ShapeDtypeStruct((BH, Tc_pad * G_pad, D_pad), out_dtype)]
    args = [inv_flat, part]
    if weighted:
        in_specs.append(full(lse_part.shape[1]))
        out_specs.append(pl.BlockSpec((None, M), lambda t, bh: (bh, t)))
        out_shape.append(jax.ShapeDtypeStruct((BH, Tc_pad * G_pad), jnp.float32))
        args.append(lse_part)
    outs = pl.pallas_call(
        functools.partial(_gather_slots_kernel, heads=G_pad, top_k=top_k, weighted=weighted),
        grid=(Tc_pad // tb, BH),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"msa_kv_outer_{'combine' if weighted else 'sum'}_slots_g{G_pad}_k{top_k}",
    )(*args)
    out = outs[0].reshape(BH, Tc_pad, G_pad, D_pad)[:, :Tc]
    if not weighted:
        return out
    return out, outs[1].reshape(BH, Tc_pad, G_pad)[:, :Tc]


def combine_outputs(o_part, lse_part, inv, *, G_pad: int, out_dtype=jnp.float32, interpret: bool | None = None):
    """Per-slot attention partials o [BH, P*G_pad, D_pad], lse [BH, P*G_pad] + inv [BH, Tc, top_k] ->
    out [BH, Tc, G_pad, D_pad] in out_dtype, lse float32 [BH, Tc, G_pad]: lse = logsumexp over the
    slots, out = sum_s exp(lse_s - lse) o_s in float32, slots in order (a Pallas kernel: one pass over
    the partials, no float32 temporary)."""
    return _gather_slots(o_part, lse_part, inv, G_pad=G_pad, out_dtype=out_dtype,
                         interpret=interpret_mode(interpret))


def combine_scalars(sum_parts, lse_part, inv):
    """Per-position float32 partials [BH, P] + inv [BH, Tc, top_k] -> per token float32 [BH, Tc]: the
    slot sum of each of sum_parts, then the slot logsumexp of lse_part (-inf: no slot; lse_part None:
    the sums only), in slot order."""
    top_k = inv.shape[-1]
    n = len(sum_parts)
    with_lse = lse_part is not None

    def row(*args):
        *parts, inv_r = args
        if with_lse:
            *parts, z = parts
        valid = inv_r >= 0
        idx = jnp.maximum(inv_r, 0)
        if with_lse:
            zg = jnp.where(valid, z[idx], -jnp.inf)  # [Tc, top_k]
            zm = jnp.max(zg, axis=1)
            zm = jnp.where(jnp.isfinite(zm), zm, 0.0)
        def add(slot, sums):
            ok = valid[:, slot]
            terms = tuple(x[idx[:, slot]] for x in parts)
            if with_lse:
                terms += (jnp.exp(zg[:, slot] - zm),)
            return [acc + jnp.where(ok, x, 0.0) for acc, x in zip(sums, terms)]

        sums = slot_loop(top_k, add, [jnp.zeros(inv_r.shape[:1], jnp.float32) for _ in range(n + with_lse)])
        if not with_lse:
            return tuple(sums)
        zl = sums[-1]
        lse = jnp.where(zl > 0.0, zm + jnp.log(jnp.where(zl > 0.0, zl, 1.0)), -jnp.inf)
        return (*sums[:-1], lse)

    return jax.vmap(row)(*sum_parts, *([lse_part] if with_lse else []), inv)


def sum_slots(part, inv, *, G_pad: int, out_dtype=jnp.float32, interpret: bool | None = None):
    """part [BH, P*G_pad, D_pad], inv [BH, Tc, top_k] -> [BH, Tc, G_pad, D_pad] in out_dtype: per
    token the sum over its slots (in slot order, float32) of the rows its slots wrote (the Pallas
    kernel of `combine_outputs`, unweighted)."""
    return _gather_slots(part, None, inv, G_pad=G_pad, out_dtype=out_dtype, interpret=interpret_mode(interpret))


# -------------------------------------------------------------------------------------- layouts


def rows(x, n_groups: int, G_pad: int = 1, width: int | None = None, fill=0.0):
    """[B, T, H(, F)] -> [B*n_groups, T*G_pad(, width)]: per KV group, its rows token-major and
    head-minor (the H = n_groups * G heads padded to G_pad per group, F to width; padding = fill).
    G = 1, width None: per-group values [B, T, n_groups(, F)] -> [B*n_groups, T(, F)]."""
    B, T, H = x.shape[:3]
    G = H // n_groups
    tail = x.shape[3:]  # () or (F,)
    x = x.reshape(B, T, n_groups, G, *tail)
    pad = [(0, 0)] * 3 + [(0, G_pad - G)] + [(0, (width or f) - f) for f in tail]
    if any(hi for _, hi in pad):
        x = jnp.pad(x, pad, constant_values=fill)
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(B * n_groups, T * G_pad, *x.shape[4:])


def ungroup(x, B: int):
    """[B*H, T, ...] -> [B, T, H, ...]."""
    return jnp.moveaxis(x.reshape(B, -1, *x.shape[1:]), 1, 2)


def kv_layout(x, T_kv_pad: int, width: int):
    """Keys in the kernels' layout: [B, T, H, F] -> [B*H, T_kv_pad, width], [B, T, F] -> [B, T_kv_pad,
    width] (zero padding)."""
    T, F = x.shape[1], x.shape[-1]
    x = jnp.pad(x, [(0, 0), (0, T_kv_pad - T)] + [(0, 0)] * (x.ndim - 3) + [(0, width - F)])
    if x.ndim == 3:
        return x
    B, _, H, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * H, T_kv_pad, width)


# --------------------------------------------------------------------------------- query chunks


def pad_time(x, T_pad: int, fill=0):
    """Pad axis 1 (time) to T_pad."""
    return jnp.pad(x, [(0, 0), (0, T_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _split(x, n_chunks: int):
    """[B, n_chunks * t_chunk, ...] -> [n_chunks, B, t_chunk, ...]."""
    return x.reshape(x.shape[0], n_chunks, -1, *x.shape[2:]).swapaxes(0, 1)


def _join(x):
    """[n_chunks, B, t_chunk, ...] -> [B, n_chunks * t_chunk, ...]."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def map_chunks(fn, xs, n_chunks: int, t_chunk: int, index=None):
    """fn(*chunk, index_c) over the query chunks of xs ([B, n_chunks * t_chunk, ...] each; index_c =
    the chunk's slice of `index`, a pytree with a leading chunk axis): one call, or `lax.map` over
    the chunks; fn's outputs joined again along time."""
    if n_chunks == 1:
        return fn(*xs, jax.tree.map(lambda a: a[0], index))
    outs = lax.map(lambda a: fn(*a), (*(_split(x, n_chunks) for x in xs), index))
    return jax.tree.map(_join, outs)


def scan_chunks(fn, xs, n_chunks: int, t_chunk: int, zeros, index=None):
    """fn(*chunk, index_c, acc=sums) -> (per-token output(s), the sums with the chunk's per-key terms
    added) over the query chunks of xs (as `map_chunks`), in chunk order from `zeros` (`lax.scan`):
    fn adds its terms itself (e.g. `reduce_units(..., accs=acc)`, in place). Returns (per-token
    output(s) joined along time, sums)."""
    if n_chunks == 1:
        return fn(*xs, jax.tree.map(lambda a: a[0], index), acc=zeros)

    def step(acc, a):
        out, acc = fn(*a, acc=acc)
        return tuple(acc), out

    sums, out = lax.scan(step, zeros, (*(_split(x, n_chunks) for x in xs), index))
    return jax.tree.map(_join, out), sums
