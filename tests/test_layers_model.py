"""Layers (RMSNorm, RoPE, MLP, GQA, index branch, MSA) and the DecoderLM: shapes, formulas, weight
sharing between dense and MSA, dense==MSA equivalence for short sequences, gradient routing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msa_jax import ops
from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.layers import MLP, GQAAttention, IndexBranch, MSAAttention, RMSNorm, rope
from msa_jax.model import INDEX_PARAMS, MAIN_PARAMS, DecoderLM, count_params, split_params

# Tiny shapes: block_size 8, top_k 4 -> MSA equals dense for T <= 32.
MSA = MSAConfig(block_size=8, top_k=4, index_dim=16)


def make_cfg(attention="dense", **kw) -> ModelConfig:
    base = dict(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
        rope_fraction=0.5, attention=attention, msa=MSA, impl="auto",
    )
    base.update(kw)
    return ModelConfig(**base)


def rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def tokens(key, B, T, vocab=64):
    return jax.random.randint(jax.random.key(key), (B, T), 0, vocab, dtype=jnp.int32)


@nnx.jit(static_argnames=("sparse", "with_recall"))
def forward(model, toks, sparse=True, with_recall=False):
    """Jitted model call: eager dispatch of the ops is far slower than compiling these tiny models."""
    return model(toks, sparse=sparse, with_recall=with_recall)


def leaves_by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- RMSNorm / RoPE


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_matches_gemma_formula(dtype):
    norm = RMSNorm(24, eps=1e-5)
    w = np.asarray(rand(1, (24,)))
    norm.scale[...] = jnp.asarray(w)
    x = rand(2, (3, 5, 24), dtype)
    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    xf = np.asarray(x, np.float64)
    want = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-5) * (1 + w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol)


def test_rmsnorm_zero_init_is_plain_rms_normalisation():
    y = RMSNorm(16)(rand(3, (4, 16)) * 7.0)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, -1)), 1.0, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 11, 3, 16), (2, 11, 16)])
def test_rope_preserves_norm_and_leaves_tail_untouched(shape):
    x = rand(4, shape)
    pos = jnp.arange(shape[1]) * 37
    y = rope(x, pos, rope_dim=8, theta=10_000.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    # ... and the rotated dims did move (except at position 0, which is the identity).
    assert not np.allclose(y[:, 1:, ..., :8], x[:, 1:, ..., :8])
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    q, k = rand(5, (1, 1, 1, 16)), rand(6, (1, 1, 1, 16))

    def score(m, n):
        qm = rope(q, jnp.array([m]), 12, 500.0)
        kn = rope(k, jnp.array([n]), 12, 500.0)
        return float(jnp.sum(qm * kn))

    for m, n in [(3, 1), (10, 8), (102, 100)]:
        assert score(m, n) == pytest.approx(score(m + 57, n + 57), rel=1e-4, abs=1e-4)
    assert score(5, 0) != pytest.approx(score(9, 0), rel=1e-3)


def test_rope_is_neox_rotate_half():
    """Dims i and i + rope_dim/2 form one rotation pair with frequency theta^(-2i/rope_dim)."""
    x = jnp.zeros((1, 1, 8)).at[0, 0, 1].set(1.0)  # unit vector on pair (1, 5)
    y = rope(x, jnp.array([2]), rope_dim=8, theta=100.0)
    ang = 2 * 100.0 ** (-2 * 1 / 8)
    want = np.zeros(8)
    want[1], want[5] = np.cos(ang), np.sin(ang)
    np.testing.assert_allclose(np.asarray(y[0, 0]), want, atol=1e-6)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("dtype", ["bfloat16"])  # float32 layers run in every other test
def test_layer_shapes_and_dtypes(dtype):
    cfg = make_cfg("msa", dtype=dtype)
    rngs = nnx.Rngs(params=0)
    dt = jnp.dtype(dtype)
    B, T = 2, 13
    x = rand(7, (B, T, cfg.d_model), dt)
    pos = jnp.arange(T)

    mlp, gqa, index, msa = MLP(cfg, rngs=rngs), GQAAttention(cfg, rngs=rngs), IndexBranch(cfg, rngs=rngs), MSAAttention(cfg, rngs=rngs)

    @nnx.jit
    def run(mlp, gqa, index, msa, x):  # one compile for every call below
        return (
            mlp(x), gqa(x, pos), index(x, pos), msa(x, pos),
            msa(x, pos, sparse=True, with_recall=True), msa(x, pos, sparse=False, with_recall=True),
        )

    y, (out, aux), (iq, ik), plain, *with_recall = run(mlp, gqa, index, msa, x)
    assert y.shape == x.shape and y.dtype == dt
    assert out.shape == x.shape and out.dtype == dt and aux == {}
    assert iq.shape == (B, T, cfg.n_kv_heads, MSA.index_dim) and ik.shape == (B, T, MSA.index_dim)
    assert iq.dtype == dt and ik.dtype == dt
    assert set(plain[1]) == {"kl"}
    for out, aux in with_recall:
        assert out.shape == x.shape and out.dtype == dt
        assert set(aux) == {"kl", "block_recall", "score_recall"}
        assert all(v.shape == () and v.dtype == jnp.float32 and np.isfinite(v) for v in aux.values())


def test_msa_layer_has_gqa_param_names_plus_index():
    cfg = make_cfg("msa")
    dense = set(leaves_by_path(nnx.state(GQAAttention(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    msa = set(leaves_by_path(nnx.state(MSAAttention(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    assert dense < msa
    assert all(p.startswith("['index']") for p in msa - dense)
    assert {"['index']['wq_idx']['kernel'].value", "['index']['wk_idx']['kernel'].value"} <= msa


def test_index_branch_options():
    T = 6
    # The same input at every position: any difference between positions comes from RoPE alone.
    x = jnp.broadcast_to(rand(8, (1, 1, 32)), (1, T, 32))
    pos = jnp.arange(T)

    cfg = make_cfg("msa", rope_fraction=0.5, msa=MSAConfig(block_size=8, top_k=4, index_dim=16))
    branch = IndexBranch(cfg, rngs=nnx.Rngs(0))
    assert hasattr(branch, "iq_norm") and hasattr(branch, "ik_norm")
    iq, ik = branch(x, pos)
    n_rot = 8  # int(16 * 0.5)
    np.testing.assert_allclose(iq[:, 1:, :, n_rot:], jnp.broadcast_to(iq[:, :1, :, n_rot:], iq[:, 1:, :, n_rot:].shape), atol=1e-6)
    assert not np.allclose(iq[:, 1:, :, :n_rot], iq[:, :1, :, :n_rot])
    assert not np.allclose(ik[:, 1:, :n_rot], ik[:, :1, :n_rot])
    # Gemma RMSNorm with zero init: every index head has unit RMS.
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(ik**2, -1)), 1.0, rtol=1e-4)

    # index_dim != head_dim: the index branch rotates exactly the main q/k's dims at their frequencies
    # (rope_dim = 8 of head_dim 16), not a share of index_dim.
    wide = dict(block_size=8, top_k=4, index_dim=32)
    on = IndexBranch(make_cfg("msa", rope_fraction=0.5, msa=MSAConfig(**wide)), rngs=nnx.Rngs(0))
    unrotated = IndexBranch(make_cfg("msa", rope_fraction=0.5, msa=MSAConfig(**wide, index_rope=False)), rngs=nnx.Rngs(0))
    x2 = rand(9, (1, T, 32))
    (iq_on, ik_on), (iq_off, ik_off) = on(x2, pos), unrotated(x2, pos)
    cfg = on.cfg
    np.testing.assert_allclose(ik_on, rope(ik_off, pos, cfg.rope_dim, cfg.rope_theta), atol=1e-5)
    np.testing.assert_allclose(iq_on, rope(iq_off, pos, cfg.rope_dim, cfg.rope_theta), atol=1e-5)
    np.testing.assert_allclose(ik_on[..., cfg.rope_dim:], ik_off[..., cfg.rope_dim:], atol=1e-6)
    with pytest.raises(ValueError, match="msa.index_dim"):  # too few index dims to rotate like q/k
        make_cfg("msa", rope_fraction=1.0, msa=MSAConfig(block_size=8, top_k=4, index_dim=8))

    off = make_cfg("msa", msa=MSAConfig(block_size=8, top_k=4, index_dim=16, index_norm=False, index_rope=False))
    branch = IndexBranch(off, rngs=nnx.Rngs(0))
    assert not hasattr(branch, "iq_norm")
    iq, ik = branch(x, pos)
    np.testing.assert_allclose(iq, jnp.broadcast_to(iq[:, :1], iq.shape), atol=1e-6)  # no RoPE
    assert not np.allclose(jnp.sqrt(jnp.mean(ik**2, -1)), 1.0, rtol=1e-2)  # no norm


# ----------------------------------------------------------------------------- model


def test_n_dense_layers_are_gqa_and_the_rest_msa():
    model = DecoderLM(make_cfg("msa", n_layers=4, n_dense_layers=2))
    kinds = [type(b.attn) for b in model.blocks]
    assert kinds == [GQAAttention, GQAAttention, MSAAttention, MSAAttention]
    assert all(type(b.attn) is GQAAttention for b in DecoderLM(make_cfg("dense", n_layers=3)).blocks)


@pytest.mark.parametrize("tie", [True, False])
def test_dense_and_msa_share_every_non_index_weight(tie):
    dense = DecoderLM(make_cfg("dense", n_layers=3, tie_embeddings=tie), seed=3)
    msa = DecoderLM(make_cfg("msa", n_layers=3, n_dense_layers=1, tie_embeddings=tie), seed=3)
    d = leaves_by_path(nnx.state(dense, nnx.Param))
    index, main = (leaves_by_path(s) for s in split_params(msa))
    assert set(main) == set(d)
    for path in d:
        np.testing.assert_array_equal(main[path], d[path], err_msg=path)
    assert index and all("['index']" in p for p in index)
    assert count_params(msa) == count_params(dense) + count_params(msa, INDEX_PARAMS)
    assert count_params(msa, MAIN_PARAMS) == count_params(dense)
    # A different seed gives different weights (the comparison above is not vacuous).
    other = leaves_by_path(nnx.state(DecoderLM(make_cfg("dense", n_layers=3, tie_embeddings=tie), seed=4), nnx.Param))
    assert not np.array_equal(other["['embed']['embedding'].value"], d["['embed']['embedding'].value"])


@pytest.mark.parametrize("impl", ["auto"])  # ops' own suite checks every impl against the oracle
def test_dense_and_msa_models_agree_within_dense_span_and_differ_beyond(impl):
    dense = DecoderLM(make_cfg("dense", impl=impl), seed=1)
    msa = DecoderLM(make_cfg("msa", impl=impl), seed=1)
    toks = tokens(9, 2, 64)
    # T = 13 (not a multiple of block_size) <= top_k * block_size = 32: every block is selected.
    ld, aux_d = forward(dense, toks[:, :13])
    lm, aux_m = forward(msa, toks[:, :13])
    assert ld.shape == (2, 13, 64) and ld.dtype == jnp.float32
    np.testing.assert_allclose(lm, ld, rtol=1e-5, atol=1e-5)
    assert float(aux_d["kl"]) == 0.0 and float(aux_m["kl"]) > 0.0
    # T = 64: the first 32 positions (T = 32 by causality) still agree; past them routing drops blocks.
    ld, _ = forward(dense, toks)
    lm, _ = forward(msa, toks)
    np.testing.assert_allclose(lm[:, :32], ld[:, :32], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(lm[:, 32:] - ld[:, 32:])).max() > 1e-3
    if impl == "auto":
        # Warmup mode (sparse=False) is dense attention at every length.
        lw, _ = forward(msa, toks, sparse=False)
        np.testing.assert_allclose(lw, ld, rtol=1e-5, atol=1e-5)


def test_local_blocks_reach_every_msa_layer():
    """MSAConfig.local_blocks = 2: every MSA layer selects each query's block and the one before it,
    as ops.select_blocks does on that layer's index queries and keys; the logits differ from the
    paper's one local block (the model is otherwise the same)."""
    from msa_jax.model import layer_selections

    cfg2 = make_cfg("msa", msa=dataclasses.replace(MSA, local_blocks=2))
    model2, model1 = DecoderLM(cfg2, seed=3), DecoderLM(make_cfg("msa"), seed=3)
    toks = tokens(4, 2, 61)
    sel = layer_selections(model2, toks)
    blk = np.arange(61) // MSA.block_size
    for entry in sel:
        ids = np.asarray(entry["block_idx"])  # [B, T, H_kv, top_k]
        for c in (blk, blk - 1):
            want = np.broadcast_to(c[None, :, None], ids.shape[:3])
            assert ((ids == want[..., None]).any(-1) | (want < 0)).all()
    first = model2.blocks[0]
    x = first.attn_norm(model2._embed(toks))
    iq, ik = first.attn.index(x, jnp.arange(61, dtype=jnp.int32))
    want = ops.select_blocks(iq, ik, block_size=8, top_k=4, local_blocks=2, impl="reference")
    np.testing.assert_array_equal(np.sort(np.asarray(sel[0]["block_idx"]), -1), np.sort(np.asarray(want), -1))
    l2, _ = forward(model2, toks)
    l1, _ = forward(model1, toks)
    np.testing.assert_allclose(l2[:, :32], l1[:, :32], rtol=1e-5, atol=1e-5)  # within the dense span
    assert np.abs(np.asarray(l2[:, 32:] - l1[:, 32:])).max() > 1e-3


