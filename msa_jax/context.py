"""Context parallelism: one sequence split over the mesh's `context` axis (docs/algorithm.md §3.6).

Layout: `zigzag(T, C)` cuts the T positions into 2C equal chunks and gives device i chunks i and
2C-1-i, so every device holds as many early (cheap) as late (expensive) causal queries. A batch
comes to the train step already in that layout (`shard_batch`: each device receives only its
rows and its share of the sequence; a plain token array is laid out inside the step by `layout`
instead), so everything outside attention (embeddings, MLPs, norms, the loss) works on local
tokens unchanged, and the model gets the true positions for RoPE and causality.

Attention (`attention`): inside `jax.shard_map`, each device gathers the keys, values and index
keys of the whole sequence over `context` (with GQA and one index-key head they are small next to
the queries), puts them back in position order and runs its own queries against them with their
global positions (`q_pos`). The gradients of the gathered tensors flow back through the gather,
which transposes to a reduce-scatter. Scalar metrics come back as weighted means over all devices.

Memory: the backward keeps only each device's own slices and what the core marks with `keep` (the
MSA selection); the gathered keys are gathered again, since kept for every layer they would grow
with T, not T/C. The xla ops size their query chunks by the local share S/T of the sequence
(`msa_jax.ops.xla`), so per-device scratch falls with C too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msa_jax.config import BATCH_AXES

AXIS = "context"
_KEEP = "context_keep"


def keep(x: jax.Array) -> jax.Array:
    """Mark an intermediate of an attention core that the backward keeps instead of recomputing."""
    return checkpoint_name(x, _KEEP)


def size() -> int:
    """The active mesh's `context` axis size (1 without a mesh or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def zigzag(T: int, C: int) -> np.ndarray:
    """int32 [T]: the position held by each layout slot; device i holds slots [i*T/C, (i+1)*T/C)."""
    if T % (2 * C):
        raise ValueError(f"seq_len {T} must be a multiple of 2 * context = {2 * C} (zigzag split)")
    c = T // (2 * C)
    return np.concatenate([np.r_[i * c:(i + 1) * c, (2 * C - 1 - i) * c:(2 * C - i) * c]
                           for i in range(C)]).astype(np.int32)


def layout(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """(positions [T], *xs permuted on axis 1 into the zigzag layout of the active mesh)."""
    perm = zigzag(xs[0].shape[1], size())
    return (jnp.asarray(perm),) + tuple(x[:, perm] for x in xs)


def batch_shardings(mesh: jax.sharding.Mesh) -> dict:
    """Shardings of a `shard_batch` batch: rows over the batch axes, the sequence over `context`."""
    seq = NamedSharding(mesh, P(BATCH_AXES, AXIS))
    return {"inputs": seq, "targets": seq, "positions": NamedSharding(mesh, P(AXIS))}


def shard_batch(tokens, mesh: jax.sharding.Mesh) -> dict:
    """A global batch `tokens` [B, T+1] (host array) as the train step's input on a context mesh.

    Returns {"inputs", "targets"}: int32 [B, T], the next-token pairs in the zigzag layout, and
    "positions" [T], the layout's positions, placed by `batch_shardings`. Every process passes the
    same global array; each device reads only its rows and its layout slots (one host or several).
    """
    tokens = np.asarray(tokens)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % n:
        raise ValueError(f"batch size {B} is not divisible by data*fsdp = {n}")
    perm = zigzag(T, mesh.shape[AXIS])
    sh = batch_shardings(mesh)

    def part(name, shift):  # token at each slot's position (+1: its target)
        return jax.make_array_from_callback((B, T), sh[name], lambda idx: tokens[idx[0]][:, perm[idx[1]] + shift])

    return {"inputs": part("inputs", 0), "targets": part("targets", 1),
            "positions": jax.make_array_from_callback((T,), sh["positions"], lambda idx: perm[idx])}


def attention(core, positions: jax.Array, queries: tuple, keys: tuple):
    """`core(*queries, *keys, q_pos)` per device on its queries against the whole sequence's keys.

    positions: int32 [T], the layout's positions. queries: arrays [B, T, ...] aligned with the
    queries (q, iq); keys: arrays [B, T, ...] aligned with the keys (k, v, ik), all in the layout
    order and split over `context` (batch over data x fsdp). core returns (out [B, S, ...], aux),
    aux a dict name -> (local mean, weight); the result is (out in the layout, {name: the weighted
    mean over every device}; 1.0 where no device has weight).
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    split = tuple(a for a in (*BATCH_AXES, AXIS) if mesh.shape[a] > 1)

    def spec(x):
        return P(batch, AXIS, *([None] * (x.ndim - 2)))

    def local(pos, *arrays):
        qs, ks = arrays[:len(queries)], arrays[len(queries):]
        order = jnp.argsort(jax.lax.all_gather(pos, AXIS, tiled=True))  # layout slot of each position
        ks = [jax.lax.all_gather(x, AXIS, axis=1, tiled=True)[:, order] for x in ks]
        q_pos = jnp.broadcast_to(pos, qs[0].shape[:2])
        out, aux = core(*qs, *ks, q_pos)
        reduced = {}
        for name, (value, weight) in aux.items():
            weight = jnp.asarray(weight, jnp.float32)
            total = jax.lax.psum(weight, split)
            reduced[name] = jnp.where(total > 0, jax.lax.psum(value * weight, split) / jnp.maximum(total, 1e-30), 1.0)
        return out, reduced

    arrays = (*queries, *keys)
    out_shape = jax.eval_shape(lambda *a: core(*a[:len(queries)], *a[len(queries):],
                                               jnp.zeros(queries[0].shape[:2], jnp.int32)), *arrays)
    out_specs = (spec(out_shape[0]), {name: P() for name in out_shape[1]})
    local = jax.checkpoint(local, policy=jax.checkpoint_policies.save_only_these_names(_KEEP))
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) + tuple(spec(x) for x in arrays),
                       out_specs=out_specs, check_vma=False)
    return fn(positions, *arrays)
