"""MSA in pure JAX with memory linear in T: the default path on CPU and the kernels' fallback.

Queries are processed in chunks of C positions with `lax.map` (a scan: no Python loop over T).
Per chunk the largest tensor is [B, C, heads, T] (a bounded slice of the score matrix), or, for
the sparse main branch at long T, the gathered keys of the selected blocks [B, C, H_kv, top_k *
block_size, D]. Each chunk body is wrapped in `jax.checkpoint`, so `grad` keeps only the inputs
and recomputes the chunk instead of storing its intermediates for every chunk.

Accumulation is in float32; outputs come back in the caller's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# Largest per-chunk intermediate, in elements: ~128 MiB of float32 on CPU, ~1 GiB on an
# accelerator (fewer, larger chunks keep it busy). The chunk length is the largest power of two
# that keeps the biggest [C, ...] tensor under it.
CHUNK_BUDGET = {"cpu": 1 << 25}
DEFAULT_BUDGET = 1 << 28
MAX_CHUNK = 1024
# Queries at an offset that are a slice of S of the L positions (a context-parallel device's
# share, a prefill chunk) get an S/L share of the chunk length, so the slices of one sequence
# use no more scratch together than one pass over it; but no less than this many queries.
MIN_SLICE_CHUNK = 128


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _chunk_len(T: int, L: int, per_query: int, q_chunk: int | None) -> int:
    """Query chunk length for T queries against L keys whose largest intermediate holds
    `per_query` elements per query."""
    if q_chunk is not None:
        return q_chunk
    budget = CHUNK_BUDGET.get(jax.default_backend(), DEFAULT_BUDGET)
    c = min(_pow2_floor(budget // max(per_query, 1)), MAX_CHUNK)
    if L > T:
        c = min(c, max(_pow2_floor(c * T // L), MIN_SLICE_CHUNK))
    return max(1, min(c, 1 << (T - 1).bit_length()))  # no longer than T rounded up to a power of 2


def _num_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def _pad_time(x, length: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _map_chunks(body, T: int, C: int, *xs, q_pos=None):
    """Apply body(q_pos [B|1, C], *chunks) to consecutive query chunks of xs (time on axis 1).

    q_pos: the queries' positions [B, T] (queries at an offset; -1 = padding query), or None for
    prefill (positions = query index, shared by the batch). Returns body's outputs stacked on a
    leading chunk axis. Inputs are padded to a multiple of C (block_idx and q_pos with -1); padded
    rows' outputs must be dropped (prefill: their positions are >= T).
    """
    n = -(-T // C)

    def split(x):
        x = _pad_time(x, n * C, -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0)
        return jnp.moveaxis(x.reshape(x.shape[0], n, C, *x.shape[2:]), 1, 0)

    chunks = tuple(map(split, xs))
    if q_pos is None:
        pos = (jnp.arange(n, dtype=jnp.int32)[:, None] * C + jnp.arange(C, dtype=jnp.int32))[:, None, :]
    else:
        pos = split(q_pos.astype(jnp.int32))  # [n, B, C]
    if n == 1:  # one chunk: no loop and no rematerialisation needed, memory is bounded already
        return jax.tree.map(lambda y: y[None], body(pos[0], *(x[0] for x in chunks)))
    return jax.lax.map(jax.checkpoint(lambda args: body(*args)), (pos, *chunks))


def _unchunk(y, T: int):
    """[n, B, C, ...] -> [B, T, ...]."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :T]


def _blocks(x, block_size: int):
    """[B, T, ...] -> [B, n_blocks, block_size, ...] (the last block zero-padded)."""
    nb = _num_blocks(x.shape[1], block_size)
    x = _pad_time(x, nb * block_size)
    return x.reshape(x.shape[0], nb, block_size, *x.shape[2:])


def _gather_blocks(x_blocks, ids):
    """Gather the selected blocks of x for every (query, group).

    x_blocks [B, nb, bs, R, D] (per-group keys) or [B, nb, bs, D] (shared index keys);
    ids [B, C, R, K] (-1 allowed, clamped; mask separately) -> [B, C, R, K * bs, D].
    """
    B, C, R, K = ids.shape
    b = jnp.arange(B)[:, None, None, None]
    ids = jnp.maximum(ids, 0)
    if x_blocks.ndim == 5:
        r = jnp.arange(R)[None, None, :, None]
        out = x_blocks.transpose(0, 3, 1, 2, 4)[b, r, ids]  # [B, C, R, K, bs, D]
    else:
        out = x_blocks[b, ids]  # [B, C, R, K, bs, D]
    return out.reshape(B, C, R, K * x_blocks.shape[2], x_blocks.shape[-1])


