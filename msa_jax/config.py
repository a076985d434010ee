"""Frozen, validated configuration dataclasses.

`MSAConfig` holds the MSA hyper-parameters (names from MSA_SPEC.md), `ModelConfig` the decoder LM
and the dense/MSA switch, `TrainConfig` the optimiser and schedule. Every field is checked in
`__post_init__`; a bad value raises `ValueError` that names the field and what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ATTENTION_KINDS = ("dense", "msa")
IMPLS = ("auto", "reference", "xla", "pallas")
# Device-mesh axes (`msa_jax.sharding` builds the mesh; the ops run their kernels per shard of it).
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both


def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _positive_int(name: str, value) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", value)


def _non_negative_int(name: str, value) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an int >= 0", value)


@dataclasses.dataclass(frozen=True)
class MSAConfig:
    """MiniMax Sparse Attention hyper-parameters (defaults: the paper / MiniMax-M3)."""

    block_size: int = 128  # B_k: tokens per KV block
    top_k: int = 16  # blocks selected per (query, group), local block included
    index_dim: int = 128  # D_idx: index head dim
    index_norm: bool = True  # Gemma-style RMSNorm on iq and ik (as in M3)
    index_rope: bool = True  # same partial RoPE as the main q/k on iq and ik (as in M3)
    sink_blocks: int = 0  # always-selected leading blocks; ablation only (paper: none)
    kl_weight: float = 1.0  # lambda in L = L_LM + lambda * sum_layers L_KL
    warmup_steps: int = 0  # dense warmup: full attention and full-support KL for this many steps

    def __post_init__(self):
        _positive_int("block_size", self.block_size)
        _positive_int("top_k", self.top_k)
        _positive_int("index_dim", self.index_dim)
        _non_negative_int("sink_blocks", self.sink_blocks)
        _non_negative_int("warmup_steps", self.warmup_steps)
        _require(isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0, "kl_weight", "a number >= 0", self.kl_weight)

    @property
    def dense_span(self) -> int:
        """Sequences this long or shorter see every block: MSA equals dense causal GQA."""
        return self.top_k * self.block_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM. `attention` switches every layer past `n_dense_layers` to MSA."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8  # H_q
    n_kv_heads: int = 2  # H_kv (GQA groups)
    head_dim: int = 32  # D
    d_ff: int = 768  # SwiGLU hidden size
    attention: Literal["dense", "msa"] = "dense"
    n_dense_layers: int = 0  # leading layers that stay dense GQA in an MSA model (M3: 3)
    msa: MSAConfig = dataclasses.field(default_factory=MSAConfig)
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0  # share of head dims rotated (M3: 0.5, NeoX-style halves)
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    impl: str = "auto"  # ops backend: auto | reference | xla | pallas
    dtype: str = "float32"  # activation / compute dtype (params stay float32)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("n_dense_layers", self.n_dense_layers)
        _require(self.attention in ATTENTION_KINDS, "attention", f"one of {ATTENTION_KINDS}", self.attention)
        _require(self.n_heads % self.n_kv_heads == 0, "n_heads", f"a multiple of n_kv_heads={self.n_kv_heads}", self.n_heads)
        _require(isinstance(self.msa, MSAConfig), "msa", "an MSAConfig", self.msa)
        _require(0.0 < self.rope_fraction <= 1.0, "rope_fraction", "a float in (0, 1]", self.rope_fraction)
        _require(self.rope_dim % 2 == 0, "rope_fraction", f"a value giving an even number of rotated dims of head_dim={self.head_dim}", self.rope_fraction)
        _require(self.rope_theta > 0, "rope_theta", "a float > 0", self.rope_theta)
        _require(self.norm_eps > 0, "norm_eps", "a float > 0", self.norm_eps)
        _require(self.impl in IMPLS, "impl", f"one of {IMPLS}", self.impl)
        _require(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)
        if self.attention == "msa" and self.msa.index_rope:
            idx_rope = int(self.msa.index_dim * self.rope_fraction)
            _require(idx_rope % 2 == 0, "msa.index_dim", f"a size whose rotated share (rope_fraction={self.rope_fraction}) is even", self.msa.index_dim)

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_fraction)

    def is_msa_layer(self, layer: int) -> bool:
        return self.attention == "msa" and layer >= self.n_dense_layers

    @property
    def n_msa_layers(self) -> int:
        return sum(self.is_msa_layer(i) for i in range(self.n_layers))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule: AdamW with linear warmup then cosine decay."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 1024
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("lr_warmup_steps", self.lr_warmup_steps)
        _require(self.learning_rate > 0, "learning_rate", "a float > 0", self.learning_rate)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)
        _require(self.weight_decay >= 0, "weight_decay", "a float >= 0", self.weight_decay)
        _require(0.0 <= self.b1 < 1.0, "b1", "a float in [0, 1)", self.b1)
        _require(0.0 <= self.b2 < 1.0, "b2", "a float in [0, 1)", self.b2)
        _require(self.grad_clip > 0, "grad_clip", "a float > 0", self.grad_clip)
