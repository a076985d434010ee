"""Tests for the fused Pallas indexer `pallas.index_topk.select_blocks` (interpret mode on CPU).

The kernel must equal the oracle `msa_jax.ops.reference.select_blocks` exactly (same ids, same
ascending layout, -1 padding). Exactness is tested with integer-valued inputs (every dot product
is exact in f32 and in bf16, so both sides see bit-identical scores and many exact ties); random
normal inputs are compared allowing only rows whose top-k boundary is a near tie (the kernel's and
the oracle's dot products may differ in the last ulp). A few hand-built inputs check the ranking
rules without the oracle, and the "sensitivity" tests make sure the comparisons can fail.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import export_for_h100
from msa_jax.ops import reference
from pallas.index_topk import select_blocks

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _ints(seed, shape, dtype, lo=-2, hi=2):
    """Integer-valued floats in [lo, hi]: exact dot products, lots of exact score ties."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(lo, hi + 1, shape), dtype)


def _normal(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def _inputs(kind, seed, B, T, H, D, dtype):
    make = _ints if kind == "int" else _normal
    return make(seed, (B, T, H, D), dtype), make(seed + 1, (B, T, D), dtype)


@functools.cache
def _oracle_fn(block_size, top_k, sink_blocks, local_blocks=1):
    def f(iq, ik):
        iq, ik = iq.astype(jnp.float32), ik.astype(jnp.float32)
        return (reference.select_blocks(iq, ik, block_size=block_size, top_k=top_k,
                                        sink_blocks=sink_blocks, local_blocks=local_blocks),
                reference.block_scores(iq, ik, block_size))
    return jax.jit(f)


def _oracle(iq, ik, *, block_size, top_k, sink_blocks=0, local_blocks=1):
    """(ids [B, T, R, k], block scores [B, R, T, nb]) of the oracle on the inputs cast to f32."""
    ids, bs = _oracle_fn(block_size, top_k, sink_blocks, local_blocks)(iq, ik)
    return np.asarray(ids), np.asarray(bs)


def _check_layout(out, *, T, block_size, top_k, sink_blocks=0):
    """Spec-level structure, independent of scores: count, order, padding, forced blocks."""
    out = np.asarray(out)
    assert out.dtype == np.int32 and out.shape[1] == T and out.shape[-1] == top_k
    for i in range(T):
        local = i // block_size
        n = min(top_k, local + 1)  # blocks visible to query i (all have finite scores)
        row = out[:, i]  # [B, R, k]
        assert (row[..., n:] == -1).all(), f"row {i}: expected -1 padding after {n} ids"
        valid = row[..., :n]
        assert (valid >= 0).all() and (valid <= local).all(), f"row {i}: invalid ids"
        assert (np.diff(valid, axis=-1) > 0).all(), f"row {i}: ids not strictly ascending"
        assert (valid == local).any(axis=-1).all(), f"row {i}: local block missing"
        n_sinks = min(sink_blocks, local, top_k - 1)
        for c in range(n_sinks):
            assert (valid == c).any(axis=-1).all(), f"row {i}: sink block {c} missing"


def _boundary_ties(ref_ids, bscores, *, block_size, sink_blocks):
    """Rows where an unselected visible ranked block scores exactly like a selected ranked one."""
    B, T, R, _ = ref_ids.shape
    n = 0
    for b in range(B):
        for i in range(T):
            local = i // block_size
            for r in range(R):
                sel = set(ref_ids[b, i, r]) - {-1}
                ranked = [c for c in range(local) if c >= sink_blocks]
                s_in = {bscores[b, r, i, c] for c in ranked if c in sel}
                s_out = {bscores[b, r, i, c] for c in ranked if c not in sel}
                n += bool(s_in & s_out)
    return n


def _assert_matches_up_to_near_ties(out, ref_ids, bscores, *, block_size, top_k, sink_blocks,
                                    rtol, max_frac=0.01):
    """Rows may differ from the oracle only where the swapped blocks' scores are within rtol."""
    out = np.asarray(out)
    bad = np.argwhere((out != ref_ids).any(axis=-1))  # (b, i, r)
    assert len(bad) <= max_frac * out[..., 0].size, f"{len(bad)} rows differ from the oracle"
    for b, i, r in bad:
        got, want = set(out[b, i, r]) - {-1}, set(ref_ids[b, i, r]) - {-1}
        assert len(got) == len(want)
        local = i // block_size
        forced = {local} | set(range(min(sink_blocks, local, top_k - 1)))
        assert forced <= got
        s = bscores[b, r, i]
        lo = min(s[c] for c in got - want)  # kernel's picks the oracle dropped
        hi = max(s[c] for c in want - got)  # oracle's picks the kernel dropped
        assert lo >= hi - rtol * (abs(lo) + abs(hi)), (b, i, r, lo, hi)


# ------------------------------------------------------------------------------------------------
# exact match against the oracle
# ------------------------------------------------------------------------------------------------

# (B, T, H, D, block_size, top_k, sink_blocks, dtype)
EXACT_CASES = [
    (2, 55, 2, 16, 16, 3, 0, jnp.float32),  # T = 3 * bs + 7
    (2, 31, 4, 32, 8, 3, 2, jnp.float32),  # T = 3 * bs + 7, sinks, H = 4
    (2, 16, 1, 16, 16, 3, 0, jnp.float32),  # T = block_size
    (2, 5, 2, 16, 8, 3, 2, jnp.float32),  # T < block_size
    (2, 1, 2, 16, 8, 3, 0, jnp.float32),  # T = 1
    (2, 31, 3, 24, 8, 9, 0, jnp.float32),  # top_k > n_blocks, H = 3, D not a power of two
    (2, 31, 2, 16, 8, 1, 0, jnp.float32),  # top_k = 1: only the local block
    (2, 47, 2, 16, 8, 3, 3, jnp.float32),  # more sinks than free slots: lower sink ids win
    (2, 55, 4, 16, 16, 3, 2, jnp.bfloat16),
    (2, 31, 1, 128, 8, 2, 0, jnp.bfloat16),  # D = 128
    (1, 3 * 128 + 7, 1, 16, 128, 2, 0, jnp.float32),  # block_size 128
]


@pytest.mark.parametrize("B,T,H,D,block_size,top_k,sink_blocks,dtype", EXACT_CASES)
def test_exact_integer_inputs(B, T, H, D, block_size, top_k, sink_blocks, dtype):
    iq, ik = _inputs("int", 1000 + T + H + D, B, T, H, D, dtype)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    out = select_blocks(iq, ik, **kw)
    ref_ids, _ = _oracle(iq, ik, **kw)
    assert out.shape == (B, T, H, top_k) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), ref_ids)
    _check_layout(out, T=T, **kw)


