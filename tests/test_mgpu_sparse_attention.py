"""The Mosaic GPU main-branch forward (`pallas.mgpu_sparse_attention`) and its dispatch from
`pallas.sparse_attention` (`fwd_kernel`).

On a CPU the kernel runs in the Mosaic GPU interpreter of jax 0.11.2 (`plgpu.InterpretGPUParams`:
simulated warpgroups, TMA, barriers and wgmma), checked against the oracle
(`msa_jax.ops.reference`, float32) and the Triton kernel (`sparse_attention_fwd`, interpret mode).
On a GPU the same tests run the compiled kernel. The interpreter deadlocks on a 2-core machine under
XLA:CPU's concurrency-optimised scheduler (its simulated warpgroups block inside host callbacks),
so those cases run in one subprocess started with
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false (a flag only read when the CPU
backend starts). Interpreted, the kernel's wgmma A operands held in registers (P, and q for G_pad <
8) go through SMEM (`regs_a=False`: the interpreter's wgmma reads SMEM refs only); the register
variant that a GPU runs is checked by lowering it to Mosaic GPU for sm_90 without a GPU (layouts,
wgmma shapes, TMA, shared memory fit), as tests/conftest.py `triton_ir_for_h100` does for Triton.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from conftest import SELECTIONS, attention_oracle, check_attention, mgpu_interpreter_reports, qkv, triton_ir_for_h100
from pallas import mgpu_sparse_attention as mg
from pallas import sparse_attention as sa
from pallas.sparse_attention import sparse_attention_fwd


# name -> (B, T, H_kv, G, D, block_size, top_k, selection, tiles_per_program, q_slots, query_chunk, q_pos)
CASES = {
    # paper tile: G = 16, BQ = 8; D = 128 (one K/V buffer: two do not fit in 227 KiB with the rest)
    "g16_bq8_d128": (1, 300, 1, 16, 128, 128, 2, "hand", 8, 2, None, False),
    # G = 4, BQ = 32 (q slabs of 4 rows: plain SMEM, then registers); B*H_kv = 2; two K/V buffers
    "g4_bq32_d64": (1, 300, 2, 4, 64, 128, 3, "indexer", 16, 2, None, False),
    # q slabs gathered from q's own layout (G = G_pad, D = D_pad: `native_q`) with B = 2, H_kv = 2 and
    # 2 query chunks (the slabs' batch row, group and chunk offset); the other cases without padding
    # take this path too, g12 the rows copy
    "g4_b2_chunks": (2, 200, 2, 4, 64, 128, 3, "indexer", 8, 2, 100, False),
    # queries at positions (a slice of 120 of 384 keys, 7 padding queries), G = 12 -> G_pad 16, 2 chunks,
    # 3 q buffers, 4 tiles per CTA
    "g12_qpos_chunks": (1, 120, 2, 12, 64, 128, 3, "hand", 4, 3, 60, True),
    # the pingpong schedule (MGPUConfig(pingpong=True): the consumers take turns through a schedule
    # barrier), G = 16, BQ = 8, hot blocks split over CTAs, dead tiles at the end of the last CTA; D = 128
    # has one K/V buffer, where a block change inside a CTA deadlocked the first schedule (on an H200
    # and here), D = 64 two
    "g16_pingpong": (1, 200, 1, 16, 128, 128, 2, "hand", 8, 2, None, False),
    "g16_d64_pingpong": (1, 200, 1, 16, 64, 128, 2, "hand", 8, 2, None, False),
}


def seed_of(name) -> int:
    return sorted(CASES).index(name)


def _inputs(name):
    B, T, H_kv, G, D, bs, top_k, selection, nt, q_slots, qc, with_pos = CASES[name]
    seed = seed_of(name)
    if not with_pos:
        q, k, v = qkv(seed, B, T, H_kv, G, D, jnp.bfloat16)
        return q, k, v, SELECTIONS[selection](seed, B, T, H_kv, bs, top_k), None
    L = 3 * bs
    q_all, k, v = qkv(seed, B, L, H_kv, G, D, jnp.bfloat16)
    pos = np.arange(L - T, L, dtype=np.int32)[None].repeat(B, 0)
    pos[:, np.random.default_rng(seed).choice(T, 7, replace=False)] = -1
    ids = np.asarray(SELECTIONS[selection](seed, B, L, H_kv, bs, top_k))
    take = np.maximum(pos, 0)
    q = jnp.take_along_axis(q_all, jnp.asarray(take)[:, :, None, None], axis=1)
    ids = np.take_along_axis(ids, take[:, :, None, None], axis=1)
    return q, k, v, jnp.asarray(ids), jnp.asarray(pos)


def run_case(name) -> dict:
    """Run one case (in the child process on a CPU): the Mosaic GPU kernel against the Triton kernel and,
    without q_pos, against the oracle. Returns a JSON-able report."""
    B, T, H_kv, G, D, bs, top_k, selection, nt, q_slots, qc, with_pos = CASES[name]
    q, k, v, ids, pos = _inputs(name)
    config = mg.MGPUConfig(tiles_per_program=nt, q_slots=q_slots, query_chunk=qc, pingpong=name.endswith("pingpong"))
    gpu = jax.default_backend() == "gpu"
    interpret = None if gpu else plgpu.InterpretGPUParams(detect_races=True)
    t0 = time.perf_counter()
    out, lse = mg.sparse_attention_fwd_mgpu(q, k, v, ids, block_size=bs, q_pos=pos, config=config,
                                            interpret=interpret)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    # races: the interpreter's happens-before race detector prints "RACE DETECTED" (the parent counts)
    report = {"name": name, "seconds": time.perf_counter() - t0, "oracle": "skipped"}
    t_out, t_lse = sparse_attention_fwd(q, k, v, ids, block_size=bs, q_pos=pos, query_chunk=qc, fwd_kernel="triton")
    t_out, t_lse = np.asarray(t_out.astype(jnp.float32)), np.asarray(t_lse)
    live = np.ones(out.shape[:2], bool) if pos is None else np.asarray(pos) >= 0
    if with_pos:  # the differentiable op with the Mosaic GPU forward: same values, Triton's backward
        w = jax.random.normal(jax.random.key(seed_of(name)), q.shape, jnp.float32)

        def loss(q, k, v, kernel):
            o, l = sa.sparse_attention(q, k, v, ids, block_size=bs, q_pos=pos, query_chunk=qc, fwd_kernel=kernel)
            return (o.astype(jnp.float32) * w).sum() + jnp.where(jnp.isfinite(l), l, 0.0).sum(), o

        (_, v_out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "mosaic")
        (_, _), t_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "triton")
        report["vjp_out_maxdiff"] = float(np.abs(np.asarray(v_out.astype(jnp.float32)) - out).max())
        report["vjp_grad_rel_diff"] = max(
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())
            for a, b in zip(grads, t_grads))
    report["triton_out_maxdiff"] = float(np.abs(out[live] - t_out[live]).max())
    report["triton_lse_maxdiff"] = float(np.abs(lse[live] - t_lse[live]).max())  # dead rows: -inf on both
    report["padding_ok"] = bool((out[~live] == 0).all() and np.isneginf(lse[~live]).all())
    if pos is None:
        ref_out, ref_lse = attention_oracle(bs)(q, k, v, ids)
        try:
            check_attention(jnp.asarray(out, jnp.bfloat16), jnp.asarray(lse), ref_out, ref_lse, jnp.bfloat16)
            report["oracle"] = "ok"
        except AssertionError as e:
            report["oracle"] = str(e)[:2000]
    return report


@pytest.fixture(scope="module")
def reports():
    """Every case's report: in this process on a GPU, else from one interpreter subprocess."""
    return mgpu_interpreter_reports(__file__, list(CASES), run_case)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle_and_triton(name, reports):
    r = reports[name]
    assert r["oracle"] in ("ok", "skipped"), r["oracle"]
    if not CASES[name][-1]:
        assert r["oracle"] == "ok"
    # Both write bf16 per-slot partials from float32 tiles and combine them in float32: the outputs
    # agree to a bf16 rounding of a partial; the lse to float32 rounding.
    assert r["triton_out_maxdiff"] <= 1e-2, r
    assert r["triton_lse_maxdiff"] <= 1e-4, r
    assert r["padding_ok"], r
    assert r["races"] == 0, r
    if CASES[name][-1]:  # sparse_attention(fwd_kernel="mosaic"): the same forward; the backward from it
        assert r["vjp_out_maxdiff"] == 0.0, r
        assert r["vjp_grad_rel_diff"] <= 2e-2, r


