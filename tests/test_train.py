"""Training: losses, LR schedule, dense->sparse switch, optimiser groups, jitted train/eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msa_jax.config import ModelConfig, MSAConfig, TrainConfig
from msa_jax.model import INDEX_PARAMS, MAIN_PARAMS, DecoderLM
from msa_jax.train import _decay_mask, eval_step, lm_loss, loss_fn, lr_schedule, make_optimizer, train_step, use_sparse

MSA = MSAConfig(block_size=4, top_k=2, index_dim=16)  # dense span 8 tokens: T = 24 is really sparse
T = 24
# One TrainConfig for every train_step below: make_tx is cached per config, so optimizers built
# from it share the compiled step (compiling the MSA backward dominates this file's run time).
# grad_clip is small so that clipping is active; weight_decay 0 so frozen params stay bit-equal.
TCFG = TrainConfig(steps=12, learning_rate=1e-2, lr_warmup_steps=0, weight_decay=0.0, grad_clip=0.1)


def make_cfg(attention: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
        attention=attention, msa=MSA, rope_fraction=0.5,
    )


def batch(seed=0, B=4) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, 32, dtype=jnp.int32)


def leaves_by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lm_loss_is_mean_token_cross_entropy():
    logits = jax.random.normal(jax.random.key(1), (2, 5, 7)) * 3
    targets = jax.random.randint(jax.random.key(2), (2, 5), 0, 7)
    lg = np.asarray(logits, np.float64)
    logz = np.log(np.exp(lg).sum(-1))
    want = np.mean(logz - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0])
    got = lm_loss(logits.astype(jnp.bfloat16), targets)
    assert got.dtype == jnp.float32
    assert float(lm_loss(logits, targets)) == pytest.approx(want, rel=1e-5)
    assert float(got) == pytest.approx(want, rel=2e-2)


def test_use_sparse_schedule():
    msa = MSAConfig(warmup_steps=3)
    assert [use_sparse(s, msa) for s in range(5)] == [False, False, False, True, True]
    assert use_sparse(0, MSAConfig(warmup_steps=0))


def test_lr_schedule_warmup_then_cosine():
    tcfg = TrainConfig(steps=100, learning_rate=1e-3, lr_warmup_steps=10, min_lr_ratio=0.1)
    lr = np.array([float(lr_schedule(tcfg)(s)) for s in range(101)])
    assert lr[0] == 0.0
    np.testing.assert_allclose(lr[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-10)  # linear warmup
    assert lr[10] == pytest.approx(1e-3)
    assert np.all(np.diff(lr[10:]) <= 1e-12)  # non-increasing after the peak
    assert lr[100] == pytest.approx(1e-4)  # decays to learning_rate * min_lr_ratio at `steps`
    assert lr[55] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)  # cosine midpoint


def test_decay_mask_skips_norms_and_embeddings():
    model = DecoderLM(ModelConfig(**{**make_cfg("msa").__dict__, "tie_embeddings": False}))
    mask = {p: bool(m) for p, m in leaves_by_path(_decay_mask(nnx.state(model, nnx.Param))).items()}
    assert not mask["['embed']['embedding'].value"]
    assert mask["['lm_head']['kernel'].value"]
    for path, decay in mask.items():
        assert decay == path.endswith("['kernel'].value"), path


@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_loss_fn_kl_weight(attention):
    model = DecoderLM(make_cfg(attention))
    tokens = batch(1)
    f = nnx.jit(loss_fn, static_argnames=("sparse", "kl_weight"))
    loss0, m0 = f(model, tokens, sparse=True, kl_weight=0.0)
    assert float(loss0) == float(m0["lm_loss"])
    loss1, m1 = f(model, tokens, sparse=True, kl_weight=0.5)
    assert float(loss1) == pytest.approx(float(m1["lm_loss"]) + 0.5 * float(m1["kl"]), rel=1e-6)
    assert set(m1) == {"loss", "lm_loss", "kl"}
    assert (float(m1["kl"]) > 0) == (attention == "msa")


@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_train_steps_reduce_loss(attention):
    model = DecoderLM(make_cfg(attention), seed=0)
    opt = make_optimizer(model, TCFG)
    tokens = batch(2)
    before = eval_step(model, tokens, sparse=True, with_recall=attention == "msa")
    history = []
    msa = MSAConfig(block_size=4, top_k=2, index_dim=16, warmup_steps=3)
    for step in range(12):
        sparse = use_sparse(step, msa) or attention == "dense"  # dense warmup first, then routing
        m = train_step(model, opt, tokens, sparse=sparse, kl_weight=1.0)
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
        assert ("index_grad_norm" in m) == (attention == "msa")
        history.append(m)
    after = eval_step(model, tokens, sparse=True, with_recall=attention == "msa")
    assert int(opt.step[...]) == 12
    assert float(after["lm_loss"]) < float(before["lm_loss"]) - 0.5
    if attention == "msa":
        # The KL trains the index branch: it falls on a fixed batch, and recall is reported.
        assert float(after["kl"]) < float(before["kl"])
        assert set(after) == {"lm_loss", "kl", "block_recall", "score_recall"}
        assert 0.0 <= float(after["score_recall"]) <= 1.0
    else:
        assert set(after) == {"lm_loss", "kl"} and float(after["kl"]) == 0.0


def test_kl_never_changes_the_backbone_update():
    """Spec 6.2 through the optimiser: index and backbone are clipped separately, so the backbone's
    update is the same with and without the KL term, and without it the index branch is frozen.
    (One step only: after it the index weights differ, so routing and the LM gradient do too.)"""
    tokens = batch(3)
    tcfg = TCFG
    init = leaves_by_path(nnx.state(DecoderLM(make_cfg("msa"), seed=0), nnx.Param))
    results = {}
    for kl_weight in (1.0, 0.0):
        model = DecoderLM(make_cfg("msa"), seed=0)
        opt = make_optimizer(model, tcfg)
        assert float(lr_schedule(tcfg)(0)) == pytest.approx(tcfg.learning_rate)
        train_step(model, opt, tokens, sparse=True, kl_weight=kl_weight)
        results[kl_weight] = [leaves_by_path(nnx.state(model, f)) for f in (MAIN_PARAMS, INDEX_PARAMS)]
    (main0, index0), (main1, index1) = results[0.0], results[1.0]
    for path in main0:
        # Equal up to rounding: the two kl_weights are two compiled programs, and on a GPU their
        # reductions may round differently (seen: 1.5e-8). A KL leak would be of the update's size.
        np.testing.assert_allclose(main1[path], main0[path], rtol=1e-6, atol=1e-7, err_msg=path)
        assert not np.array_equal(main0[path], init[path]) or "scale" in path, path
    for path in index0:
        np.testing.assert_array_equal(index0[path], init[path], err_msg=path)  # no KL: frozen
        if path.endswith("['kernel'].value"):
            assert not np.array_equal(index1[path], init[path]), path  # KL: trained


def test_kl_support_follows_the_warmup_switch():
    """Warmup: KL over the full causal support; after the switch: over the selected blocks (spec 6.3)."""
    from msa_jax import ops
    from msa_jax.layers import MSAAttention

    cfg = make_cfg("msa")
    layer = MSAAttention(cfg, rngs=nnx.Rngs(params=3, index=4))
    x = jax.random.normal(jax.random.key(5), (2, T, cfg.d_model))
    pos = jnp.arange(T)
    q, k, _ = layer.qkv(x, pos)
    iq, ik = layer.index(x, pos)
    m = cfg.msa
    full = ops.index_kl_loss(q, k, iq, ik, None, block_size=m.block_size)
    idx = ops.select_blocks(iq, ik, block_size=m.block_size, top_k=m.top_k)
    selected = ops.index_kl_loss(q, k, iq, ik, idx, block_size=m.block_size)
    kl_warm = layer(x, pos, sparse=False)[1]["kl"]
    kl_sparse = layer(x, pos, sparse=True)[1]["kl"]
    np.testing.assert_allclose(kl_warm, full, rtol=1e-5)
    np.testing.assert_allclose(kl_sparse, selected, rtol=1e-5)
    assert abs(float(full) - float(selected)) > 1e-3  # T=24 > dense span 8: the supports differ
    # The step counter decides the mode: dense for steps < warmup_steps, sparse from then on.
    msa = MSAConfig(block_size=4, top_k=2, index_dim=16, warmup_steps=3)
    assert [use_sparse(s, msa) for s in range(5)] == [False, False, False, True, True]



def test_index_lr_scale_sets_the_index_update_and_kl_weight_barely_does():
    """make_tx on a two-group parameter tree: the index group's update scales with index_lr_scale
    (0: frozen), the backbone's does not; scaling the index gradient by 10 (kl_weight 10 instead of
    1: only the index branch gets the KL's gradient) gives nearly the same update (separate clip +
    Adam, invariant to the gradient's scale), so the README says to ablate the LR and KL on/off."""
    import dataclasses

    from msa_jax.train import make_tx

    params = {"main": {"kernel": jnp.ones((4, 3))}, "index": {"kernel": jnp.ones((4, 3))}}
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape) * 1e-2, params)

    def first_update(scale, index_grad_factor=1.0):
        tx = make_tx(dataclasses.replace(TCFG, index_lr_scale=scale))
        g = {**grads, "index": jax.tree.map(lambda x: x * index_grad_factor, grads["index"])}
        upd, _ = tx.update(g, tx.init(params), params)
        return jax.tree.map(np.asarray, upd)

    base, half, frozen = first_update(1.0), first_update(0.5), first_update(0.0)
    np.testing.assert_array_equal(half["main"]["kernel"], base["main"]["kernel"])
    np.testing.assert_allclose(half["index"]["kernel"], 0.5 * base["index"]["kernel"], rtol=1e-6)
    assert np.abs(base["index"]["kernel"]).min() > 0 and not frozen["index"]["kernel"].any()
    tenfold = first_update(1.0, index_grad_factor=10.0)["index"]["kernel"]
    np.testing.assert_allclose(tenfold, base["index"]["kernel"], rtol=1e-4)
    assert make_tx(TCFG) is make_tx(dataclasses.replace(TCFG))  # scale 1: the same cached transform
    with pytest.raises(ValueError, match="index_lr_scale"):
        TrainConfig(index_lr_scale=-1.0)
