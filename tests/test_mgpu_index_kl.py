"""The Mosaic GPU KL teacher pass (`pallas.mgpu_index_kl`, `index_kl_sum(kl_kernel="mosaic")`).

On a CPU the kernel runs in the Mosaic GPU interpreter of jax 0.11.2 with its race detector, in a
subprocess with XLA:CPU's concurrency-optimised scheduler off (see tests/test_mgpu_sparse_attention.py:
the interpreter deadlocks under it on two cores), against the oracle and the Triton teacher pass. The
register variant a GPU runs is checked by lowering it for sm_90 without a GPU. On a GPU the same
case runs compiled.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mgpu_interpreter_reports, triton_ir_for_h100
from test_pallas_index_kl import _inputs, _messy_ids, _oracle_fn
from pallas import kv_outer as kvo
from pallas import mgpu_index_kl as mk
from pallas.index_kl import _index_kl_sum_fused, index_kl_sum
from pallas.sparse_attention import sparse_attention_fwd

# B, T, H_kv, G (12 -> G_pad 16: padded heads), D, D_idx, block_size, top_k (messy: repeats, junk ids, empty rows)
CASE = (1, 260, 2, 12, 64, 64, 128, 5)


def run_case() -> dict:
    """index_kl_sum with the Mosaic GPU pass: value and d iq, d ik under a random cotangent, against
    the oracle and the Triton pass (relative to the largest |value|)."""
    B, T, H_kv, G, D, Di, bs, top_k = CASE
    q, k, iq, ik, _ = _inputs(7, B, T, H_kv, G, D, Di, jnp.bfloat16)
    ids = _messy_ids(7, B, T, H_kv, bs, top_k)
    lse = sparse_attention_fwd(q, k, k, ids, block_size=bs, fwd_kernel="triton")[1]
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.uniform(0.0, 1.0, (B, T)).astype(np.float32))
    c = jnp.asarray(rng.standard_normal((B, H_kv)).astype(np.float32))
    out = {}
    for kernel in ("mosaic", "triton"):
        fn = lambda a, b: index_kl_sum(q, k, a, b, ids, lse, w, block_size=bs, kl_kernel=kernel)  # noqa: E731
        value, vjp = jax.vjp(fn, iq, ik)
        out[kernel] = [np.asarray(x, np.float32) for x in (value, *vjp(c))]
    ref_kl, _, (ref_diq, ref_dik) = _oracle_fn(bs)(q, k, iq, ik, ids, c[:, None, :] * w[:, :, None])
    ref = [np.asarray((ref_kl * w[..., None]).sum(1)), np.asarray(ref_diq, np.float32), np.asarray(ref_dik, np.float32)]

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    names = ("value", "d_iq", "d_ik")
    return {"vs_oracle": {n: rel(a, b) for n, a, b in zip(names, out["mosaic"], ref)},
            "vs_triton": {n: rel(a, b) for n, a, b in zip(names, out["mosaic"], out["triton"])}}


@pytest.fixture(scope="module")
def report():
    return mgpu_interpreter_reports(__file__, ["kl"], lambda name: dict(run_case(), name=name))["kl"]


def test_matches_oracle_and_triton(report):
    """bf16 inputs: the value to float32 rounding of its sums, the gradients to bf16 rounding (both
    passes round dz and the d iq partials to bf16), and no races in the interpreter."""
    assert report["races"] == 0, report
    assert report["vs_oracle"]["value"] <= 1e-4, report
    for g in ("d_iq", "d_ik"):
        assert report["vs_oracle"][g] <= 2e-2, report
        assert report["vs_triton"][g] <= 2e-3, report
    assert report["vs_triton"]["value"] <= 1e-5, report


def _abstract(B, T, H_kv, G, D, Di, top_k):
    sd = jax.ShapeDtypeStruct
    return (sd((B, T, H_kv * G, D), jnp.bfloat16), sd((B, T, H_kv, D), jnp.bfloat16),
            sd((B, T, H_kv, Di), jnp.bfloat16), sd((B, T, Di), jnp.bfloat16), sd((B, T, H_kv, top_k), jnp.int32),
            sd((B, T, H_kv * G), jnp.float32), sd((B, T), jnp.int32), sd((B, T), jnp.float32))


@pytest.mark.parametrize("B, T, H_kv, G, D, Di, top_k", [(1, 4096, 4, 16, 128, 128, 16), (1, 2048, 2, 8, 64, 64, 4)])
def test_lowers_to_mosaic_gpu_for_sm90(B, T, H_kv, G, D, Di, top_k):
    """The register variant (Sel as a wgmma A operand from registers) at the paper's heads and at G 8,
    D 64: layouts, wgmma shapes, TMA and the 227 KiB of shared memory."""
    args = _abstract(B, T, H_kv, G, D, Di, top_k)
    sz = kvo.sizes(args[0], args[1], args[4], 128)
    plan = kvo.KVOuterConfig(block_q=128 // sz.G_pad).resolve("kl_bwd", sz, f32=False, width=Di, interpret=False)
    fn = functools.partial(_index_kl_sum_fused, block_size=128, plan=plan, mosaic=False)
    text = triton_ir_for_h100(fn, *args)
    assert "mosaic_gpu" in text
    q_slots, iq_slots = mk.default_slots(sz.G_pad, D, Di, 128, plan.tiles_per_unit)
    assert mk.smem_bytes(sz.G_pad, D, Di, 128, plan.tiles_per_unit, q_slots, iq_slots) + mk.SMEM_RESERVE <= mk.SMEM_LIMIT


def test_kl_kernel_choices_and_limits():
    q, k, iq, ik, _ = _inputs(0, 1, 64, 1, 4, 64, 64, jnp.bfloat16)  # G 4: not supported by the Mosaic pass
    ids = jnp.zeros((1, 64, 1, 2), jnp.int32)
    lse = jnp.zeros((1, 64, 4), jnp.float32)
    w = jnp.ones((1, 64), jnp.float32)
    call = functools.partial(index_kl_sum, q, k, iq, ik, ids, lse, w, block_size=128)
    with pytest.raises(ValueError, match="kl_kernel"):
        call(kl_kernel="cuda")
    with pytest.raises(ValueError, match="G_pad"):
        call(kl_kernel="mosaic")
    with pytest.raises(ValueError, match="bfloat16"):
        mk.check_supported(16, 128, 128, 128, jnp.float32)
    with pytest.raises(ValueError, match="block_size"):
        mk.check_supported(16, 128, 128, 64, jnp.bfloat16)
    assert mk.supported(16, 128, 128, 128, jnp.bfloat16) and not mk.supported(16, 256, 128, 128, jnp.bfloat16)
    # "auto" falls back to Triton off Hopper or for unsupported shapes: the same value as "triton"
    np.testing.assert_array_equal(np.asarray(call(kl_kernel="auto")), np.asarray(call(kl_kernel="triton")))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(dict(run_case(), name="kl")), flush=True)
