"""Training: losses, AdamW optimiser with warmup-cosine LR, jitted train/eval steps (one device or a mesh).

Loss (docs/algorithm.md §6.1): L = L_LM + kl_weight * sum over MSA layers of L_KL. Gradient routing (docs/algorithm.md §6.2)
is done by the layers (stop_gradient on the index input, the KL op stops its teacher), so one
`value_and_grad` over all params is correct: L_LM reaches only the backbone, L_KL only the index
branches. The dense -> sparse warmup (docs/algorithm.md §6.3) is `sparse=use_sparse(step, msa)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from msa_jax import context, retrieval, sharding
from msa_jax.config import MSAConfig, TrainConfig


def lr_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate over lr_warmup_steps, cosine to lr*min_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tcfg.learning_rate,
        warmup_steps=tcfg.lr_warmup_steps,
        decay_steps=max(tcfg.steps, tcfg.lr_warmup_steps + 1),
        end_value=tcfg.learning_rate * tcfg.min_lr_ratio,
    )


def _path_names(path) -> set:
    return {getattr(p, "key", getattr(p, "name", None)) for p in path}


def _decay_mask(params):
    """Weight-decay only matrices (ndim >= 2) outside the embedding: no decay on norms/embeddings."""
    return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim >= 2 and "embed" not in _path_names(path), params)


def _group_labels(params):
    """"index" for index-branch params, "main" for the rest (the two groups of docs/algorithm.md §6.2)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: "index" if "index" in _path_names(path) else "main", params)


@functools.lru_cache(maxsize=32)
def make_tx(tcfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(b1, b2, weight_decay, warmup-cosine LR), per group;
    the index group's LR is `index_lr_scale` times the backbone's.

    The index branch and the backbone are clipped separately: with one global clip, a KL gradient
    spike would shrink the backbone's update, the leak that docs/algorithm.md §6.2 detaches the KL to prevent.
    With separate groups the backbone's update does not depend on the KL at all.
    Cached per (frozen, hashable) TrainConfig: the same tx object gives the same optimizer graph,
    so a new optimizer for an equal config reuses the compiled train_step instead of recompiling.
    """

    def group(lr):
        return optax.chain(
            optax.clip_by_global_norm(tcfg.grad_clip),
            optax.adamw(lr, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=_decay_mask),
        )

    base, scale = lr_schedule(tcfg), tcfg.index_lr_scale
    # Adam's update does not scale with the gradient, so the size of kl_weight (> 0) barely changes
    # the index branch's update; its learning rate does (index_lr_scale; 1.0: the backbone's schedule).
    index_lr = base if scale == 1.0 else (lambda step: scale * base(step))
    return optax.multi_transform({"main": group(base), "index": group(index_lr)}, _group_labels)


def make_optimizer(model: nnx.Module, tcfg: TrainConfig) -> nnx.Optimizer:
    """nnx.Optimizer over every nnx.Param of `model` with `make_tx(tcfg)`."""
    return nnx.Optimizer(model, make_tx(tcfg), wrt=nnx.Param)


def use_sparse(step: int, msa: MSAConfig) -> bool:
    """Dense warmup for the first msa.warmup_steps steps (docs/algorithm.md §6.3), top-k routing after."""
    return step >= msa.warmup_steps


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean token cross-entropy in float32 (weighted mean sum(w * ce) / sum(w) with `weights`)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return ce.mean() if weights is None else (ce * weights).sum() / weights.sum()


def answer_weights(answer_rows: jax.Array, positions: jax.Array, T: int, answer_weight: float) -> jax.Array:
    """float32 [B, T] loss weights: answer_weight on the targets that predict the answer of a
    retrieval row (`answer_rows` bool [B]; `retrieval.answer_targets`), 1 elsewhere. positions [T]:
    each target slot's index in the sequence (the context-parallel layout permutes them)."""
    lo, hi = retrieval.answer_targets(T)
    in_answer = (positions >= lo) & (positions < hi)
    hit = answer_rows[:, None] & in_answer[None, :]
    return jnp.where(hit, jnp.float32(answer_weight), jnp.float32(1.0))


def loss_fn(model: nnx.Module, tokens, *, sparse: bool, kl_weight: float, with_recall: bool = False,
            answer_rows: jax.Array | None = None, answer_weight: float = 1.0):
    """tokens [B, T+1] int32 -> (loss, metrics {"loss", "lm_loss", "kl"}); next-token prediction.

    tokens may also be a context-parallel batch (`msa_jax.context.shard_batch`: inputs, targets
    and positions, already in the zigzag layout and split over the sequence). A token array under
    a mesh with a `context` axis is laid out here instead. Either way: the same loss.
    answer_rows (bool [B], the batch's retrieval rows): the metrics add `answer_counts`, and with
    answer_weight != 1 the LM loss is the weighted mean with `answer_weights` (the answer bytes count
    answer_weight times)."""
    if isinstance(tokens, dict):
        inputs, targets, positions = tokens["inputs"], tokens["targets"], tokens["positions"]
    else:
        inputs, targets, positions = tokens[:, :-1], tokens[:, 1:], None
        if context.size() > 1:
            positions, inputs, targets = context.layout(inputs, targets)
    logits, aux = model(inputs, positions=positions, sparse=sparse, with_recall=with_recall)
    weights = None
    if answer_rows is not None:
        T = targets.shape[1]
        positions_ = jnp.arange(T) if positions is None else positions
        if answer_weight != 1.0:
            weights = answer_weights(answer_rows, positions_, T, answer_weight)
    lm = lm_loss(logits, targets, weights)
    kl = aux["kl"]
    loss = lm + kl_weight * kl if kl_weight else lm
    metrics = {"loss": loss, "lm_loss": lm, "kl": kl}
    metrics.update({k: v for k, v in aux.items() if k != "kl"})
    if answer_rows is not None:
        metrics.update(answer_counts(logits, targets, answer_rows, positions_))
    return loss, metrics


def answer_counts(logits: jax.Array, targets: jax.Array, answer_rows: jax.Array, positions: jax.Array) -> dict:
    """Teacher-forced greedy scoring of the retrieval rows' answers (`retrieval.answer_targets`) as
    float32 counts (they add over batches and shards): answer_bytes and answer_bytes_right; answer_rows
    and answer_rows_right (every answer byte right)."""
    lo, hi = retrieval.answer_targets(targets.shape[1])
    mask = answer_rows[:, None] & ((positions >= lo) & (positions < hi))[None, :]
    hit = jnp.argmax(logits, axis=-1) == targets
    f32 = jnp.float32
    return {"answer_bytes": mask.sum(dtype=f32), "answer_bytes_right": (hit & mask).sum(dtype=f32),
            "answer_rows": answer_rows.sum(dtype=f32),
            "answer_rows_right": (answer_rows & (hit | ~mask).all(axis=1)).sum(dtype=f32)}


@nnx.jit(static_argnames=("sparse", "kl_weight", "answer_weight"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, tokens, *, sparse: bool, kl_weight: float,
               answer_rows: jax.Array | None = None, answer_weight: float = 1.0):
    """One AdamW step on `tokens` [B, T+1] (or a context-parallel batch: `loss_fn`; answer_rows and
    answer_weight: `loss_fn`).

    Returns metrics: loss, lm_loss, kl, grad_norm (all params, before clipping), for a model
    with index branches index_grad_norm (index params only; the KL's gradient), and grad_finite:
    bool [n_params], whether each parameter's gradient is all finite (names: `param_names`).
    """

    def f(m):
        return loss_fn(m, tokens, sparse=sparse, kl_weight=kl_weight, answer_rows=answer_rows,
                       answer_weight=answer_weight)

    (_, metrics), grads = nnx.value_and_grad(f, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["grad_finite"] = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)])
    index_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "index" in _path_names(path)]
    if index_grads:
        metrics["index_grad_norm"] = optax.tree.norm(index_grads)
    return metrics


