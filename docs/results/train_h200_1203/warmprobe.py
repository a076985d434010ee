"""The dense warmup's cost per attention layer: dense cuDNN fwd+bwd, and the full-support KL's value +
gradients (d iq, d ik) with pallas/index_kl_full.py against the path it replaced (a selection of every
visible block through the KV-outer teacher_lse + index_kl_sum). Every array is an argument of the
jitted functions. Usage (repository root, PYTHONPATH=.): python3 docs/results/train_h200_1203/warmprobe.py OUT.json [T ...]  (SHAPE=lc|paper; default lc)."""
import json, os, sys
import jax, jax.numpy as jnp
from msa_jax import bench, ops
from pallas import index_kl, index_kl_full, kv_outer

shape = dict(lc=dict(B=1, Hq=12, R=4, D=64, Di=64), paper=dict(B=1, Hq=64, R=4, D=128, Di=128))[os.environ.get("SHAPE", "lc")]
B, Hq, R, D, Di = (shape[k] for k in ("B", "Hq", "R", "D", "Di"))
gpu = jax.default_backend() == "gpu"
dt = jnp.bfloat16 if gpu else jnp.float32
bs = 128 if gpu else 16
Ts = [int(t) for t in sys.argv[2:]] or ([16384, 65536] if gpu else [96])
rows = []
for T in Ts:
    ks = jax.random.split(jax.random.key(T), 6)
    q, k, v = (jax.random.normal(ks[i], (B, T, h, D), dt) for i, h in ((0, Hq), (1, R), (2, R)))
    iq, ik = jax.random.normal(ks[3], (B, T, R, Di), dt), jax.random.normal(ks[4], (B, T, Di), dt)
    w = jnp.full((B, T), 1.0 / (B * T * R), jnp.float32)

    def dense(q, k, v):
        return jax.grad(lambda q, k, v: ops.dense_attention(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    def full(q, k, iq, ik, w):
        return jax.value_and_grad(lambda a, b: index_kl_full.index_kl_full_sum(q, k, a, b, w).sum(), (0, 1))(iq, ik)

    def every_block(q, k, iq, ik, w):
        pos = kv_outer.positions(None, B, T)
        ids = kv_outer.visible_blocks(pos, bs, -(-T // bs), R)
        lse = index_kl.teacher_lse(q, k, ids, block_size=bs)
        return jax.value_and_grad(lambda a, b: index_kl.index_kl_sum(q, k, a, b, ids, lse, w, block_size=bs).sum(),
                                  (0, 1))(iq, ik)

    r = dict(T=T, **shape, dtype=str(jnp.dtype(dt)))
    for name, fn, args in (("dense_fwd_bwd", dense, (q, k, v)), ("kl_full", full, (q, k, iq, ik, w)),
                           ("kl_every_block", every_block, (q, k, iq, ik, w))):
        try:
            med, n, first = bench.timeit(jax.jit(fn), *args, reps=5, budget=20)
            r[name] = dict(ms=med * 1e3, reps=n, first_s=first)
        except Exception as e:  # noqa: BLE001  (record and go on: one path failing is a result)
            r[name] = dict(error=repr(e)[:300])
        print(T, name, r[name], flush=True)
    (v1, g1), (v2, g2) = jax.jit(full)(q, k, iq, ik, w), jax.jit(every_block)(q, k, iq, ik, w)
    r["value_rel_diff"] = float(abs(v1 - v2) / abs(v2))
    r["grad_rel_diff"] = [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max()) for a, b in zip(g1, g2)]
    print(T, "agreement", r["value_rel_diff"], r["grad_rel_diff"], flush=True)
    rows.append(r)
json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), open(sys.argv[1], "w"), indent=1)
