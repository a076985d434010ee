"""Decoder-only LM (Flax NNX) that switches between dense GQA and MSA with `ModelConfig.attention`.

Layout: token embedding -> n_layers pre-norm blocks (RMSNorm -> attention -> residual; RMSNorm ->
SwiGLU -> residual) -> final RMSNorm -> tied (`embed.attend`) or untied `lm_head`.

Weight sharing between the two modes: every non-index weight is drawn from the `params` RNG
stream in the same order in both modes, and the index branches draw from a separate `index`
stream. So `DecoderLM(dense_cfg, seed=s)` and `DecoderLM(msa_cfg, seed=s)` have bit-identical
non-index weights, and a dense checkpoint is an MSA checkpoint minus the `index` sub-modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from msa_jax import context, ops
from msa_jax.ops import reference
from msa_jax.cache import Cache
from msa_jax.config import BATCH_AXES, ModelConfig
from msa_jax.layers import MLP, GQAAttention, MSAAttention, RMSNorm

# Filters over the model state: index-branch params (trained only by the KL) and the rest.
INDEX_PARAMS = nnx.All(nnx.Param, nnx.PathContains("index"))
MAIN_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("index")))

_INDEX_STREAM_SALT = 0x15D7  # any fixed constant: the index stream just must differ from `params`


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        attn_cls = MSAAttention if cfg.is_msa_layer(layer) else GQAAttention
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = attn_cls(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, *, sparse: bool = True, with_recall: bool = False):
        h, aux = self.attn(self.attn_norm(x), positions, sparse=sparse, with_recall=with_recall)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, aux

    def cached(self, x, q_pos, lc, *, prefill: bool, sparse: bool = True):
        h, lc = self.attn.cached(self.attn_norm(x), q_pos, lc, prefill=prefill, sparse=sparse)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, lc


class DecoderLM(nnx.Module):
    """`__call__(tokens [B,T] int32, *, positions=None, sparse=True, with_recall=False) -> (logits f32 [B,T,V], aux)`.

    positions: int32 [T], each token's position (default arange(T)); a permutation of it when the
    tokens come in a context-parallel layout (`msa_jax.context`).

    aux["kl"]: sum over MSA layers of the index KL (docs/algorithm.md §6.1); 0.0 for a dense model.
    aux["block_recall"], aux["score_recall"]: mean over MSA layers, only when `with_recall` and the
    model has MSA layers (absent for a dense model: there is no selection to score).
    `sparse=False` is the dense warmup of docs/algorithm.md §6.3 (ignored by a dense model).

    Activations are computed in cfg.dtype (params stay float32); logits are returned in float32.
    The embedding is scaled by sqrt(d_model) on input (Gemma) and initialised with std
    1/sqrt(d_model), so both the residual stream and the tied-head logits start at unit scale.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0):
        self.cfg = cfg
        rngs = nnx.Rngs(params=seed, index=jax.random.fold_in(jax.random.key(seed), _INDEX_STREAM_SALT))
        dtype = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(stddev=cfg.d_model**-0.5),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
            )

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None, sparse: bool = True,
                 with_recall: bool = False):
        T = tokens.shape[1]
        positions = jnp.arange(T, dtype=jnp.int32) if positions is None else positions
        x = self._embed(tokens)
        if context.size() > 1:  # tokens in the zigzag layout (msa_jax.context): split the sequence
            x = jax.lax.with_sharding_constraint(x, P(BATCH_AXES, context.AXIS, None))
        kl = jnp.zeros((), jnp.float32)
        recalls = {"block_recall": [], "score_recall": []}
        for block in self.blocks:
            x, layer_aux = block(x, positions, sparse=sparse, with_recall=with_recall)
            if "kl" in layer_aux:
                kl = kl + layer_aux["kl"]
            for name in recalls:
                if name in layer_aux:
                    recalls[name].append(layer_aux[name])
        aux = {"kl": kl}
        for name, values in recalls.items():
            if values:
                aux[name] = jnp.mean(jnp.stack(values))
        return self._logits(x), aux

    def _embed(self, tokens):
        return self.embed(tokens) * jnp.asarray(self.cfg.d_model**0.5, jnp.dtype(self.cfg.dtype))

    def _logits(self, x):
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def forward_cached(self, tokens: jax.Array, q_pos: jax.Array, cache: Cache, *, prefill: bool = False,
                       sparse: bool = True):
        """S new tokens [B, S] at positions q_pos [B, S] (-1: padding) through every layer, reading
        and extending `cache`. -> (logits f32 [B, S, V], the updated cache; lengths unchanged).

        prefill=True: the tokens are a prompt from position 0 (q_pos = arange(S) in every row), so
        attention runs the prefill path over the prompt's own keys. Positions past a row's real
        length are harmless: their keys are never visible to that row's later tokens' queries
        before being overwritten (causality)."""
        x = self._embed(tokens)
        layers = []
        for block, lc in zip(self.blocks, cache.layers):
            x, lc = block.cached(x, q_pos, lc, prefill=prefill, sparse=sparse)
            layers.append(lc)
        return self._logits(x), Cache(layers, cache.lengths)


