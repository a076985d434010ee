"""Data / FSDP / tensor / context parallelism over a named device mesh (GSPMD, MaxText-style logical axes).

Mesh axes are ("data", "fsdp", "tensor", "context"). `context` splits each sequence (msa_jax.context:
`shard_batch` places a batch in zigzag order split over it, attention gathers the keys);
parameters are not split over it. Every parameter is mapped in two steps:

1. `PARAM_RULES` (ordered, first match wins): a regex over the parameter's "/"-joined path -> one
   *logical* axis name per dim, e.g. `attn/wq/kernel` [d_model, H*D] -> ("embed", "heads").
2. `LOGICAL_RULES`: logical axis -> mesh axis (or tuple of mesh axes, or None = replicated), e.g.
   embed -> "fsdp", heads/mlp/vocab -> "tensor", batch -> ("data", "fsdp").

A dim is sharded only if its size divides the product of its mesh axes' sizes (and no mesh axis is
used twice in one spec); otherwise it is replicated, so tiny test models run on any mesh.

The same rules apply to the optimizer state: the regexes are anchored at the *end* of the path,
and AdamW's `mu` / `nu` leaves end with the path of their param (`.../mu/blocks/0/attn/wq/kernel`),
so moments get their param's spec; scalars (step counts) are replicated.

Training reuses `msa_jax.train.train_step` / `eval_step` unchanged: they are `nnx.jit`s without
explicit shardings, so once the model, optimizer and batch are placed with `shard_model`,
`shard_optimizer` and `shard_batch`, XLA's GSPMD propagates the input shardings through the step
(the mesh uses `AxisType.Auto` for that reason; jax's default for `make_mesh` is Explicit).
`msa_jax.train.sharded_train_step` additionally re-constrains the updated params / optimizer state
to their specs, so the layout cannot drift over many steps.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msa_jax import context
from msa_jax.config import BATCH_AXES, MESH_AXES

# Parameter path regex (searched at the end of the "/"-joined path) -> logical axes, one per dim.
# Ordered: the first matching rule wins. Norm scales and anything unmatched are replicated.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)index/(wq_idx|wk_idx)/kernel$", ("embed", "heads")),
    (r"(^|/)attn/(wq|wk|wv)/kernel$", ("embed", "heads")),
    (r"(^|/)attn/wo/kernel$", ("heads", "embed")),
    (r"(^|/)mlp/(w_gate|w_up)/kernel$", ("embed", "mlp")),
    (r"(^|/)mlp/w_down/kernel$", ("mlp", "embed")),
    (r"(^|/)scale$", ("norm",)),
)

# Logical axis -> mesh axis (str), several mesh axes (tuple) or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
}


# ----------------------------------------------------------------------------------------- mesh


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; missing axes are omitted
    (context=C splits each sequence over C devices).

    Raises ValueError naming the bad entry: unknown axis, repeated axis, non-integer or size < 1.
    """
    if not isinstance(spec, str):
        raise ValueError(f"mesh spec: expected a string like 'data=2,fsdp=2,tensor=2', got {spec!r}")
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: entry {part!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}, expected one of {MESH_AXES}")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be a positive int, got {size!r}") from None
        if n < 1:
            raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be a positive int, got {n}")
        out[name] = n
    return out


def _axis_sizes(spec: str | Mapping[str, int]) -> dict[str, int]:
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    for name, n in sizes.items():
        if name not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {name!r}, expected one of {MESH_AXES}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mesh: size of axis {name!r} must be a positive int, got {n!r}")
    return {name: int(sizes.get(name, 1)) for name in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor", "context") (missing axes = 1) over `devices` (default: all).

    The product of the axis sizes must equal the number of devices. Axis types are `Auto`, so jit
    propagates shardings with GSPMD (jax's `make_mesh` defaults to `Explicit`).
    """
    sizes = _axis_sizes(spec)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {sizes}: product of axis sizes is {math.prod(shape)}, but {len(devices)} devices are used"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


# ------------------------------------------------------------------------------ logical -> spec


def _path_str(path) -> str:
    """jax key path -> "blocks/0/attn/wq/kernel" (Variable ".value" attributes dropped)."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in ("value", "raw_value"):
                names.append(k.name)
        else:
            names.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(names)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the param at "/"-joined `path` with `ndim` dims (all None if no rule matches)."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """PartitionSpec for logical `axes` of an array of `shape` on `mesh`.

    A dim is sharded only when its size is divisible by the product of its mesh axes' sizes and
    none of those mesh axes was already used by an earlier dim; size-1 mesh axes are dropped.
    """
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for ax, size in zip(axes, shape, strict=True):
        target = rules.get(ax) if ax is not None else None
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or used & set(mesh_axes) or size % n:
            out.append(None)
            continue
        used |= set(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def tree_specs(tree, mesh: Mesh):
    """Same-structure pytree of PartitionSpec for every array leaf of `tree` (params, opt state)."""

    def spec(path, x):
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) == 0:
            return P()
        return logical_to_spec(logical_axes(_path_str(path), len(shape)), shape, mesh)

    return jax.tree_util.tree_map_with_path(spec, tree)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def tree_shardings(tree, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh), is_leaf=_is_spec)


def param_specs(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """nnx.State of PartitionSpec, matching `nnx.state(model)` (non-Param variables replicated)."""
    return tree_specs(nnx.state(model), mesh)


def _place(node, mesh: Mesh) -> None:
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, tree_shardings(state, mesh)))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `model` (in place) on `mesh` by the rules; returns `model`."""
    _place(model, mesh)
    return model


def shard_optimizer(optimizer: nnx.Optimizer, mesh: Mesh) -> nnx.Optimizer:
    """Place the optimizer state (in place): moments take their param's spec, scalars replicated."""
    _place(optimizer, mesh)
    return optimizer


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens [B, T] split over ("data", "fsdp") on the batch dim, sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """A per-row array [B] (e.g. which rows are retrieval examples) split like the batch's rows."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_rows(x, mesh: Mesh) -> jax.Array:
    """A global per-row host array [B] as a jax.Array placed by `row_sharding` (any mesh, context too)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, row_sharding(mesh), lambda idx: x[idx])


def shard_batch(tokens, mesh: Mesh) -> jax.Array | dict:
    """A global batch `tokens` [B, ...] as a jax.Array split by `batch_sharding(mesh)`.

    Every process passes the same global host array and contributes the rows of its own devices
    (`make_array_from_callback`), so this works unchanged on one host and on several. B must be a
    multiple of data * fsdp. On a mesh with a `context` axis, a training batch [B, T+1] comes back
    split over the sequence too, as `msa_jax.context.shard_batch`'s dict.
    """
    if mesh.shape["context"] > 1:
        return context.shard_batch(tokens, mesh)
    tokens = np.asarray(tokens)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if tokens.shape[0] % n:
        raise ValueError(f"batch size {tokens.shape[0]} is not divisible by data*fsdp = {n}")
    sharding = NamedSharding(mesh, P(BATCH_AXES, *([None] * (tokens.ndim - 1))))
    return jax.make_array_from_callback(tokens.shape, sharding, lambda idx: tokens[idx])


# ---------------------------------------------------------------------------------- multi-host


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Call `jax.distributed.initialize` when this process is one of several; True if it did.

    Multi-process when `coordinator` (host:port of process 0) is given or the environment sets
    `JAX_COORDINATOR_ADDRESS` (then `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` give the other two
    unless passed), or when SLURM / Open MPI launched more than one task (jax detects those
    settings itself). Must run before anything touches a device. On CPU, collectives between
    processes go through gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    launched = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if coordinator is None and not launched:
        return False
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