def _support(ids, q_pos, block_size: int):
    """Key positions [B, C, R, K*bs] of the selected blocks and their validity (q_pos [B|1, C]).

    A key is in the support when its slot holds a valid id seen for the first time (duplicate
    ids count once), and it is causal (pos <= q_pos, which also excludes padding past T).
    """
    K = ids.shape[-1]
    earlier = jnp.arange(K)[:, None] > jnp.arange(K)[None, :]  # [s, t]: t comes before s
    dup = ((ids[..., :, None] == ids[..., None, :]) & earlier).any(-1)
    slot_ok = (ids >= 0) & ~dup
    pos = ids[..., None] * block_size + jnp.arange(block_size)  # [B, C, R, K, bs]
    ok = slot_ok[..., None] & (pos <= q_pos[:, :, None, None, None])
    return pos.reshape(*ids.shape[:-1], -1), ok.reshape(*ids.shape[:-1], -1)


def _softmax(logits, mask):
    """Masked softmax over the last axis in float32; empty rows give zeros. Also returns log p."""
    logits = jnp.where(mask, logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = e.sum(-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    logp = jnp.where(mask, logits - m - jnp.log(safe), 0.0)
    return e / safe, logp


def _group(q, n_kv: int):
    B, C, H_q, D = q.shape
    return q.reshape(B, C, n_kv, H_q // n_kv, D)


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _f32_shared(x):
    """A key-side array that every query chunk reads, held in float32 (each chunk casts it back).

    Its gradient is a sum over all queries (chunk after chunk, and over the queries of a block
    gather's scatter-add); with a 16-bit array that sum would run in 16 bits, and a key that many
    queries attend to (the local block, a sink) loses most of its contributions: on an H100 at
    T = 32K the bf16 d ik of the gather path was 23% off. Float32 costs one extra copy of k, v, ik.
    """
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


# ----------------------------------------------------------------------------- index branch


def dequantize_index_keys(ik, scale=None, block_size: int | None = None, dtype=jnp.float32):
    """Index keys as the selection sees them: ik itself (scale None), or ik * scale with a float32
    scale per token [B, L] or per block [B, ceil(L / block_size)] (an fp8 index-key cache)."""
    if scale is None:
        return ik.astype(dtype)
    scale = scale.astype(jnp.float32)
    if scale.shape[1] != ik.shape[1]:  # per block
        scale = jnp.repeat(scale, block_size, axis=1)[:, : ik.shape[1]]
    return (ik.astype(jnp.float32) * scale[..., None]).astype(dtype)



def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0, local_blocks: int = 1,
                  q_chunk: int | None = None, q_pos=None):
    B, T, R, Di = iq.shape
    nb = _num_blocks(ik.shape[1], block_size)
    kk = min(top_k, nb)
    ik_pad = _pad_time(ik, nb * block_size)
    C = _chunk_len(T, ik.shape[1], B * R * nb * block_size, q_chunk)
    forced_sink = jnp.finfo(jnp.float32).max  # sinks rank above any score, below the local block

    def body(q_pos, iq_c):  # q_pos [B|1, C]
        s = _mm("bcrd,bjd->brcj", iq_c, ik_pad) * Di**-0.5  # [B, R, C, nb*bs]
        s = jnp.where(jnp.arange(nb * block_size) <= q_pos[:, None, :, None], s, NEG_INF)
        bs = s.reshape(B, R, C, nb, block_size).max(-1)  # block max: exp-free scores
        blk = jnp.arange(nb)
        local = (q_pos // block_size)[:, None, :, None]  # -1 for a padding query: nothing visible
        key = jnp.where(blk < jnp.minimum(sink_blocks, local + 1), forced_sink, bs)
        key = jnp.where((blk <= local) & (blk > local - local_blocks), jnp.inf, key)  # the local block(s)
        vals, ids = jax.lax.top_k(key, kk)  # stable: ties go to the lower block id
        ids = jnp.where(vals > NEG_INF, ids, -1)
        return ids.transpose(0, 2, 1, 3)  # [B, C, R, kk]

    ids = _unchunk(_map_chunks(body, T, C, iq, q_pos=q_pos), T)
    if top_k > kk:
        ids = jnp.pad(ids, ((0, 0), (0, 0), (0, 0), (0, top_k - kk)), constant_values=-1)
    return ids.astype(jnp.int32)


# ----------------------------------------------------------------------------- main branch
#
# Two ways to restrict a chunk's queries to their selected blocks, same result:
#   "gather": copy the top_k selected blocks per (query, group), attend over top_k * block_size
#             keys. Work O(T * top_k * block_size); but its gradient is a scatter-add per
#             (query, block), which accelerators serialise.
#   "mask":   attend over all T keys with the selection as a mask. Work O(T^2) like dense, but
#             plain matmuls forward and backward. Faster while T is a few times top_k * block_size.
MASK_FACTOR = 4  # "mask" when T <= MASK_FACTOR * top_k * block_size


def _strategy(T: int, top_k: int, block_size: int, strategy: str | None) -> str:
    if strategy is None:
        return "mask" if T <= MASK_FACTOR * top_k * block_size else "gather"
    if strategy not in ("mask", "gather"):
        raise ValueError(f"strategy: expected 'mask' or 'gather', got {strategy!r}")
    return strategy


def _key_mask(ids, q_pos, T: int, block_size: int):
    """[B, C, R, T] bool: key j is causal for the query (q_pos [B|1, C]) and (ids given) lies in a
    selected block."""
    causal = jnp.arange(T) <= q_pos[:, :, None, None]
    if ids is None:
        return causal
    nb = _num_blocks(T, block_size)
    selected = (ids[..., None] == jnp.arange(nb)).any(-2)  # [B, C, R, nb]; -1 and duplicates drop out
    return causal & selected[..., jnp.arange(T) // block_size]


def _attend(q_c, keys, values, mask, per_query_keys: bool, return_lse: bool = False):
    """Softmax attention of a query chunk [B, C, H_q, D] over keys [B, T, R, D] (shared by the
    chunk) or [B, C, R, S, D] (per query); mask [B|1, C, R, S|T]. Returns [B, C, H_q, D] (and the
    float32 log-sum-exp [B, C, H_q] of the logits over the mask, -inf where it is empty)."""
    B, C, H_q, D = q_c.shape
    R = keys.shape[2]
    spec = "bcrsd" if per_query_keys else "bsrd"
    logits = _mm(f"bcrgd,{spec}->bcrgs", _group(q_c, R), keys) * D**-0.5
    p, _ = _softmax(logits, mask[:, :, :, None])
    out = _mm(f"bcrgs,{spec}->bcrgd", p.astype(values.dtype), values)
    out = out.reshape(B, C, H_q, D).astype(q_c.dtype)
    if not return_lse:
        return out
    lse = jax.nn.logsumexp(jnp.where(mask[:, :, :, None], logits, NEG_INF), axis=-1)
    return out, lse.reshape(B, C, H_q)


def sparse_attention(q, k, v, block_idx, *, block_size: int, q_chunk: int | None = None, strategy: str | None = None,
                     return_lse: bool = False, q_pos=None):
    B, T, H_q, D = q.shape
    L, R, K = k.shape[1], k.shape[2], block_idx.shape[-1]
    dt = k.dtype
    if q_pos is None:  # training: gradients of shared keys sum in float32 (not needed for a cache)
        k, v = _f32_shared(k), _f32_shared(v)
    if _strategy(L, K, block_size, strategy) == "mask":
        C = _chunk_len(T, L, B * H_q * L, q_chunk)

        def body(q_pos, q_c, ids):
            return _attend(q_c, k.astype(dt), v.astype(dt), _key_mask(ids, q_pos, L, block_size), False, return_lse)
    else:
        kb, vb = _blocks(k, block_size), _blocks(v, block_size)
        C = _chunk_len(T, L, B * R * K * block_size * (2 * D + H_q // R), q_chunk)

        def body(q_pos, q_c, ids):
            _, ok = _support(ids, q_pos, block_size)
            keys, values = _gather_blocks(kb, ids).astype(dt), _gather_blocks(vb, ids).astype(dt)
            return _attend(q_c, keys, values, ok, True, return_lse)

    return jax.tree.map(lambda y: _unchunk(y, T), _map_chunks(body, T, C, q, block_idx, q_pos=q_pos))


def dense_attention(q, k, v, *, return_lse: bool = False, q_chunk: int | None = None, q_pos=None):
    B, T, H_q, D = q.shape
    L = k.shape[1]
    C = _chunk_len(T, L, B * H_q * L, q_chunk)
    dt = k.dtype
    if q_pos is None:
        k, v = _f32_shared(k), _f32_shared(v)
    body = lambda q_pos, q_c: _attend(q_c, k.astype(dt), v.astype(dt), _key_mask(None, q_pos, L, 1), False,  # noqa: E731
                                      return_lse)
    return jax.tree.map(lambda y: _unchunk(y, T), _map_chunks(body, T, C, q, q_pos=q_pos))


# ----------------------------------------------------------------------------- training signals


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int, lse=None, q_chunk: int | None = None,
                  strategy: str | None = None, q_pos=None):
    del lse  # the teacher is recomputed per chunk; its normaliser comes with it
    B, S, H_q, D = q.shape
    L, R, Di = k.shape[1], k.shape[2], iq.shape[-1]
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)  # the teacher is detached
    dt = ik.dtype
    ik = _f32_shared(ik)  # d ik sums over every query that selects the key: in float32

    def kl(teacher_logits, student_logits, mask, q_pos):
        teacher, _ = _softmax(teacher_logits, mask[:, :, :, None])
        teacher = teacher.mean(3)  # heads softmaxed separately, averaged as probabilities
        _, log_student = _softmax(student_logits, mask)
        log_teacher = jnp.log(jnp.where(teacher > 0, teacher, 1.0))
        per_query = jnp.where(teacher > 0, teacher * (log_teacher - log_student), 0.0).sum(-1)
        return jnp.where((q_pos[:, :, None] < L) & (q_pos[:, :, None] >= 0), per_query, 0.0).sum()

    K = 1 if block_idx is None else block_idx.shape[-1]
    if block_idx is None or _strategy(L, K, block_size, strategy) == "mask":
        # All keys, masked: the full causal support (dense warmup) or the selected blocks.
        C = _chunk_len(S, L, B * L * (H_q + R), q_chunk)

        def body(q_pos, q_c, iq_c, ids=None):
            mask = _key_mask(ids, q_pos, L, block_size)
            t_logits = _mm("bcrgd,bjrd->bcrgj", _group(q_c, R), k) * D**-0.5
            s_logits = _mm("bcrd,bjd->bcrj", iq_c, ik.astype(dt)) * Di**-0.5
            return kl(t_logits, s_logits, mask, q_pos)
    else:
        kb, ikb = _blocks(k, block_size), _blocks(ik, block_size)
        C = _chunk_len(S, L, B * R * K * block_size * (D + Di + H_q // R), q_chunk)

        def body(q_pos, q_c, iq_c, ids):
            _, ok = _support(ids, q_pos, block_size)
            t_logits = _mm("bcrgd,bcrsd->bcrgs", _group(q_c, R), _gather_blocks(kb, ids)) * D**-0.5
            s_logits = _mm("bcrd,bcrsd->bcrs", iq_c, _gather_blocks(ikb, ids).astype(dt)) * Di**-0.5
            return kl(t_logits, s_logits, ok, q_pos)

    xs = (q, iq) if block_idx is None else (q, iq, block_idx)
    n_real = B * S if q_pos is None else jnp.maximum((q_pos >= 0).sum(), 1)  # mean over real queries
    return _map_chunks(body, S, C, *xs, q_pos=q_pos).sum() / (n_real * R)


def selection_recall(q, k, block_idx, *, block_size: int, top_k: int, q_chunk: int | None = None,
                     q_pos=None):
    B, S, H_q, D = q.shape
    L, R = k.shape[1], k.shape[2]
    nb = _num_blocks(L, block_size)
    kk = min(top_k, nb)
    k_pad = _pad_time(k, nb * block_size)
    C = _chunk_len(S, L, B * H_q * nb * block_size, q_chunk)

    def body(q_pos, q_c, ids):
        logits = _mm("bcrgd,bjrd->bcrgj", _group(q_c, R), k_pad) * D**-0.5
        p, _ = _softmax(logits, jnp.arange(nb * block_size) <= q_pos[:, :, None, None, None])
        mass = p.mean(3).reshape(B, C, R, nb, block_size).sum(-1)  # [B, C, R, nb]
        visible = jnp.arange(nb) <= (q_pos // block_size)[:, :, None, None]
        best_mass, best = jax.lax.top_k(jnp.where(visible, mass, -1.0), kk)  # I*, ties to lower id
        in_best = best_mass >= 0  # fewer than kk visible blocks: the rest are padding
        hit = in_best & (best[..., :, None] == ids[..., None, :]).any(-1)
        block_recall = hit.sum(-1) / in_best.sum(-1)
        score_recall = jnp.where(hit, best_mass, 0.0).sum(-1) / jnp.where(in_best, best_mass, 0.0).sum(-1)
        counted = ((q_pos // block_size + 1 > top_k) & (q_pos < L) & (q_pos >= 0))[:, :, None]
        total = lambda x: jnp.where(counted, x, 0.0).sum()
        return total(block_recall), total(score_recall), jnp.broadcast_to(counted, block_recall.shape).sum()

    br, sr, n = (x.sum() for x in _map_chunks(body, S, C, q, block_idx, q_pos=q_pos))
    mean = lambda x: jnp.where(n > 0, x / jnp.maximum(n, 1), 1.0)
    return mean(br), mean(sr)
