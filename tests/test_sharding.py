"""Mesh parsing, the logical-axis rule table, and data/FSDP/tensor-parallel training equivalence.

The multi-device check needs 8 CPU devices, which XLA only creates if
XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before jax initialises, so it runs in a
subprocess; everything else runs in-process (1 device, or an AbstractMesh for the 2x2x2 layout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from msa_jax import sharding as S
from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.model import DecoderLM
from msa_jax.train import sharded_eval_step

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
    attention="msa", msa=MSAConfig(block_size=8, top_k=2, index_dim=8),
)
MESH_222 = AbstractMesh((2, 2, 2, 1), S.MESH_AXES)  # data x fsdp x tensor (context 1)


def specs_by_path(tree) -> dict:
    return {S._path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))}


def test_parse_mesh():
    assert S.parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.parse_mesh(" tensor = 4 ") == {"tensor": 4}
    assert S.parse_mesh("") == {}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=2,model=2", "unknown axis 'model'"),
        ("data=0", "positive int"),
        ("data=-1", "positive int"),
        ("data=x", "positive int"),
        ("data=2,data=2", "given twice"),
        ("data", "axis=size"),
    ],
)
def test_parse_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        S.parse_mesh(spec)


def test_make_mesh_one_device():
    mesh = S.make_mesh("data=1", devices=jax.devices()[:1])
    assert mesh.axis_names == S.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(S.make_mesh({}, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="product of axis sizes is 8, but 1 devices"):
        S.make_mesh("data=2,fsdp=2,tensor=2", devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown axis"):
        S.make_mesh({"pipeline": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="positive int"):
        S.make_mesh({"data": 0}, devices=jax.devices()[:1])


def test_logical_to_spec_divisibility_and_reuse():
    assert S.logical_to_spec(("embed", "heads"), (32, 16), MESH_222) == P("fsdp", "tensor")
    assert S.logical_to_spec(("embed", "heads"), (33, 16), MESH_222) == P(None, "tensor")  # 33 % 2
    assert S.logical_to_spec(("batch", None), (8, 5), MESH_222) == P(("data", "fsdp"), None)
    assert S.logical_to_spec(("batch", None), (6, 5), MESH_222) == P(None, None)  # 6 % 4
    assert S.logical_to_spec(("heads", "mlp"), (8, 8), MESH_222) == P("tensor", None)  # tensor used once
    assert S.logical_to_spec(("norm",), (32,), MESH_222) == P(None)
    # size-1 mesh axes are dropped: ("data", "fsdp") with data=1 becomes plain "fsdp"
    assert S.logical_to_spec(("batch",), (8,), AbstractMesh((1, 2, 4, 1), S.MESH_AXES)) == P("fsdp")


def test_param_rule_table():
    for attention in ("msa", "dense"):
        cfg = ModelConfig(**{**CFG.__dict__, "attention": attention, "tie_embeddings": attention == "msa"})
        specs = specs_by_path(S.param_specs(DecoderLM(cfg), MESH_222))
        want = {
            "embed/embedding": P("tensor", "fsdp"),
            "final_norm/scale": P(None),
            "blocks/1/attn_norm/scale": P(None),
            "blocks/0/attn/wq/kernel": P("fsdp", "tensor"),
            "blocks/0/attn/wk/kernel": P("fsdp", "tensor"),
            "blocks/1/attn/wv/kernel": P("fsdp", "tensor"),
            "blocks/1/attn/wo/kernel": P("tensor", "fsdp"),
            "blocks/0/mlp/w_gate/kernel": P("fsdp", "tensor"),
            "blocks/0/mlp/w_up/kernel": P("fsdp", "tensor"),
            "blocks/0/mlp/w_down/kernel": P("tensor", "fsdp"),
        }
        if attention == "msa":
            want |= {
                "blocks/0/attn/index/wq_idx/kernel": P("fsdp", "tensor"),
                "blocks/1/attn/index/wk_idx/kernel": P("fsdp", "tensor"),
                "blocks/0/attn/index/iq_norm/scale": P(None),
            }
        else:
            want["lm_head/kernel"] = P("fsdp", "tensor")
        for path, spec in want.items():
            assert specs[path] == spec, path
        assert any("index" in p for p in specs) == (attention == "msa")


def test_one_device_mesh_replicates_and_runs():
    mesh = S.make_mesh("data=1", devices=jax.devices()[:1])
    model = DecoderLM(CFG)
    specs = specs_by_path(S.param_specs(model, mesh))
    assert all(all(a is None for a in s) for s in specs.values())  # every mesh axis has size 1
    S.shard_model(model, mesh)
    assert model.blocks[0].attn.wq.kernel[...].sharding.mesh == mesh
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 1, 64, dtype=jnp.int32)
    assert S.shard_batch(tokens, mesh).sharding == S.batch_sharding(mesh)
    metrics = sharded_eval_step(model, tokens, mesh=mesh, sparse=True)
    assert jnp.isfinite(metrics["lm_loss"])


# ------------------------------------------------------------------------------ 8 CPU devices

_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from msa_jax import sharding as S
    from msa_jax.config import ModelConfig, MSAConfig, TrainConfig
    from msa_jax.model import DecoderLM
    from msa_jax.train import eval_step, make_optimizer, sharded_train_step, train_step

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      attention="msa", msa=MSAConfig(block_size=8, top_k=2, index_dim=8))
    tcfg = TrainConfig(steps=10, learning_rate=1e-3, lr_warmup_steps=0)
    # T = 32 tokens (+1 target), 4 blocks of 8 with top_k 2: really sparse; tokens never all zero
    tok = jax.random.randint(jax.random.key(0), (8, 33), 1, 64, dtype=jnp.int32)
    tok2 = jax.random.randint(jax.random.key(1), (8, 33), 1, 64, dtype=jnp.int32)

    m1 = DecoderLM(cfg, seed=3)
    o1 = make_optimizer(m1, tcfg)
    dev0 = jax.devices()[0]
    assert all(x.sharding.device_set == {dev0} for x in jax.tree.leaves(nnx.state(m1)))

    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    m2 = S.shard_model(DecoderLM(cfg, seed=3), mesh)
    o2 = make_optimizer(m2, tcfg)  # built after sharding: the moments follow the params
    batch = S.shard_batch(tok, mesh)
    assert batch.sharding.spec == P(("data", "fsdp"), None)

    def spec(x):
        return x.sharding.spec

    assert spec(m2.blocks[0].attn.wq.kernel[...]) == P("fsdp", "tensor")
    assert spec(m2.blocks[1].mlp.w_down.kernel[...]) == P("tensor", "fsdp")
    assert spec(m2.embed.embedding[...]) == P("tensor", "fsdp")
    assert spec(m2.blocks[0].attn.index.wq_idx.kernel[...]) == P("fsdp", "tensor")
    assert len(m2.blocks[0].attn.wq.kernel[...].addressable_shards) == 8
    assert m2.blocks[0].attn.wq.kernel[...].addressable_shards[0].data.shape == (16, 16)
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(o2))
          if S._path_str(p).endswith("mu/blocks/0/attn/wq/kernel")]
    assert len(mu) == 1 and spec(mu[0]) == P("fsdp", "tensor"), mu

    # same loss on 1 device and on the 2x2x2 mesh, through the unchanged jitted eval_step
    e1, e2 = eval_step(m1, tok, sparse=True), eval_step(m2, batch, sparse=True)
    for k in ("lm_loss", "kl"):
        np.testing.assert_allclose(e2[k], e1[k], rtol=1e-5, atol=1e-5, err_msg=k)

    # one unchanged train.train_step on each: same metrics, same updated params, sharding kept
    r1 = train_step(m1, o1, tok, sparse=True, kl_weight=1.0)
    r2 = train_step(m2, o2, batch, sparse=True, kl_weight=1.0)
    for k in ("loss", "lm_loss", "kl", "grad_norm", "index_grad_norm"):
        np.testing.assert_allclose(r2[k], r1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert spec(m2.blocks[0].attn.wq.kernel[...]) == P("fsdp", "tensor")
    s1 = {S._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(m1))}
    s2 = {S._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(m2))}
    assert s1.keys() == s2.keys()
    for k in s1:  # Adam's first step moves every weight by ~lr; allow 1% of that
        np.testing.assert_allclose(s2[k], s1[k], rtol=0, atol=1e-5, err_msg=k)

    # second step: sharded_train_step (layout pinned) vs plain train_step on 1 device
    r1 = train_step(m1, o1, tok2, sparse=True, kl_weight=1.0)
    r2 = sharded_train_step(m2, o2, S.shard_batch(tok2, mesh), mesh=mesh, sparse=True, kl_weight=1.0)
    np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=1e-5, atol=1e-5)
    assert spec(m2.blocks[1].mlp.w_gate.kernel[...]) == P("fsdp", "tensor")
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(o2))
          if S._path_str(p).endswith("nu/blocks/1/attn/wo/kernel")]
    assert len(mu) == 1 and spec(mu[0]) == P("tensor", "fsdp"), mu

    # Pallas kernels (interpret mode on CPU) under the mesh run per shard (kernel_shard_map); a whole
    # pallas model on a mesh with data and tensor axes: tests/test_context.py (its last case)
    from msa_jax import ops
    iq = jax.random.normal(jax.random.key(5), (8, 32, 2, 8))
    ik = jax.random.normal(jax.random.key(6), (8, 32, 8))
    sel = lambda a, b: ops.select_blocks(a, b, block_size=8, top_k=2, impl="pallas")
    assert "shard_map" not in str(jax.make_jaxpr(sel)(iq, ik))
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(sel)(iq, ik))
        np.testing.assert_array_equal(jax.jit(sel)(iq, ik), sel(iq, ik))

    # generation: a cache placed on the mesh (batch over data x fsdp, KV heads over tensor), donated
    # from step to step, gives the single-device logits and keeps its layout
    from msa_jax.cache import cache_shardings, init_cache
    from msa_jax.generate import decode_step, prefill
    c1 = init_cache(cfg, 8, 40)
    c2 = init_cache(cfg, 8, 40)
    c2 = jax.device_put(c2, cache_shardings(c2, mesh))
    assert spec(c2.layers[0].k) == P(("data", "fsdp"), None, "tensor", None), spec(c2.layers[0].k)
    assert spec(c2.layers[1].ik) == P(("data", "fsdp"), None, None), spec(c2.layers[1].ik)
    lens = jnp.array([32, 30, 31, 32, 5, 32, 17, 32], jnp.int32)  # ragged prompts
    l1, c1 = prefill(m1, tok[:, :32], lens, c1)
    with jax.set_mesh(mesh):
        l2, c2 = prefill(m2, S.shard_batch(tok[:, :32], mesh), lens, c2)
    np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4)
    for t in range(2):
        d1, c1 = decode_step(m1, tok[:, 32 + t], c1)
        with jax.set_mesh(mesh):
            d2, c2 = decode_step(m2, tok[:, 32 + t], c2)
        np.testing.assert_allclose(d2, d1, rtol=1e-4, atol=1e-4)
    assert tuple(spec(c2.layers[0].v)) + (None,) * (4 - len(spec(c2.layers[0].v))) == (
        ("data", "fsdp"), None, "tensor", None), spec(c2.layers[0].v)  # (trailing Nones may be dropped)
    print("MULTI_DEVICE_OK")
    """
)


def test_data_fsdp_tensor_mesh_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "MULTI_DEVICE_OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-8000:]