# (B, T, H, D, block_size, top_k, sink_blocks, local_blocks)
LOCAL_CASES = [
    (2, 55, 2, 16, 8, 3, 0, 2),  # one ranked slot
    (2, 31, 4, 16, 8, 4, 1, 2),  # sinks after the local blocks
    (2, 20, 2, 16, 8, 3, 0, 3),  # every slot forced: nothing ranked
    (2, 12, 2, 16, 8, 4, 0, 3),  # fewer blocks (2) than local blocks
    (1, 70, 2, 16, 16, 5, 0, 2),  # top_k > n_blocks
]


@pytest.mark.parametrize("B,T,H,D,block_size,top_k,sink_blocks,local_blocks", LOCAL_CASES)
def test_local_blocks_exact(B, T, H, D, block_size, top_k, sink_blocks, local_blocks):
    iq, ik = _inputs("int", 7 + T + H + top_k, B, T, H, D, jnp.float32)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    out = np.asarray(select_blocks(iq, ik, **kw))
    ref_ids, _ = _oracle(iq, ik, **kw)
    np.testing.assert_array_equal(out, ref_ids)
    for i in range(T):  # the local blocks are in every row
        for c in range(max(0, i // block_size - local_blocks + 1), i // block_size + 1):
            assert (out[:, i] == c).any(axis=-1).all(), (i, c)


@pytest.mark.parametrize("block_size,top_k,sink_blocks,block_q,H", [
    (8, 4, 0, 16, 3),  # row tiles of 16 straddle tokens (H = 3) and blocks
    (16, 3, 1, 32, 2),
    (5, 3, 1, None, 2),  # block size that is not a power of two (3 blocks per key tile)
    (24, 2, 0, None, 1),  # ditto, 24-key blocks in 32-key tiles
])
def test_exact_ties_many_tiles(block_size, top_k, sink_blocks, block_q, H):
    """Values in {-1, 0, 1} and a small D: exact ties at the top-k boundary are common."""
    B, T, D = 2, 70, 16
    iq, ik = _ints(7, (B, T, H, D), jnp.float32, -1, 1), _ints(8, (B, T, D), jnp.float32, -1, 1)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    out = np.asarray(select_blocks(iq, ik, block_q=block_q, **kw))
    ref_ids, bscores = _oracle(iq, ik, **kw)
    assert _boundary_ties(ref_ids, bscores, block_size=block_size, sink_blocks=sink_blocks) > 10
    np.testing.assert_array_equal(out, ref_ids)
    _check_layout(out, T=T, **kw)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-4)])
