"""Next session: the Mosaic GPU KL teacher pass against the Triton one at the paper heads: value and
gradients (relative diff), forward+backward time. Usage: klprobe3.py T out.json"""
import json, sys
import jax, jax.numpy as jnp
from msa_jax import bench
from msa_jax.presets import BENCH_SHAPES
from pallas.index_kl import index_kl_sum
from pallas.index_topk import select_blocks
from pallas.sparse_attention import sparse_attention_fwd

T = int(sys.argv[1])
shape = BENCH_SHAPES["paper"]
bs, K = shape["block_size"], shape["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), shape, T, jnp.bfloat16)
idx = select_blocks(iq, ik, block_size=bs, top_k=K)
_, lse = sparse_attention_fwd(q, k, v, idx, block_size=bs)
w = jnp.full(q.shape[:2], 1.0 / (T * k.shape[2]), jnp.float32)
res = {"T": T, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
out = {}
for kern in ("triton", "mosaic"):
    # every array an argument: closed-over arrays become constants XLA folds for minutes at 128K
    f = lambda q, k, iq, ik, idx, lse, w: index_kl_sum(q, k, iq, ik, idx, lse, w, block_size=bs, kl_kernel=kern).sum()
    vg = jax.jit(jax.value_and_grad(f, argnums=(2, 3)))
    args = (q, k, iq, ik, idx, lse, w)
    t, n, first = bench.timeit(vg, *args, reps=4, budget=8)
    res[f"{kern}_fwd_bwd_ms"] = t * 1e3
    print(kern, f"{t*1e3:.2f} ms (first {first:.1f} s)", flush=True)
    out[kern] = vg(*args)
(va, (a0, a1)), (vb, (b0, b1)) = out["triton"], out["mosaic"]
res["value_rel_diff"] = float(abs(va - vb) / abs(va))
for nm, x, y in (("diq", a0, b0), ("dik", a1, b1)):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    res[f"{nm}_rel_diff"] = float(jnp.abs(x - y).max() / jnp.abs(x).max())
print(json.dumps(res))
json.dump(res, open(sys.argv[2], "w"), indent=1)
