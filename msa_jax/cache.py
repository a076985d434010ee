"""KV + index-key caches for generation (docs/algorithm.md §3.6, §5.2, §7.4).

Per attention layer the cache holds the post-RoPE keys and values `k, v [B, L, H_kv, D]` and, for an
MSA layer, the index keys `ik [B, L, D_idx]` (post-norm, post-RoPE: exactly what the selection
consumes), with `L` the capacity, a multiple of the block size. Slot `j` holds position `j`; slots
past a sequence's length hold stale values that no query can see (attention is causal: a query at
position p sees keys j <= p, and position p itself is written before it attends). `lengths [B]`
counts the tokens of each sequence, so one batch holds prompts of different lengths.

Layout and paging. `[B, L, ...]` is the layout of a paged cache with page size = block size and an
identity page table: page `b * (L // block_size) + c` holds block `c` of sequence `b`. The decode
kernels address K/V and index-key blocks through that mapping, so a real page table (vLLM / SGLang
style) can replace the identity without changing their contract.

Index keys are stored in the compute dtype, or as float8_e4m3fn with a float32 scale per token
(`ik_scale [B, L]`, amax / 448): half the bytes of the scan that dominates a decode step.

The cache is a pytree (`jax.tree_util` dataclass): it goes through `jit`, is donated between decode
steps, and `cache_shardings` places it on a mesh (batch over data x fsdp, KV heads over tensor).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msa_jax.config import BATCH_AXES, MESH_AXES, ModelConfig

INDEX_CACHE_DTYPES = ("bfloat16", "float32", "float8_e4m3fn")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One attention layer's cache. ik / ik_scale are None for a dense layer (and ik_scale unless fp8)."""

    k: jax.Array  # [B, L, H_kv, D]
    v: jax.Array  # [B, L, H_kv, D]
    ik: jax.Array | None = None  # [B, L, D_idx]
    ik_scale: jax.Array | None = None  # [B, L] float32 (fp8 index keys only)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """The caches of every layer and the number of tokens of each sequence."""

    layers: list[LayerCache]
    lengths: jax.Array  # [B] int32

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[1]

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]


def capacity_for(n_tokens: int, block_size: int) -> int:
    """The smallest capacity holding n_tokens: a whole number of blocks."""
    return max(1, math.ceil(n_tokens / block_size)) * block_size


def _check_index_dtype(index_dtype: str) -> None:
    if index_dtype not in INDEX_CACHE_DTYPES:
        raise ValueError(f"index_cache_dtype: expected one of {INDEX_CACHE_DTYPES}, got {index_dtype!r}")


def init_cache(cfg: ModelConfig, batch_size: int, capacity: int, *, index_dtype: str | None = None) -> Cache:
    """An empty cache (zeros, lengths 0) for `batch_size` sequences of up to `capacity` tokens.

    capacity must be a multiple of cfg.msa.block_size; index_dtype defaults to cfg.dtype."""
    bs = cfg.msa.block_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(capacity, int) or capacity < 1 or capacity % bs:
        raise ValueError(f"capacity: expected a positive multiple of block_size={bs}, got {capacity!r}")
    index_dtype = index_dtype or cfg.dtype
    _check_index_dtype(index_dtype)
    dt = jnp.dtype(cfg.dtype)
    layers = []
    for layer in range(cfg.n_layers):
        kv = lambda: jnp.zeros((batch_size, capacity, cfg.n_kv_heads, cfg.head_dim), dt)  # noqa: E731
        lc = LayerCache(kv(), kv())
        if cfg.is_msa_layer(layer):
            lc.ik = jnp.zeros((batch_size, capacity, cfg.msa.index_dim), jnp.dtype(index_dtype))
            if index_dtype == "float8_e4m3fn":
                lc.ik_scale = jnp.zeros((batch_size, capacity), jnp.float32)
        layers.append(lc)
    return Cache(layers, jnp.zeros((batch_size,), jnp.int32))


def quantize_index_keys(ik: jax.Array, dtype) -> tuple[jax.Array, jax.Array | None]:
    """ik [..., D_idx] -> (stored keys, per-token float32 scale or None). fp8: scale = amax / 448."""
    if jnp.dtype(dtype) != jnp.float8_e4m3fn:
        return ik.astype(dtype), None
    ikf = ik.astype(jnp.float32)
    scale = jnp.max(jnp.abs(ikf), axis=-1) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return (ikf / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def write(lc: LayerCache, q_pos: jax.Array, k, v, ik=None) -> LayerCache:
    """Write new keys at positions q_pos [B, S] (-1: skip) of one layer's cache.

    k, v [B, S, H_kv, D]; ik [B, S, D_idx] (an MSA layer). Positions >= capacity are dropped (the
    caller stops generation before that happens)."""
    B, S = q_pos.shape
    L = lc.k.shape[1]
    b = jnp.arange(B)[:, None]
    pos = jnp.where(q_pos >= 0, q_pos, L)  # out of range: dropped

    def put(buf, x):
        return buf.at[b, pos].set(x.astype(buf.dtype), mode="drop")

    out = LayerCache(put(lc.k, k), put(lc.v, v), lc.ik, lc.ik_scale)
    if ik is not None:
        stored, scale = quantize_index_keys(ik, lc.ik.dtype)
        out.ik = put(lc.ik, stored)
        if scale is not None:
            out.ik_scale = put(lc.ik_scale, scale)
    return out


def bytes_per_token(cfg: ModelConfig, index_dtype: str | None = None) -> dict:
    """Cache bytes per token of the whole model: {"kv", "index", "total", "index_over_kv"}.

    At the paper heads (H_kv 4, D 128, D_idx 128) a bf16 index cache is 1/8 of the KV cache."""
    index_dtype = index_dtype or cfg.dtype
    _check_index_dtype(index_dtype)
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    per_idx = cfg.msa.index_dim * jnp.dtype(index_dtype).itemsize + (4 if index_dtype == "float8_e4m3fn" else 0)
    index = cfg.n_msa_layers * per_idx
    return dict(kv=kv, index=index, total=kv + index, index_over_kv=index / kv)


def cache_specs(cache: Cache, mesh) -> Cache:
    """PartitionSpecs for `cache` on a ("data", "fsdp", "tensor") mesh (concrete or abstract): batch
    over data x fsdp, KV heads over tensor (when they divide), sequence and head dims replicated."""
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    n_batch = math.prod(mesh.shape[a] for a in batch) if batch else 1

    def spec(x):
        dims = [None] * x.ndim
        if batch and x.shape[0] % n_batch == 0:
            dims[0] = batch if len(batch) > 1 else batch[0]
        if x.ndim == 4 and mesh.shape["tensor"] > 1 and x.shape[2] % mesh.shape["tensor"] == 0:
            dims[2] = "tensor"
        return P(*dims)

    return jax.tree.map(spec, cache)


def cache_shardings(cache: Cache, mesh) -> Cache:
    """NamedShardings of `cache_specs` on `mesh`: where to place a cache (`jax.device_put`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def pin(cache: Cache) -> Cache:
    """Inside a jitted step under an active mesh (`jax.set_mesh`): constrain the updated cache to
    `cache_specs`, so that its layout stays put from step to step (no re-layout of the donated
    buffers). Without a mesh: the cache unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_specs(cache, mesh))