@pytest.mark.parametrize("T,H,block_size,top_k,sink_blocks", [
    (99, 2, 8, 4, 0),
    (67, 4, 16, 3, 2),
])
def test_random_inputs_vs_oracle(dtype, rtol, T, H, block_size, top_k, sink_blocks):
    B, D = 2, 32
    iq, ik = _inputs("normal", 3, B, T, H, D, dtype)
    kw = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    out = select_blocks(iq, ik, **kw)
    ref_ids, bscores = _oracle(iq, ik, **kw)
    _assert_matches_up_to_near_ties(out, ref_ids, bscores, rtol=rtol, **kw)
    _check_layout(out, T=T, **kw)


def test_jit_and_vmap():
    V, B, T, H, D = 2, 2, 40, 2, 16
    kw = dict(block_size=8, top_k=3, sink_blocks=2)
    iq, ik = _ints(11, (V, B, T, H, D), jnp.float32), _ints(12, (V, B, T, D), jnp.float32)
    f = functools.partial(select_blocks, **kw)
    want = np.stack([_oracle(iq[v], ik[v], **kw)[0] for v in range(V)])
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f))(iq, ik)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(iq[1], ik[1])), want[1])
    # vmap over a non-leading axis of one argument, the other broadcast
    got = jax.vmap(f, in_axes=(2, None), out_axes=2)(iq[0][:, :, :, None], ik[0])
    np.testing.assert_array_equal(np.asarray(got)[:, :, :, 0], want[0])


# ------------------------------------------------------------------------------------------------
# ranking rules checked by hand (no oracle)
# ------------------------------------------------------------------------------------------------