def test_auto_runs_short_sequences_dense_with_the_same_logits_kl_and_gradients(monkeypatch):
    """T <= top_k * block_size: impl="auto" takes the dense path (every block is selected anyway),
    impl="xla" the sparse ops; logits, KL and every gradient (index branch included) agree."""
    toks = tokens(3, 2, 29)  # 29 tokens: 4 blocks of 8 = top_k; not a multiple of the block

    def loss(model):
        logits, aux = model(toks, sparse=True)
        return jnp.mean(jnp.square(logits)) + aux["kl"], (logits, aux["kl"])

    res = {}
    for impl in ("auto", "xla"):
        if impl == "auto":  # the sparse ops must not run at all
            monkeypatch.setattr(ops, "sparse_attention", None)
        else:
            monkeypatch.undo()
        model = DecoderLM(make_cfg("msa", impl=impl), seed=2)
        (_, (logits, kl)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        res[impl] = logits, kl, leaves_by_path(grads)
    (la, ka, ga), (lx, kx, gx) = res["auto"], res["xla"]
    np.testing.assert_allclose(la, lx, rtol=1e-5, atol=1e-5)
    assert float(ka) > 0.0
    np.testing.assert_allclose(ka, kx, rtol=1e-5, atol=1e-7)
    assert ga.keys() == gx.keys() and any("index" in name for name in ga)
    for name in ga:
        np.testing.assert_allclose(ga[name], gx[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_model_is_causal(attention):
    model = DecoderLM(make_cfg(attention), seed=2)
    a = tokens(10, 2, 64)  # same shapes as above: reuses the compiled forward
    b = a.at[:, 40:].set((a[:, 40:] + 1) % 64)
    la, _ = forward(model, a)
    lb, _ = forward(model, b)
    np.testing.assert_allclose(la[:, :40], lb[:, :40], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, 40:], lb[:, 40:])


def test_model_aux_and_bf16():
    toks = tokens(11, 2, 48)
    _, aux = forward(DecoderLM(make_cfg("dense")), toks, with_recall=True)
    assert set(aux) == {"kl"} and float(aux["kl"]) == 0.0  # no recall for a dense model
    model = DecoderLM(make_cfg("msa", n_dense_layers=1, dtype="bfloat16"))
    for sparse in (True, False):
        logits, aux = forward(model, toks, sparse=sparse, with_recall=True)
        assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
        assert set(aux) == {"kl", "block_recall", "score_recall"}
        for name in ("block_recall", "score_recall"):
            assert 0.0 <= float(aux[name]) <= 1.0
        assert float(aux["kl"]) > 0.0
    # Params stay float32 even when compute is bf16.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_routing(sparse):
    """Spec 6.2: L_LM never reaches the index branch; the KL reaches only the index branch."""
    cfg = make_cfg("msa", n_layers=2)
    model = DecoderLM(cfg, seed=5)
    toks = tokens(12, 2, 49)  # T = 48 > dense span: routing is active when sparse

    def lm(m):
        logits, _ = m(toks[:, :-1], sparse=sparse)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0])

    def kl(m):
        return m(toks[:, :-1], sparse=sparse)[1]["kl"]

    @nnx.jit
    def both_grads(m):
        return nnx.grad(lm)(m), nnx.grad(kl)(m)

    lm_grads, kl_grads = both_grads(model)
    for name, grads, silent, active in (("lm", lm_grads, INDEX_PARAMS, MAIN_PARAMS), ("kl", kl_grads, MAIN_PARAMS, INDEX_PARAMS)):
        zero = leaves_by_path(nnx.filter_state(grads, silent))
        live = leaves_by_path(nnx.filter_state(grads, active))
        assert zero and live
        for path, g in zero.items():
            assert not np.any(np.asarray(g)), f"{name}: nonzero grad at {path}"
        for path, g in live.items():
            if path.endswith("['kernel'].value"):  # every projection gets a signal
                assert np.any(np.asarray(g)), f"{name}: zero grad at {path}"


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense_warmup"])
def test_msa_model_train_step_pallas_matches_xla(sparse):
    """impl="pallas" (kernels in interpret mode off a GPU) gives the xla model's loss and update, in
    sparse steps and in dense-warmup steps (the full-support KL fed the dense attention's LSE)."""
    from msa_jax.config import TrainConfig
    from msa_jax.train import make_optimizer, train_step

    tcfg = TrainConfig(steps=4, learning_rate=1e-2, lr_warmup_steps=0)
    tokens = jax.random.randint(jax.random.key(2), (2, 41), 0, 64, dtype=jnp.int32)
    results = {}
    for impl in ("xla", "pallas"):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                          attention="msa", msa=MSAConfig(block_size=8, top_k=2, index_dim=16), impl=impl)
        model = DecoderLM(cfg, seed=0)
        opt = make_optimizer(model, tcfg)
        metrics = train_step(model, opt, tokens, sparse=sparse, kl_weight=1.0)
        results[impl] = (metrics, nnx.state(model, nnx.Param))
    (mx, px), (mp, pp) = results["xla"], results["pallas"]
    for key in ("lm_loss", "kl", "grad_norm"):
        np.testing.assert_allclose(mp[key], mx[key], rtol=2e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(pp), jax.tree.leaves(px)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_layer_block_mass_is_the_dense_attention_of_each_layer_at_the_rows(attention):
    from msa_jax.model import layer_block_mass
    from msa_jax.ops import reference

    cfg = make_cfg(attention, n_layers=2, n_dense_layers=1 if attention == "msa" else 0)
    model = DecoderLM(cfg, seed=7)
    T, bs = 40, cfg.msa.block_size
    toks = jax.random.randint(jax.random.key(11), (2, T), 0, cfg.vocab_size)
    whole = layer_block_mass(model, toks, 0, n_rows=T)  # every row
    part = layer_block_mass(model, toks, jnp.int32(23), n_rows=5)  # rows 23..27, start traced as under jit
    assert len(whole) == len(part) == cfg.n_layers
    n_blocks = -(-T // bs)
    for w, p in zip(whole, part):
        assert w.shape == (2, cfg.n_kv_heads, T, n_blocks) and p.shape == (2, cfg.n_kv_heads, 5, n_blocks)
        np.testing.assert_allclose(p, w[:, :, 23:28], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # probabilities over the visible keys
        assert float(w[:, :, :bs].max(axis=(0, 1, 2))[1:].max()) == 0.0  # rows of block 0 see nothing later
    # layer 0 by hand: its q, k on the embedded tokens
    block = model.blocks[0]
    q, k, _ = block.attn.qkv(block.attn_norm(model._embed(toks)), jnp.arange(T, dtype=jnp.int32))
    np.testing.assert_allclose(whole[0], reference.block_mass(q, k, bs), rtol=1e-5, atol=1e-6)
