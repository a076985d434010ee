"""Shared test suite for `msa_jax.ops`.

Two kinds of checks:

* against independent computations written here, literally from docs/algorithm.md (numpy, float64,
  python loops over query / group on tiny shapes): run for every backend, the oracle
  ``impl="reference"`` included (``ALL_IMPLS``);
* against the oracle ``impl="reference"``: run for every concrete backend (``ops.IMPLS``).

Head mapping convention: query head ``h`` belongs to GQA group ``h // G`` (as ``jnp.repeat`` of the
KV heads, and ``jax.nn.dot_product_attention``).

Block-id sets are compared as sets (the order of the valid ids is unspecified).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_jax import ops

IMPLS = tuple(ops.IMPLS)
ALL_IMPLS = ("reference",) + tuple(i for i in IMPLS if i != "reference")
DTYPES = (jnp.float32, jnp.bfloat16)

HYP = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --------------------------------------------------------------------------------------------
# Jitted calls. The ops run eagerly when called directly; eager dispatch compiles every primitive
# for every new shape (seconds per op for the reference), so the value tests call them through a
# cached `jax.jit` (static keyword arguments). Eager calls are exercised by test_jit_matches_eager.
# --------------------------------------------------------------------------------------------


@functools.cache
def _jitted(name, kw_items):
    return jax.jit(functools.partial(getattr(ops, name), **dict(kw_items)))


class _JitOps:
    def __getattr__(self, name):
        def call(*args, **kw):
            return _jitted(name, tuple(sorted(kw.items())))(*args)

        return call


jops = _JitOps()


def skip_if_runs_xla(impl, op: str) -> None:
    """A backend without its own kernel for `op` runs the xla function itself: already tested."""
    if impl not in ("xla", "reference") and getattr(ops._backend(impl), op) is getattr(ops.xla, op):
        pytest.skip(f"impl={impl!r} runs the xla {op} (tested under impl='xla')")


# --------------------------------------------------------------------------------------------
# Shapes and inputs
# --------------------------------------------------------------------------------------------


class Cfg(NamedTuple):
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    Di: int
    bs: int  # block_size
    topk: int

    @property
    def G(self):
        return self.Hq // self.Hkv

    @property
    def nblocks(self):
        return -(-self.T // self.bs)


# Reused everywhere so jit caches are shared between tests. Every GQA ratio 1..16, T not a multiple
# of the block, T shorter than a block, top_k larger than the number of blocks, top_k == 1, more
# slots than the kernels unroll (kv_outer.SLOT_UNROLL: a loop over groups of slots, then the rest).
CONFIGS = {
    "g1_partial": Cfg(B=1, T=37, Hq=2, Hkv=2, D=8, Di=8, bs=8, topk=2),
    "g2_batch2": Cfg(B=2, T=22, Hq=4, Hkv=2, D=8, Di=4, bs=4, topk=3),
    "g4_short": Cfg(B=1, T=5, Hq=4, Hkv=1, D=8, Di=8, bs=8, topk=2),
    "g8_topk_gt_blocks": Cfg(B=1, T=19, Hq=8, Hkv=1, D=4, Di=4, bs=4, topk=8),
    "g16": Cfg(B=1, T=33, Hq=16, Hkv=1, D=4, Di=4, bs=8, topk=2),
    "g2_4groups": Cfg(B=1, T=29, Hq=8, Hkv=4, D=8, Di=8, bs=4, topk=3),
    "topk1": Cfg(B=2, T=20, Hq=4, Hkv=2, D=16, Di=8, bs=8, topk=1),
    "g2_many_slots": Cfg(B=1, T=83, Hq=4, Hkv=2, D=8, Di=8, bs=4, topk=19),
}


def _normal(rng, shape, scale=1.0):
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    # never exactly zero (zeros hide masking bugs)
    return np.where(x == 0, np.float32(1e-3), x)


def make_inputs(cfg: Cfg, seed: int, dtype=jnp.float32, scale=1.0, idx_scale=1.0):
    rng = np.random.default_rng(seed)
    q = _normal(rng, (cfg.B, cfg.T, cfg.Hq, cfg.D), scale)
    k = _normal(rng, (cfg.B, cfg.T, cfg.Hkv, cfg.D), scale)
    v = _normal(rng, (cfg.B, cfg.T, cfg.Hkv, cfg.D))
    iq = _normal(rng, (cfg.B, cfg.T, cfg.Hkv, cfg.Di), idx_scale)
    ik = _normal(rng, (cfg.B, cfg.T, cfg.Di), idx_scale)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, iq, ik))


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def canon(idx):
    """Block-id sets as a canonical array: valid ids sorted ascending, -1 padding last."""
    idx = np.asarray(idx)
    big = np.iinfo(np.int32).max
    s = np.sort(np.where(idx < 0, big, idx), axis=-1)
    return np.where(s == big, -1, s)


def as_sets(idx):
    idx = np.asarray(idx)
    out = np.empty(idx.shape[:-1], dtype=object)
    for pos in np.ndindex(*idx.shape[:-1]):
        out[pos] = frozenset(int(x) for x in idx[pos] if x >= 0)
    return out


def sets_to_idx(sets, top_k):
    """[B,T,H] array of sets -> int32 [B,T,H,top_k] with -1 padding."""
    out = np.full(sets.shape + (top_k,), -1, np.int32)
    for pos in np.ndindex(*sets.shape):
        ids = sorted(sets[pos])
        assert len(ids) <= top_k
        out[pos][: len(ids)] = ids
    return jnp.asarray(out)


# --------------------------------------------------------------------------------------------
# Independent numpy oracles, written from docs/algorithm.md
# --------------------------------------------------------------------------------------------


def np_block_scores(iq, ik, block_size):
    """bs[b, i, r, blk] = max_{j in blk, j <= i} <iq[i,r], ik[j]> / sqrt(D_idx); -inf if invisible."""
    iq, ik = f64(iq), f64(ik)
    B, T, H, Di = iq.shape
    nb = -(-T // block_size)
    out = np.full((B, T, H, nb), -np.inf)
    for b in range(B):
        for i in range(T):
            for r in range(H):
                s = ik[b, : i + 1] @ iq[b, i, r] / math.sqrt(Di)  # tokens j <= i
                for blk in range(i // block_size + 1):
                    out[b, i, r, blk] = s[blk * block_size : (blk + 1) * block_size].max()
    return out


def forced_blocks(i, block_size, top_k, sink_blocks, local_blocks=1):
    """The local block(s) first (the query's own and the local_blocks - 1 before it), then sinks by
    lower id, while slots remain."""
    n_vis = i // block_size + 1
    count = min(top_k, n_vis)
    local = i // block_size
    forced = [local - j for j in range(local_blocks) if local - j >= 0]
    for blk in range(min(sink_blocks, n_vis)):
        if len(forced) < count and blk not in forced:
            forced.append(blk)
    return forced


def np_select_blocks(iq, ik, block_size, top_k, sink_blocks=0, local_blocks=1):
    """docs/algorithm.md §3, literally. Returns a [B,T,H_kv] object array of frozensets."""
    bsc = np_block_scores(iq, ik, block_size)
    B, T, H, _ = bsc.shape
    out = np.empty((B, T, H), dtype=object)
    for b in range(B):
        for i in range(T):
            for r in range(H):
                n_vis = i // block_size + 1
                count = min(top_k, n_vis)
                sel = forced_blocks(i, block_size, top_k, sink_blocks, local_blocks)
                others = [blk for blk in range(n_vis) if blk not in sel and np.isfinite(bsc[b, i, r, blk])]
                others.sort(key=lambda blk: (-bsc[b, i, r, blk], blk))  # ties -> lower id
                sel = sel + others[: count - len(sel)]
                out[b, i, r] = frozenset(sel)
    return out


def check_selection_valid(idx, iq, ik, block_size, top_k, sink_blocks=0, tol=0.0, local_blocks=1):
    """Structural checks + optimality of the free slots (up to `tol` on the block scores)."""
    idx = np.asarray(idx)
    B, T, H = np.shape(iq)[:3]
    assert idx.shape == (B, T, H, top_k), idx.shape
    assert idx.dtype == np.int32, idx.dtype
    bsc = np_block_scores(iq, ik, block_size)
    for b, i, r in itertools.product(range(B), range(T), range(H)):
        row = idx[b, i, r]
        n = int((row >= 0).sum())
        where = f"(b={b}, i={i}, r={r}) row={row.tolist()}"
        assert (row[:n] >= 0).all() and (row[n:] == -1).all(), f"-1 padding not at the end {where}"
        valid = [int(x) for x in row[:n]]
        assert len(set(valid)) == n, f"duplicate ids {where}"
        n_vis = i // block_size + 1
        assert n == min(top_k, n_vis), f"count {n} != min(top_k, visible={n_vis}) {where}"
        assert max(valid) < n_vis, f"future block {where}"
        assert i // block_size in valid, f"local block missing {where}"
        forced = forced_blocks(i, block_size, top_k, sink_blocks, local_blocks)
        assert set(forced) <= set(valid), f"forced blocks {forced} missing {where}"
        free_sel = set(valid) - set(forced)
        free_unsel = set(range(n_vis)) - set(valid)
        for x in free_sel:
            for y in free_unsel:
                sx, sy = bsc[b, i, r, x], bsc[b, i, r, y]
                if tol == 0.0:
                    ok = sx > sy or (sx == sy and x < y)
                else:
                    ok = sx >= sy - tol
                assert ok, f"block {x} (score {sx}) chosen over {y} (score {sy}) {where}"


def np_attention_rows(q, k, v, i, b, h, G, support, D):
    """softmax over `support` tokens of <q[i,h], k[j, h//G]>/sqrt(D) . v."""
    r = h // G
    if len(support) == 0:
        return np.zeros(v.shape[-1])
    logits = k[b, support, r] @ q[b, i, h] / math.sqrt(D)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p @ v[b, support, r]


def np_dense_attention(q, k, v):
    q, k, v = f64(q), f64(k), f64(v)
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros(q.shape)
    for b, i, h in itertools.product(range(B), range(T), range(Hq)):
        out[b, i, h] = np_attention_rows(q, k, v, i, b, h, G, list(range(i + 1)), D)
    return out


def support_of(row_ids, i, block_size):
    blocks = {int(x) for x in row_ids if x >= 0}
    return [j for j in range(i + 1) if j // block_size in blocks]


def np_sparse_attention(q, k, v, block_idx, block_size):
    q, k, v = f64(q), f64(k), f64(v)
    block_idx = np.asarray(block_idx)
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros(q.shape)
    for b, i, h in itertools.product(range(B), range(T), range(Hq)):
        sup = support_of(block_idx[b, i, h // G], i, block_size)
        out[b, i, h] = np_attention_rows(q, k, v, i, b, h, G, sup, D)
    return out


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_index_kl(q, k, iq, ik, block_idx, block_size):
    """docs/algorithm.md §6.1: mean over (b, i, r) of KL(P || P_idx) on the support U."""
    q, k, iq, ik = f64(q), f64(k), f64(iq), f64(ik)
    B, T, Hq, D = q.shape
    Hkv, Di = iq.shape[2], iq.shape[3]
    G = Hq // Hkv
    total, n = 0.0, 0
    for b, i, r in itertools.product(range(B), range(T), range(Hkv)):
        if block_idx is None:
            U = list(range(i + 1))
        else:
            U = support_of(np.asarray(block_idx)[b, i, r], i, block_size)
        s = ik[b, U] @ iq[b, i, r] / math.sqrt(Di)
        log_p_idx = s - s.max() - np.log(np.exp(s - s.max()).sum())
        P = np.mean([_softmax(k[b, U, r] @ q[b, i, h] / math.sqrt(D)) for h in range(r * G, (r + 1) * G)], axis=0)
        total += float(np.sum(P * (np.log(P) - log_p_idx)))
        n += 1
    return total / n


def np_block_mass(q, k, block_size):
    """mass[b, i, r, blk]: head-averaged (within group r) dense causal attention mass of block blk."""
    q, k = f64(q), f64(k)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    nb = -(-T // block_size)
    mass = np.zeros((B, T, Hkv, nb))
    for b, i, r in itertools.product(range(B), range(T), range(Hkv)):
        P = np.mean([_softmax(k[b, : i + 1, r] @ q[b, i, h] / math.sqrt(D)) for h in range(r * G, (r + 1) * G)], axis=0)
        for blk in range(i // block_size + 1):
            mass[b, i, r, blk] = P[blk * block_size : (blk + 1) * block_size].sum()
    return mass


def np_top_mass_sets(mass, block_size, top_k):
    """I*: top-min(top_k, visible) blocks by mass, ties to the lower id. Also the smallest margin
    between the last chosen and the first unchosen block (over rows that see > top_k blocks)."""
    B, T, H, _ = mass.shape
    sets = np.empty((B, T, H), dtype=object)
    margin = np.inf
    for b, i, r in itertools.product(range(B), range(T), range(H)):
        n_vis = i // block_size + 1
        order = sorted(range(n_vis), key=lambda blk: (-mass[b, i, r, blk], blk))
        c = min(top_k, n_vis)
        sets[b, i, r] = frozenset(order[:c])
        if n_vis > top_k:
            margin = min(margin, mass[b, i, r, order[c - 1]] - mass[b, i, r, order[c]])
    return sets, margin


def np_selection_recall(q, k, block_idx, block_size, top_k):
    mass = np_block_mass(q, k, block_size)
    star, _ = np_top_mass_sets(mass, block_size, top_k)
    hat = as_sets(block_idx)
    B, T, H = star.shape
    br, sr = [], []
    for b, i, r in itertools.product(range(B), range(T), range(H)):
        if i // block_size + 1 <= top_k:
            continue  # only queries that see more than top_k blocks count
        inter = star[b, i, r] & hat[b, i, r]
        br.append(len(inter) / len(star[b, i, r]))
        sr.append(sum(mass[b, i, r, x] for x in inter) / sum(mass[b, i, r, x] for x in star[b, i, r]))
    if not br:
        return 1.0, 1.0
    return float(np.mean(br)), float(np.mean(sr))


# --------------------------------------------------------------------------------------------
# Independent jnp versions (for gradients)
# --------------------------------------------------------------------------------------------


def support_mask(block_idx, T, block_size):
    """[B, T, H_kv, T] bool: j in a selected block of (b, i, r) and j <= i."""
    block_idx = np.asarray(block_idx)
    B, _, H, _ = block_idx.shape
    m = np.zeros((B, T, H, T), bool)
    jblk = np.arange(T) // block_size
    for b, i, r in itertools.product(range(B), range(T), range(H)):
        ids = block_idx[b, i, r]
        m[b, i, r] = np.isin(jblk, ids[ids >= 0]) & (np.arange(T) <= i)
    return jnp.asarray(m)


def causal_mask(B, T, H):
    m = np.tril(np.ones((T, T), bool))
    return jnp.asarray(np.broadcast_to(m[None, :, None, :], (B, T, H, T)))


def jnp_masked_attention(q, k, v, mask):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    m = jnp.repeat(mask, G, axis=2)  # [B, T, Hq, T]
    logits = jnp.einsum("bihd,bjhd->bihj", q, kr) / math.sqrt(q.shape[-1])
    logits = jnp.where(m, logits, -jnp.inf)
    mx = jnp.max(jnp.where(m, logits, -1e30), axis=-1, keepdims=True)
    e = jnp.where(m, jnp.exp(logits - jax.lax.stop_gradient(mx)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / jnp.where(den == 0, 1.0, den)
    return jnp.einsum("bihj,bjhd->bihd", p, vr)


def jnp_index_kl(q, k, iq, ik, mask):
    q, k, iq, ik = (x.astype(jnp.float32) for x in (q, k, iq, ik))
    Hq, Hkv = q.shape[2], k.shape[2]
    G = Hq // Hkv
    s = jnp.einsum("bird,bjd->birj", iq, ik) / math.sqrt(iq.shape[-1])
    log_p_idx = jax.nn.log_softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    t = jnp.einsum("bihd,bjhd->bihj", q, jnp.repeat(k, G, axis=2)) / math.sqrt(q.shape[-1])
    t = jnp.where(jnp.repeat(mask, G, axis=2), t, -jnp.inf)
    p = jax.nn.softmax(t, axis=-1)
    B, T = q.shape[:2]
    P = jax.lax.stop_gradient(p.reshape(B, T, Hkv, G, T).mean(3))
    kl = jnp.where(mask, P * (jnp.log(jnp.where(mask, P, 1.0)) - jnp.where(mask, log_p_idx, 0.0)), 0.0)
    return kl.sum(-1).mean()


def assert_close(a, b, atol, rtol=None, msg=""):
    rtol = atol if rtol is None else rtol
    np.testing.assert_allclose(f64(a) if not isinstance(a, np.ndarray) else a,
                               f64(b) if not isinstance(b, np.ndarray) else b, atol=atol, rtol=rtol, err_msg=msg)


def tol_for(dtype):
    return 2e-5 if dtype == jnp.float32 else 2e-2


# ============================================================================================
# 1. select_blocks against the literal numpy oracle
# ============================================================================================


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_batch2", "g2_4groups", "g8_topk_gt_blocks", "topk1", "g4_short"])
def test_select_blocks_integer_ties_exact(impl, cfg_name):
    """Integer-valued iq/ik (D_idx=4 so the 1/sqrt(D_idx) scale is exact): many exact ties.
    The selection must equal the oracle exactly, ties to the lower block id."""
    cfg = CONFIGS[cfg_name]._replace(Di=4)
    rng = np.random.default_rng(100 + list(CONFIGS).index(cfg_name))
    iq = jnp.asarray(rng.integers(-2, 3, (cfg.B, cfg.T, cfg.Hkv, 4)), jnp.float32)
    ik = jnp.asarray(rng.integers(-2, 3, (cfg.B, cfg.T, 4)), jnp.float32)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    check_selection_valid(idx, iq, ik, cfg.bs, cfg.topk, tol=0.0)
    expected = np_select_blocks(iq, ik, cfg.bs, cfg.topk)
    got = as_sets(idx)
    bad = [(pos, sorted(got[pos]), sorted(expected[pos])) for pos in np.ndindex(*got.shape) if got[pos] != expected[pos]]
    assert not bad, f"{len(bad)} rows differ, first (pos, got, expected): {bad[:3]}"


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("sink_blocks", [0, 1, 2, 5])
def test_select_blocks_all_tied_lower_id(impl, sink_blocks):
    """All keys identical -> every visible block has the same score -> local + lowest ids."""
    B, T, H, Di, bs, top_k = 1, 30, 2, 4, 4, 3
    rng = np.random.default_rng(7)
    iq = jnp.asarray(_normal(rng, (B, T, H, Di)))
    ik = jnp.asarray(np.broadcast_to(_normal(rng, (1, 1, Di)), (B, T, Di)).copy())
    idx = jops.select_blocks(iq, ik, block_size=bs, top_k=top_k, sink_blocks=sink_blocks, impl=impl)
    got = as_sets(idx)
    for i in range(T):
        n_vis = i // bs + 1
        local = i // bs
        expected = [local] + [b for b in range(n_vis) if b != local][: min(top_k, n_vis) - 1]
        for r in range(H):
            assert got[0, i, r] == frozenset(expected), (i, r, sorted(got[0, i, r]), expected)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_select_blocks_random_matches_oracle(impl, cfg_name):
    cfg = CONFIGS[cfg_name]
    _, _, _, iq, ik = make_inputs(cfg, seed=1 + list(CONFIGS).index(cfg_name))
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    assert idx.dtype == jnp.int32 and idx.shape == (cfg.B, cfg.T, cfg.Hkv, cfg.topk)
    check_selection_valid(idx, iq, ik, cfg.bs, cfg.topk, tol=1e-5)
    expected = np_select_blocks(iq, ik, cfg.bs, cfg.topk)
    got = as_sets(idx)
    n_bad = sum(got[pos] != expected[pos] for pos in np.ndindex(*got.shape))
    # Random gaussian scores: no near-ties at these sizes, so the sets must be identical.
    assert n_bad == 0, f"{n_bad} rows differ from the oracle"


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("sink_blocks,top_k", [(1, 3), (2, 3), (3, 3), (4, 3), (2, 1), (2, 2), (9, 4)])
def test_select_blocks_sinks(impl, sink_blocks, top_k):
    B, T, H, Di, bs = 2, 26, 2, 4, 4
    rng = np.random.default_rng(11 + 10 * sink_blocks + top_k)
    iq = jnp.asarray(rng.integers(-2, 3, (B, T, H, Di)), jnp.float32)
    ik = jnp.asarray(rng.integers(-2, 3, (B, T, Di)), jnp.float32)
    idx = jops.select_blocks(iq, ik, block_size=bs, top_k=top_k, sink_blocks=sink_blocks, impl=impl)
    check_selection_valid(idx, iq, ik, bs, top_k, sink_blocks=sink_blocks, tol=0.0)
    expected = np_select_blocks(iq, ik, bs, top_k, sink_blocks)
    got = as_sets(idx)
    bad = [(pos, sorted(got[pos]), sorted(expected[pos])) for pos in np.ndindex(*got.shape) if got[pos] != expected[pos]]
    assert not bad, f"{len(bad)} rows differ, first (pos, got, expected): {bad[:3]}"


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("local_blocks,sink_blocks,top_k", [(2, 0, 3), (3, 0, 3), (2, 2, 4), (4, 1, 5), (2, 0, 2)])
def test_select_blocks_local_blocks(impl, local_blocks, sink_blocks, top_k):
    """local_blocks > 1: the query's block and the ones just before it are always in, then sinks,
    then the best by score (integer inputs: many ties, resolved to the lower id)."""
    B, T, H, Di, bs = 2, 29, 2, 4, 4
    rng = np.random.default_rng(5 + 10 * local_blocks + sink_blocks + 100 * top_k)
    iq = jnp.asarray(rng.integers(-2, 3, (B, T, H, Di)), jnp.float32)
    ik = jnp.asarray(rng.integers(-2, 3, (B, T, Di)), jnp.float32)
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    idx = jops.select_blocks(iq, ik, impl=impl, **kw)
    check_selection_valid(idx, iq, ik, bs, top_k, sink_blocks=sink_blocks, tol=0.0, local_blocks=local_blocks)
    expected = np_select_blocks(iq, ik, bs, top_k, sink_blocks, local_blocks)
    got = as_sets(idx)
    bad = [(pos, sorted(got[pos]), sorted(expected[pos])) for pos in np.ndindex(*got.shape) if got[pos] != expected[pos]]
    assert not bad, f"{len(bad)} rows differ, first (pos, got, expected): {bad[:3]}"
    # The paper's selection (one local block) differs: the block before the local one is ranked there.
    if local_blocks < top_k:
        paper = as_sets(jops.select_blocks(iq, ik, impl=impl, **dict(kw, local_blocks=1)))
        assert any(paper[pos] != got[pos] for pos in np.ndindex(*got.shape))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_select_blocks_per_group_independent(impl):
    cfg = CONFIGS["g2_4groups"]
    _, _, _, iq, ik = make_inputs(cfg, seed=21)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    sets = as_sets(idx)
    # groups choose differently for random inputs (no max over index heads)
    n_differ = sum(len({sets[b, i, r] for r in range(cfg.Hkv)}) > 1 for b in range(cfg.B) for i in range(cfg.T))
    assert n_differ > cfg.T // 3, n_differ
    # changing group 1's index query changes nothing for the other groups
    iq2 = iq.at[:, :, 1].set(-iq[:, :, 1] * 3.0)
    idx2 = jops.select_blocks(iq2, ik, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    keep = [0, 2, 3]
    np.testing.assert_array_equal(canon(idx)[:, :, keep], canon(idx2)[:, :, keep])
    assert not np.array_equal(canon(idx)[:, :, 1], canon(idx2)[:, :, 1])


@pytest.mark.parametrize("impl", IMPLS)
def test_msa_attention_consistent_with_parts(impl):
    cfg = CONFIGS["g2_4groups"]
    q, k, v, iq, ik = make_inputs(cfg, seed=31)
    for sink in (0, 2):
        out, idx = jops.msa_attention(q, k, v, iq, ik, block_size=cfg.bs, top_k=cfg.topk, sink_blocks=sink, impl=impl)
        idx_ref = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, sink_blocks=sink, impl="reference")
        np.testing.assert_array_equal(canon(idx), canon(idx_ref))
        out_ref = jops.sparse_attention(q, k, v, idx_ref, block_size=cfg.bs, impl="reference")
        assert out.dtype == q.dtype and out.shape == q.shape
        assert_close(out, out_ref, 2e-5)


# ============================================================================================
# 2. T <= top_k * block_size: MSA == dense
# ============================================================================================


@pytest.mark.parametrize("impl", ALL_IMPLS + ("auto",))  # auto: the dense shortcut (ops.selects_every_block)
@pytest.mark.parametrize(
    "cfg",
    [
        Cfg(B=2, T=24, Hq=4, Hkv=2, D=8, Di=8, bs=8, topk=3),  # T == top_k * block_size
        Cfg(B=1, T=21, Hq=8, Hkv=2, D=8, Di=4, bs=4, topk=6),  # partial last block
        Cfg(B=1, T=5, Hq=2, Hkv=1, D=8, Di=8, bs=8, topk=1),  # shorter than a block
    ],
    ids=["exact_span", "partial", "short"],
)
def test_msa_equals_dense_when_short(impl, cfg):
    assert cfg.T <= cfg.topk * cfg.bs
    q, k, v, iq, ik = make_inputs(cfg, seed=cfg.T)
    out, idx = jops.msa_attention(q, k, v, iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    dense = jops.dense_attention(q, k, v, impl=impl)
    expected = np_dense_attention(q, k, v)
    assert_close(out, dense, 2e-5)
    assert_close(out, expected, 2e-5)
    assert_close(dense, expected, 2e-5)
    sets = as_sets(idx)
    for b, i, r in itertools.product(range(cfg.B), range(cfg.T), range(cfg.Hkv)):
        assert sets[b, i, r] == frozenset(range(i // cfg.bs + 1))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_dense_attention_matches_numpy(impl, dtype):
    skip_if_runs_xla(impl, "dense_attention")
    cfg = CONFIGS["g2_batch2"]
    q, k, v, _, _ = make_inputs(cfg, seed=41, dtype=dtype)
    out = jops.dense_attention(q, k, v, impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, np_dense_attention(q, k, v), tol_for(dtype))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g16", "g2_4groups", "g8_topk_gt_blocks", "g2_many_slots"])
def test_sparse_attention_matches_numpy(impl, cfg_name):
    cfg = CONFIGS[cfg_name]
    q, k, v, iq, ik = make_inputs(cfg, seed=51)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    out = jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, impl=impl)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, np_sparse_attention(q, k, v, idx, cfg.bs), 2e-5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_sparse_attention_handcrafted_block_idx(impl):
    """Duplicates count once, future blocks contribute nothing, all -1 -> zero output,
    a non-local-only selection (local block absent) is honoured as given."""
    B, T, Hq, Hkv, D, bs, top_k = 1, 14, 4, 2, 8, 4, 3
    rng = np.random.default_rng(61)
    q, k, v = (jnp.asarray(_normal(rng, s)) for s in [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D)])
    idx = np.full((B, T, Hkv, top_k), -1, np.int32)
    for i in range(T):
        local = i // bs
        idx[0, i, 0] = [local, local, 0]  # duplicate local
        idx[0, i, 1] = [local, 3, -1] if i % 3 else [-1, -1, -1]  # future block 3 for early i; empty rows
    idx[0, 5, 0] = [0, -1, -1]  # local block (1) not selected: only block 0 is the support
    out = jops.sparse_attention(q, k, v, jnp.asarray(idx), block_size=bs, impl=impl)
    expected = np_sparse_attention(q, k, v, idx, bs)
    assert_close(out, expected, 2e-5)
    # empty support -> exactly 0 for heads of group 1 (heads 2, 3)
    empty = [i for i in range(T) if i % 3 == 0]
    assert np.all(np.asarray(out)[0, empty][:, 2:] == 0)
    assert np.all(np.isfinite(np.asarray(out)))


# ============================================================================================
# 3. Backends against the oracle (impl="reference")
# ============================================================================================


def _compare_all_ops(impl, cfg, seed, dtype, scale=1.0):
    q, k, v, iq, ik = make_inputs(cfg, seed, dtype=dtype, scale=scale)
    kw = dict(block_size=cfg.bs)
    tol = tol_for(dtype)
    # selection: only in f32 (bf16 near-ties may legitimately differ); use the f32 selection of the
    # (bf16-rounded) inputs as block_idx for the other ops
    iq32, ik32 = iq.astype(jnp.float32), ik.astype(jnp.float32)
    idx_ref = jops.select_blocks(iq32, ik32, top_k=cfg.topk, impl="reference", **kw)
    if dtype == jnp.float32:
        idx = jops.select_blocks(iq, ik, top_k=cfg.topk, impl=impl, **kw)
        assert idx.dtype == jnp.int32 and idx.shape == idx_ref.shape
        if not np.array_equal(canon(idx), canon(idx_ref)):
            # backends may legitimately differ only on near-ties (f32 rounding of the scores)
            check_selection_valid(idx, iq, ik, cfg.bs, cfg.topk, tol=1e-5)
        out, idx_m = jops.msa_attention(q, k, v, iq, ik, top_k=cfg.topk, impl=impl, **kw)
        np.testing.assert_array_equal(canon(idx_m), canon(idx), err_msg="msa_attention block_idx")
        out_r = jops.sparse_attention(q, k, v, idx_m, impl="reference", **kw)
        assert_close(out, out_r, tol, msg="msa_attention")
    else:
        # bf16 inputs: scores are accumulated in f32, so the selection is optimal up to f32 noise
        idx = jops.select_blocks(iq, ik, top_k=cfg.topk, impl=impl, **kw)
        check_selection_valid(idx, iq, ik, cfg.bs, cfg.topk, tol=1e-4)

    out = jops.sparse_attention(q, k, v, idx_ref, impl=impl, **kw)
    out_r = jops.sparse_attention(q, k, v, idx_ref, impl="reference", **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, out_r, tol, msg="sparse_attention")

    d = jops.dense_attention(q, k, v, impl=impl)
    d_r = jops.dense_attention(q, k, v, impl="reference")
    assert d.dtype == dtype
    assert_close(d, d_r, tol, msg="dense_attention")

    for bi in (idx_ref, None):
        l = jops.index_kl_loss(q, k, iq, ik, bi, impl=impl, **kw)
        l_r = jops.index_kl_loss(q, k, iq, ik, bi, impl="reference", **kw)
        assert l.shape == () and l.dtype == jnp.float32
        assert_close(l, l_r, atol=tol * 0.1, rtol=tol, msg=f"index_kl_loss block_idx={'None' if bi is None else 'sel'}")

    br, sr = jops.selection_recall(q, k, idx_ref, top_k=cfg.topk, impl=impl, **kw)
    br_r, sr_r = jops.selection_recall(q, k, idx_ref, top_k=cfg.topk, impl="reference", **kw)
    rtol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert_close(br, br_r, rtol, msg="block_recall")
    assert_close(sr, sr_r, rtol, msg="score_recall")


BF16_CONFIGS = ("g2_batch2", "g16", "g2_4groups")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "cfg_name,dtype",
    [(c, jnp.float32) for c in CONFIGS] + [(c, jnp.bfloat16) for c in BF16_CONFIGS],
    ids=[f"{c}-f32" for c in CONFIGS] + [f"{c}-bf16" for c in BF16_CONFIGS],
)
def test_impl_matches_reference_configs(impl, cfg_name, dtype):
    if impl == "pallas" and dtype == jnp.bfloat16 and cfg_name != "g16":
        pytest.skip("bf16 kernels: tests/test_pallas_*.py cover them; one config here (interpret mode is slow)")
    _compare_all_ops(impl, CONFIGS[cfg_name], seed=71 + list(CONFIGS).index(cfg_name), dtype=dtype)


@st.composite
def random_cfg(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4, 8, 16]))
    bs = draw(st.sampled_from([2, 4, 8]))
    T = draw(st.integers(1, 30))
    topk = draw(st.integers(1, 6))
    B = draw(st.sampled_from([1, 2]))
    return Cfg(B=B, T=T, Hq=G * Hkv, Hkv=Hkv, D=8, Di=4, bs=bs, topk=topk)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas"])
@HYP
@given(cfg=random_cfg(), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([0.5, 1.0, 2.5]))
def test_impl_matches_reference_random(impl, cfg, seed, dtype, scale):
    _compare_all_ops(impl, cfg, seed, dtype, scale)


@pytest.mark.skipif("pallas" not in IMPLS, reason="no pallas impl")
@settings(HYP, max_examples=2)  # every shape compiles the kernels anew in interpret mode
@given(cfg=random_cfg(), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([0.5, 1.0, 2.5]))
def test_pallas_matches_reference_random(cfg, seed, dtype, scale):
    _compare_all_ops("pallas", cfg, seed, dtype, scale)


# ============================================================================================
# 4. jit, vmap, grad
# ============================================================================================


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_jit_matches_eager(impl):
    cfg = CONFIGS["g2_batch2"]
    q, k, v, iq, ik = make_inputs(cfg, seed=81)
    kw = dict(block_size=cfg.bs, impl=impl)
    idx = ops.select_blocks(iq, ik, top_k=cfg.topk, **kw)
    idx_j = jax.jit(functools.partial(ops.select_blocks, top_k=cfg.topk, **kw))(iq, ik)
    np.testing.assert_array_equal(canon(idx), canon(idx_j))
    pairs = [
        (functools.partial(ops.sparse_attention, **kw), (q, k, v, idx)),
        (functools.partial(ops.dense_attention, impl=impl), (q, k, v)),
        (functools.partial(ops.index_kl_loss, **kw), (q, k, iq, ik, idx)),
        (lambda q, k, iq, ik: ops.index_kl_loss(q, k, iq, ik, None, **kw), (q, k, iq, ik)),
        (functools.partial(ops.selection_recall, top_k=cfg.topk, **kw), (q, k, idx)),
    ]
    for f, args in pairs:
        for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(jax.jit(f)(*args))):
            assert_close(a, b, 1e-5)
    out, idx_m = jax.jit(functools.partial(ops.msa_attention, top_k=cfg.topk, **kw))(q, k, v, iq, ik)
    np.testing.assert_array_equal(canon(idx_m), canon(idx))
    assert_close(out, ops.sparse_attention(q, k, v, idx, **kw), 1e-5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_vmap_over_extra_axis(impl):
    """jit(vmap(op)) over an extra leading axis == the op on each slice."""
    cfg = CONFIGS["g2_batch2"]
    E = 2
    ins = [make_inputs(cfg, seed=90 + e) for e in range(E)]
    q, k, v, iq, ik = (jnp.stack(x) for x in zip(*ins))
    kw = dict(block_size=cfg.bs, impl=impl)
    vm = lambda f: jax.jit(jax.vmap(f))
    idx = vm(functools.partial(ops.select_blocks, top_k=cfg.topk, **kw))(iq, ik)
    assert idx.shape == (E, cfg.B, cfg.T, cfg.Hkv, cfg.topk)
    for e in range(E):
        np.testing.assert_array_equal(canon(idx[e]), canon(jops.select_blocks(iq[e], ik[e], top_k=cfg.topk, **kw)))
    fns = [
        ("sparse_attention", kw, (q, k, v, idx)),
        ("dense_attention", dict(impl=impl), (q, k, v)),
        ("index_kl_loss", kw, (q, k, iq, ik, idx)),
        ("selection_recall", dict(top_k=cfg.topk, **kw), (q, k, idx)),
    ]
    for name, fkw, args in fns:
        batched = vm(functools.partial(getattr(ops, name), **fkw))(*args)
        for e in range(E):
            single = getattr(jops, name)(*(a[e] for a in args), **fkw)
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
                assert_close(a, b[e], 1e-5, msg=name)
    kl_none = vm(lambda q, k, iq, ik: ops.index_kl_loss(q, k, iq, ik, None, **kw))(q, k, iq, ik)
    for e in range(E):
        assert_close(kl_none[e], jops.index_kl_loss(q[e], k[e], iq[e], ik[e], None, **kw), 1e-5)
    out, idx_m = vm(functools.partial(ops.msa_attention, top_k=cfg.topk, **kw))(q, k, v, iq, ik)
    np.testing.assert_array_equal(canon(idx_m), canon(idx))
    for e in range(E):
        assert_close(out[e], jops.sparse_attention(q[e], k[e], v[e], idx[e], **kw), 1e-5)


def _grad_qkv(f, q, k, v, ct):
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_4groups", "g8_topk_gt_blocks", "g2_many_slots"])
def test_grads_attention(impl, cfg_name):
    """Grads of sparse/dense attention w.r.t. q, k, v: against autodiff of an independent masked
    jnp attention (all impls) and against the reference (concrete impls)."""
    cfg = CONFIGS[cfg_name]
    q, k, v, iq, ik = make_inputs(cfg, seed=101)
    ct = jnp.asarray(_normal(np.random.default_rng(102), q.shape))
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    smask = support_mask(idx, cfg.T, cfg.bs)
    cmask = causal_mask(cfg.B, cfg.T, cfg.Hkv)
    cases = {
        "sparse": (lambda impl: (lambda q, k, v: jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, impl=impl)),
                   lambda q, k, v: jnp_masked_attention(q, k, v, smask)),
        "dense": (lambda impl: (lambda q, k, v: jops.dense_attention(q, k, v, impl=impl)),
                  lambda q, k, v: jnp_masked_attention(q, k, v, cmask)),
    }
    for name, (make_f, indep) in cases.items():
        g = _grad_qkv(make_f(impl), q, k, v, ct)
        g_ind = jax.jit(functools.partial(_grad_qkv, indep))(q, k, v, ct)
        for a, b, n in zip(g, g_ind, "qkv"):
            assert_close(a, b, 1e-4, msg=f"{name} d{n} vs independent")
        if impl != "reference":
            g_ref = _grad_qkv(make_f("reference"), q, k, v, ct)
            for a, b, n in zip(g, g_ref, "qkv"):
                assert_close(a, b, 1e-5, msg=f"{name} d{n} vs reference")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("use_idx", [True, False], ids=["selected", "full"])
def test_grads_index_kl(impl, use_idx):
    skip_if_runs_xla(impl, "index_kl_loss")
    cfg = CONFIGS["g2_4groups"]
    q, k, v, iq, ik = make_inputs(cfg, seed=111)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference") if use_idx else None
    mask = support_mask(idx, cfg.T, cfg.bs) if use_idx else causal_mask(cfg.B, cfg.T, cfg.Hkv)

    def loss(impl):
        return lambda q, k, iq, ik: jops.index_kl_loss(q, k, iq, ik, idx, block_size=cfg.bs, impl=impl)

    g = jax.grad(loss(impl), argnums=(0, 1, 2, 3))(q, k, iq, ik)
    # teacher is stopped: exactly zero w.r.t. q and k
    assert np.all(np.asarray(g[0]) == 0), "d loss / d q must be exactly 0"
    assert np.all(np.asarray(g[1]) == 0), "d loss / d k must be exactly 0"
    g_ind = jax.jit(jax.grad(lambda iq, ik: jnp_index_kl(q, k, iq, ik, mask), argnums=(0, 1)))(iq, ik)
    assert_close(g[2], g_ind[0], 1e-5, msg="d iq vs independent")
    assert_close(g[3], g_ind[1], 1e-5, msg="d ik vs independent")
    if impl != "reference":
        g_ref = jax.grad(loss("reference"), argnums=(2, 3))(q, k, iq, ik)
        assert_close(g[2], g_ref[0], 1e-5, msg="d iq vs reference")
        assert_close(g[3], g_ref[1], 1e-5, msg="d ik vs reference")


def jnp_lse(q, k, mask):
    """[B, T, H_q] log-sum-exp of the logits over the mask [B, T, H_kv, T] (independent jnp)."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    G = q.shape[2] // k.shape[2]
    logits = jnp.einsum("bihd,bjhd->bihj", q, jnp.repeat(k, G, axis=2)) / math.sqrt(q.shape[-1])
    return jax.nn.logsumexp(jnp.where(jnp.repeat(mask, G, axis=2), logits, -jnp.inf), axis=-1)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_4groups"])
def test_sparse_attention_return_lse(impl, cfg_name):
    """return_lse=True: the same output, the log-sum-exp of the logits over the support, and the
    gradient of a loss that uses both (d lse / d logits = P: the pallas backward folds it into its
    delta), against an independent jnp version."""
    cfg = CONFIGS[cfg_name]
    q, k, v, iq, ik = make_inputs(cfg, seed=131)
    ct = jnp.asarray(_normal(np.random.default_rng(132), q.shape))
    ct_lse = jnp.asarray(_normal(np.random.default_rng(133), q.shape[:3]))
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    smask = support_mask(idx, cfg.T, cfg.bs)
    out, lse = jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, return_lse=True, impl=impl)
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    plain = jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, impl=impl)
    if impl == "pallas":  # the same kernel call either way
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    else:  # XLA may fuse the jnp paths differently once the LSE is an output too (seen on an H200: 2e-7)
        assert_close(out, plain, 1e-6)
    assert_close(lse, jnp_lse(q, k, smask), 1e-5)
    out2, idx2, lse2 = jops.msa_attention(q, k, v, iq, ik, block_size=cfg.bs, top_k=cfg.topk, return_lse=True, impl=impl)
    np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v)[0].astype(jnp.float32) * ct) + jnp.sum(f(q, k, v)[1] * ct_lse)

    f_impl = lambda q, k, v: jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, return_lse=True, impl=impl)
    f_ind = lambda q, k, v: (jnp_masked_attention(q, k, v, smask), jnp_lse(q, k, smask))
    g = jax.grad(loss(f_impl), argnums=(0, 1, 2))(q, k, v)
    g_ind = jax.jit(jax.grad(loss(f_ind), argnums=(0, 1, 2)))(q, k, v)
    for a, b, n in zip(g, g_ind, "qkv"):
        assert_close(a, b, 1e-4, msg=f"d{n}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_index_kl_loss_given_lse(impl):
    """Handing the main branch's LSE to index_kl_loss changes neither the value nor the gradients;
    two backward runs give the same bits (the pallas kernels sum in a fixed order)."""
    cfg = CONFIGS["g2_4groups"]
    q, k, v, iq, ik = make_inputs(cfg, seed=141)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    _, lse = jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, return_lse=True, impl=impl)

    def grads(lse_arg):
        f = lambda iq, ik: ops.index_kl_loss(q, k, iq, ik, idx, block_size=cfg.bs, lse=lse_arg, impl=impl)
        return jax.value_and_grad(f, argnums=(0, 1))(iq, ik)

    (v0, g0), (v1, g1), (_, g2) = grads(None), grads(lse), grads(lse)
    assert_close(v1, v0, 1e-6)
    for a, b in zip(g1, g0):
        assert_close(a, b, 1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="lse"):
        ops.index_kl_loss(q, k, iq, ik, idx, block_size=cfg.bs, lse=lse[:, :, :1], impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS + ("auto",))
def test_dense_attention_return_lse(impl):
    """dense_attention(return_lse=True): the same output and the log-sum-exp over the causal support
    (impl="auto" on a GPU: cuDNN's float32 softmax statistics, bf16 inputs), also for queries at
    positions (pallas: the decode kernel's); as the full-support KL's lse it changes neither the KL
    nor its gradients."""
    cfg = CONFIGS["g2_4groups"]
    dtype = jnp.bfloat16 if impl == "auto" else jnp.float32
    q, k, v, iq, ik = make_inputs(cfg, seed=151, dtype=dtype)
    out, lse = jops.dense_attention(q, k, v, return_lse=True, impl=impl)
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    plain = jops.dense_attention(q, k, v, impl=impl)
    assert_close(out, plain, 1e-6 if dtype == jnp.float32 else 1e-2)
    assert_close(lse, jnp_lse(q, k, causal_mask(cfg.B, cfg.T, cfg.Hkv)), 1e-5 if dtype == jnp.float32 else 2e-3)
    rows = jnp.asarray([[cfg.T - 1, 0, 5], [3, -1, cfg.T // 2]], jnp.int32)[:cfg.B]  # -1: a padding query
    at = jnp.take_along_axis(q, jnp.maximum(rows, 0)[:, :, None, None], axis=1)
    _, lse_rows = ops.dense_attention(at, k, v, return_lse=True, q_pos=rows, impl=impl)
    want = jnp.take_along_axis(lse, jnp.maximum(rows, 0)[:, :, None], axis=1)
    real = np.asarray(rows >= 0)
    assert_close(np.asarray(lse_rows)[real], np.asarray(want)[real], 1e-5 if dtype == jnp.float32 else 2e-3)
    assert np.all(np.isneginf(np.asarray(lse_rows)[~real]))

    def kl(lse_arg):
        f = lambda iq, ik: ops.index_kl_loss(q, k, iq, ik, None, block_size=cfg.bs, lse=lse_arg, impl=impl)
        return jax.value_and_grad(f, argnums=(0, 1))(iq, ik)

    (v0, g0), (v1, g1) = kl(None), kl(lse)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert_close(v1, v0, tol)
    for a, b in zip(g1, g0):
        assert_close(a, b, tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_attention_and_index_kl_without_the_value_keeps_the_gradients(impl):
    """sparse_attention_and_index_kl: with kl_value the two ops' out and KL; without, the same out, a
    KL of 0 and the same gradients of sum(out * ct) + kl to q, k, v, iq, ik (pallas: the KL's
    gradient from the main backward's tiles), also at query positions (a context-parallel slice)."""
    cfg = CONFIGS["g2_4groups"]
    q, k, v, iq, ik = make_inputs(cfg, seed=147)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    ct = jnp.asarray(np.random.default_rng(148).standard_normal(q.shape).astype(np.float32))
    half = q.shape[1] // 2
    q_pos = jnp.broadcast_to(jnp.arange(half, q.shape[1]), (q.shape[0], q.shape[1] - half))

    for sl, pos in ((slice(None), None), (slice(half, None), q_pos)):
        def f(q, k, v, iq, ik, kl_value):
            out, kl = ops.sparse_attention_and_index_kl(q[:, sl], k, v, iq[:, sl], ik, idx[:, sl], block_size=cfg.bs,
                                                        kl_value=kl_value, q_pos=pos, impl=impl)
            return (out * ct[:, sl]).sum() + 0.5 * kl, (out, kl)

        grads = lambda kl_value: jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(  # noqa: E731
            q, k, v, iq, ik, kl_value)
        (_, (out1, kl1)), g1 = grads(True)
        (_, (out0, kl0)), g0 = grads(False)
        want_kl = ops.index_kl_loss(q[:, sl], k, iq[:, sl], ik, idx[:, sl], block_size=cfg.bs, q_pos=pos, impl=impl)
        assert_close(kl1, want_kl, 1e-5)
        assert float(kl0) == 0.0
        assert_close(out0, out1, 1e-6)
        for name, a, b in zip(("q", "k", "v", "iq", "ik"), g0, g1):
            assert np.abs(np.asarray(b)).max() > 0, name  # every input gets a gradient: the test can fail
            assert_close(a, b, 1e-5, msg=f"d{name} q_pos={pos is not None}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_grads_of_shared_keys_sum_in_f32(impl):
    """bf16 inputs, a sink block every query selects (plus each local block): dk, dv and d ik sum
    over hundreds of queries. Summed in bf16 (a scatter-add or a chunk loop carrying bf16) they
    drift 3-8% from the float32 gradient; every impl must stay within the bf16 rounding (~0.5%)."""
    B, T, H, R, D, Di, bs, K = 1, 1024, 8, 2, 32, 16, 16, 4
    rng = np.random.default_rng(151)
    q, k, v = (jnp.asarray(_normal(rng, s)) for s in ((B, T, H, D), (B, T, R, D), (B, T, R, D)))
    iq, ik = jnp.asarray(_normal(rng, (B, T, R, Di))), jnp.asarray(_normal(rng, (B, T, Di)))
    ct = jnp.asarray(_normal(rng, q.shape))
    idx = jops.select_blocks(iq, ik, block_size=bs, top_k=K, sink_blocks=1, impl="xla")

    def grads(impl, dtype):
        def f(q, k, v, iq, ik):
            o = ops.sparse_attention(q, k, v, idx, block_size=bs, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * ct) + 100 * ops.index_kl_loss(q, k, iq, ik, idx, block_size=bs, impl=impl)

        args = (x.astype(dtype) for x in (q, k, v, iq, ik))
        return [np.asarray(g, np.float32) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(*args)]

    with jax.default_matmul_precision("highest"):
        ref = grads("xla", jnp.float32)
    for name, g, r in zip(["dq", "dk", "dv", "diq", "dik"], grads(impl, jnp.bfloat16), ref):
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert rel < 0.012, f"{name}: relative error {rel:.4f} of the bf16 gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_bf16_vs_reference(impl):
    cfg = CONFIGS["g2_batch2"]
    q, k, v, iq, ik = make_inputs(cfg, seed=121, dtype=jnp.bfloat16)
    ct = jnp.asarray(_normal(np.random.default_rng(122), q.shape))
    idx = jops.select_blocks(iq.astype(jnp.float32), ik.astype(jnp.float32), block_size=cfg.bs, top_k=cfg.topk,
                            impl="reference")
    f = lambda impl: (lambda q, k, v: jops.sparse_attention(q, k, v, idx, block_size=cfg.bs, impl=impl))
    g, g_ref = _grad_qkv(f(impl), q, k, v, ct), _grad_qkv(f("reference"), q, k, v, ct)
    for a, b, n in zip(g, g_ref, "qkv"):
        assert a.dtype == jnp.bfloat16
        assert_close(a, b, 5e-2, msg=f"d{n}")
    l = lambda impl: (lambda iq, ik: jops.index_kl_loss(q, k, iq, ik, idx, block_size=cfg.bs, impl=impl))
    g, g_ref = jax.grad(l(impl), argnums=(0, 1))(iq, ik), jax.grad(l("reference"), argnums=(0, 1))(iq, ik)
    for a, b in zip(g, g_ref):
        assert_close(a, b, 5e-2)


# ============================================================================================
# 5. index_kl_loss value
# ============================================================================================


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_batch2", "g16", "g2_4groups", "g4_short", "g2_many_slots"])
def test_index_kl_matches_numpy(impl, cfg_name):
    skip_if_runs_xla(impl, "index_kl_loss")
    cfg = CONFIGS[cfg_name]
    q, k, v, iq, ik = make_inputs(cfg, seed=131, scale=1.5)
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    for bi in (idx, None):
        got = jops.index_kl_loss(q, k, iq, ik, bi, block_size=cfg.bs, impl=impl)
        assert got.shape == () and got.dtype == jnp.float32
        expected = np_index_kl(q, k, iq, ik, bi, cfg.bs)
        assert expected > 1e-3
        assert_close(got, expected, atol=1e-6, rtol=1e-4, msg="selected" if bi is not None else "full")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_index_kl_handcrafted_support(impl):
    """Duplicate ids count once; future blocks add nothing to the support."""
    skip_if_runs_xla(impl, "index_kl_loss")
    cfg = CONFIGS["g2_batch2"]
    q, k, v, iq, ik = make_inputs(cfg, seed=137)
    idx = np.full((cfg.B, cfg.T, cfg.Hkv, cfg.topk), -1, np.int32)
    for i in range(cfg.T):
        local = i // cfg.bs
        idx[:, i, 0] = [local, local, 0]
        idx[:, i, 1] = [local, cfg.nblocks - 1, -1]
    got = jops.index_kl_loss(q, k, iq, ik, jnp.asarray(idx), block_size=cfg.bs, impl=impl)
    assert_close(got, np_index_kl(q, k, iq, ik, idx, cfg.bs), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("G", [1, 4])
def test_index_kl_zero_when_student_equals_teacher(impl, G):
    """D == D_idx, keys equal for all groups (k[:, :, r] = ik), every head of group r queries with
    iq[:, :, r]: student logits == teacher logits for every head -> KL == 0."""
    skip_if_runs_xla(impl, "index_kl_loss")
    B, T, Hkv, D, bs, top_k = 2, 21, 2, 8, 4, 2
    rng = np.random.default_rng(141 + G)
    iq = jnp.asarray(_normal(rng, (B, T, Hkv, D), 2.0))
    ik = jnp.asarray(_normal(rng, (B, T, D), 2.0))
    q = jnp.repeat(iq, G, axis=2)
    k = jnp.broadcast_to(ik[:, :, None, :], (B, T, Hkv, D))
    idx = jops.select_blocks(iq, ik, block_size=bs, top_k=top_k, impl="reference")
    for bi in (idx, None):
        l = jops.index_kl_loss(q, k, iq, ik, bi, block_size=bs, impl=impl)
        assert abs(float(l)) < 1e-6, float(l)
    # random inputs -> strictly positive
    q2, k2 = jnp.asarray(_normal(rng, q.shape)), jnp.asarray(_normal(rng, k.shape))
    for bi in (idx, None):
        assert float(jops.index_kl_loss(q2, k2, iq, ik, bi, block_size=bs, impl=impl)) > 1e-3


# ============================================================================================
# 6. selection_recall
# ============================================================================================


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_batch2", "g16", "g2_4groups"])
def test_selection_recall_perfect(impl, cfg_name):
    skip_if_runs_xla(impl, "selection_recall")
    cfg = CONFIGS[cfg_name]
    q, k, _, _, _ = make_inputs(cfg, seed=151, scale=2.0)
    mass = np_block_mass(q, k, cfg.bs)
    star, margin = np_top_mass_sets(mass, cfg.bs, cfg.topk)
    assert margin > 1e-5, "test precondition: no near-ties in block mass"
    br, sr = jops.selection_recall(q, k, sets_to_idx(star, cfg.topk), block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    assert br.shape == () and sr.shape == ()
    assert_close(br, 1.0, 1e-6)
    assert_close(sr, 1.0, 1e-6)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("cfg_name", ["g1_partial", "g2_batch2", "g16", "g2_4groups", "topk1"])
def test_selection_recall_matches_numpy(impl, cfg_name):
    skip_if_runs_xla(impl, "selection_recall")
    cfg = CONFIGS[cfg_name]
    q, k, _, iq, ik = make_inputs(cfg, seed=161, scale=2.0)
    _, margin = np_top_mass_sets(np_block_mass(q, k, cfg.bs), cfg.bs, cfg.topk)
    assert margin > 1e-5, "test precondition: no near-ties in block mass"
    idx = jops.select_blocks(iq, ik, block_size=cfg.bs, top_k=cfg.topk, impl="reference")
    br, sr = jops.selection_recall(q, k, idx, block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    ebr, esr = np_selection_recall(q, k, idx, cfg.bs, cfg.topk)
    assert 0.0 <= float(br) <= 1.0 and 0.0 <= float(sr) <= 1.0
    assert ebr < 1.0  # a random index should miss something
    assert_close(br, ebr, 1e-5, msg="block_recall")
    assert_close(sr, esr, 1e-5, msg="score_recall")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_selection_recall_mass_ties_lower_id(impl):
    """Every query attends (to f32 precision: exp underflows to exactly 0) only to itself, so the
    local block has mass 1 and every other visible block exactly 0: I* = local + the lowest ids.
    (Uniform attention would give ties only up to an ulp: XLA's fused exp differs across lanes.)"""
    skip_if_runs_xla(impl, "selection_recall")
    B, T, Hq, Hkv, D, bs, top_k = 1, 26, 4, 2, 32, 4, 3
    rng = np.random.default_rng(181)
    onehot = np.eye(T, D, dtype=np.float32) * 80.0  # token j -> 80 * e_j (D >= T); gap ~1100 in logits
    k = onehot[None, :, None, :] + _normal(rng, (B, T, Hkv, D), 1e-3)
    q = onehot[None, :, None, :] + _normal(rng, (B, T, Hq, D), 1e-3)
    q, k = jnp.asarray(q), jnp.asarray(k)
    mass = np_block_mass(q, k, bs)
    star, _ = np_top_mass_sets(mass, bs, top_k)
    assert star[0, 25, 0] == frozenset({0, 1, 6})
    low = sets_to_idx(star, top_k)
    br, sr = jops.selection_recall(q, k, low, block_size=bs, top_k=top_k, impl=impl)
    assert_close(br, 1.0, 1e-6)
    assert_close(sr, 1.0, 1e-6)
    # local + the highest other ids instead: tie-broken the other way this would also score 1
    high = np.full((B, T, Hkv, top_k), -1, np.int32)
    for i in range(T):
        local = i // bs
        ids = [local] + list(range(local))[-(top_k - 1):][: local]
        high[:, i, :, : len(ids)] = ids
    br, sr = jops.selection_recall(q, k, jnp.asarray(high), block_size=bs, top_k=top_k, impl=impl)
    ebr, esr = np_selection_recall(q, k, high, bs, top_k)
    assert ebr < 0.9 and esr == 1.0
    assert_close(br, ebr, 1e-6)
    assert_close(sr, esr, 1e-6)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_selection_recall_local_only_and_no_qualifying_query(impl):
    skip_if_runs_xla(impl, "selection_recall")
    cfg = CONFIGS["g2_batch2"]
    q, k, _, _, _ = make_inputs(cfg, seed=171, scale=2.0)
    # only the local block selected: recall = numpy value, strictly between 0 and 1
    local = np.full((cfg.B, cfg.T, cfg.Hkv, cfg.topk), -1, np.int32)
    local[..., 0] = (np.arange(cfg.T) // cfg.bs)[None, :, None]
    br, sr = jops.selection_recall(q, k, jnp.asarray(local), block_size=cfg.bs, top_k=cfg.topk, impl=impl)
    ebr, esr = np_selection_recall(q, k, local, cfg.bs, cfg.topk)
    assert_close(br, ebr, 1e-5)
    assert_close(sr, esr, 1e-5)
    assert 0 < float(br) < 1 and 0 < float(sr) < 1
    # no query sees more than top_k blocks -> (1, 1) whatever block_idx says
    short = Cfg(B=1, T=12, Hq=4, Hkv=2, D=8, Di=8, bs=4, topk=3)
    q, k, _, _, _ = make_inputs(short, seed=172)
    junk = jnp.full((1, 12, 2, 3), -1, jnp.int32).at[..., 0].set(0)
    br, sr = jops.selection_recall(q, k, junk, block_size=short.bs, top_k=short.topk, impl=impl)
    assert_close(br, 1.0, 1e-7)
    assert_close(sr, 1.0, 1e-7)


# ============================================================================================
# 7. Argument validation
# ============================================================================================


def _bad_cases():
    cfg = CONFIGS["g2_batch2"]  # B=2, T=22, H_q=4, H_kv=2, D=8, D_idx=4
    q, k, v, iq, ik = make_inputs(cfg, seed=0)
    idx = jnp.zeros((2, 22, 2, 3), jnp.int32)
    sa, sel, msa, dense, kl, rec = (ops.sparse_attention, ops.select_blocks, ops.msa_attention,
                                    ops.dense_attention, ops.index_kl_loss, ops.selection_recall)
    bq3 = jnp.ones((2, 22, 3, 8), q.dtype)  # 3 query heads, 2 kv heads
    # (name, fn, args, kwargs, regex the message must match)
    return [
        # head counts
        ("heads_sparse", sa, (bq3, k, v, idx), {}, r"H_q|H_kv|head"),
        ("heads_dense", dense, (bq3, k, v), {}, r"H_q|H_kv|head"),
        ("heads_msa", msa, (bq3, k, v, iq, ik), {}, r"H_q|H_kv|head"),
        ("heads_kl", kl, (bq3, k, iq, ik, idx), {}, r"H_q|H_kv|head"),
        ("heads_recall", rec, (bq3, k, idx), {}, r"H_q|H_kv|head"),
        # top_k / block_size
        ("topk0_select", sel, (iq, ik), dict(top_k=0), r"top_k"),
        ("topk_neg_msa", msa, (q, k, v, iq, ik), dict(top_k=-1), r"top_k"),
        ("topk0_recall", rec, (q, k, idx), dict(top_k=0), r"top_k"),
        ("bs0_select", sel, (iq, ik), dict(block_size=0), r"block_size"),
        ("sink_neg_select", sel, (iq, ik), dict(sink_blocks=-1), r"sink_blocks"),
        ("sink_neg_msa", msa, (q, k, v, iq, ik), dict(sink_blocks=-1), r"sink_blocks"),
        ("local0_select", sel, (iq, ik), dict(local_blocks=0), r"local_blocks"),
        ("local_gt_topk_select", sel, (iq, ik), dict(top_k=3, local_blocks=4), r"local_blocks.*top_k"),
        ("local_gt_topk_msa", msa, (q, k, v, iq, ik), dict(top_k=2, local_blocks=3), r"local_blocks.*top_k"),
        ("bs0_sparse", sa, (q, k, v, idx), dict(block_size=0), r"block_size"),
        ("bs0_msa", msa, (q, k, v, iq, ik), dict(block_size=0), r"block_size"),
        ("bs0_kl", kl, (q, k, iq, ik, idx), dict(block_size=0), r"block_size"),
        ("bs0_recall", rec, (q, k, idx), dict(block_size=0), r"block_size"),
        # q/k/v shape mismatches (B, T, D, H_kv between k and v)
        ("B_k", sa, (q, k[:1], v[:1], idx), {}, r"\bk\b|\bq\b|batch|\bB\b"),
        ("T_k", dense, (q, k[:, :21], v[:, :21]), {}, r"\bk\b|\bq\b|\bT\b|length"),
        ("D_k", dense, (q, k[..., :4], v[..., :4]), {}, r"\bk\b|\bq\b|\bD\b|dim"),
        ("v_shape", dense, (q, k, v[:, :, :1]), {}, r"\bv\b"),
        ("v_T", sa, (q, k, v[:, :20], idx), {}, r"\bv\b"),
        # iq / ik shape mismatches
        ("B_ik", sel, (iq, ik[:1]), {}, r"\bik\b|\biq\b"),
        ("T_ik", sel, (iq, ik[:, :21]), {}, r"\bik\b|\biq\b"),
        ("Didx_ik", sel, (iq, ik[..., :3]), {}, r"\bik\b|\biq\b|D_idx"),
        ("iq_groups_msa", msa, (q, k, v, iq[:, :, :1], ik), {}, r"\biq\b|H_kv|group|head"),
        ("iq_groups_kl", kl, (q, k, iq[:, :, :1], ik, idx), {}, r"\biq\b|H_kv|group|head"),
        ("iq_T_msa", msa, (q, k, v, iq[:, :21], ik[:, :21]), {}, r"\biq\b|\bik\b|\bT\b|length"),
        # block_idx shape / dtype
        ("idx_T", sa, (q, k, v, idx[:, :21]), {}, r"block_idx"),
        ("idx_H", sa, (q, k, v, idx[:, :, :1]), {}, r"block_idx"),
        ("idx_B", kl, (q, k, iq, ik, idx[:1]), {}, r"block_idx"),
        ("idx_ndim", sa, (q, k, v, idx[..., 0]), {}, r"block_idx"),
        ("idx_float", sa, (q, k, v, idx.astype(jnp.float32)), {}, r"block_idx"),
        ("idx_float_kl", kl, (q, k, iq, ik, idx.astype(jnp.float32)), {}, r"block_idx"),
        ("idx_float_recall", rec, (q, k, idx.astype(jnp.float32)), {}, r"block_idx"),
        ("idx_B_recall", rec, (q, k, idx[:1]), {}, r"block_idx"),
        # dtypes
        ("k_dtype", sa, (q, k.astype(jnp.bfloat16), v, idx), {}, r"dtype"),
        ("v_dtype", dense, (q, k, v.astype(jnp.bfloat16)), {}, r"dtype"),
        ("ik_dtype", sel, (iq, ik.astype(jnp.bfloat16)), {}, r"dtype"),
        ("ik_dtype_kl", kl, (q, k, iq, ik.astype(jnp.bfloat16), idx), {}, r"dtype"),
        # ndim
        ("q_ndim", dense, (q[0], k[0], v[0]), {}, r"\bq\b|ndim|rank|dim"),
        ("q_ndim_sparse", sa, (q[..., 0], k, v, idx), {}, r"\bq\b|ndim|rank|dim"),
        ("iq_ndim", sel, (iq[..., 0], ik), {}, r"\biq\b|ndim|rank|dim"),
        ("ik_ndim", sel, (iq, ik[..., None]), {}, r"\bik\b|ndim|rank|dim"),
        # impl
        ("impl_select", sel, (iq, ik), dict(impl="nope"), r"impl"),
        ("impl_sparse", sa, (q, k, v, idx), dict(impl="nope"), r"impl"),
        ("impl_msa", msa, (q, k, v, iq, ik), dict(impl="nope"), r"impl"),
        ("impl_dense", dense, (q, k, v), dict(impl="nope"), r"impl"),
        ("impl_kl", kl, (q, k, iq, ik, idx), dict(impl="nope"), r"impl"),
        ("impl_recall", rec, (q, k, idx), dict(impl="nope"), r"impl"),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_arguments_raise(impl, case):
    name, fn, args, kwargs, pattern = case
    kwargs = dict(kwargs)
    kwargs.setdefault("impl", impl)
    if fn in (ops.select_blocks, ops.sparse_attention, ops.msa_attention, ops.index_kl_loss, ops.selection_recall):
        kwargs.setdefault("block_size", 4)
    if fn in (ops.select_blocks, ops.msa_attention, ops.selection_recall):
        kwargs.setdefault("top_k", 3)
    with pytest.raises(ValueError, match=pattern):
        fn(*args, **kwargs)


def test_valid_arguments_accepted():
    """The well-formed version of the inputs used above does not raise (guards the bad cases)."""
    cfg = CONFIGS["g2_batch2"]
    q, k, v, iq, ik = make_inputs(cfg, seed=0)
    idx = ops.select_blocks(iq, ik, block_size=4, top_k=3)
    ops.sparse_attention(q, k, v, idx, block_size=4)
    ops.msa_attention(q, k, v, iq, ik, block_size=4, top_k=3)
    ops.dense_attention(q, k, v)
    ops.index_kl_loss(q, k, iq, ik, idx, block_size=4)
    ops.index_kl_loss(q, k, iq, ik, None, block_size=4)
    ops.selection_recall(q, k, idx, block_size=4, top_k=3)
