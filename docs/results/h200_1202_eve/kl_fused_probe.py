"""Time the pallas KL at the paper heads: two-pass index_kl (mean) vs index_kl_sum (student pass + one
fused teacher pass), value and gradients, forward-only and forward+backward."""
import json, sys
import jax, jax.numpy as jnp
from msa_jax import bench
from msa_jax.presets import BENCH_SHAPES
from pallas.index_kl import index_kl, index_kl_sum
from pallas.index_topk import select_blocks
from pallas.sparse_attention import sparse_attention_fwd

T = int(sys.argv[1])
shape = BENCH_SHAPES["paper" if jax.default_backend() == "gpu" else "cpu"]
bs, K = shape["block_size"], shape["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), shape, T, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
idx = select_blocks(iq, ik, block_size=bs, top_k=K)
_, lse = sparse_attention_fwd(q, k, v, idx, block_size=bs)
w = jnp.full(q.shape[:2], 1.0 / (T * k.shape[2]), jnp.float32)
two = lambda q, k, iq, ik, idx, lse: index_kl(q, k, iq, ik, idx, lse, block_size=bs).mean()
fused = lambda q, k, iq, ik, idx, lse: index_kl_sum(q, k, iq, ik, idx, lse, w, block_size=bs).sum()
res = {"T": T, "device": jax.devices()[0].device_kind}
for name, f in (("two_pass", two), ("fused", fused)):
    fwd = jax.jit(f)
    vg = jax.jit(jax.value_and_grad(f, argnums=(2, 3)))
    for kind, fn in (("fwd", fwd), ("fwd_bwd", vg)):
        t, n, first = bench.timeit(fn, q, k, iq, ik, idx, lse, reps=4, budget=8)
        res[f"{name}_{kind}_ms"] = t * 1e3
        print(name, kind, f"{t*1e3:.2f} ms (first {first:.1f} s)", flush=True)
    val, (a, b) = vg(q, k, iq, ik, idx, lse)
    res[f"{name}_value"] = float(val)
    res[f"{name}_grads"] = (a, b)
ga, gb = res.pop("two_pass_grads"), res.pop("fused_grads")
for nm, x, y in (("diq", ga[0], gb[0]), ("dik", ga[1], gb[1])):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    res[f"{nm}_rel_diff"] = float(jnp.abs(x - y).max() / jnp.abs(x).max())
print(json.dumps(res))
