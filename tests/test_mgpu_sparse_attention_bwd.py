"""The Mosaic GPU main-branch backward (`pallas.mgpu_sparse_attention_bwd`) against the Triton backward
(`pallas.sparse_attention_bwd`, itself tested against the oracle) and against autodiff of the
float32 oracle.

On a CPU the unit kernel runs in the Mosaic GPU interpreter of jax 0.11.2 (with its race detector) in
one subprocess started with XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false, as in
tests/test_mgpu_sparse_attention.py (conftest.mgpu_interpreter_reports says why); the Triton backward runs in the Pallas interpreter.
On a GPU the same cases run the compiled kernel in-process. The register-operand variant a GPU runs
(P^T from registers) is checked by lowering it to Mosaic GPU without a GPU.
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

from conftest import SELECTIONS, attention_oracle, mgpu_interpreter_reports, qkv, triton_ir_for_h100
from pallas import mgpu_sparse_attention_bwd as mb
from pallas import sparse_attention as sa
from pallas.sparse_attention import sparse_attention_fwd
from pallas.sparse_attention_bwd import sparse_attention_bwd

# name -> (B, T, H_kv, G, D, top_k, selection, tiles_per_unit, query_chunk, q_pos, dlse)
CASES = {
    # paper tile: G = 16 (BQ = 4 tokens per 64-row tile), D = 128; 4 tiles per unit: hot blocks split
    # into several units; an lse cotangent
    "g16_d128": (1, 260, 1, 16, 128, 2, "hand", 4, None, False, True),
    # G = 6 -> G_pad 8 (BQ = 8), D = 64 (warpgroup 0 computes dq alone), two KV groups; queries at
    # positions (120 of 384 keys, 7 padding queries), two query chunks
    "g6_d64_qpos": (1, 120, 2, 6, 64, 3, "indexer", 16, 60, True, False),
    # G = 3 -> G_pad 4 (BQ = 16; plain-SMEM slabs rewritten per consumer), D = 64, messy ids
    "g3_d64": (1, 200, 2, 3, 64, 7, "messy", 16, None, False, False),
}
BS = 128
VJP_CASE = "g6_d64_qpos"  # also through pallas.sparse_attention's custom_vjp


def seed_of(name) -> int:
    return sorted(CASES).index(name)


def _inputs(name):
    B, T, H_kv, G, D, top_k, selection, W, qc, with_pos, with_dlse = CASES[name]
    seed = seed_of(name)
    pos = None
    if not with_pos:
        q, k, v = qkv(seed, B, T, H_kv, G, D, jnp.bfloat16)
        ids = SELECTIONS[selection](seed, B, T, H_kv, BS, top_k)
    else:
        L = 3 * BS
        q_all, k, v = qkv(seed, B, L, H_kv, G, D, jnp.bfloat16)
        p = np.arange(L - T, L, dtype=np.int32)[None].repeat(B, 0)
        p[:, np.random.default_rng(seed).choice(T, 7, replace=False)] = -1
        take = np.maximum(p, 0)
        q = jnp.take_along_axis(q_all, jnp.asarray(take)[:, :, None, None], axis=1)
        ids = np.take_along_axis(np.asarray(SELECTIONS[selection](seed, B, L, H_kv, BS, top_k)),
                                 take[:, :, None, None], axis=1)
        ids, pos = jnp.asarray(ids), jnp.asarray(p)
    kd = jax.random.split(jax.random.key(100 + seed))
    dout = jax.random.normal(kd[0], q.shape, jnp.bfloat16)
    dlse = jax.random.normal(kd[1], q.shape[:3], jnp.float32) if with_dlse else None
    return q, k, v, ids, pos, dout, dlse


def _rel(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_case(name) -> dict:
    """One case (in the child process on a CPU) -> a JSON-able report: the largest difference of dq,
    dk, dv to the Triton backward's and to autodiff of the float32 oracle, relative to the largest
    entry."""
    B, T, H_kv, G, D, top_k, selection, W, qc, with_pos, with_dlse = CASES[name]
    q, k, v, ids, pos, dout, dlse = _inputs(name)
    out, lse = sparse_attention_fwd(q, k, v, ids, block_size=BS, q_pos=pos, fwd_kernel="triton")
    gpu = jax.default_backend() == "gpu"
    interpret = None if gpu else plgpu.InterpretGPUParams(detect_races=True)
    t0 = time.perf_counter()
    got = mb.sparse_attention_bwd_mgpu(q, k, v, ids, out, lse, dout, dlse, block_size=BS, q_pos=pos,
                                       config=mb.MGPUBwdConfig(tiles_per_unit=W, query_chunk=qc), interpret=interpret)
    got = jax.block_until_ready(got)
    report = {"name": name, "seconds": time.perf_counter() - t0}
    tri = sparse_attention_bwd(q, k, v, ids, out, lse, dout, dlse, block_size=BS, q_pos=pos, query_chunk=qc)
    report["triton"] = [_rel(a, b) for a, b in zip(got, tri)]
    if pos is None:  # autodiff of the float32 oracle (out, lse) with the same cotangents
        oracle = attention_oracle(BS)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]

        def loss(q, k, v):
            o, l = oracle(q, k, v, ids)
            extra = (jnp.where(jnp.isfinite(l), l, 0.0) * dlse).sum() if dlse is not None else 0.0
            return (o * dout.astype(jnp.float32)).sum() + extra

        ref = jax.grad(loss, argnums=(0, 1, 2))(*f32)
        report["oracle"] = [_rel(a, b) for a, b in zip(got, ref)]
    if pos is not None:  # padding queries get dq = 0
        report["padding_dq_zero"] = bool((np.asarray(got[0])[np.asarray(pos) < 0] == 0).all())
    if name == VJP_CASE:  # sparse_attention(bwd_kernel="mosaic"): the same gradients through the custom_vjp
        w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

        def loss(q, k, v, kernel):
            o, l = sa.sparse_attention(q, k, v, ids, block_size=BS, q_pos=pos, query_chunk=qc, tiles_per_unit=W,
                                       fwd_kernel="triton", bwd_kernel=kernel)
            return (o.astype(jnp.float32) * w).sum() + jnp.where(jnp.isfinite(l), l, 0.0).sum()

        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "mosaic")
        t_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "triton")
        report["vjp"] = [_rel(a, b) for a, b in zip(grads, t_grads)]
    return report


@pytest.fixture(scope="module")
def reports():
    return mgpu_interpreter_reports(__file__, list(CASES), run_case)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_triton_and_oracle(name, reports):
    r = reports[name]
    # Both kernels round dq partials and P / dS to bf16 before products: the gradients agree to a few
    # bf16 roundings of their largest entry; against the float32 oracle, as the Triton backward's tests.
    assert max(r["triton"]) <= 1e-2, r
    if "oracle" in r:
        assert max(r["oracle"]) <= 2e-2, r
    if "padding_dq_zero" in r:
        assert r["padding_dq_zero"], r
    if name == VJP_CASE:
        assert max(r["vjp"]) <= 1e-2, r
    assert r["races"] == 0, r


@pytest.mark.parametrize("T, H_kv, G, D", [(4096, 4, 16, 128), (2048, 2, 8, 64), (4096, 4, 4, 64)])
def test_lowers_to_mosaic_gpu_for_sm90(T, H_kv, G, D):
    """The variant a GPU runs (P^T from registers) lowers for sm_90 without a GPU, within 227 KiB."""
    sd = jax.ShapeDtypeStruct
    q, k = sd((1, T, H_kv * G, D), jnp.bfloat16), sd((1, T, H_kv, D), jnp.bfloat16)
    ids, lse = sd((1, T, H_kv, 16), jnp.int32), sd((1, T, H_kv * G), jnp.float32)
    fn = functools.partial(mb.sparse_attention_bwd_mgpu, block_size=BS, interpret=False)
    assert "mosaic_gpu" in triton_ir_for_h100(fn, q, k, k, ids, q, lse, q)
    bq = 64 // G
    assert mb.smem_bytes(D, bq, 16, mb.default_q_slots(D, bq, 16)) + mb.SMEM_RESERVE <= mb.SMEM_LIMIT


def test_bad_arguments():
    q, k, v = qkv(0, 1, 16, 1, 16, 64, jnp.bfloat16)
    ids = jnp.zeros((1, 16, 1, 2), jnp.int32)
    lse = jnp.zeros((1, 16, 16), jnp.float32)
    with pytest.raises(ValueError, match="block_size"):
        mb.sparse_attention_bwd_mgpu(q, k, v, ids, q, lse, q, block_size=64)
    q2, k2, v2 = qkv(0, 1, 16, 1, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="heads per group"):
        mb.sparse_attention_bwd_mgpu(q2, k2, v2, ids, q2, lse[..., :2], q2, block_size=128)
    with pytest.raises(ValueError, match="bfloat16|dtype"):
        f = [x.astype(jnp.float32) for x in (q, k, v)]
        mb.sparse_attention_bwd_mgpu(*f, ids, f[0], lse, f[0], block_size=128)
    with pytest.raises(ValueError, match="tiles_per_unit"):
        mb.MGPUBwdConfig(tiles_per_unit=0)
    q4, k4, v4 = qkv(0, 1, 16, 1, 4, 128, jnp.bfloat16)  # G_pad 4 with D 128: does not fit in shared memory
    with pytest.raises(ValueError, match="shared memory"):
        mb.sparse_attention_bwd_mgpu(q4, k4, v4, ids, q4, lse[..., :4], q4, block_size=128)
    with pytest.raises(ValueError, match="bwd_kernel"):
        sa.sparse_attention(q, k, v, ids, block_size=128, bwd_kernel="cutlass")
    with pytest.raises(ValueError, match="block_size"):
        sa.sparse_attention(q, k, v, ids, block_size=64, bwd_kernel="mosaic")


def test_auto_picks_mosaic_on_hopper_from_8_heads_per_group(monkeypatch):
    from pallas import mgpu_sparse_attention as mg

    def abstract(G, D, dtype=jnp.bfloat16):
        return (jax.ShapeDtypeStruct((1, 512, 2 * G, D), dtype), jax.ShapeDtypeStruct((1, 512, 2, D), dtype),
                jax.ShapeDtypeStruct((1, 512, 2, 4), jnp.int32))

    used = functools.partial(sa.bwd_kernel_used, block_size=128, interpret=False)
    assert used(*abstract(16, 128)) == ("mosaic" if mg.on_hopper() else "triton")
    monkeypatch.setattr(mg, "on_hopper", lambda: True)
    assert used(*abstract(16, 128)) == "mosaic"
    assert used(*abstract(8, 64)) == "mosaic"
    assert used(*abstract(5, 128)) == "mosaic"  # padded to 8
    assert used(*abstract(4, 64)) == "triton"  # as fast as Triton there (BENCHMARKS.md)
    assert used(*abstract(16, 128, jnp.float32)) == "triton"
    assert used(*abstract(16, 128), bwd_kernel="triton") == "triton"
    assert used(*abstract(4, 64), bwd_kernel="mosaic") == "mosaic"
    assert sa.bwd_kernel_used(*abstract(16, 128), block_size=128, interpret=True) == "triton"
    assert sa.bwd_kernel_used(*abstract(16, 128), block_size=64, interpret=False) == "triton"
    sz = mb.kvo.sizes(*[abstract(16, 128)[i] for i in (0, 1, 2)], 128)
    assert not sa._use_mosaic_bwd("auto", sz, jnp.bfloat16, False, True)  # block_q (a Triton knob) given
    monkeypatch.setattr(mg, "on_hopper", lambda: False)
    assert used(*abstract(16, 128)) == "triton"


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    for case in sys.argv[2:]:
        print(json.dumps(run_case(case)), flush=True)
