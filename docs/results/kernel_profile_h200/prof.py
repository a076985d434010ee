"""Per-kernel GPU time of the training-attention pieces at the paper heads (main fwd+bwd, KL fwd+bwd,
indexer), from a jax.profiler perfetto trace: where do the 250 ms at 128K go?"""
import collections, glob, gzip, json, os, sys
import jax, jax.numpy as jnp
from msa_jax import bench, ops
from msa_jax.presets import BENCH_SHAPES

T = int(sys.argv[1]); out = sys.argv[2]
cfg = BENCH_SHAPES["paper"]; bs, K = cfg["block_size"], cfg["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), cfg, T, jnp.bfloat16)
dout = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
sel = jax.jit(lambda iq, ik: ops.select_blocks(iq, ik, block_size=bs, top_k=K, impl="pallas"))
idx = sel(iq, ik)
ol = lambda o, d: jnp.sum(o * d, dtype=jnp.float32)
main = jax.jit(jax.value_and_grad(lambda q, k, v: ol(ops.sparse_attention(q, k, v, idx, block_size=bs, impl="pallas"), dout), argnums=(0, 1, 2)))
lse = jax.jit(lambda q, k, v: ops.sparse_attention(q, k, v, idx, block_size=bs, return_lse=True, impl="pallas")[1])(q, k, v)
kl = jax.jit(jax.value_and_grad(lambda iq, ik: ops.index_kl_loss(q, k, iq, ik, idx, block_size=bs, lse=lse, impl="pallas"), argnums=(0, 1)))
fns = dict(sel=lambda: sel(iq, ik), main=lambda: main(q, k, v), kl=lambda: kl(iq, ik))
res = {}
for name, f in fns.items():
    jax.block_until_ready(f()); jax.block_until_ready(f())
    d = f"/tmp/prof_{name}"
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(f())
    path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
    tr = json.load(gzip.open(path))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    agg = collections.defaultdict(float)
    for e in ev:
        if "dur" in e and "GPU" in pname.get(e.get("pid"), "") :
            agg[e["name"][:90]] += e["dur"] / 2e3  # ms per call (2 calls)
    top = sorted(agg.items(), key=lambda x: -x[1])[:25]
    res[name] = top
    print(f"== {name}: total {sum(agg.values()):.1f} ms (GPU event sum per call)")
    for n_, t in top:
        print(f"  {t:8.2f}  {n_}")
json.dump(res, open(out, "w"), indent=1)
