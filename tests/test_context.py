"""Context parallelism (`msa_jax.context`): the zigzag layout, and training on a `context` mesh axis
equal to training on one device (8 CPU devices in a subprocess)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from msa_jax import context

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("T,C", [(16, 1), (64, 4), (48, 3)])
def test_zigzag_gives_each_device_an_early_and_a_late_chunk(T, C):
    perm = context.zigzag(T, C)
    assert sorted(perm.tolist()) == list(range(T))  # a permutation of the positions
    c = T // (2 * C)
    for i, slots in enumerate(np.split(perm, C)):  # device i's contiguous share of the layout
        assert slots.tolist() == list(range(i * c, (i + 1) * c)) + list(range((2 * C - 1 - i) * c, (2 * C - i) * c))
    # equal causal work: every device's queries see the same number of keys in total
    work = [int((s + 1).sum()) for s in np.split(perm, C)]
    assert len(set(work)) == 1


def test_zigzag_needs_two_chunks_per_device():
    with pytest.raises(ValueError, match="multiple of 2 \\* context = 8"):
        context.zigzag(20, 4)


_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from msa_jax import sharding as S
from msa_jax.config import ModelConfig, MSAConfig, TrainConfig
from msa_jax.model import DecoderLM
from msa_jax.train import loss_fn, make_optimizer, sharded_train_step, train_step

jax.config.update("jax_default_matmul_precision", "highest")
T, B = 64, 4
tok = jnp.asarray(np.random.default_rng(0).integers(1, 32, (B, T + 1)), jnp.int32)
tcfg = TrainConfig(steps=4, batch_size=B, seq_len=T, learning_rate=1e-2, lr_warmup_steps=1)

def grads(model, sparse, with_recall):
    f = lambda m: loss_fn(m, tok, sparse=sparse, kl_weight=1.0, with_recall=with_recall)
    (_, metrics), g = nnx.value_and_grad(f, has_aux=True)(model)
    return metrics, g

def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]

def close(a, b, what):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        scale = max(float(np.abs(y).max()), 1e-6)
        assert np.abs(x - y).max() <= 2e-5 * scale + 1e-7, (what, np.abs(x - y).max(), scale)

# (attention, impl, sparse, mesh, also one optimizer step): the step (shard_batch's layout, the
# sharded update) is checked on one xla mesh of each kind; the others compare loss and gradients.
cases = [("dense", "xla", True, "context=8", True), ("msa", "xla", True, "context=4,data=2", False),
         ("msa", "xla", False, "context=4,data=2", False), ("msa", "xla", True, "context=2,fsdp=2,tensor=2", True),
         ("msa", "pallas", True, "context=2,data=2,tensor=2", False)]
for attention, impl, sparse, spec, with_step in cases:
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      attention=attention, impl=impl, msa=MSAConfig(block_size=8, top_k=2, index_dim=8))
    recall = attention == "msa"
    m1 = DecoderLM(cfg, seed=0)
    want, want_g = nnx.jit(grads, static_argnums=(1, 2))(m1, sparse, recall)
    mesh = S.make_mesh(spec)
    m2 = S.shard_model(DecoderLM(cfg, seed=0), mesh)
    with jax.set_mesh(mesh):
        got, got_g = nnx.jit(grads, static_argnums=(1, 2))(m2, sparse, recall)
    assert want.keys() == got.keys(), (want.keys(), got.keys())
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=2e-5, err_msg=f"{spec} {k}")
    close(got_g, want_g, f"{attention} {impl} {spec} grads")
    if impl == "xla" and attention == "msa" and sparse and spec.startswith("context=4"):
        aw_models = (m1, m2, mesh)  # for the answer-weight check below
    if not with_step:
        print("ok", attention, impl, sparse, spec, flush=True)
        continue
    # one optimizer step each, the context mesh's on a sequence-sharded batch: the same updated parameters
    o1, o2 = make_optimizer(m1, tcfg), S.shard_optimizer(make_optimizer(m2, tcfg), mesh)
    train_step(m1, o1, tok, sparse=sparse, kl_weight=1.0)
    batch = S.shard_batch(tok, mesh)  # sequence-sharded, in the zigzag layout
    C, n = mesh.shape["context"], mesh.shape["data"] * mesh.shape["fsdp"]
    assert batch["inputs"].sharding.shard_shape((B, T)) == (B // n, T // C)
    unperm = np.argsort(np.asarray(batch["positions"]))
    np.testing.assert_array_equal(np.asarray(batch["inputs"])[:, unperm], np.asarray(tok[:, :-1]))
    np.testing.assert_array_equal(np.asarray(batch["targets"])[:, unperm], np.asarray(tok[:, 1:]))
    sharded_train_step(m2, o2, batch, mesh=mesh, sparse=sparse, kl_weight=1.0)
    close(nnx.state(m2, nnx.Param), nnx.state(m1, nnx.Param), f"{attention} {impl} {spec} params")
    print("ok", attention, impl, sparse, spec, {k: round(float(v), 4) for k, v in want.items()}, flush=True)

# The answer-weighted LM loss (--answer-weight): weights follow each target's position through the
# zigzag layout, so the context mesh gives one device's loss.
m1, m2, mesh = aw_models
rows = jnp.array([True, False, True, True])
aw = lambda m, t: loss_fn(m, t, sparse=True, kl_weight=0.0, answer_rows=rows, answer_weight=30.0)[1]["lm_loss"]
want = nnx.jit(aw)(m1, tok)
with jax.set_mesh(mesh):
    got = nnx.jit(aw)(m2, S.shard_batch(tok, mesh))
np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
assert abs(float(want) - float(nnx.jit(lambda m: loss_fn(m, tok, sparse=True, kl_weight=0.0)[1]["lm_loss"])(m1))) > 1e-4
print("ok answer weights", flush=True)

"""


def test_a_context_mesh_trains_like_one_device():
    """Loss, KL, recall and gradients on context=8, context=4 x data=2, context=2 x fsdp=2 x tensor=2
    and context=2 x data=2 x tensor=2 against one device: dense and MSA (sparse and warmup), xla and
    pallas (its kernels at the slices' positions, per data shard and, nested, per tensor shard); the
    updated parameters after one optimizer step fed a batch split over the sequence by `shard_batch`
    on context=8 (dense) and context=2 x fsdp=2 x tensor=2 (MSA). (Per-device memory:
    test_context_memory.py, a file of its own so that the two subprocesses run side by side.)"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("ok ") == 6, proc.stdout