def count_params(model: nnx.Module, wrt=nnx.Param) -> int:
    """Number of scalars in the model's variables matching `wrt` (e.g. INDEX_PARAMS)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


def split_params(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(index-branch params, all other params) as two nnx.State trees."""
    return nnx.state(model, INDEX_PARAMS, MAIN_PARAMS)


def layer_selections(model: DecoderLM, tokens: jax.Array, *, with_recall: bool = False,
                     sparse: bool = True) -> list[dict | None]:
    """What each MSA layer's index branch selects on `tokens` [B, T] (one device, or under `jax.set_mesh` with
    the batch split as `needle_trace.probe_needle_selected` does).

    Returns one entry per layer: None for a dense layer; for an MSA layer {"block_idx": int32
    [B, T, H_kv, top_k]} (the blocks its main branch attends to with top-k routing on), plus
    "block_recall" and "score_recall" (`ops.selection_recall`, per layer: the model's aux only has
    their mean) when `with_recall`. The layers run their usual forward in between (`sparse=False`: the
    dense warmup's, so the selections are those the index would make in the model as it is trained
    then); jit it (`nnx.jit`) for long sequences."""
    cfg, m = model.cfg, model.cfg.msa
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = model._embed(tokens)
    out: list[dict | None] = []
    for i, block in enumerate(model.blocks):
        if cfg.is_msa_layer(i):
            h = block.attn_norm(x)
            q, k, _ = block.attn.qkv(h, positions)
            iq, ik = block.attn.index(h, positions)
            kw = dict(block_size=m.block_size, top_k=m.top_k, impl=cfg.impl)
            entry = {"block_idx": ops.select_blocks(iq, ik, sink_blocks=m.sink_blocks, local_blocks=m.local_blocks,
                                                    **kw)}
            if with_recall:
                entry["block_recall"], entry["score_recall"] = ops.selection_recall(q, k, entry["block_idx"], **kw)
            out.append(entry)
        else:
            out.append(None)
        x, _ = block(x, positions, sparse=sparse)
    return out


def layer_block_mass(model: DecoderLM, tokens: jax.Array, start: jax.Array, n_rows: int) -> list[jax.Array]:
    """The dense attention's mass per KV block at the query rows [start, start + n_rows) of `tokens`
    [B, T], in every layer (dense or MSA): float32 [B, H_kv, n_rows, n_blocks] per layer, the
    probabilities of the group's heads over all visible keys, averaged over the heads and summed per
    block of `cfg.msa.block_size` (`reference.block_mass`: what an index branch's KL is taught; in an
    MSA layer the main branch's own q and k, whatever it selected). The layers run their usual sparse
    forward in between. start: an int (traced under jit, so one compile serves every example)."""
    cfg = model.cfg
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    rows = start + jnp.arange(n_rows, dtype=jnp.int32)
    x = model._embed(tokens)
    out = []
    for block in model.blocks:
        q, k, _ = block.attn.qkv(block.attn_norm(x), positions)
        q_rows = jax.lax.dynamic_slice_in_dim(q, start, n_rows, axis=1)
        q_pos = jnp.broadcast_to(rows, (tokens.shape[0], n_rows))
        out.append(reference.block_mass(q_rows, k, cfg.msa.block_size, q_pos=q_pos))
        x, _ = block(x, positions, sparse=True)
    return out
