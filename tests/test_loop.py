"""The training loop (`msa_jax.loop.train_and_evaluate`): outputs, resume, interrupts, meshes, hosts.

The reference is one uninterrupted tiny run, in-process. Every other way of getting to the same
step (stop_at + rerun in-process; through `experiments/train_lm.py`: SIGTERM + rerun, resumes on
8-device context=2 then context=4 meshes, two processes of four devices each) must give the same
metrics.jsonl. The scripts that read run directories (eval_retrieval.py, compare_runs.py) run on it too.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RESUME_RTOL, resume_is_exact
from msa_jax import determinism
from msa_jax.checkpoint import Checkpointer, load_run
from msa_jax.loop import train_and_evaluate
from msa_jax.presets import run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

STEPS = 8
# T=256 with block 32 x top-4 (dense span 128) is really sparse; warmup 3 -> steps 1-3 dense.
SIZES = dict(steps=STEPS, seq_len=256, batch_size=4, eval_every=4, eval_batches=1, ckpt_every=3, log_every=2,
             msa_warmup_steps=3, max_bytes=600000, plot=False)
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--seq-len", "256", "--batch-size", "4", "--eval-every", "4",
        "--eval-batches", "1", "--ckpt-every", "3", "--log-every", "2", "--msa-warmup-steps", "3",
        "--max-bytes", "600000", "--no-plot"]  # the same run through train_lm.py's flags


def train(run_dir, **changes) -> dict:
    return train_and_evaluate(run_config("tiny", **{**SIZES, **changes}), run_dir, progress=False)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def values(rs: list[dict]) -> list[tuple]:
    """The deterministic part of the metric rows (timings excluded)."""
    keys = ("loss", "kl", "lr", "grad_norm", "index_grad_norm", "sparse", "val_loss", "val_kl", "block_recall",
            "score_recall")
    return [(r["kind"], r["step"]) + tuple(r.get(k) for k in keys) for r in rs]


def assert_rows_close(a: list[dict], b: list[dict], rtol: float) -> None:
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for x, y in zip(values(a), values(b)):
        for u, v in zip(x[2:], y[2:]):
            if isinstance(u, float):
                np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-6, err_msg=f"{x[:2]}")
            else:
                assert u == v, (x[:2], u, v)


def run_cli(args, env=None, **kw) -> subprocess.Popen:
    return run_script("train_lm.py", args, env, **kw)


def run_script(script, args, env=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("full")
    summary = train(run_dir)
    assert summary["steps"] == STEPS
    # step time from the median tokens/s; peak memory (none on the CPU: no allocator statistics); the mesh
    tokens_per_step = SIZES["batch_size"] * SIZES["seq_len"]
    assert summary["median_step_s"] == pytest.approx(tokens_per_step / summary["median_tokens_per_s"])
    peak = summary["peak_memory_gib"]
    assert peak is None if jax.default_backend() == "cpu" else peak > 0
    assert summary["env"]["mesh"]["data"] == jax.device_count()
    assert json.loads((run_dir / "summary.json").read_text())["median_step_s"] == summary["median_step_s"]
    return run_dir


def test_full_run_outputs(full):
    rs = rows(full)
    train = [r for r in rs if r["kind"] == "train"]
    evals = [r for r in rs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [4, 8]
    assert [r["sparse"] for r in evals] == [True, True]  # the mode of the step just taken
    assert [r["sparse"] for r in train] == [False] * 3 + [True] * 5  # the warmup switch, at the configured step
    for r in train:
        assert np.isfinite(r["loss"]) and r["kl"] > 0 and r["lr"] >= 0 and r["index_grad_norm"] > 0
    assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0  # warmup-cosine starts at 0
    assert any(r["tokens_per_s"] for r in train)
    for r in evals:
        assert 0 <= r["block_recall"] <= 1 and 0 <= r["score_recall"] <= 1 and np.isfinite(r["val_loss"])
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["attention"] == "msa" and cfg["seq_len"] == 256
    with Checkpointer(full / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6, 8]
        meta = ckpt.restore_meta()
    assert meta["step"] == 8 and meta["data"]["step"] == 8 and meta["rng"] == {"seed": 0}
    assert meta["data"]["task_mix"] == 0.0  # the iterator state holds the task mix


def assert_resumed(a: list[dict], b: list[dict]) -> None:
    """A resumed run's rows against an uninterrupted one's: bit for bit on a deterministic backend
    (the CPU, or deterministic mode), within the GPU's reduction noise otherwise."""
    if resume_is_exact():
        assert values(a) == values(b)
    else:
        assert_rows_close(a, b, rtol=RESUME_RTOL)


