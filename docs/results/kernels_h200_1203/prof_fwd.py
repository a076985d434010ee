"""Per-kernel GPU time of the main-branch forward at 128K (real indexer selection) for MGPUConfig variants.
Usage: prof_fwd.py T OUT.json [default,pingpong,qc2048,qc1024,rows] (rows: the q rows copy of before
2026-12-03's q_in_place). The query-chunk variants ask whether the tile
kernel's q slab reads come from L2 (a chunk's q per KV group: 4096 tokens x 16 heads x 128 x 2 B = 16.8 MB)."""
import collections, glob, gzip, json, sys, time
import jax, jax.numpy as jnp
from msa_jax import bench, ops
from msa_jax.presets import BENCH_SHAPES
import pallas.mgpu_sparse_attention as mg
T = int(sys.argv[1]); out = sys.argv[2]
cfg = BENCH_SHAPES["paper"]; bs, K = cfg["block_size"], cfg["top_k"]
q, k, v, iq, ik = bench.inputs(jax.random.key(0), cfg, T, jnp.bfloat16)
idx = jax.jit(lambda iq, ik: ops.select_blocks(iq, ik, block_size=bs, top_k=K, impl="pallas"))(iq, ik)
res = {}
VARIANTS = dict(default=mg.MGPUConfig(), pingpong=mg.MGPUConfig(pingpong=True),
                qc2048=mg.MGPUConfig(query_chunk=2048), qc1024=mg.MGPUConfig(query_chunk=1024),
                rows=mg.MGPUConfig(q_in_place=False))
names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["default", "pingpong"]
for name, c in ((n, VARIANTS[n]) for n in names):
    f = jax.jit(lambda q, k, v, i, c=c: mg.sparse_attention_fwd_mgpu(q, k, v, i, block_size=bs, config=c))
    jax.block_until_ready(f(q, k, v, idx)); t0 = time.perf_counter()
    for _ in range(5): r = f(q, k, v, idx)
    jax.block_until_ready(r); wall = (time.perf_counter() - t0) / 5 * 1e3
    d = f"/tmp/prof_{name}"
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(f(q, k, v, idx))
    tr = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    agg = collections.defaultdict(float)
    for e in ev:
        if "dur" in e and "GPU" in pname.get(e.get("pid"), ""):
            agg[e["name"][:90]] += e["dur"] / 2e3
    top = sorted(agg.items(), key=lambda x: -x[1])[:20]
    res[name] = dict(wall_ms=wall, kernels=top)
    print(f"== {name}: wall {wall:.2f} ms, GPU event sum {sum(agg.values()):.1f} ms per call", flush=True)
    for n_, t in top:
        print(f"  {t:8.2f}  {n_}", flush=True)
json.dump(res, open(out, "w"), indent=1)
