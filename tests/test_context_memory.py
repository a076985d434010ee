"""Context parallelism saves memory: the compiled train step's per-device temp bytes on a context=4
mesh against one device (8 CPU devices in a subprocess; the equivalence tests: test_context.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import optimized_env

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import jax, numpy as np
from msa_jax import sharding as S
from msa_jax.config import ModelConfig, MSAConfig, TrainConfig
from msa_jax.model import DecoderLM
from msa_jax.train import _sharded_train_step, make_optimizer

# Per-device memory: the compiled train step's temp bytes (activations kept for the backward and
# the attention scratch) at T = 4096 on context=4 against one device.
T = 4096
cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  attention="msa", impl="xla", msa=MSAConfig(block_size=32, top_k=4, index_dim=8))
tok = np.random.default_rng().integers(1, 32, (1, T + 1)).astype(np.int32)

def temp_bytes(C):
    mesh = S.make_mesh(f"context={C}", jax.devices()[:C])
    m = S.shard_model(DecoderLM(cfg), mesh)
    o = S.shard_optimizer(make_optimizer(m, TrainConfig(steps=1, batch_size=1, seq_len=T)), mesh)
    with jax.set_mesh(mesh):
        step = _sharded_train_step.lower(m, o, S.shard_batch(tok, mesh), None, mesh=mesh, sparse=True, kl_weight=1.0,
                                         answer_weight=1.0)
    return step.compile().memory_analysis().temp_size_in_bytes

t1, t4 = temp_bytes(1), temp_bytes(4)
assert t4 < 0.35 * t1, ("temp bytes per device", t1, t4)
print("ok memory", t1, t4, flush=True)
"""


def test_a_context_mesh_uses_less_memory_per_device():
    """The train step's compiled temp bytes (activations kept for the backward and the attention
    scratch) at T = 4096 on context=4 are well below one device's (ideally 1/4)."""
    env = optimized_env({**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ok memory" in proc.stdout, proc.stdout
