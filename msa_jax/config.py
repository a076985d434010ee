"""Frozen, validated configuration dataclasses.

`MSAConfig` holds the MSA hyper-parameters (names from docs/algorithm.md), `ModelConfig` the decoder LM
and the dense/MSA switch, `TrainConfig` the optimiser and schedule. Every field is checked in
`__post_init__`; a bad value raises `ValueError` that names the field and what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ATTENTION_KINDS = ("dense", "msa")
IMPLS = ("auto", "reference", "xla", "pallas")
# Device-mesh axes (`msa_jax.sharding` builds the mesh; the ops run their kernels per shard of it).
MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; "context" splits the sequence


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
    local_blocks: int = 1  # always-selected blocks ending at the query's own (paper: 1, the local block)
    kl_weight: float = 1.0  # lambda in L = L_LM + lambda * sum_layers L_KL
    warmup_steps: int = 0  # dense warmup: full attention and full-support KL for this many steps

    def __post_init__(self):
        _positive_int("block_size", self.block_size)
        _positive_int("top_k", self.top_k)
        _positive_int("index_dim", self.index_dim)
        _non_negative_int("sink_blocks", self.sink_blocks)
        _positive_int("local_blocks", self.local_blocks)
        _require(self.local_blocks <= self.top_k, "local_blocks", f"<= top_k ({self.top_k})", self.local_blocks)
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
        if self.attention == "msa" and self.msa.index_rope:  # the index branch rotates the main q/k's dims
            _require(self.msa.index_dim >= self.rope_dim, "msa.index_dim",
                     f">= the rotated dims of the main q/k (rope_dim={self.rope_dim}), or index_rope=False",
                     self.msa.index_dim)

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
    index_lr_scale: float = 1.0  # the index branch's learning rate = learning_rate * this (same schedule)

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
        _require(isinstance(self.index_lr_scale, (int, float)) and self.index_lr_scale >= 0, "index_lr_scale",
                 "a number >= 0", self.index_lr_scale)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: model sizes, optimiser, MSA recipe, data and the run's cadence.

    Flat on purpose: it is what `config.json` of a run directory and every checkpoint's metadata
    hold, and what `--flags` override (`msa_jax.presets`). `model_config()` and `train_config()`
    build the validated library configs from it. Fields in `RESUMABLE` may differ when a run is
    resumed (how it is executed); every other field must match the run being resumed.
    """

    preset: str = "tiny"
    attention: Literal["dense", "msa"] = "msa"
    impl: str = "auto"
    seed: int = 0
    # optimisation
    steps: int = 100
    batch_size: int = 2
    seq_len: int = 512
    lr: float = 3e-3
    lr_warmup_steps: int | None = None  # None: 5% of the steps (at least 1)
    # model
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 192
    n_dense_layers: int = 0
    dtype: str = "float32"
    rope_theta: float = 10_000.0  # RoPE base; a next stage at a longer --seq-len may raise it
    # MSA
    block_size: int = 32
    top_k: int = 4
    index_dim: int = 16
    msa_warmup_steps: int = 20  # dense warmup steps (capped at `steps`)
    kl_weight: float = 1.0
    index_lr_scale: float = 1.0  # index branch LR / backbone LR (0: the index branch never changes)
    index_rope: bool = True  # the main q/k's partial RoPE on the index queries and keys too (False: content only)
    local_blocks: int = 1  # always-selected blocks ending at the query's own, of the top_k (paper: 1)
    sink_blocks: int = 0  # always-selected leading blocks, of the top_k (paper: none; an ablation)
    # data
    max_bytes: int | None = 4_000_000
    sources: str = "stdlib,site-packages"
    task_mix: float = 0.0  # share of each batch's rows that are retrieval examples (msa_jax.retrieval)
    task_mix_tasks: str = "passkey,multikey,variable_tracking"  # comma list of the tasks mixed in
    task_depth_power: float = 1.0  # the mixed-in needles' depths are u ** this (1: uniform; > 1: more far back)
    answer_weight: float = 1.0  # loss weight of the retrieval rows' answer bytes (1: the plain LM loss)
    # cadence and outputs
    eval_every: int = 25
    eval_batches: int = 2
    log_every: int = 5
    ckpt_every: int = 50  # 0: only at the end and on an interrupt
    keep: int = 3
    plot: bool = True
    mesh: str | None = None  # e.g. "data=2,fsdp=2,tensor=2"; None: data=<all devices>
    deterministic: bool = False  # deterministic GPU ops (msa_jax.determinism): bit-identical resume on a GPU
    stop_at: int | None = None  # stop (with a checkpoint) after this step
    # start from another run's weights: dense -> MSA conversion (continued pre-training), or a new
    # stage at another length (e.g. 2K -> 16K; dense or MSA), with a fresh optimizer
    init_from: str | None = None  # a run directory (or its checkpoints/): its weights are loaded (index: MSA into MSA)
    init_step: int | None = None  # step of init_from to load (None: its latest)
    init_loaded_step: int | None = None  # filled in by the loop: the step actually loaded

    RESUMABLE = frozenset({"steps", "eval_every", "eval_batches", "ckpt_every", "keep", "log_every", "mesh",
                           "init_from", "init_step", "plot", "impl", "stop_at", "deterministic"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every", "keep"):
            _positive_int(name, getattr(self, name))
        for name in ("ckpt_every", "msa_warmup_steps"):
            _non_negative_int(name, getattr(self, name))
        if self.lr_warmup_steps is not None:
            _non_negative_int("lr_warmup_steps", self.lr_warmup_steps)
        _require(self.attention in ATTENTION_KINDS, "attention", f"one of {ATTENTION_KINDS}", self.attention)
        if self.stop_at is not None:
            _non_negative_int("stop_at", self.stop_at)
        from msa_jax import data, retrieval  # numpy only: the batches' own checks of the task mix

        data.check_task_mix(self.task_mix, self.task_mix_tasks, self.seq_len)
        _require(isinstance(self.answer_weight, (int, float)) and not isinstance(self.answer_weight, bool)
                 and self.answer_weight >= 0, "answer_weight", "a number >= 0", self.answer_weight)
        retrieval.check_depth_power(self.task_depth_power, "task_depth_power")
        _require(self.task_depth_power == 1.0 or self.task_mix > 0, "task_depth_power",
                 "1 unless task_mix > 0 (it draws the depths of the mixed-in retrieval rows)", self.task_depth_power)
        _require(self.answer_weight == 1.0 or self.task_mix > 0, "answer_weight",
                 "1 unless task_mix > 0 (it weights the answers of the mixed-in retrieval rows)", self.answer_weight)
        self.model_config(), self.train_config()  # validates every size

    @property
    def warmup_steps(self) -> int:
        """Dense warmup steps actually used: msa_warmup_steps, at most `steps`."""
        return min(self.msa_warmup_steps, self.steps)

    @property
    def mix_tasks(self) -> tuple[str, ...]:
        """The tasks of `task_mix_tasks` as a tuple of names."""
        return tuple(t.strip() for t in self.task_mix_tasks.split(","))

    def model_config(self) -> ModelConfig:
        msa = MSAConfig(block_size=self.block_size, top_k=self.top_k, index_dim=self.index_dim,
                        kl_weight=self.kl_weight, warmup_steps=self.warmup_steps, index_rope=self.index_rope,
                        local_blocks=self.local_blocks, sink_blocks=self.sink_blocks)
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_ff=self.d_ff,
                           attention=self.attention, n_dense_layers=self.n_dense_layers, msa=msa, impl=self.impl,
                           dtype=self.dtype, rope_theta=self.rope_theta)

    def train_config(self) -> TrainConfig:
        warm = max(1, round(0.05 * self.steps)) if self.lr_warmup_steps is None else self.lr_warmup_steps
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                           learning_rate=self.lr, lr_warmup_steps=min(warm, self.steps), seed=self.seed,
                           index_lr_scale=self.index_lr_scale)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """From `to_dict()` output (a run's config.json); unknown keys raise a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        _require(not unknown, "run config", "only the fields of RunConfig", f"unknown keys {unknown}")
        return cls(**d)

    def differences(self, other: "RunConfig") -> list[str]:
        """Names of the fields whose values differ."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
