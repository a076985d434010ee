"""Checkpoints: save/restore round trip, exact resume, retention, interrupted saves, dense -> MSA."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import assert_same_run
from msa_jax.checkpoint import Checkpointer, DamagedCheckpoint, load_dense_into_msa
from msa_jax.config import ModelConfig, MSAConfig, TrainConfig
from msa_jax.data import batch_at
from msa_jax.model import INDEX_PARAMS, MAIN_PARAMS, DecoderLM
from msa_jax.train import make_optimizer, train_step, use_sparse

MSA = MSAConfig(block_size=8, top_k=2, index_dim=8, warmup_steps=1)  # dense span 16 < T: really sparse
T, B = 32, 2
# One TrainConfig everywhere: make_tx is cached per config, so all optimizers share one compiled step.
TCFG = TrainConfig(steps=8, batch_size=B, seq_len=T, learning_rate=1e-2, lr_warmup_steps=2, grad_clip=0.5)
DATA = np.random.default_rng(0).integers(1, 32, size=4096).astype(np.uint8)  # random tokens, no zeros
DATA_SEED = 7


def make_cfg(attention: str, **kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, rope_fraction=0.5)
    return ModelConfig(**{**base, "msa": MSA, **kw}, attention=attention)


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    """Leaf-by-leaf equality of two pytrees (or of `leaves` snapshots: nnx.state is a live view)."""
    la, lb = (x if isinstance(x, dict) else leaves(x) for x in (a, b))
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def train(model, opt, steps) -> list[float]:
    losses = []
    for step in steps:
        tokens = batch_at(DATA, B, T, seed=DATA_SEED, step=step)
        m = train_step(model, opt, tokens, sparse=use_sparse(step, MSA), kl_weight=MSA.kl_weight)
        losses.append(float(m["loss"]))
    return losses


def fresh(seed: int, attention: str = "msa"):
    model = DecoderLM(make_cfg(attention), seed=seed)
    return model, make_optimizer(model, TCFG)


def test_round_trip_restores_params_optimizer_and_meta(tmp_path):
    model, opt = fresh(0)
    train(model, opt, range(2))  # non-trivial moments and step count
    meta = {"data": {"seed": DATA_SEED, "step": 2}, "model_cfg": dataclasses.asdict(make_cfg("msa")), "x": [1.5, None]}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(2, model, opt, meta)
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    model2, opt2 = fresh(1)
    assert not np.array_equal(nnx.state(model2)["embed"]["embedding"][...], nnx.state(model)["embed"]["embedding"][...])
    with Checkpointer(tmp_path) as ckpt:  # a new process would open the directory afresh
        got = ckpt.restore(model2, opt2)
    assert got == meta
    assert_trees_equal(nnx.state(model2), nnx.state(model))
    assert_trees_equal(nnx.state(opt2), nnx.state(opt))
    assert int(opt2.step[...]) == 2


def test_resume_is_exact(tmp_path):
    model, opt = fresh(0)
    want = train(model, opt, range(4))

    model, opt = fresh(0)
    first = train(model, opt, range(2))
    assert_same_run(first, want[:2])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, model, opt, {"data": {"seed": DATA_SEED, "step": 2}})
    saved = leaves(nnx.state(model)), leaves(nnx.state(opt))
    del model, opt

    model, opt = fresh(5)  # different init: everything must come from the checkpoint
    with Checkpointer(tmp_path) as ckpt:
        meta = ckpt.restore(model, opt)
    assert_trees_equal(saved[0], nnx.state(model))  # the state is restored bit for bit on any backend
    assert_trees_equal(saved[1], nnx.state(opt))
    start = meta["data"]["step"]
    assert start == 2 and int(opt.step[...]) == 2
    # the same batches follow; bit-exact losses on a deterministic backend, else within reduction noise
    assert_same_run(train(model, opt, range(start, 4)), want[2:])


def test_keep_only_the_last_steps(tmp_path):
    model, opt = fresh(0)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, model, opt, {"step": step})
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.restore_meta() == {"step": 4}
        assert ckpt.restore_meta(3) == {"step": 3}
        with pytest.raises(FileNotFoundError):
            ckpt.restore(model, opt, step=2)
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


_KILLED_SAVE = """
import os, sys
import orbax.checkpoint._src.handlers.json_checkpoint_handler as handler
from msa_jax.checkpoint import Checkpointer
from msa_jax.config import ModelConfig
from msa_jax.model import DecoderLM

class DieOnDump:  # the JSON item is written while the arrays are: die in the middle of the save
    @staticmethod
    def dumps(x):
        os._exit(17)

