"""Time the pallas KL (fwd, fwd+bwd) at the paper heads; whichever `pallas` package is first on the path."""
import json, sys, time
import jax, jax.numpy as jnp
from msa_jax import bench
from msa_jax.presets import BENCH_SHAPES
import pallas.index_kl as kl_mod
from pallas.index_topk import select_blocks
from pallas.sparse_attention import sparse_attention_fwd

T = int(sys.argv[1]); tag = sys.argv[2]
shape = BENCH_SHAPES["paper" if jax.default_backend() == "gpu" else "cpu"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), shape, T, jnp.bfloat16)
idx = select_blocks(iq, ik, block_size=shape["block_size"], top_k=shape["top_k"])
_, lse = sparse_attention_fwd(q, k, v, idx, block_size=shape["block_size"])
f = jax.jit(lambda iq, ik: kl_mod.index_kl(q, k, iq, ik, idx, lse, block_size=shape["block_size"]).mean())
g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
res = {"T": T, "tag": tag, "file": kl_mod.__file__}
for name, fn in (("fwd", f), ("fwd_bwd", g)):
    t, n, first = bench.timeit(fn, iq, ik, reps=4, budget=8)
    res[name] = t * 1e3
    print(tag, name, f"{t*1e3:.1f} ms", flush=True)
v, (a, b) = g(iq, ik)
res["value"] = float(v); res["diq_norm"] = float(jnp.linalg.norm(a.astype(jnp.float32))); res["dik_norm"] = float(jnp.linalg.norm(b.astype(jnp.float32)))
print(json.dumps(res))