def test_fwd_kernel_dispatch(monkeypatch):
    """"auto" takes Mosaic GPU only compiled on a Hopper GPU, for bf16 shapes it supports and without
    Triton tuning knobs; "mosaic" refuses what it does not support; unknown names are errors."""
    q, k, v, ids = _abstract(1, 512, 4, 16, 128, 4)
    sz = mg.kvo.sizes(q, k, ids, 128)
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert not sa._use_mosaic("auto", sz, bf16, None, False) or mg.on_hopper()
    assert not sa._use_mosaic("triton", sz, bf16, False, False)
    assert sa._use_mosaic("mosaic", sz, bf16, True, False)
    with pytest.raises(ValueError, match="bfloat16"):
        sa._use_mosaic("mosaic", sz, f32, False, False)
    with pytest.raises(ValueError, match="fwd_kernel"):
        sa._use_mosaic("cutlass", sz, bf16, False, False)
    assert sa.fwd_kernel_used(q, k, ids, block_size=128) == ("mosaic" if mg.on_hopper() else "triton")
    monkeypatch.setattr(mg, "on_hopper", lambda: True)
    assert sa._use_mosaic("auto", sz, bf16, False, False)
    assert sa.fwd_kernel_used(q, k, ids, block_size=128, interpret=False) == "mosaic"
    assert sa.fwd_kernel_used(q, k, ids, block_size=128, interpret=False, fwd_kernel="triton") == "triton"
    assert not sa._use_mosaic("auto", sz, bf16, True, False)  # interpreted: Triton
    assert not sa._use_mosaic("auto", sz, bf16, False, True)  # Triton knobs given
    assert not sa._use_mosaic("auto", sz, f32, False, False)
    q64, k64, v64, ids64 = _abstract(1, 512, 1, 128, 64, 4)  # G = 128 > one consumer's 64 rows
    assert not sa._use_mosaic("auto", mg.kvo.sizes(q64, k64, ids64, 128), bf16, False, False)
    monkeypatch.setattr(mg, "on_hopper", lambda: False)
    assert not sa._use_mosaic("auto", sz, bf16, False, False)


