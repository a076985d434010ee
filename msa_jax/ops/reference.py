"""The oracle: MSA written as plainly as possible, to be read next to docs/algorithm.md.

Every quantity is materialised with explicit masks ([T, T] per head, [T, n_blocks] per group), in
float32. That costs O(T^2) memory, so this module is for tests and small sizes only; `xla.py` is
the path that scales. Arguments are validated by `msa_jax.ops` before they reach here.

Shapes (see docs/design.md): q [B, T, H_q, D]; k, v [B, T, H_kv, D]; iq [B, T, H_kv, D_idx];
ik [B, T, D_idx]; block_idx int32 [B, T, H_kv, top_k], valid ids first, -1 padding after.
Queries at an offset (docs/algorithm.md §3.6): with `q_pos` int32 [B, S] the S queries (q, iq,
block_idx have S rows) sit at those positions against L keys (k, v, ik have L rows); a query at
position p sees the keys j <= p; q_pos = -1 is a padding query (no support). q_pos=None is
prefill: S = L = T and q_pos = arange(T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _num_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def _positions(S: int, q_pos) -> jax.Array:
    """Query positions [B|1, S]: q_pos, or arange(S) for prefill."""
    return jnp.arange(S)[None] if q_pos is None else q_pos


def _causal_mask(S: int, L: int, q_pos=None) -> jax.Array:
    """[B|1, S, L] bool: the query at position p sees key j iff j <= p."""
    return jnp.arange(L)[None, None, :] <= _positions(S, q_pos)[:, :, None]


def _group_queries(q: jax.Array, n_kv: int) -> jax.Array:
    """[B, T, H_q, D] -> [B, T, H_kv, G, D]: heads h = r * G + g belong to group r."""
    B, T, H_q, D = q.shape
    return q.reshape(B, T, n_kv, H_q // n_kv, D)


def index_scores(iq: jax.Array, ik: jax.Array, q_pos=None) -> jax.Array:
    """Token scores s[b, r, i, j] = <iq[i, r], ik[j]> / sqrt(D_idx), -inf where key j is not visible."""
    scale = iq.shape[-1] ** -0.5
    s = jnp.einsum("bird,bjd->brij", iq.astype(jnp.float32), ik.astype(jnp.float32)) * scale
    return jnp.where(_causal_mask(iq.shape[1], ik.shape[1], q_pos)[:, None], s, NEG_INF)


def block_scores(iq: jax.Array, ik: jax.Array, block_size: int, q_pos=None) -> jax.Array:
    """bs[b, r, i, blk] = max over visible tokens j of block blk of s[b, r, i, j] (-inf if none)."""
    s = index_scores(iq, ik, q_pos)
    B, R, S, L = s.shape
    nb = _num_blocks(L, block_size)
    s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, nb * block_size - L)), constant_values=NEG_INF)
    return s.reshape(B, R, S, nb, block_size).max(axis=-1)


def select_blocks(iq, ik, *, block_size: int, top_k: int, sink_blocks: int = 0, local_blocks: int = 1,
                  q_pos=None) -> jax.Array:
    """docs/algorithm.md §3, literally: rank the visible blocks of each (query, group), keep top_k.

    Ranking key, best first: the local blocks (the query's own block and the local_blocks - 1 before
    it; the paper: 1), then the sink blocks (ablation; lower id first), then the block score, then
    the lower block id (ties). A block is selected when it is visible (finite score, or forced) and
    fewer than top_k blocks rank above it.
    """
    bs = block_scores(iq, ik, block_size, q_pos)  # [B, R, S, nb]
    B, R, S, nb = bs.shape
    blk = jnp.arange(nb)
    local = (_positions(S, q_pos) // block_size)[:, None, :, None]  # [B|1, 1, S, 1] (-1: padding query)
    visible = blk <= local  # [B|1, 1, S, nb]; a block is visible iff it starts at or before the query
    # Priority classes: 2 = local block(s), 1 = sink block, 0 = ranked by score.
    prio = jnp.where(blk > local - local_blocks, 2, jnp.where(blk < sink_blocks, 1, 0))
    prio = jnp.where(visible, prio, -1)  # invisible blocks rank last and are never selected

    # outranks[..., a, c]: block a ranks above block c.
    pa, pc = prio[..., :, None], prio[..., None, :]
    sa, sc = bs[..., :, None], bs[..., None, :]
    ia, ic = blk[:, None], blk[None, :]
    score_wins = (pa == 0) & ((sa > sc) | ((sa == sc) & (ia < ic)))
    forced_wins = (pa > 0) & (ia < ic)  # among forced blocks (local ones, sinks): lower id first
    outranks = (pa > pc) | ((pa == pc) & (forced_wins | score_wins))
    rank = outranks.sum(axis=-2)  # [B, R, T, nb]: how many blocks rank above each block
    candidate = visible & ((prio > 0) | jnp.isfinite(bs))
    selected = candidate & (rank < top_k)  # [B, R, T, nb]

    # Output format: selected ids in ascending order, then -1 padding, width top_k.
    order_key = jnp.where(selected, blk, nb + blk)
    ids = jnp.argsort(order_key, axis=-1)[..., :top_k]
    ids = jnp.where(jnp.take_along_axis(selected, ids, axis=-1), ids, -1)
    if top_k > nb:
        ids = jnp.pad(ids, ((0, 0), (0, 0), (0, 0), (0, top_k - nb)), constant_values=-1)
    return ids.transpose(0, 2, 1, 3).astype(jnp.int32)  # [B, S, R, top_k]


def support_mask(block_idx: jax.Array | None, T: int, block_size: int, q_pos=None, L: int | None = None) -> jax.Array:
    """[B|1, R|1, T, L] bool: key j is in the support of query i for group r.

    With block_idx: j lies in one of the selected blocks and j is visible. With None: j is visible.
    Visible: j <= i (prefill, L = T) or j <= q_pos[b, i] (queries at an offset, L keys).
    """
    L = T if L is None else L
    causal = _causal_mask(T, L, q_pos)[:, None]  # [B|1, 1, T, L]
    if block_idx is None:
        return causal
    key_block = jnp.arange(L) // block_size  # [L]
    # in_sel[b, i, r, j]: block of key j is one of the ids block_idx[b, i, r, :]
    in_sel = (block_idx[..., None, :] == key_block[:, None]).any(axis=-1)  # [B, T, R, L]
    return in_sel.transpose(0, 2, 1, 3) & causal


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to mask; rows with an empty mask give all zeros."""
    logits = jnp.where(mask, logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def _head_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Main-branch attention probabilities [B, R, G, T, L] over the support mask [B|1, R|1, T, L]."""
    n_kv = k.shape[2]
    qg = _group_queries(q.astype(jnp.float32), n_kv)  # [B, T, R, G, D]
    logits = jnp.einsum("birgd,bjrd->brgij", qg, k.astype(jnp.float32)) * q.shape[-1] ** -0.5
    return _masked_softmax(logits, mask[:, :, None])


def _attend(q, k, v, mask):
    p = _head_probs(q, k, mask)  # [B, R, G, T, L]
    out = jnp.einsum("brgij,bjrd->birgd", p, v.astype(jnp.float32))
    B, T, H_q, D = q.shape
    return out.reshape(B, T, H_q, D).astype(q.dtype)


def _lse(q, k, mask):
    """Natural log of the softmax denominator over the support, float32 [B, T, H_q] (-inf: empty)."""
    n_kv = k.shape[2]
    qg = _group_queries(q.astype(jnp.float32), n_kv)
    logits = jnp.einsum("birgd,bjrd->brgij", qg, k.astype(jnp.float32)) * q.shape[-1] ** -0.5
    lse = jax.nn.logsumexp(jnp.where(mask[:, :, None], logits, NEG_INF), axis=-1)  # [B, R, G, T]
    B, T, H_q, _ = q.shape
    return lse.transpose(0, 3, 1, 2).reshape(B, T, H_q)


def sparse_attention(q, k, v, block_idx, *, block_size: int, return_lse: bool = False, q_pos=None):
    """docs/algorithm.md §4: exact softmax attention over the tokens of the selected blocks, j <= i.

    return_lse: also return the log-sum-exp of the logits over the support (the KL's teacher
    normaliser, docs/algorithm.md §6.1)."""
    mask = support_mask(block_idx, q.shape[1], block_size, q_pos, k.shape[1])
    out = _attend(q, k, v, mask)
    return (out, _lse(q, k, mask)) if return_lse else out


def dense_attention(q, k, v, *, return_lse: bool = False, q_pos=None):
    """Causal GQA softmax attention (return_lse: and its log-sum-exp, as `sparse_attention`)."""
    mask = support_mask(None, q.shape[1], 1, q_pos, k.shape[1])
    out = _attend(q, k, v, mask)
    return (out, _lse(q, k, mask)) if return_lse else out


def index_kl_loss(q, k, iq, ik, block_idx, *, block_size: int, lse=None, q_pos=None) -> jax.Array:
    """docs/algorithm.md §6.1: mean over (b, i, r) of KL(teacher || student) on the support U.

    lse (the main branch's normaliser) is accepted for a uniform signature and not needed here.
    q_pos [B, S]: queries at an offset against L keys (§3.6); the mean is over real queries
    (q_pos >= 0).

    Teacher: the group's heads softmaxed separately over U and averaged as probabilities, with
    stop_gradient. Student: softmax over U of the index scores.
    """
    S, L = q.shape[1], k.shape[1]
    mask = support_mask(block_idx, S, block_size, q_pos=q_pos, L=L)  # [B|1, R, S, L]
    teacher = _head_probs(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), mask).mean(axis=2)
    s = index_scores(iq, ik, q_pos)  # [B, R, S, L]
    log_student = jax.nn.log_softmax(jnp.where(mask, s, NEG_INF), axis=-1)
    log_teacher = jnp.log(jnp.where(teacher > 0, teacher, 1.0))
    kl = jnp.where(teacher > 0, teacher * (log_teacher - jnp.where(mask, log_student, 0.0)), 0.0).sum(-1)
    if q_pos is None:
        return kl.mean()
    real = jnp.broadcast_to((q_pos >= 0)[:, None, :], kl.shape)
    return jnp.where(real, kl, 0.0).sum() / jnp.maximum(real.sum(), 1)


def block_mass(q, k, block_size: int, q_pos=None) -> jax.Array:
    """mass[b, r, i, blk]: the dense causal attention probability of query i on the keys of block blk,
    averaged over the heads of group r (docs/algorithm.md §6.4: what the selection is scored against)."""
    S, L = q.shape[1], k.shape[1]
    nb = _num_blocks(L, block_size)
    probs = _head_probs(q, k, support_mask(None, S, 1, q_pos=q_pos, L=L)).mean(axis=2)  # [B, R, S, L]
    probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, nb * block_size - L)))
    return probs.reshape(*probs.shape[:3], nb, block_size).sum(-1)


def selection_recall(q, k, block_idx, *, block_size: int, top_k: int, q_pos=None):
    """docs/algorithm.md §6.4: block and score recall of block_idx against the top blocks by mass.

    I* = the min(top_k, visible) blocks with the most dense causal attention mass (heads of the
    group averaged; ties to the lower id). Averaged over (b, i, r) for queries that see more than
    top_k blocks (project choice: for the others every selection is complete, recall is 1).
    Returns (1.0, 1.0) when no query sees more than top_k blocks.
    """
    S, L = q.shape[1], k.shape[1]
    nb = _num_blocks(L, block_size)
    mass = block_mass(q, k, block_size, q_pos)  # [B, R, S, nb]

    blk = jnp.arange(nb)
    pos = _positions(S, q_pos)  # [B|1, S]
    n_visible = jnp.where(pos >= 0, pos // block_size + 1, 0)[:, None, :]  # [B|1, 1, S]
    visible = blk < n_visible[..., None]  # [B|1, 1, S, nb]
    key = jnp.where(visible, mass, -1.0)  # invisible blocks rank last
    ka, kc = key[..., :, None], key[..., None, :]
    outranks = (ka > kc) | ((ka == kc) & (blk[:, None] < blk[None, :]))
    rank = outranks.sum(axis=-2)
    best = visible & (rank < top_k)  # I*: [B, R, T, nb]

    chosen = (block_idx[..., None] == blk).any(axis=-2).transpose(0, 2, 1, 3)  # I^: [B, R, T, nb]
    hit = best & chosen
    block_recall = hit.sum(-1) / best.sum(-1)
    score_recall = jnp.where(hit, mass, 0.0).sum(-1) / jnp.where(best, mass, 0.0).sum(-1)

    counted = jnp.broadcast_to(n_visible > top_k, block_recall.shape)  # padding queries see none
    n = counted.sum()
    mean = lambda x: jnp.where(n > 0, jnp.where(counted, x, 0.0).sum() / jnp.maximum(n, 1), 1.0)
    return mean(block_recall), mean(score_recall)
