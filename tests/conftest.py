"""Shared test inputs, block selections, the main-branch oracle and its tolerances (kernel tests).

Test files import these names (`from conftest import ...`; pytest puts tests/ on sys.path).

The same command runs the suite on the CPU and on a GPU. For a GPU this file sets, unless the
environment already does:
  - JAX_DEFAULT_MATMUL_PRECISION=highest: float32 results are checked against float32 oracles with
    float32 tolerances. XLA's default float32 matmul on a GPU is TF32 (10-bit mantissa, ~1e-3
    relative error per product), an accuracy choice of the user's, not an error of the code under
    test; bfloat16 cases have bfloat16 tolerances either way. Subprocesses inherit the setting.
  - XLA_PYTHON_CLIENT_PREALLOCATE=false: several pytest-xdist workers share one GPU.
  - JAX_COMPILATION_CACHE_DIR=<a new temporary directory>, removed at the end of the session: the
    run's compiled programs are shared by its workers and subprocesses.
Resumed-run tests expect bit-identical losses where the backend is deterministic (the CPU, or a GPU
with msa_jax.determinism on) and agreement within `RESUME_RTOL` otherwise (`resume_is_exact`).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One on-disk XLA compilation cache for this run of the suite, shared by its xdist workers and the
# subprocesses some tests start (they inherit the environment): many tests compile the same small
# models' steps, which then load instead of compiling again. Removed when the session ends.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="msa-jax-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from msa_jax import determinism  # noqa: E402
from msa_jax.ops import reference  # noqa: E402
from pallas import triton_smem  # noqa: E402

# On a CPU the suite is mostly XLA compile time of small programs, which the tests run once: compile
# them with little optimisation (about a third less time; the values are the same up to float
# rounding, which the tolerances cover). Tests of compiled memory turn it back on
# (`optimized_compile`, `optimized_env`); MSA_TEST_OPTIMIZE=1 runs the whole suite optimised.
# Subprocesses inherit it.
FAST_COMPILE = os.environ.get("MSA_TEST_OPTIMIZE") != "1" and jax.default_backend() == "cpu"
if FAST_COMPILE:
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"


def optimized_env(env: dict) -> dict:
    """`env` for a subprocess that compiles with XLA's full optimisation (measures compiled memory)."""
    return {k: v for k, v in env.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}


@pytest.fixture
def optimized_compile():
    """XLA's full optimisation for this test's compiles (it measures compiled memory)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", FAST_COMPILE)


jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

# A GPU's reductions (atomics in scatter-adds) differ in the last bits from run to run unless
# deterministic ops are on: resumed losses then agree with an uninterrupted run's to about 1e-7
# relative per step, growing slowly; 1e-4 over the tests' few steps.
RESUME_RTOL = 1e-4


def resume_is_exact() -> bool:
    """Whether this process gives bit-identical results from run to run (so exact resumes)."""
    return jax.default_backend() == "cpu" or determinism.is_enabled()


def assert_same_run(got, want, exact: bool | None = None) -> None:
    """Losses (or other metric values) of two runs of the same steps: bit-identical where the backend
    is deterministic (`exact` overrides), else equal within RESUME_RTOL."""
    if resume_is_exact() if exact is None else exact:
        assert got == want
    else:
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=RESUME_RTOL)


# (atol, rtol) of the main-branch kernels' out and lse against the float32 oracle
TOL = {
    jnp.float32: dict(out=(2e-5, 1e-5), lse=(2e-5, 1e-5)),
    jnp.bfloat16: dict(out=(2e-2, 2e-2), lse=(1e-4, 1e-5)),
}


# ----------------------------------------------------------------------------------- inputs


def qkv(seed, B, T, H_kv, G, D, dtype):
    """Random normal q, k, v (numpy RNG: no per-shape jit compile, which dominates on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = [(B, T, H_kv * G, D), (B, T, H_kv, D), (B, T, H_kv, D)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32).astype(dtype)) for s in shapes)


# ------------------------------------------------------------------------------- selections


@functools.partial(jax.jit, static_argnums=range(1, 7))
def indexer_ids(seed, B, T, H_kv, block_size, top_k, D_idx=16):
    """The oracle's indexer (select_blocks) on random index queries / keys."""
    ks = jax.random.split(jax.random.key(seed + 1000), 2)
    iq = jax.random.normal(ks[0], (B, T, H_kv, D_idx))
    ik = jax.random.normal(ks[1], (B, T, D_idx))
    return reference.select_blocks(iq, ik, block_size=block_size, top_k=top_k)


def hand_ids(seed, B, T, H_kv, block_size, top_k, dup=False):
    """Random selections: the local block plus a random subset (random size) of earlier blocks,
    shuffled, then -1 padding. dup=True: the padding is filled with repeats of selected ids."""
    rng = np.random.default_rng(seed)
    ids = np.full((B, T, H_kv, top_k), -1, np.int32)
    for b in range(B):
        for i in range(T):
            local = i // block_size
            for r in range(H_kv):
                n_extra = rng.integers(0, min(top_k - 1, local) + 1)
                chosen = [local] + list(rng.choice(local, size=n_extra, replace=False))
                if dup:
                    chosen += list(rng.choice(chosen, size=top_k - len(chosen)))
                rng.shuffle(chosen)
                ids[b, i, r, : len(chosen)] = chosen
    return jnp.asarray(ids)


