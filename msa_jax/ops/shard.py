"""Run a kernel per shard of the active device mesh (`jax.shard_map`), for the pallas backend.

A `pallas_call` has no GSPMD partitioning rule: under a sharded `jit` XLA would gather its operands
onto every device. The MSA kernels are independent per (batch row, KV group), so each device can
run them on its own rows and heads instead.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from msa_jax.config import BATCH_AXES, MESH_AXES


def kernel_shard_map(fn, *args, specs, out_specs):
    """`fn(*args)`, per shard, inside `jax.shard_map` over the active mesh (`jax.set_mesh`).

    `specs` / `out_specs` give,
    per array, one logical role per dim: "batch" (split over data x fsdp), "heads" (split over
    tensor) or None; `out_specs` is one such tuple, or a tuple of them for several outputs. Without
    an active multi-device mesh, or when a dim does not divide its mesh
    axes, `fn` runs unsharded (GSPMD then replicates, which is correct, just slower).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return fn(*args)
    # Axes already manual (inside an enclosing shard_map, e.g. context parallelism's) are split already.
    free = lambda a: mesh.shape[a] > 1 and a not in mesh.manual_axes  # noqa: E731
    roles = {"batch": tuple(a for a in BATCH_AXES if free(a)), "heads": tuple(a for a in ("tensor",) if free(a))}
    if not any(roles.values()):
        return fn(*args)

    def spec(role_dims, shape):
        out = []
        for role, size in zip(role_dims, shape, strict=True):
            axes = roles[role] if role else ()
            if axes and size % math.prod(mesh.shape[a] for a in axes):
                return None
            out.append((axes if len(axes) > 1 else axes[0]) if axes else None)
        return P(*out)

    in_specs = [spec(r, a.shape) for r, a in zip(specs, args, strict=True)]
    if any(s is None for s in in_specs):
        return fn(*args)
    outs = jax.eval_shape(fn, *args)
    is_roles = lambda x: isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)  # noqa: E731
    out_tree = jax.tree.map(lambda r, o: spec(r, o.shape), out_specs, outs, is_leaf=is_roles)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_tree, check_vma=False)(*args)