handler.json = DieOnDump
model = DecoderLM(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64))
Checkpointer(sys.argv[1]).save(3, model, None, {"step": 3})
"""


def test_interrupted_save_leaves_latest_complete_checkpoint(tmp_path):
    model, opt = fresh(0)
    train(model, opt, range(2))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, model, opt, {"step": 2})
        with pytest.raises(TypeError):  # meta is checked before anything is written
            ckpt.save(3, model, opt, {"bad": object()})
        assert ckpt.all_steps() == [2]
    assert sorted(os.listdir(tmp_path)) == ["2"]

    # A process killed in the middle of saving step 3 (hard exit: no cleanup, no finalize).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr[-2000:]
    leftovers = [p for p in os.listdir(tmp_path) if p != "2"]
    assert leftovers and all(p.startswith("3.orbax-checkpoint-tmp") for p in leftovers), leftovers

    model2, opt2 = fresh(1)
    with Checkpointer(tmp_path) as ckpt:  # the restarted run
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        assert ckpt.restore(model2, opt2) == {"step": 2}
        assert sorted(os.listdir(tmp_path)) == ["2"]  # the partial save was removed
        ckpt.save(3, model2, opt2, {"step": 3})  # and the step can be saved again
        assert ckpt.all_steps() == [2, 3]
    assert_trees_equal(nnx.state(model2), nnx.state(model))
    assert_trees_equal(nnx.state(opt2), nnx.state(opt))


def _largest_file(step_dir: pathlib.Path, item: str) -> pathlib.Path:
    """The item's largest array data file (orbax's OCDBT store)."""
    return max((step_dir / item / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)


def _truncate(step_dir):  # a copy or a disk write cut short
    f = _largest_file(step_dir, "model")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bits(step_dir):  # bit rot: same size, a bit flipped every 97 bytes
    f = _largest_file(step_dir, "optimizer")
    data = bytearray(f.read_bytes())
    for i in range(0, len(data), 97):
        data[i] ^= 0x40
    f.write_bytes(bytes(data))


def _mix_steps(step_dir):  # every file intact, but the optimizer is another step's: only the fingerprint tells
    shutil.rmtree(step_dir / "optimizer")
    shutil.copytree(step_dir.parent / str(int(step_dir.name) - 1) / "optimizer", step_dir / "optimizer")


def _lose_an_item(step_dir):  # a partial copy of the step directory
    shutil.rmtree(step_dir / "optimizer")


def _break_the_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"st')


@pytest.mark.parametrize("damage", [_truncate, _flip_bits, _mix_steps, _lose_an_item, _break_the_meta])
def test_restore_refuses_a_damaged_step(tmp_path, damage):
    model, opt = fresh(0)
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            train(model, opt, [step])  # non-zero moments, different at each step
            ckpt.save(step, model, opt, {"step": step})
    damage(tmp_path / "2")
    other, other_opt = fresh(1)
    before = leaves(nnx.state(other)), leaves(nnx.state(other_opt))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(Exception) as err:
            ckpt.restore_meta(2) if damage is _break_the_meta else ckpt.restore(other, other_opt, step=2)
    if damage is not _break_the_meta:
        assert err.type is DamagedCheckpoint and "step 2" in str(err.value)
    if damage is _mix_steps:
        assert "optimizer state's bits differ" in str(err.value)
    assert_trees_equal(before[0], nnx.state(other))  # nothing was half-restored
    assert_trees_equal(before[1], nnx.state(other_opt))


def test_restore_latest_skips_damaged_steps(tmp_path):
    model, opt = fresh(0)
    saved = {}
    with Checkpointer(tmp_path, keep=5) as ckpt:
        for step in (1, 2, 3, 4):
            train(model, opt, [step])
            ckpt.save(step, model, opt, {"step": step})
            saved[step] = leaves(nnx.state(model))
    _mix_steps(tmp_path / "4")
    _truncate(tmp_path / "3")
    (tmp_path / "2" / "meta" / "metadata").unlink()

    other, other_opt = fresh(1)
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # read-only: warns, renames nothing
        with pytest.warns(UserWarning, match="left in place") as caught:
            step, meta = ckpt.restore_latest(other, other_opt)
    assert (step, meta) == (1, {"step": 1}) and len(caught) == 3
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "4"]
    assert_trees_equal(saved[1], nnx.state(other))

    seen = []
    with Checkpointer(tmp_path, keep=5) as ckpt:  # what a resuming run does
        with pytest.warns(UserWarning) as caught:
            step, _ = ckpt.restore_latest(other, other_opt, check_meta=seen.append)
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 3 and "/4 (renamed to 4.damaged)" in msgs[0] and "fingerprint" in msgs[0], msgs
        assert "/3 (renamed to 3.damaged)" in msgs[1] and "OUT_OF_RANGE" in msgs[1], msgs
        assert "/2 (renamed to 2.damaged)" in msgs[2] and "meta does not load" in msgs[2], msgs
        assert step == 1 and [m["step"] for m in seen] == [4, 3, 1]  # step 2's meta did not load
        assert ckpt.all_steps() == [1]
        ckpt.save(2, other, other_opt, {"step": 2})  # training goes on and saves over the same steps
        assert ckpt.all_steps() == [1, 2] and ckpt.restore_meta() == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.damaged", "3.damaged", "4.damaged"]

    def refuse(meta):
        raise SystemExit("another run")
    with Checkpointer(tmp_path) as ckpt:  # what check_meta raises is not "damage": no fallback
        with pytest.raises(SystemExit, match="another run"):
            ckpt.restore_latest(other, other_opt, check_meta=refuse)
        assert ckpt.all_steps() == [1, 2]
    for step in ("1", "2"):
        shutil.rmtree(tmp_path / step)
    (tmp_path / "5").mkdir()  # an empty step directory: a copy that never started
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="(?s)no usable checkpoint.*step 5"):
            ckpt.restore_latest(other, other_opt)


def test_dense_checkpoint_loads_into_msa(tmp_path):
    dense, dense_opt = fresh(0, "dense")
    train(dense, dense_opt, range(2))  # trained weights (step 0 has lr 0): no match with a fresh init
    with Checkpointer(tmp_path / "dense") as ckpt:
        ckpt.save(1, dense, dense_opt, {"step": 1})

    in_progress = tmp_path / "dense" / "4.orbax-checkpoint-tmp"  # the dense run may still be saving
    in_progress.mkdir()
    msa = DecoderLM(make_cfg("msa"), seed=3)
    fresh_index = leaves(nnx.state(msa, INDEX_PARAMS))
    loaded = load_dense_into_msa(tmp_path / "dense", msa)
    assert len(loaded) == len(leaves(nnx.state(dense, nnx.Param))) > 0
    assert in_progress.exists()  # loading is read-only
    assert_trees_equal(nnx.state(msa, MAIN_PARAMS), nnx.state(dense, nnx.Param))
    got_index = leaves(nnx.state(msa, INDEX_PARAMS))
    assert got_index.keys() == fresh_index.keys() and len(got_index) > 0
    for k in got_index:
        np.testing.assert_array_equal(got_index[k], fresh_index[k], err_msg=k)

    # Up to top_k * block_size tokens MSA attends to every block: it is the dense model.
    tokens = batch_at(DATA, B, MSA.dense_span, seed=1, step=0)[:, :-1]
    assert tokens.shape[1] <= MSA.dense_span
    dense_logits, _ = dense(tokens)
    msa_logits, _ = msa(tokens)
    np.testing.assert_allclose(np.asarray(msa_logits), np.asarray(dense_logits), rtol=1e-5, atol=1e-5)

    wide = DecoderLM(make_cfg("dense", d_model=48), seed=0)
    with Checkpointer(tmp_path / "wide") as ckpt:
        ckpt.save(0, wide, None)
    before = leaves(nnx.state(msa))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_dense_into_msa(tmp_path / "wide", msa)
    deep = DecoderLM(make_cfg("dense", n_layers=3), seed=0)
    with Checkpointer(tmp_path / "deep") as ckpt:
        ckpt.save(0, deep, None)
    with pytest.raises(ValueError, match="in the checkpoint but not in the model"):
        load_dense_into_msa(tmp_path / "deep", msa)
    assert_trees_equal(nnx.state(msa), before)  # a failed load changes nothing
    with pytest.raises(FileNotFoundError):
        load_dense_into_msa(tmp_path / "nowhere", msa)
    assert not (tmp_path / "nowhere").exists()  # loading creates nothing


def test_msa_checkpoint_into_msa_keeps_its_index_branches_on_request(tmp_path):
    src, src_opt = fresh(0, "msa")
    train(src, src_opt, range(2))  # trained weights, index branches included
    with Checkpointer(tmp_path / "msa") as ckpt:
        ckpt.save(1, src, src_opt, {"step": 1})
    with Checkpointer(tmp_path / "dense") as ckpt:
        ckpt.save(0, DecoderLM(make_cfg("dense"), seed=0), None)

    trained_index = leaves(nnx.state(src, INDEX_PARAMS))
    for index in (None, True):  # None: load them because the checkpoint has them
        msa = DecoderLM(make_cfg("msa"), seed=3)
        loaded = load_dense_into_msa(tmp_path / "msa", msa, index=index)
        assert len(loaded) == len(leaves(nnx.state(src, nnx.Param)))
        assert_trees_equal(nnx.state(msa, nnx.Param), nnx.state(src, nnx.Param))
    msa = DecoderLM(make_cfg("msa"), seed=3)
    fresh_index = leaves(nnx.state(msa, INDEX_PARAMS))
    load_dense_into_msa(tmp_path / "msa", msa)  # default index=False: the CPT start, index fresh
    got = leaves(nnx.state(msa, INDEX_PARAMS))
    assert any(not np.array_equal(trained_index[k], fresh_index[k]) for k in got)  # the check can fail
    for k in got:
        np.testing.assert_array_equal(got[k], fresh_index[k], err_msg=k)
    load_dense_into_msa(tmp_path / "dense", msa, index=None)  # a dense checkpoint: index stays fresh
    with pytest.raises(ValueError, match="no index weights"):
        load_dense_into_msa(tmp_path / "dense", msa, index=True)
    wide = DecoderLM(make_cfg("msa", msa=dataclasses.replace(MSA, index_dim=16)), seed=3)  # another index_dim
    with pytest.raises(ValueError, match="shape mismatch"):
        load_dense_into_msa(tmp_path / "msa", wide, index=True)
    with pytest.raises(ValueError, match="in the checkpoint but not in the model"):
        load_dense_into_msa(tmp_path / "msa", DecoderLM(make_cfg("dense"), seed=0), index=True)
