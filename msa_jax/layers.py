"""Flax NNX layers: RMSNorm, RoPE, SwiGLU MLP, GQA attention and MSA attention (docs/algorithm.md §3-6).

`MSAAttention` subclasses `GQAAttention`, so the main branch of an MSA layer has exactly the
parameter names of a dense layer (`wq`, `wk`, `wv`, `wo`) and a dense checkpoint loads into an MSA
model; the only extra sub-module is `index` (the Index Branch). All attention math lives in
`msa_jax.ops`; these layers only project, normalise, rotate and route.

Both attention kinds return `(out, aux)`. A dense layer has no index branch, so its `aux` is the
empty dict `{}`; an MSA layer's `aux` holds `"kl"` (and the recall metrics when asked). The model
aggregates `aux` over MSA layers only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msa_jax import context, ops
from msa_jax.cache import LayerCache, quantize_index_keys, write
from msa_jax.config import ModelConfig


def _dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def _linear(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
    """Bias-free projection; params in float32, matmul in the compute dtype."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=_dtype(cfg), param_dtype=jnp.float32, rngs=rngs)


class RMSNorm(nnx.Module):
    """Gemma-style RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, w initialised to zero.

    Computed in float32 (the mean of squares underflows/overflows in bf16), returned in x.dtype.
    Normalises the last axis, so on [B, T, H, D] it is a per-head norm with weights shared by heads.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None = None):
        del rngs  # zero init: no randomness; the argument keeps the usual NNX constructor shape
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...])).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, rope_dim: int, theta: float) -> jax.Array:
    """Partial NeoX-style rotary embedding of the first `rope_dim` dims of the last axis.

    Within those dims the two halves are rotated against each other (rotate-half, as in GPT-NeoX
    and MiniMax-M3); the remaining `D - rope_dim` dims pass through untouched.
    x: [B, T, H, D] or [B, T, D]; positions: [T] or [B, T] (integer token positions).
    """
    if rope_dim == 0:
        return x
    if rope_dim % 2 or rope_dim > x.shape[-1]:
        raise ValueError(f"rope_dim: expected an even int <= {x.shape[-1]}, got {rope_dim!r}")
    half = rope_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rope_dim)  # [half]
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None, :]
    angle = pos[..., None] * inv_freq  # [B|1, T, half]
    if x.ndim == 4:
        angle = angle[:, :, None, :]  # broadcast over heads
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rope_dim], xf[..., rope_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def _offset_impl(impl: str, n_queries: int) -> str:
    """The impl for a context-parallel slice of n_queries queries in training: the Pallas impl takes
    queries at positions differentiably from DECODE_MAX_QUERIES + 1 on (fewer run its decode kernels,
    which have no gradient: the xla ops then)."""
    if impl in ("reference", "xla") or n_queries > ops.pallas_backend.DECODE_MAX_QUERIES:
        return impl
    return "xla"


class MLP(nnx.Module):
    """SwiGLU feed-forward: `w_down(silu(w_gate x) * w_up x)`, no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.w_gate = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.w_up = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.w_down = _linear(cfg.d_ff, cfg.d_model, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class GQAAttention(nnx.Module):
    """Dense causal grouped-query attention with partial RoPE on q and k.

    `__call__(x, positions, *, sparse=True, with_recall=False) -> (out, {})`: `sparse` and
    `with_recall` are accepted and ignored so that every layer kind is called the same way.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, D = cfg.d_model, cfg.head_dim
        self.wq = _linear(d, cfg.n_heads * D, cfg, rngs)
        self.wk = _linear(d, cfg.n_kv_heads * D, cfg, rngs)
        self.wv = _linear(d, cfg.n_kv_heads * D, cfg, rngs)
        self.wo = _linear(cfg.n_heads * D, d, cfg, rngs)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """Post-RoPE q [B,T,H_q,D] and k, v [B,T,H_kv,D]: exactly what the main branch attends with."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        q = rope(q, positions, cfg.rope_dim, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_dim, cfg.rope_theta)
        return q, k, v

    def project_out(self, o: jax.Array) -> jax.Array:
        B, T = o.shape[:2]
        return self.wo(o.reshape(B, T, -1))

    def __call__(self, x: jax.Array, positions: jax.Array, *, sparse: bool = True, with_recall: bool = False):
        del sparse, with_recall
        q, k, v = self.qkv(x, positions)
        if context.size() > 1:  # the sequence is split over the mesh's context axis
            def core(q, k, v, q_pos):
                impl = _offset_impl(self.cfg.impl, q.shape[1])
                return ops.dense_attention(q, k, v, q_pos=q_pos, impl=impl), {}

            o, _ = context.attention(core, positions, (q,), (k, v))
        else:
            o = ops.dense_attention(q, k, v, impl=self.cfg.impl)
        return self.project_out(o), {}

    def cached(self, x: jax.Array, q_pos: jax.Array, lc: LayerCache, *, prefill: bool, sparse: bool = True):
        """Attention of S new tokens x [B, S, d] at positions q_pos [B, S] against the cache, after
        writing their keys into it. prefill=True: q_pos is arange(S) in every row (a prompt from
        position 0), so the prompt attends to its own keys with the prefill path. -> (out, cache)."""
        del sparse
        q, k, v = self.qkv(x, q_pos)
        lc = write(lc, q_pos, k, v)
        if prefill:
            o = ops.dense_attention(q, k, v, impl=self.cfg.impl)
        else:
            o = ops.dense_attention(q, lc.k, lc.v, q_pos=q_pos, impl=self.cfg.impl)
        return self.project_out(o), lc


class IndexBranch(nnx.Module):
    """MSA Index Branch (docs/algorithm.md §3): iq = X W_q_idx (one head per GQA group), ik = X W_k_idx (shared).

    Optional Gemma RMSNorm on iq and on ik (separate weights, shared across heads) and the same
    partial RoPE as the main q/k: the first `cfg.rope_dim` dims rotated at the same frequencies
    (so index_dim >= rope_dim; the rest pass through). The input is `stop_gradient(x)`
    (docs/algorithm.md §6.2): the KL trains only these projections, never the backbone.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D_idx = cfg.msa.index_dim
        self.wq_idx = _linear(cfg.d_model, cfg.n_kv_heads * D_idx, cfg, rngs)
        self.wk_idx = _linear(cfg.d_model, D_idx, cfg, rngs)
        if cfg.msa.index_norm:
            self.iq_norm = RMSNorm(D_idx, cfg.norm_eps)
            self.ik_norm = RMSNorm(D_idx, cfg.norm_eps)
        self.rope_dim = cfg.rope_dim if cfg.msa.index_rope else 0  # the main q/k's rotation

    def __call__(self, x: jax.Array, positions: jax.Array):
        cfg = self.cfg
        B, T, _ = x.shape
        x = jax.lax.stop_gradient(x)
        iq = self.wq_idx(x).reshape(B, T, cfg.n_kv_heads, cfg.msa.index_dim)
        ik = self.wk_idx(x)
        if cfg.msa.index_norm:
            iq, ik = self.iq_norm(iq), self.ik_norm(ik)
        iq = rope(iq, positions, self.rope_dim, cfg.rope_theta)
        ik = rope(ik, positions, self.rope_dim, cfg.rope_theta)
        return iq, ik


class MSAAttention(GQAAttention):
    """MiniMax Sparse Attention layer: the GQA main branch plus an `index` branch.

    The main-branch params are inherited from `GQAAttention` (same names and init order). The index
    branch draws its params from the `index` RNG stream when `rngs` has one, so adding it does not
    shift the keys of any other weight (a dense and an MSA model with one seed share weights).

    `__call__(x, positions, *, sparse=True, with_recall=False) -> (out, aux)`:
      sparse=True   top-k block routing (§3-4); KL over the selected support (§6.1).
      sparse=False  dense warmup (§6.3): full causal attention, KL over the full causal support.
      aux = {"kl": f32 scalar} (+ "block_recall", "score_recall" when `with_recall`; the selection
      is computed even in warmup so that recall can be tracked before routing turns on).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        index_rngs = nnx.Rngs(params=rngs.index()) if "index" in rngs else rngs
        self.index = IndexBranch(cfg, rngs=index_rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, *, sparse: bool = True, with_recall: bool = False):
        q, k, v = self.qkv(x, positions)
        iq, ik = self.index(x, positions)
        kw = dict(sparse=sparse, with_recall=with_recall)
        if context.size() > 1:  # the sequence is split over the mesh's context axis
            core = lambda q, iq, k, v, ik, q_pos: self._attend(q, iq, k, v, ik, q_pos,  # noqa: E731
                                                                impl=_offset_impl(self.cfg.impl, q.shape[1]), **kw)
            o, aux = context.attention(core, positions, (q, iq), (k, v, ik))
        else:
            o, aux = self._attend(q, iq, k, v, ik, None, impl=self.cfg.impl, **kw)
            aux = {name: value for name, (value, _) in aux.items()}
        return self.project_out(o), aux

    def _attend(self, q, iq, k, v, ik, q_pos, *, sparse: bool, with_recall: bool, impl: str):
        """Both branches and the KL (+ recall) -> (out, {name: (mean over the queries, their weight)}).
        q_pos: the queries' positions when they are a slice of the sequence (context parallelism)."""
        m = self.cfg.msa
        kw = dict(block_size=m.block_size, q_pos=q_pos, impl=impl)
        if sparse and impl == "auto" and q_pos is None and ops.selects_every_block(k.shape[1], m.block_size, m.top_k):
            sparse = False  # every query selects all its blocks: the dense path gives the same out and KL, faster
        if sparse:
            # msa_attention's two steps, so that a context-parallel backward keeps the selection
            block_idx = context.keep(ops.select_blocks(iq, ik, top_k=m.top_k, sink_blocks=m.sink_blocks,
                                                       local_blocks=m.local_blocks, **kw))
            o, lse = ops.sparse_attention(q, k, v, block_idx, return_lse=True, **kw)
            # The main branch's LSE is the teacher's normaliser (§6.1): a fused KL reuses it.
            kl = ops.index_kl_loss(q, k, iq, ik, block_idx, lse=lse, **kw)
        else:
            # the dense attention's LSE is the full-support KL's teacher normaliser: the KL kernel then
            # skips its own teacher pass (on a GPU cuDNN keeps it for its backward anyway)
            o, lse = ops.dense_attention(q, k, v, return_lse=True, q_pos=q_pos, impl=impl)
            kl = ops.index_kl_loss(q, k, iq, ik, None, lse=lse, **kw)
            block_idx = None
        aux = {"kl": (kl.astype(jnp.float32), 1.0)}  # every slice has as many queries
        if with_recall:
            if block_idx is None:
                block_idx = ops.select_blocks(iq, ik, top_k=m.top_k, sink_blocks=m.sink_blocks,
                                              local_blocks=m.local_blocks, **kw)
            # the op detaches q and k itself; it averages over queries that see more than top_k blocks
            block_recall, score_recall = ops.selection_recall(q, k, block_idx, top_k=m.top_k, **kw)
            counted = 1.0 if q_pos is None else ((q_pos // m.block_size + 1) > m.top_k).sum()
            aux["block_recall"] = (block_recall.astype(jnp.float32), counted)
            aux["score_recall"] = (score_recall.astype(jnp.float32), counted)
        return o, aux

    def cached(self, x: jax.Array, q_pos: jax.Array, lc: LayerCache, *, prefill: bool, sparse: bool = True):
        """As `GQAAttention.cached`, with the index keys cached too and top-k routing (sparse=False:
        dense attention over the cache, the warmup mode). The selection of a cached query equals
        `select_blocks` on the whole sequence at its row (docs/algorithm.md §3.6)."""
        cfg, m = self.cfg, self.cfg.msa
        q, k, v = self.qkv(x, q_pos)
        iq, ik = self.index(x, q_pos)
        lc = write(lc, q_pos, k, v, ik)
        kw = dict(block_size=m.block_size, top_k=m.top_k, sink_blocks=m.sink_blocks, local_blocks=m.local_blocks,
                  impl=cfg.impl)
        if not sparse:
            o = (ops.dense_attention(q, k, v, impl=cfg.impl) if prefill
                 else ops.dense_attention(q, lc.k, lc.v, q_pos=q_pos, impl=cfg.impl))
        elif prefill:
            # The selection sees the index keys as the cache stores them (fp8: quantised), so that
            # prompt and decoded tokens are routed alike.
            ik_seen = ops.xla.dequantize_index_keys(*quantize_index_keys(ik, lc.ik.dtype), dtype=ik.dtype)
            o, _ = ops.msa_attention(q, k, v, iq, ik_seen, **kw)
        else:
            o, _ = ops.msa_attention(q, lc.k, lc.v, iq, lc.ik, q_pos=q_pos, ik_scale=lc.ik_scale, **kw)
        return self.project_out(o), lc
