"""Generation: prefill + step-by-step decode with the caches reproduces the full-sequence forward.

For dense and MSA models (any n_dense_layers), ragged prompt lengths in one batch, sequences that
cross block boundaries and lengths that are not a multiple of the block: the logits of prefill and
of every teacher-forced decode step equal the full forward's logits at that position (f32 tight,
bf16 loose), with the prompt prefilled in one call or in chunks. Then sampling, stopping, the cache
capacity, fp8 index keys and bad input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.cache import bytes_per_token, init_cache
from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.generate import decode_step, generate, prefill, sample
from msa_jax.model import DecoderLM

# block 8 x top-2: a query sees at most 16 keys, so sequences of 40 are really sparse.
MSA = MSAConfig(block_size=8, top_k=2, index_dim=16)


def make_model(attention="msa", dtype="float32", n_dense_layers=0, seed=0, impl="xla", msa=MSA):
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                      attention=attention, n_dense_layers=n_dense_layers, msa=msa, dtype=dtype, impl=impl)
    return DecoderLM(cfg, seed=seed)


def tokens(seed, B, T):
    return np.random.default_rng(seed).integers(1, 256, size=(B, T)).astype(np.int32)


def teacher_forced_logits(model, toks, prompt_lens, *, chunk=None, index_dtype=None):
    """Logits [B, T, V] predicted at every position >= prompt_len - 1 by prefill + decode steps (the
    true next token fed back each step); NaN before that."""
    B, T = toks.shape
    P = int(max(prompt_lens))
    if chunk:
        P = -(-P // chunk) * chunk
    prompt = np.zeros((B, P), np.int32)
    for b in range(B):
        prompt[b, :prompt_lens[b]] = toks[b, :prompt_lens[b]]
    cache = init_cache(model.cfg, B, 48, index_dtype=index_dtype)
    logits, cache = prefill(model, jnp.asarray(prompt), jnp.asarray(prompt_lens), cache, chunk=chunk)
    out = np.full((B, T, model.cfg.vocab_size), np.nan, np.float32)
    pos = np.array(prompt_lens) - 1
    out[np.arange(B), pos] = np.asarray(logits)
    while (pos < T - 1).any():
        active = pos < T - 1
        nxt = toks[np.arange(B), np.minimum(pos + 1, T - 1)]
        logits, cache = decode_step(model, jnp.asarray(nxt), cache, jnp.asarray(active))
        pos = pos + active
        out[np.arange(B)[active], pos[active]] = np.asarray(logits)[active]
    assert list(np.asarray(cache.lengths)) == [T] * B
    return out


@pytest.mark.parametrize("attention,n_dense", [("dense", 0), ("msa", 0), ("msa", 1)])
@pytest.mark.parametrize("chunk", [None, 8], ids=["one_call", "chunked"])
def test_prefill_and_decode_match_the_full_forward(attention, n_dense, chunk):
    model = make_model(attention, n_dense_layers=n_dense)
    B, T = 3, 37  # 37 = 4 blocks + 5: not a multiple of the block
    toks = tokens(1, B, T)
    full = np.asarray(model(jnp.asarray(toks), sparse=True)[0])
    prompt_lens = [5, 17, 9]  # ragged; decode then crosses block boundaries 8, 16, 24, 32
    got = teacher_forced_logits(model, toks, prompt_lens, chunk=chunk)
    for b in range(B):
        p = prompt_lens[b] - 1
        np.testing.assert_allclose(got[b, p:], full[b, p:], atol=2e-4, rtol=2e-4, err_msg=f"row {b}")


def test_local_blocks_decode_like_the_full_forward():
    """MSAConfig.local_blocks = 2 (top_k 3): prefill + decode route as the full forward does."""
    model = make_model(msa=MSAConfig(block_size=8, top_k=3, index_dim=16, local_blocks=2))
    B, T = 2, 45
    toks = tokens(2, B, T)
    full = np.asarray(model(jnp.asarray(toks), sparse=True)[0])
    prompt_lens = [6, 19]
    got = teacher_forced_logits(model, toks, prompt_lens)
    for b in range(B):
        p = prompt_lens[b] - 1
        np.testing.assert_allclose(got[b, p:], full[b, p:], atol=2e-4, rtol=2e-4, err_msg=f"row {b}")
    # and it is not the paper's routing (one local block) at these lengths
    paper = make_model(msa=MSAConfig(block_size=8, top_k=3, index_dim=16))
    assert np.abs(np.asarray(paper(jnp.asarray(toks), sparse=True)[0]) - full)[:, 24:].max() > 1e-3


def test_bf16_decode_tracks_the_full_forward():
    model = make_model("msa", dtype="bfloat16")
    toks = tokens(2, 2, 33)
    full = np.asarray(model(jnp.asarray(toks), sparse=True)[0])
    got = teacher_forced_logits(model, toks, [4, 11])
    for b, p in enumerate([3, 10]):
        err = np.abs(got[b, p:] - full[b, p:]).max()
        assert err < 0.1 * np.abs(full[b, p:]).max(), err  # bf16 activations: loose


def test_fp8_index_cache_changes_little():
    """fp8 index keys (per-token scale): the logits move little against bf16/f32 index keys."""
    model = make_model("msa")
    toks = tokens(3, 2, 40)
    exact = teacher_forced_logits(model, toks, [3, 9])
    fp8 = teacher_forced_logits(model, toks, [3, 9], index_dtype="float8_e4m3fn")
    ok = ~np.isnan(exact)
    assert np.isfinite(fp8[ok]).all()
    rel = np.abs(fp8[ok] - exact[ok]).max() / np.abs(exact[ok]).max()
    assert rel < 0.25, rel  # a flipped near-tie block changes a row; most rows are identical
    same_rows = np.isclose(fp8, exact, atol=1e-4).all(-1)[ok[..., 0]]
    assert same_rows.mean() > 0.7, same_rows.mean()


def test_bytes_per_token_of_the_caches():
    paper = ModelConfig(n_heads=64, n_kv_heads=4, head_dim=128, n_layers=1, attention="msa", dtype="bfloat16")
    b = bytes_per_token(paper)
    assert b["kv"] == 2 * 4 * 128 * 2 and b["index"] == 128 * 2 and b["index_over_kv"] == 1 / 8
    assert bytes_per_token(paper, "float8_e4m3fn")["index"] == 128 + 4  # fp8 keys + a float32 scale
    assert bytes_per_token(dataclasses.replace(paper, attention="dense"))["index"] == 0


def test_generate_greedy_is_deterministic_and_matches_argmax():
    model = make_model("msa")
    res = generate(model, [b"def f(x):", b"import"], max_new_tokens=12)
    assert [len(t) for t in res.tokens] == [12, 12] and res.finish_reason == ["length", "length"]
    again = generate(model, [b"def f(x):", b"import"], max_new_tokens=12, stream_every=5)
    assert again.tokens == res.tokens  # chunks of the on-device loop change nothing
    # greedy = argmax of the full forward at every step
    seq = np.frombuffer(b"import" + res.tokens[1], np.uint8).astype(np.int32)[None]
    logits = np.asarray(model(jnp.asarray(seq), sparse=True)[0])[0]
    assert bytes(np.argmax(logits[5:-1], -1).astype(np.uint8)) == res.tokens[1]
    assert res.ttft_s > 0 and res.total_steps == 11


def test_sampling_seed_stop_and_streaming():
    model = make_model("dense")
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, ["abc"], seed=1, **kw)
    assert a.tokens == generate(model, ["abc"], seed=1, **kw).tokens  # the seed fixes the sample
    assert a.tokens != generate(model, ["abc"], seed=2, **kw).tokens
    stop = a.tokens[0][4]  # a byte it emits at step 5
    chunks = []
    s = generate(model, ["abc"], seed=1, stop_bytes=bytes([stop]), on_tokens=chunks.append, stream_every=3, **kw)
    assert s.finish_reason == ["stop"] and s.tokens[0] == a.tokens[0][: a.tokens[0].index(stop) + 1]
    assert b"".join(c[0] for c in chunks) == s.tokens[0]  # the streamed bytes are the output


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda **kw: {int(sample(logits, k, temperature=1.0, **kw)[0]) for k in keys}  # noqa: E731
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two most likely tokens
    assert draw(top_p=0.5) == {0}
    assert len(draw()) == 4
    assert int(sample(logits, keys[0])[0]) == 0  # greedy


def test_cache_capacity_stops_cleanly_and_bad_input_is_refused():
    model = make_model("msa")
    res = generate(model, [b"x" * 10, b"y"], max_new_tokens=50, capacity=16)
    assert res.finish_reason == ["cache_full", "cache_full"]
    assert [len(t) for t in res.tokens] == [16 - 10 + 1, 16 - 1 + 1]  # every slot used, then one last token
    with pytest.raises(ValueError, match="capacity"):
        generate(model, [b"x" * 20], max_new_tokens=4, capacity=16)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [b""], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [np.zeros((2, 2), np.float32)], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [b"a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="index_cache_dtype"):
        generate(model, [b"a"], max_new_tokens=2, index_cache_dtype="int4")


@pytest.mark.parametrize("chunk", [None, 16], ids=["one_call", "chunked"])
def test_pallas_kernels_decode_like_the_full_forward(chunk):
    """impl="pallas": the prefill kernels fill the cache (chunked: 16-query chunks run the training
    kernels at their positions against the cache), the decode kernels (interpret mode here) select
    and attend; the logits equal the full forward's (xla path, same weights)."""
    msa16 = MSAConfig(block_size=16, top_k=2, index_dim=16)  # the Triton decode kernels take blocks >= 16
    model = make_model("msa", impl="pallas", n_dense_layers=1, msa=msa16)
    ref = make_model("msa", impl="xla", n_dense_layers=1, msa=msa16)
    toks = tokens(4, 2, 40)  # 2.5 blocks: decode crosses the boundary at 32 in both rows
    full = np.asarray(ref(jnp.asarray(toks), sparse=True)[0])
    got = teacher_forced_logits(model, toks, [28, 33], chunk=chunk)
    for b, p in enumerate([27, 32]):
        np.testing.assert_allclose(got[b, p:], full[b, p:], atol=2e-4, rtol=2e-4, err_msg=f"row {b}")