def test_padding_where_fewer_blocks_are_visible():
    B, T, H, D, bs, k = 2, 21, 2, 16, 4, 4  # queries see 1..6 blocks
    iq, ik = _normal(5, (B, T, H, D), jnp.float32), _normal(6, (B, T, D), jnp.float32)
    out = np.asarray(select_blocks(iq, ik, block_size=bs, top_k=k))
    n_valid = (out >= 0).sum(-1)  # [B, T, H]
    expected = np.minimum(np.arange(T) // bs + 1, k)
    np.testing.assert_array_equal(n_valid, np.broadcast_to(expected[None, :, None], n_valid.shape))
    assert (out[:, :4][..., 1:] == -1).all() and (out[:, 4:8][..., 2:] == -1).all()
    assert (out[:, 12:] >= 0).all()


def test_equal_scores_prefer_lower_block_ids():
    """All scores equal (zero keys): the local block plus the lowest ids."""
    B, T, H, D, bs, k = 1, 48, 2, 16, 8, 3
    iq = _normal(1, (B, T, H, D), jnp.float32)
    ik = jnp.zeros((B, T, D), jnp.float32)
    out = np.asarray(select_blocks(iq, ik, block_size=bs, top_k=k))
    for i in range(T):
        local = i // bs
        want = sorted({local} | set(range(min(local, k - 1))))
        want = want + [-1] * (k - len(want))
        assert (out[:, i] == np.asarray(want)).all(), (i, out[0, i], want)


def test_scores_increasing_with_block_id_and_sinks():
    """Key j scores j (iq = e_0, ik[j] = j e_0): the best ranked blocks are the latest visible."""
    B, T, H, D, bs, k, sinks = 1, 64, 1, 16, 8, 4, 1
    iq = jnp.zeros((B, T, H, D), jnp.float32).at[..., 0].set(1.0)
    ik = jnp.zeros((B, T, D), jnp.float32).at[..., 0].set(jnp.arange(T, dtype=jnp.float32))
    out = np.asarray(select_blocks(iq, ik, block_size=bs, top_k=k, sink_blocks=sinks))
    for i in range(T):
        local = i // bs
        want = {local} | ({0} if local > 0 else set())
        cands = [c for c in range(local - 1, sinks - 1, -1)]  # ranked, best first
        want |= set(cands[: k - len(want)])
        want = sorted(want) + [-1] * (k - len(want))
        np.testing.assert_array_equal(out[0, i, 0], want, err_msg=f"row {i}")


# ------------------------------------------------------------------------------------------------
# the comparisons can fail
# ------------------------------------------------------------------------------------------------


def test_wrong_inputs_change_the_answer():
    B, T, H, D = 2, 55, 2, 16
    kw = dict(block_size=8, top_k=3, sink_blocks=0)
    iq, ik = _inputs("normal", 21, B, T, H, D, jnp.float32)
    ref_ids, _ = _oracle(iq, ik, **kw)
    np.testing.assert_array_equal(np.asarray(select_blocks(iq, ik, **kw)), ref_ids)
    reversed_keys = np.asarray(select_blocks(iq, ik[:, ::-1], **kw))
    swapped_groups = np.asarray(select_blocks(iq[:, :, ::-1], ik, **kw))
    assert (reversed_keys != ref_ids).any(axis=-1).mean() > 0.2
    assert (swapped_groups != ref_ids).any(axis=-1).mean() > 0.2
    # and the near-tie comparison rejects them
    _, bscores = _oracle(iq, ik, **kw)
    with pytest.raises(AssertionError):
        _assert_matches_up_to_near_ties(reversed_keys, ref_ids, bscores, rtol=1e-5, **kw)


def test_upper_id_tie_rule_would_be_caught():
    """Flip the tie rule on the oracle's own output: the exact comparison must notice."""
    B, T, H, D = 1, 70, 2, 16
    kw = dict(block_size=8, top_k=3, sink_blocks=0)
    iq, ik = _ints(7, (B, T, H, D), jnp.float32, -1, 1), _ints(8, (B, T, D), jnp.float32, -1, 1)
    out = np.asarray(select_blocks(iq, ik, **kw))
    # higher id wins ties <=> lower id wins ties on the time-reversed block order: emulate by
    # ranking -id as tie key in numpy from the oracle scores.
    _, bscores = _oracle(iq, ik, **kw)
    flipped = np.full_like(out, -1)
    for i in range(T):
        local = i // 8
        for r in range(H):
            s = bscores[0, r, i]
            ranked = sorted(range(local), key=lambda c: (-s[c], -c))[: kw["top_k"] - 1]
            ids = sorted(ranked + [local])
            flipped[0, i, r, : len(ids)] = ids
    assert (flipped != out).any()


# ------------------------------------------------------------------------------------------------
# structure: a real pallas_call, no [T, n_blocks] array, lowers to Triton
# ------------------------------------------------------------------------------------------------


def test_no_block_score_matrix_outside_the_kernel():
    B, T, H, D, bs, k = 1, 512, 2, 16, 4, 4  # n_blocks = 128 >> D, top_k
    f = functools.partial(select_blocks, block_size=bs, top_k=k)
    jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
                              jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16))
    prims = set()
    biggest = 0

    def walk(jx):
        nonlocal biggest
        for eqn in jx.eqns:
            prims.add(eqn.primitive.name)
            for v in eqn.outvars:
                biggest = max(biggest, int(np.prod(v.aval.shape)))
            if eqn.primitive.name == "pallas_call":
                continue  # the kernel body works on on-chip tiles
            for p in eqn.params.values():
                if hasattr(p, "eqns"):
                    walk(p)
                elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                    walk(p.jaxpr)

    walk(jaxpr.jaxpr)
    assert "pallas_call" in prims
    # Nothing bigger than iq itself ([B, T, H, D]); the block scores would be 8x bigger.
    assert biggest <= B * T * H * D < B * H * T * (T // bs) // 4, biggest




@pytest.mark.parametrize("B,T,H,D,block_size,top_k,sink_blocks,dtype", [
    (1, 8192, 4, 128, 128, 16, 0, jnp.bfloat16),  # paper head config
    (2, 55, 3, 24, 8, 3, 2, jnp.float32),  # tiny blocks, odd H and D
    (1, 1000, 2, 64, 48, 5, 1, jnp.bfloat16),  # block size not a power of two
])
def test_lowers_to_triton(B, T, H, D, block_size, top_k, sink_blocks, dtype):
    f = functools.partial(select_blocks, block_size=block_size, top_k=top_k,
                          sink_blocks=sink_blocks, interpret=False)
    text = export_for_h100(f, jax.ShapeDtypeStruct((B, T, H, D), dtype),
                           jax.ShapeDtypeStruct((B, T, D), dtype))
    assert "__gpu$xla.gpu.triton" in text and "msa_index_topk" in text


def test_vmapped_kernel_lowers_to_triton():
    f = jax.vmap(functools.partial(select_blocks, block_size=16, top_k=4, interpret=False))
    text = export_for_h100(f, jax.ShapeDtypeStruct((3, 2, 100, 2, 32), jnp.bfloat16),
                           jax.ShapeDtypeStruct((3, 2, 100, 32), jnp.bfloat16))
    assert "__gpu$xla.gpu.triton" in text


def test_batch_split_for_int32_offsets(monkeypatch):
    """Operands over the int32-offset limit are processed in batch chunks (limit shrunk here)."""
    import pallas.index_topk as mod

    B, T, H, D = 3, 37, 2, 16  # a shape no other test compiles (the jit cache keys on shapes)
    kw = dict(block_size=8, top_k=3, sink_blocks=0)
    iq, ik = _inputs("int", 31, B, T, H, D, jnp.float32)
    per_batch = 128 * 16  # iq rows (74 -> 2 tiles of 64) x 16 lanes: the largest operand
    monkeypatch.setattr(mod, "_MAX_CALL_ELEMS", 2 * per_batch)
    f = functools.partial(select_blocks, **kw)
    jaxpr = str(jax.make_jaxpr(f)(iq, ik))
    assert jaxpr.count("pallas_call[") == 2, "expected 2 calls: batch chunks of 2 + 1"
    np.testing.assert_array_equal(np.asarray(f(iq, ik)), _oracle(iq, ik, **kw)[0])
    monkeypatch.setattr(mod, "_MAX_CALL_ELEMS", per_batch - 1)
    with pytest.raises(ValueError, match="int32"):
        select_blocks(iq[:, :36], ik[:, :36], **kw)


def test_rejects_bad_arguments():
    iq, ik = jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 16))
    with pytest.raises(ValueError):
        select_blocks(iq, ik.astype(jnp.bfloat16), block_size=4, top_k=2)
    with pytest.raises(ValueError):
        select_blocks(iq, ik[:, :4], block_size=4, top_k=2)
    with pytest.raises(ValueError):
        select_blocks(iq, ik, block_size=4, top_k=0)
    with pytest.raises(ValueError):
        select_blocks(iq, ik, block_size=4, top_k=2, block_q=24)