def test_stop_at_then_rerun_equals_uninterrupted(full, tmp_path):
    run_dir = tmp_path / "run"
    out = train(run_dir, stop_at=5)
    assert out["stopped"] and out["steps"] == 5
    assert max(r["step"] for r in rows(run_dir)) == 5
    train(run_dir)  # the same run again: resumes at 5
    assert_resumed(rows(run_dir), rows(full))


def test_a_non_finite_step_stops_the_run_before_any_save(full, tmp_path, monkeypatch):
    import msa_jax.loop as loop

    real, calls = loop.sharded_train_step, []

    def poisoned(model, optimizer, tokens, **kw):  # step 5: one index weight of layer 1 becomes NaN
        calls.append(1)
        if len(calls) == 5:
            w = model.blocks[1].attn.index.wq_idx.kernel
            w[...] = w[...].at[0, 0].set(jnp.nan)
        return real(model, optimizer, tokens, **kw)

    monkeypatch.setattr(loop, "sharded_train_step", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(loop.NonFiniteError) as err:
        train(run_dir)  # checkpoints at 3 and 6; the metrics of 5 are fetched with 6's, before its save
    msg = str(err.value)
    assert msg.startswith("non-finite values at step 5: ") and "kl=nan" in msg, msg
    assert "blocks/1/attn/index/wq_idx/kernel" in msg and "blocks/0/" not in msg, msg
    assert f"latest checkpoint ({run_dir / 'checkpoints'}/3) is the last good state" in msg, msg
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [3]
    assert max(r["step"] for r in rows(run_dir)) == 4
    monkeypatch.undo()
    train(run_dir)  # the rerun resumes from the good state
    assert_resumed(rows(run_dir), rows(full))


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(full, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, stop_at=4)  # checkpoints 3 and 4
    data_files = run_dir / "checkpoints" / "4" / "model" / "ocdbt.process_0" / "d"
    for f in data_files.iterdir():  # a copy cut short
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"damaged checkpoint .*/4 \(renamed to 4.damaged\)"):
        train(run_dir)
    assert (run_dir / "checkpoints" / "4.damaged").is_dir()
    assert_resumed(rows(run_dir), rows(full))


