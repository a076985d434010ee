"""The Mosaic GPU main backward (pallas.mgpu_sparse_attention_bwd) against the Triton backward,
paper heads, bf16, batch 1: time (bench.timeit, median of 4) and max relative difference of dq, dk, dv.
Usage: [BWD_SHAPE=gpu] bwdprobe.py T out.json [tiles_per_unit ...]   (gpu: the gpu preset's heads, 16/4 of 64)"""
import os
import json, sys
import jax, jax.numpy as jnp
from msa_jax import bench
from msa_jax.presets import BENCH_SHAPES
from pallas.index_topk import select_blocks
from pallas.mgpu_sparse_attention_bwd import MGPUBwdConfig, sparse_attention_bwd_mgpu
from pallas.sparse_attention import sparse_attention_fwd
from pallas.sparse_attention_bwd import sparse_attention_bwd

T = int(sys.argv[1])
tpus = [int(x) for x in sys.argv[3:]] or [16]
shape = dict(BENCH_SHAPES["paper"])
if os.environ.get("BWD_SHAPE") == "gpu":
    shape.update(heads=16, kv_heads=4, head_dim=64, index_dim=64)
bs, K = shape["block_size"], shape["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), shape, T, jnp.bfloat16)
idx = select_blocks(iq, ik, block_size=bs, top_k=K)
out, lse = sparse_attention_fwd(q, k, v, idx, block_size=bs)
dout = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)
args = (q, k, v, idx, out, lse, dout)  # every array an argument of the jitted functions
runs = {"triton": jax.jit(lambda *a: sparse_attention_bwd(*a, block_size=bs))}
for w in tpus:
    runs[f"mosaic_w{w}"] = jax.jit(lambda *a, w=w: sparse_attention_bwd_mgpu(
        *a, block_size=bs, config=MGPUBwdConfig(tiles_per_unit=w), interpret=False))
from pallas.sparse_attention import sparse_attention


def fwd_bwd(kernel):  # main forward + backward through the custom_vjp (all the glue included)
    def loss(q, k, v, idx, dout):
        o, _ = sparse_attention(q, k, v, idx, block_size=bs, bwd_kernel=kernel)
        return (o.astype(jnp.float32) * dout.astype(jnp.float32)).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


res = {"shape": shape, "T": T, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
outs = {}
for name, fn in runs.items():
    try:
        t, n, first = bench.timeit(fn, *args, reps=4, budget=8)
    except Exception as e:  # report and go on
        res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        print(name, "FAILED", res[f"{name}_error"], flush=True)
        continue
    res[f"{name}_ms"] = t * 1e3
    print(name, f"{t*1e3:.2f} ms (first {first:.1f} s)", flush=True)
    outs[name] = fn(*args)
for name in outs:
    if name != "triton" and "triton" in outs:
        res[f"{name}_rel_diff"] = [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                                         / jnp.abs(b.astype(jnp.float32)).max()) for a, b in zip(outs[name], outs["triton"])]
for kernel in ("triton", "mosaic"):
    try:
        t, n, first = bench.timeit(fwd_bwd(kernel), q, k, v, idx, dout, reps=4, budget=8)
        res[f"fwd_bwd_{kernel}_ms"] = t * 1e3
        print(f"fwd+bwd ({kernel} backward)", f"{t*1e3:.2f} ms (first {first:.1f} s)", flush=True)
    except Exception as e:
        res[f"fwd_bwd_{kernel}_error"] = f"{type(e).__name__}: {str(e)[:800]}"
        print(kernel, "fwd+bwd FAILED", res[f"fwd_bwd_{kernel}_error"], flush=True)
print(json.dumps(res))
json.dump(res, open(sys.argv[2], "w"), indent=1)
