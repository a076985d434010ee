"""The ops trace and run inside shard_map (how the kernels will be placed on a mesh): the batch is
split over a 'data' axis and every shard computes MSA on its own sequences."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msa_jax import ops


def test_msa_ops_inside_shard_map():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    B = 2 * len(jax.devices())
    ks = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(ks[0], (B, 40, 4, 16))
    k, v = (jax.random.normal(key, (B, 40, 2, 16)) for key in ks[1:3])
    iq, ik = jax.random.normal(ks[3], (B, 40, 2, 8)), jax.random.normal(ks[4], (B, 40, 8))

    def step(q, k, v, iq, ik):
        out, idx = ops.msa_attention(q, k, v, iq, ik, block_size=8, top_k=2, impl="xla")
        kl = ops.index_kl_loss(q, k, iq, ik, idx, block_size=8, impl="xla")
        return out, idx, jax.lax.pmean(kl, "data")

    spec = P("data")
    sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec, spec, P())))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
    out, idx, kl = sharded(*map(shard, (q, k, v, iq, ik)))

    ref_out, ref_idx = ops.msa_attention(q, k, v, iq, ik, block_size=8, top_k=2, impl="reference")
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(ref_idx, -1))
    np.testing.assert_allclose(kl, ops.index_kl_loss(q, k, iq, ik, ref_idx, block_size=8, impl="reference"), rtol=1e-5)
