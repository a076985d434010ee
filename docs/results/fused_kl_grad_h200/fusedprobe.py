"""Session 7: the main backward with the KL's gradient fused in (pallas.index_kl.main_and_index_kl_bwd)
against the separate main backward + index_kl_sum (value and gradients), paper heads, bf16.
Usage: fusedprobe.py T out.json"""
import json, sys
import jax, jax.numpy as jnp
from msa_jax import bench, ops
from msa_jax.presets import BENCH_SHAPES
from pallas.index_kl import index_kl_sum, main_and_index_kl_bwd
from pallas.index_topk import select_blocks
from pallas.sparse_attention import sparse_attention_fwd
from pallas.sparse_attention_bwd import sparse_attention_bwd

T = int(sys.argv[1])
shape = BENCH_SHAPES[sys.argv[3] if len(sys.argv) > 3 else "paper"]
bs, K = shape["block_size"], shape["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), shape, T, jnp.bfloat16)
idx = select_blocks(iq, ik, block_size=bs, top_k=K)
out, lse = sparse_attention_fwd(q, k, v, idx, block_size=bs)
dout = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)
H_kv = k.shape[2]
w = jnp.full(q.shape[:2], 1.0 / (T * H_kv), jnp.float32)
g = jnp.broadcast_to(w[:, :, None], (*w.shape, H_kv))


# every array an argument (closed-over arrays become constants XLA folds for minutes)
@jax.jit
def separate(q, k, v, iq, ik, idx, out, lse, dout, w):
    dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, dout, block_size=bs)
    f = lambda a, b: index_kl_sum(q, k, a, b, idx, lse, w, block_size=bs).sum()
    _, (diq, dik) = jax.value_and_grad(f, argnums=(0, 1))(iq, ik)
    return dq, dk, dv, diq, dik


@jax.jit
def fused(q, k, v, iq, ik, idx, out, lse, dout, g):
    return main_and_index_kl_bwd(q, k, v, iq, ik, idx, out, lse, dout, g, block_size=bs)


def fused_with(**opts):  # the fused kernel with other Triton settings (register pressure)
    return jax.jit(lambda *a: main_and_index_kl_bwd(*a, block_size=bs, **opts))


@jax.jit
def main_only(q, k, v, idx, out, lse, dout):
    return sparse_attention_bwd(q, k, v, idx, out, lse, dout, block_size=bs)


res = {"T": T, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
runs = {"separate": (separate, (q, k, v, iq, ik, idx, out, lse, dout, w)),
        "fused": (fused, (q, k, v, iq, ik, idx, out, lse, dout, g)),
        "main_bwd_only": (main_only, (q, k, v, idx, out, lse, dout)),
        "fused_w4": (fused_with(num_warps=4), (q, k, v, iq, ik, idx, out, lse, dout, g))}


def train_attention(kl_value):  # the op a train step would call: main fwd + bwd + KL (value or not)
    def loss(q, k, v, iq, ik, idx, dout):
        o, kl = ops.sparse_attention_and_index_kl(q, k, v, iq, ik, idx, block_size=bs, kl_value=kl_value, impl="pallas")
        return (o.astype(jnp.float32) * dout.astype(jnp.float32)).sum() + kl
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


runs["op_kl_value"] = (train_attention(True), (q, k, v, iq, ik, idx, dout))
runs["op_no_kl_value"] = (train_attention(False), (q, k, v, iq, ik, idx, dout))
outs = {}
for name, (fn, args) in runs.items():
    t, n, first = bench.timeit(fn, *args, reps=4, budget=8)
    res[f"{name}_ms"] = t * 1e3
    print(name, f"{t*1e3:.2f} ms (first {first:.1f} s)", flush=True)
    if not name.startswith("op_"):
        outs[name] = fn(*args)
for i, nm in enumerate(("dq", "dk", "dv", "diq", "dik")):
    a, b = (outs[x][i].astype(jnp.float32) for x in ("separate", "fused"))
    res[f"{nm}_rel_diff"] = float(jnp.abs(a - b).max() / jnp.abs(a).max())
print(json.dumps(res))
json.dump(res, open(sys.argv[2], "w"), indent=1)