# ------------------------------------------------------------------------------ lowering (no GPU)


def _abstract(B, T, H_kv, G, D, top_k, L=None):
    L = L or T
    return (jax.ShapeDtypeStruct((B, T, H_kv * G, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, L, H_kv, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, L, H_kv, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, T, H_kv, top_k), jnp.int32))


@pytest.mark.parametrize(
    "B, T, H_kv, G, D, bs, top_k, nt, q_slots, pingpong",
    [
        (1, 4096, 4, 16, 128, 128, 16, 16, 2, False),  # paper heads: one K/V buffer
        (1, 4096, 4, 16, 128, 128, 16, 16, 2, True),  # the same with the pingpong schedule
        (1, 4096, 4, 16, 128, 128, 16, 32, 3, False),  # three q buffers
        (1, 1000, 2, 4, 64, 128, 4, 16, 2, False),  # G_pad < 8: q through registers; two K/V buffers
        (2, 1000, 1, 8, 64, 64, 4, 8, 2, False),  # block_size 64
    ],
)
def test_lowers_to_mosaic_gpu_for_sm90(B, T, H_kv, G, D, bs, top_k, nt, q_slots, pingpong):
    config = mg.MGPUConfig(tiles_per_program=nt, q_slots=q_slots, pingpong=pingpong)
    fn = functools.partial(mg.sparse_attention_fwd_mgpu, block_size=bs, config=config, interpret=False)
    text = triton_ir_for_h100(fn, *_abstract(B, T, H_kv, G, D, top_k))
    assert "mosaic_gpu" in text  # the tile kernel
    assert "__gpu$xla.gpu.triton" in text  # kv_outer's combine
    G_pad = 1 << (G - 1).bit_length()
    kv_slots = mg.default_kv_slots(G_pad, D, bs, nt, q_slots)
    assert mg.smem_bytes(G_pad, D, bs, nt, q_slots, kv_slots) + mg.SMEM_RESERVE <= mg.SMEM_LIMIT


def test_two_kv_buffers_do_not_fit_at_d128():
    """Lowering checks the 227 KiB: two K/V buffers with two q buffers and the output staging exceed
    it at D = 128 (the default then takes one K/V buffer)."""
    assert mg.default_kv_slots(16, 128, 128, 16, 2) == 1
    assert mg.default_kv_slots(16, 64, 128, 16, 2) == 2
    q, k, v, ids = _abstract(1, 512, 1, 16, 128, 4)
    sz = mg.kvo.sizes(q, k, ids, 128)
    plan = mg.plan_for(sz, mg.MGPUConfig(), False)
    n = plan.n_tiles
    args = (jax.ShapeDtypeStruct((1, n), jnp.int32), jax.ShapeDtypeStruct((1, n * 8), jnp.int32),
            jax.ShapeDtypeStruct((1, n * 128), jnp.int32), jax.ShapeDtypeStruct((1, 512 * 16, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 512, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 512, 128), jnp.bfloat16))
    fn = functools.partial(mg.tile_partials, block_size=128, G_pad=16, D_orig=128, nt=plan.tiles_per_program,
                           kv_slots=2)
    with pytest.raises(Exception, match="shared memory"):
        triton_ir_for_h100(fn, *args)


def test_bad_arguments():
    q, k, v = qkv(0, 1, 16, 1, 4, 64, jnp.float32)
    ids = jnp.zeros((1, 16, 1, 2), jnp.int32)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        mg.sparse_attention_fwd_mgpu(q, k, v, ids, block_size=64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="block_size"):
        mg.sparse_attention_fwd_mgpu(q, k, v, ids, block_size=16)
    with pytest.raises(ValueError, match="tiles_per_program"):
        mg.MGPUConfig(tiles_per_program=6)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    for case in sys.argv[2:]:
        print(json.dumps(run_case(case)), flush=True)