def param_names(model: nnx.Module) -> list[str]:
    """"blocks/3/attn/wq/kernel", ...: the parameters in the order of train_step's `grad_finite`."""
    return [jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
            for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


@nnx.jit(static_argnames=("sparse", "with_recall"))
def eval_step(model: nnx.Module, tokens: jax.Array, *, sparse: bool, with_recall: bool = False,
              answer_rows: jax.Array | None = None):
    """Metrics on `tokens` [B, T+1]: lm_loss, kl (+ block_recall, score_recall for an MSA model; +
    `answer_counts` of the retrieval rows `answer_rows` bool [B])."""
    _, metrics = loss_fn(model, tokens, sparse=sparse, kl_weight=0.0, with_recall=with_recall,
                         answer_rows=answer_rows)
    del metrics["loss"]
    return metrics


# ------------------------------------------------------------------------------- sharded steps


def _constrain(node, mesh: jax.sharding.Mesh) -> None:
    state = nnx.state(node)
    nnx.update(node, jax.lax.with_sharding_constraint(state, sharding.tree_shardings(state, mesh)))


def sharded_train_step(model, optimizer, tokens, *, mesh: jax.sharding.Mesh, sparse: bool, kl_weight: float,
                       answer_rows: jax.Array | None = None, answer_weight: float = 1.0):
    """`train.train_step` on a sharded model / optimizer / batch, with the updated state pinned.

    Same math and metrics as `train.train_step` (it is called inside); the only addition is a
    sharding constraint on the new params and optimizer state, so they keep the rule layout.
    """
    with jax.set_mesh(mesh):  # the active mesh lets the kernels run per shard (msa_jax.ops.shard)
        return _sharded_train_step(model, optimizer, tokens, answer_rows, mesh=mesh, sparse=sparse,
                                   kl_weight=kl_weight, answer_weight=answer_weight)


@nnx.jit(static_argnames=("mesh", "sparse", "kl_weight", "answer_weight"))
def _sharded_train_step(model, optimizer, tokens, answer_rows, *, mesh, sparse, kl_weight, answer_weight):
    layout = context.batch_shardings(mesh) if isinstance(tokens, dict) else sharding.batch_sharding(mesh)
    tokens = jax.lax.with_sharding_constraint(tokens, layout)
    if answer_rows is not None:
        answer_rows = jax.lax.with_sharding_constraint(answer_rows, sharding.row_sharding(mesh))
    # train_step is itself an nnx.jit; nested inside this jit it is simply inlined.
    metrics = train_step(model, optimizer, tokens, sparse=sparse, kl_weight=kl_weight, answer_rows=answer_rows,
                         answer_weight=answer_weight)
    _constrain(model, mesh)
    _constrain(optimizer, mesh)
    return metrics


def sharded_eval_step(model, tokens, *, mesh: jax.sharding.Mesh, sparse: bool, with_recall: bool = False,
                      answer_rows=None):
    """`train.eval_step` with the batch placed by `sharding.batch_sharding(mesh)` (GSPMD does the rest)."""
    with jax.set_mesh(mesh):
        rows = None if answer_rows is None else sharding.shard_rows(answer_rows, mesh)
        return eval_step(model, sharding.shard_batch(tokens, mesh), sparse=sparse, with_recall=with_recall,
                         answer_rows=rows)