def hot_ids(seed, B, T, H_kv, block_size, top_k):
    """Every query picks block 0 (a hot block, split over many tiles) and its local block (both 0
    for the first block: a duplicate that must count once), then random repeats of its ids."""
    ids = np.array(hand_ids(seed, B, T, H_kv, block_size, top_k, dup=True))
    ids[..., 0] = 0
    if top_k > 1:
        ids[..., 1] = (np.arange(T) // block_size)[None, :, None]
    return jnp.asarray(ids)


def messy_ids(seed, B, T, H_kv, block_size, top_k):
    """Hand-made selections (top_k - 5 slots) plus 5 columns of junk the kernel must ignore or
    count once: a repeat of a selected id, the local block again, an out-of-range id, a future
    block (all its keys are > i) and -1; then every row is shuffled."""
    assert top_k > 5
    ids = np.asarray(hand_ids(seed, B, T, H_kv, block_size, top_k - 5))
    n_blocks = -(-T // block_size)
    local = np.broadcast_to((np.arange(T) // block_size)[None, :, None], (B, T, H_kv))
    junk = [ids[..., 0], local, np.full_like(local, n_blocks + 2), local + 1, np.full_like(local, -1)]
    ids = np.concatenate([ids, np.stack(junk, axis=-1)], axis=-1)
    rng = np.random.default_rng(seed)
    ids = np.take_along_axis(ids, rng.permuted(np.argsort(ids, -1), axis=-1), -1)  # shuffle rows
    return jnp.asarray(ids.astype(np.int32))


# selection name -> fn(seed, B, T, H_kv, block_size, top_k) -> int32 [B, T, H_kv, top_k]
SELECTIONS = {
    "indexer": indexer_ids,
    "hand": hand_ids,
    "dup": functools.partial(hand_ids, dup=True),
    "hot": hot_ids,
    "messy": messy_ids,
}


# ---------------------------------------------------------------------------- oracle, check


@functools.cache
def attention_oracle(block_size):
    """jitted (q, k, v, ids) -> (out, lse) of the oracle, float32 at the highest matmul precision."""

    def f(q, k, v, ids):
        with jax.default_matmul_precision("highest"):
            out = reference.sparse_attention(q, k, v, ids, block_size=block_size)
            B, T, H_q, D = q.shape
            H_kv = k.shape[2]
            mask = reference.support_mask(ids, T, block_size)  # [B, R, T, T]
            qg = q.astype(jnp.float32).reshape(B, T, H_kv, H_q // H_kv, D)
            logits = jnp.einsum("birgd,bjrd->brgij", qg, k.astype(jnp.float32)) * D**-0.5
            logits = jnp.where(mask[:, :, None], logits, -jnp.inf)
            lse = jax.nn.logsumexp(logits, axis=-1)  # [B, R, G, T]
            lse = lse.transpose(0, 3, 1, 2).reshape(B, T, H_q)
        return out, lse

    return jax.jit(f)


def close_grad(got, want, tol):
    """Max abs error of `got` against `want`, asserted <= tol x max |want| (and got finite)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    assert err <= tol * np.abs(want).max(), (err, np.abs(want).max())
    return err


def check_attention(out, lse, ref_out, ref_lse, dtype):
    """A kernel's (out, lse) against the oracle's, within TOL[dtype]."""
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    out, lse = np.asarray(out, np.float32), np.asarray(lse)  # numpy: no per-shape compiles
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    atol, rtol = TOL[dtype]["out"]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=rtol
    )
    atol, rtol = TOL[dtype]["lse"]
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------- lowering


def triton_ir_for_h100(fn, *args) -> str:
    """Lower jit(fn) on abstract args for an abstract H100 (no GPU needed) through the Pallas Triton
    lowering; returns the module text (`pallas.triton_smem` compiles the kernels' IR further)."""
    return triton_smem.lower_for_h100(fn, *args)[0]


def export_for_h100(f, *shapes):
    """Lower jit(f) through the Pallas Triton backend for an H100 with jax.export (no GPU, no PTX
    compile); returns the MLIR module. Catches shapes or constructs the Triton lowering rejects."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    orig = pallas_call_registration.gpu_info_lib.get_gpu_info
    pallas_call_registration.gpu_info_lib.get_gpu_info = (
        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    try:
        exp = jax.export.export(
            jax.jit(f), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*shapes)
    finally:
        pallas_call_registration.gpu_info_lib.get_gpu_info = orig
    return exp.mlir_module()


def pytest_sessionfinish(session, exitstatus):
    if _OWN_XLA_CACHE:  # the process that made the run's compilation cache removes it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# ------------------------------------------------------------- Mosaic GPU interpreter subprocess

MGPU_INTERPRETER_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def mgpu_interpreter_reports(test_file: str, names, run_case, timeout: int = 600) -> dict:
    """{name: run_case(name)} for the Mosaic GPU kernel tests: in this process on a GPU; on a CPU from
    one subprocess `python test_file --child *names` (each case one JSON line on stdout, its "name"
    key naming it) started with XLA:CPU's concurrency-optimised scheduler off (the interpreter's
    simulated warpgroups block inside host callbacks and deadlock under it on a 2-core machine; the
    flag is only read when the CPU backend starts). Each report gains "races": the interpreter's race
    reports printed before its line."""
    import json
    import subprocess
    import sys

    import pytest

    if jax.default_backend() == "gpu":
        return {name: dict(run_case(name), races=0) for name in names}
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MGPU_INTERPRETER_XLA_FLAG).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--child", *names], env=env,
                          capture_output=True, text=True, timeout=timeout)
    got, races = {}, 0
    for line in proc.stdout.splitlines():
        races += line.startswith("RACE DETECTED")
        if line.startswith("{"):
            r = json.loads(line)
            got[r["name"]], races = dict(r, races=races), 0
    if proc.returncode != 0 or set(got) != set(names):
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return got