def test_deterministic_mode_must_be_chosen_before_the_backends_start(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert not determinism.is_enabled()
    jax.devices()  # this process's backends are up
    with pytest.raises(RuntimeError, match="before jax starts its backends"):
        determinism.enable()
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops --xla_gpu_deterministic_ops=false")
    assert not determinism.is_enabled()  # the last setting wins, as in XLA
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false --xla_gpu_deterministic_ops=true")
    assert determinism.is_enabled()
    determinism.enable()  # already on: nothing to do

    # On a GPU, dense attention leaves cuDNN in deterministic mode (XLA cannot compile it there).
    from msa_jax import ops
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not ops._cudnn_ok(q)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert ops._cudnn_ok(q)


def test_sigterm_checkpoints_and_the_deterministic_rerun_is_bit_identical(full, tmp_path):
    """Interrupt a --deterministic run with SIGTERM, resume it in a new process: the same bits as an
    uninterrupted run (on a GPU this needs deterministic mode; on the CPU it holds anyway)."""
    if resume_is_exact():
        reference = rows(full)
    else:  # this process is not deterministic: the reference is a deterministic run of its own
        proc = run_cli(ARGS + ["--run-dir", str(tmp_path / "reference"), "--deterministic"])
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
        reference = rows(tmp_path / "reference")
    run_dir = tmp_path / "run"
    proc = run_cli(ARGS + ["--run-dir", str(run_dir), "--log-every", "1", "--deterministic"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x)["step"] >= 2 for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, output[-2000:]
    assert "SIGTERM" in output and "s after the signal" in output and "Run again to resume" in output
    last = max(r["step"] for r in rows(run_dir))
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == last < STEPS
    proc = run_cli(ARGS + ["--run-dir", str(run_dir), "--deterministic"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "| deterministic" in output and f"resumed from {run_dir / 'checkpoints'}/{last}" in output
    assert values(rows(run_dir)) == values(reference)  # bit for bit


def test_a_signal_after_the_save_decision_still_saves_that_step(tmp_path, monkeypatch):
    """SIGTERM landing between a step's "save now?" decision and the loop's check of the flag (a race
    that a loaded machine hits): the loop saves that step on its way out instead of stopping unsaved."""
    import tqdm.auto

    class SignalAtStep2(tqdm.auto.tqdm):
        calls = 0

        def update(self, n=1):  # once per step, after its save decision (steps 1-2 save nothing)
            super().update(n)
            SignalAtStep2.calls += 1
            if SignalAtStep2.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tqdm.auto, "tqdm", SignalAtStep2)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train(run_dir)
    assert exit_info.value.code == 130
    assert max(r["step"] for r in rows(run_dir)) == 2
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == 2


def test_resume_on_context_meshes_of_other_sizes_gives_the_single_device_losses(full, tmp_path):
    """Checkpoints do not depend on the mesh: one device -> context=2 (with data and tensor), same
    losses. (One hop: training on each context mesh is tests/test_context.py's.)"""
    run_dir = tmp_path / "run"
    train(run_dir, stop_at=3)  # one device, in-process
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    # steps 4-8: the sequence split over 2 devices (context), the batch over 2, the heads over 2
    proc = run_cli(ARGS + ["--run-dir", str(run_dir), "--mesh", "data=2,tensor=2,context=2"], env=env)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "8 device(s)" in output and "'data': 2, 'fsdp': 1, 'tensor': 2, 'context': 2" in output
    assert f"resumed from {run_dir / 'checkpoints'}/3" in output, output[-3000:]
    assert_rows_close(rows(run_dir), rows(full), rtol=2e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_losses(full, tmp_path):
    """Multi-host launch: 2 processes x 4 CPU devices, a 2x2x2 mesh over both, gloo collectives."""
    run_dir = tmp_path / "run"
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [run_cli(ARGS + ["--run-dir", str(run_dir), "--mesh", "data=2,fsdp=2,tensor=2"],
                     env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es), 8 device(s)" in outs[0]
    assert_rows_close(rows(run_dir), rows(full), rtol=2e-5)


def test_init_from_dense_converts_then_warms_up_and_extends_the_length(tmp_path):
    from msa_jax import data
    from msa_jax.train import loss_fn

    dense_dir, cpt_dir = tmp_path / "dense", tmp_path / "cpt"
    train(dense_dir, attention="dense", steps=4)
    train(cpt_dir, steps=4, init_from=str(dense_dir))
    # Step 1 of the converted run (dense warmup, before its first update) sees the dense model's weights:
    # its LM loss equals the trained dense model's loss on batch 0.
    dense, cfg, step = load_run(dense_dir)
    assert step == 4 and cfg.attention == "dense"
    corpus = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(",")))
    batch = data.batch_at(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=0)
    _, m = loss_fn(dense, jnp.asarray(batch), sparse=False, kl_weight=0.0)
    first = rows(cpt_dir)[0]
    np.testing.assert_allclose(first["loss"], float(m["lm_loss"]), rtol=1e-5)
    assert first["kl"] > 0 and not first["sparse"]
    assert [r["sparse"] for r in rows(cpt_dir) if r["kind"] == "train"] == [False] * 3 + [True]
    assert json.loads((cpt_dir / "config.json").read_text())["init_loaded_step"] == 4
    # A next stage at another length (a length curriculum), dense from dense: its first step sees the
    # loaded weights too.
    long_dir = tmp_path / "long"
    train(long_dir, attention="dense", steps=1, seq_len=512, init_from=str(dense_dir))
    batch = data.batch_at(corpus.train, cfg.batch_size, 512, seed=cfg.seed, step=0)
    _, m = loss_fn(dense, jnp.asarray(batch), sparse=False, kl_weight=0.0)
    np.testing.assert_allclose(rows(long_dir)[0]["loss"], float(m["lm_loss"]), rtol=1e-5)
    # An MSA stage from the MSA run keeps its trained index branches: the first step's KL is the loaded
    # model's (a fresh index branch gives another KL).
    msa_long = tmp_path / "msa_long"
    train(msa_long, steps=1, init_from=str(cpt_dir))
    cpt, _, _ = load_run(cpt_dir)
    batch = data.batch_at(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=0)
    _, m = loss_fn(cpt, jnp.asarray(batch), sparse=False, kl_weight=1.0)
    first = rows(msa_long)[0]
    assert not first["sparse"]
    np.testing.assert_allclose(first["kl"], float(m["kl"]), rtol=1e-5)
    np.testing.assert_allclose(first["loss"], float(m["lm_loss"]), rtol=1e-5)


def test_a_task_mix_run_logs_the_probe_and_the_index_routing(tmp_path):
    """With a task mix, each evaluation of an MSA run scores the retrieval probe and the index's routing of
    its answers to the needle, in the dense warmup (step 2) and once sparse (step 4), beside what a uniform
    choice would route, and loss.png draws them."""
    train(tmp_path, steps=4, eval_every=2, task_mix=1.0, plot=True)
    evals = [r for r in rows(tmp_path) if r["kind"] == "eval"]
    assert [(r["step"], r["sparse"]) for r in evals] == [(2, False), (4, True)]
    cfg = run_config("tiny", **SIZES).model_config()
    n_msa = cfg.n_layers - cfg.n_dense_layers
    for r in evals:
        assert 0 <= r["val_answer_exact"] <= r["val_answer_bytes"] <= 1
        assert np.shape(r["val_needle_selected_groups"]) == (n_msa, cfg.n_kv_heads)
        assert r["val_needle_selected"] == pytest.approx(np.mean(r["val_needle_selected_groups"]), abs=1e-3)
        assert 0 < r["val_needle_selected_chance"] < 1  # 256 tokens, block 32 x top 4
    assert evals[0]["val_needle_selected_chance"] == evals[1]["val_needle_selected_chance"]  # one fixed probe
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resume_refuses_a_different_run(full, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    with pytest.raises(SystemExit, match="d_model"):
        train(run_dir, d_model=32)
    with pytest.raises(ValueError, match="devices"):
        train(tmp_path / "x", mesh=f"data={jax.device_count() + 1}")


def test_load_run_restores_the_trained_model(full):
    from msa_jax import data
    from msa_jax.train import eval_step

    model, cfg, step = load_run(full)
    assert step == STEPS and cfg == run_config("tiny", **SIZES)
    corpus = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(",")))
    (batch,) = data.eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, 1)
    m = eval_step(model, jnp.asarray(batch), sparse=True, with_recall=True)
    last = [r for r in rows(full) if r["kind"] == "eval"][-1]
    np.testing.assert_allclose(float(m["lm_loss"]), last["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(m["block_recall"]), last["block_recall"], rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        load_run(full / "nothing")


def test_load_run_overrides_the_routing_only(full):
    """An inference-time routing ablation: same weights, the selection the overrides ask for."""
    from flax import nnx

    from msa_jax.model import layer_selections

    model, cfg, _ = load_run(full)
    sunk, sunk_cfg, _ = load_run(full, routing=dict(sink_blocks=1, top_k=2))
    assert (sunk_cfg.sink_blocks, sunk_cfg.top_k) == (1, 2) and (cfg.sink_blocks, cfg.top_k) == (0, 4)
    assert sunk.cfg.msa.sink_blocks == 1 and sunk.cfg.msa.top_k == 2
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nnx.state(model, nnx.Param), nnx.state(sunk, nnx.Param))
    assert all(jax.tree.leaves(same))
    tokens = jax.random.randint(jax.random.key(7), (2, 256), 0, 256)
    for plain, forced in zip(layer_selections(model, tokens), layer_selections(sunk, tokens)):
        idx, fidx = np.asarray(plain["block_idx"]), np.asarray(forced["block_idx"])  # [B, T, H_kv, top_k]
        assert fidx.shape[-1] == 2 and (fidx == 0).any(-1).all()  # block 0 in every selection
        local = (np.arange(256) // 32)[None, :, None, None]
        assert ((fidx == local).any(-1)).all()  # and the local block
        assert not (idx[:, 128:] == 0).any(-1).all()  # the trained routing does not always pick block 0
    with pytest.raises(ValueError, match="routing"):
        load_run(full, routing=dict(d_model=8))
    with pytest.raises(ValueError, match="local_blocks"):
        load_run(full, routing=dict(local_blocks=3, top_k=2))


def test_eval_retrieval_routing_override_cli(full, tmp_path):
    out = tmp_path / "sink"
    proc = run_script("eval_retrieval.py", [str(full), "--tasks", "passkey", "--lengths", "256", "--depths", "0",
                                            "--n", "1", "--val-batches", "0", "--selection-depths", "0",
                                            "--sink-blocks", "1", "--out", str(out)])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    saved = json.loads((out / "results.json").read_text())
    name = f"{full.name}-sink1"  # the label says the routing is not the trained one
    assert {r["run"] for r in saved["rows"]} == {name} and saved["runs"][name]["routing_override"] == {"sink_blocks": 1}
    assert saved["runs"][name]["config"]["sink_blocks"] == 1
    (trace,) = saved["val"][0]["selections"]  # depth 0: the needle is in block 0, which every query now selects
    assert set(trace["needle_selected"].values()) == {1.0}
    proc = run_script("eval_retrieval.py", [str(full), "--local-blocks", "9", "--out", str(out)])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0 and "local_blocks" in output


def test_eval_retrieval_and_compare_runs_cli(full, tmp_path):
    out = tmp_path / "ret"
    proc = run_script("eval_retrieval.py", [str(full), "--lengths", "256,384", "--depths", "0,1", "--n", "2",
                                            "--selection-depths", "0,1", "--selection-lengths", "256,384",
                                            "--out", str(out)])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 3 * 2 * 2  # tasks x lengths x depths
    assert {r["task"] for r in saved["rows"]} == {"passkey", "multikey", "variable_tracking"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 and r["attention"] == "msa" for r in saved["rows"])
    assert all(0.0 <= r["byte_accuracy"] <= 1.0 for r in saved["rows"])
    assert all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] and r["correct"] == round(2 * r["accuracy"])
               for r in saved["rows"])
    assert "passkey" in saved["table"] and "exact match" in output
    assert (out / "retrieval.png").stat().st_size > 10_000 and (out / "retrieval_bytes.png").exists()
    assert (out / f"heatmap_{full.name}.png").stat().st_size > 10_000
    assert (out / "by_length.png").stat().st_size > 10_000
    assert all((out / f"selection_{full.name}{at}_depth{d}.png").stat().st_size > 10_000
               for d in (0, 1) for at in ("", "_T384"))  # 256: the training length
    assert all((out / f"distance_{full.name}_T384_depth{d}.png").stat().st_size > 10_000 for d in (0, 1))
    assert not list(out.glob("distance_*_T256_*"))  # nothing is past the training length at it
    assert saved["markdown"] in (out / "results.md").read_text()
    assert "partial" not in saved and "Partial" not in (out / "results.md").read_text()
    # Validation at the training length: the loop's own last evaluation, and its recall per layer.
    (val,) = saved["val"]
    last = [r for r in rows(full) if r["kind"] == "eval"][-1]
    np.testing.assert_allclose(val["val_bpb"], last["val_bpb"], rtol=1e-5)
    np.testing.assert_allclose(val["block_recall"], last["block_recall"], rtol=1e-5)
    assert [p["layer"] for p in val["per_layer"]] == [0, 1]
    np.testing.assert_allclose(np.mean([p["block_recall"] for p in val["per_layer"]]), val["block_recall"], rtol=1e-5)
    top_k = json.loads((full / "config.json").read_text())["top_k"]
    for p in val["per_layer"]:  # distinct blocks per query-outer tile: at most tile tokens x top_k
        assert 1 <= p["block_union"] <= p["union_tile_tokens"] * top_k
        unions = {int(t): u for t, u in p["union_by_tile"].items()}
        assert {4, 8, 16, 32, p["union_tile_tokens"]} == set(unions) and unions[p["union_tile_tokens"]] == p["block_union"]
        assert all(1 <= unions[t] <= t * top_k for t in unions)
        assert [unions[t] for t in sorted(unions)] == sorted(unions.values())  # wider tiles read more blocks
    # on validation code, the blocks each MSA layer's index and its attention's top-k choose, by distance
    by_d = val["selection_by_distance"]
    assert set(by_d) == {"0", "1"} and "the blocks 1 / 2 / 3 back chosen" in output
    for curves in by_d.values():
        assert set(curves) == {"index", "attention's top-k"}
        assert all(x is None or 0 <= x <= 1 for c in curves.values() for x in c)
        assert curves["index"][0] == 1.0 and curves["attention's top-k"][0] > 0  # the local block: always selected
        assert sum(curves["index"][1:]) > 0  # the index chooses blocks further back too
    # one needle trace per --selection-lengths x --selection-depths
    assert [(t["context_len"], t["depth"]) for t in val["selections"]] == [(256, 0.0), (256, 1.0), (384, 0.0), (384, 1.0)]
    n_layers = json.loads((full / "config.json").read_text())["n_layers"]
    for sel in val["selections"]:
        assert set(sel["needle_selected"]) == {"0", "1"} and sel["examples"] == 8 and 0 <= sel["correct"] <= 1
        # past the training length: how much of the selection lies where the model never trained
        assert ("selected_beyond" in sel) == (sel["context_len"] > 256)
        if sel["context_len"] > 256:
            assert set(sel["selected_beyond"]) == {"0", "1"} and all(0 <= x <= 1 for x in sel["selected_beyond"].values())
            assert 0 < sel["beyond_uniform"] < 1
        # and the dense attention's side, per layer (every layer, dense ones too)
        assert ("attention_top_k_beyond" in sel) == (sel["context_len"] > 256)
        if sel["context_len"] > 256:
            assert set(sel["attention_mass_beyond"]) == set(sel["attention_top_k_beyond"]) == {str(i) for i in range(n_layers)}
            assert all(0 <= x <= 1 for x in [*sel["attention_mass_beyond"].values(), *sel["attention_top_k_beyond"].values()])
            assert any(x > 0 for x in sel["attention_top_k_beyond"].values())  # 16 blocks of 24 at 384: some are far
            rates = sel["selection_rate_by_distance"]  # MSA layers; distances in blocks
            assert set(rates) == {"0", "1"}
            for curves in rates.values():
                assert set(curves) == {"attention's top-k (answer rows)", "index (answer rows)", "index (rows past 256)"}
                assert all(x is None or 0 <= x <= 1 for c in curves.values() for x in c)
                assert curves["index (rows past 256)"][0] == 1.0  # the local block is always selected
        mass, top = sel["teacher_needle_mass"], sel["teacher_needle_in_top_k"]
        assert set(mass) == set(top) == {str(i) for i in range(n_layers)}
        assert all(0 <= x <= 1 for x in [*mass.values(), *top.values()])
    md = (out / "results.md").read_text()
    assert "needle in the attention's top-k" in md and f"| {full.name} | 256 | 1 |" in md
    assert "attention mass past the training distance" in md and f"| {full.name} | 384 | 0 |" in md
    proc = run_script("eval_retrieval.py", [str(tmp_path / "nothing")])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0 and "checkpoints" in output

    cmp_out = tmp_path / "cmp"
    proc = run_script("compare_runs.py", [str(full), str(full), "--out", str(cmp_out)])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    table = json.loads((cmp_out / "compare.json").read_text())["table"]
    assert len(table) == 2 and table[0]["steps"] == STEPS and table[0]["block_recall"] is not None
    assert "| run |" in output and (cmp_out / "compare.png").stat().st_size > 10_000
    # the columns of a context-parallel comparison: length, mesh, step time, peak memory (GPU only)
    n = jax.device_count()
    assert table[0]["seq_len"] == SIZES["seq_len"] and table[0]["mesh"] == (f"data={n}" if n > 1 else "1 device")
    assert table[0]["step_s"] == pytest.approx(SIZES["batch_size"] * SIZES["seq_len"] / table[0]["tokens_per_s"])
    assert (table[0]["peak_memory_gib"] is None) == (jax.default_backend() == "cpu")
    assert "| T | mesh | s/step | peak GiB/device |" in output



def test_eval_retrieval_keeps_finished_cells_when_stopped(full, tmp_path, monkeypatch):
    """A GPU call's deadline can stop an evaluation during its needle traces (the slowest phase): the
    retrieval cells and the validation metrics it already has must be on disk, marked partial."""
    import importlib.util

    from msa_jax import needle_trace

    spec = importlib.util.spec_from_file_location("eval_retrieval", ROOT / "experiments" / "eval_retrieval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def stopped(*a, **k):
        raise KeyboardInterrupt  # what SIGINT / the timeout's stop looks like mid-trace

    monkeypatch.setattr(needle_trace, "needle_trace", stopped)
    out = tmp_path / "ret"
    with pytest.raises(KeyboardInterrupt):
        script.main([str(full), "--tasks", "passkey", "--lengths", "256", "--depths", "0,1", "--n", "2",
                     "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["depth"]) for r in saved["rows"]] == [("passkey", 0.0), ("passkey", 1.0)]
    assert "needle traces not done" in saved["partial"] and saved["partial"] in (out / "results.md").read_text()
    (val,) = saved["val"]
    last = [r for r in rows(full) if r["kind"] == "eval"][-1]
    np.testing.assert_allclose(val["val_bpb"], last["val_bpb"], rtol=1e-5)

def test_generate_from_the_trained_checkpoint(full):
    """experiments/generate.py on the tiny trained run: it loads the checkpoint, streams the bytes,
    and its greedy output is what the restored model's full forward predicts step by step."""
    from msa_jax.generate import generate

    proc = run_script("generate.py", [str(full), "--prompt", "def main(", "--max-new-tokens", "24",
                                      "--out", str(full / "gen.json")])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    res = json.loads((full / "gen.json").read_text())
    text = res["outputs"][0].encode("latin-1")
    assert len(text) == 24 and res["finish_reason"] == ["length"] and "time to first token" in output
    assert res["cache_bytes_per_token"]["index"] > 0 and res["attention"] == "msa"
    model, _, _ = load_run(full)
    assert generate(model, [b"def main("], max_new_tokens=24).tokens[0] == text
    seq = np.frombuffer(b"def main(" + text, np.uint8).astype(np.int32)[None]
    logits = np.asarray(model(jnp.asarray(seq), sparse=True)[0])[0]
    assert bytes(np.argmax(logits[8:-1], -1).astype(np.uint8)) == text  # greedy = the full forward's argmax
