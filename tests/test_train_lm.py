"""experiments/train_lm.py and eval_retrieval.py as a user runs them: resume, interrupts, meshes, hosts.

The reference is one uninterrupted tiny run (in-process `main(argv)`, the same argv the CLI parses).
Every other way of getting to the same step (--stop-at + rerun, SIGTERM + rerun, a resume on an
8-device 2x2x2 mesh, two processes of four devices each) must give the same metrics.jsonl.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import eval_retrieval  # noqa: E402
import train_lm  # noqa: E402

STEPS = 8
# T=256 with block 32 x top-4 (dense span 128) is really sparse; warmup 3 -> steps 1-3 dense.
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--seq-len", "256", "--batch-size", "4", "--eval-every", "4",
        "--eval-batches", "1", "--ckpt-every", "3", "--log-every", "2", "--msa-warmup-steps", "3",
        "--max-bytes", "600000", "--no-plot"]


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
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train_lm.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("full")
    summary = train_lm.main(ARGS + ["--run-dir", str(run_dir)])
    assert summary["steps"] == STEPS
    return run_dir


def test_help_runs():
    for script in ("train_lm.py", "eval_retrieval.py"):
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "usage" in out
    for flag in ("--attention", "--impl", "--steps", "--seed", "--run-dir", "--ckpt-every", "--mesh", "--init-from",
                 "--msa-warmup-steps", "--kl-weight", "--eval-every", "--seq-len", "--batch-size", "--preset"):
        assert flag in train_lm.build_parser().format_help(), flag


def test_full_run_outputs(full):
    rs = rows(full)
    train = [r for r in rs if r["kind"] == "train"]
    evals = [r for r in rs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [4, 8]
    assert [r["sparse"] for r in train] == [False] * 3 + [True] * 5  # the warmup switch, at the configured step
    for r in train:
        assert np.isfinite(r["loss"]) and r["kl"] > 0 and r["lr"] >= 0 and r["index_grad_norm"] > 0
    assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0  # warmup-cosine starts at 0
    assert any(r["tokens_per_s"] for r in train)
    for r in evals:
        assert 0 <= r["block_recall"] <= 1 and 0 <= r["score_recall"] <= 1 and np.isfinite(r["val_loss"])
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["attention"] == "msa" and cfg["seq_len"] == 256
    from msa_jax.checkpoint import Checkpointer

    with Checkpointer(full / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6, 8]
        meta = ckpt.restore_meta()
    assert meta["step"] == 8 and meta["data"]["step"] == 8 and meta["rng"] == {"seed": 0}


def test_stop_at_then_rerun_equals_uninterrupted(full, tmp_path):
    run_dir = tmp_path / "run"
    out = train_lm.main(ARGS + ["--run-dir", str(run_dir), "--stop-at", "5"])
    assert out["stopped"] and out["steps"] == 5
    assert max(r["step"] for r in rows(run_dir)) == 5
    train_lm.main(ARGS + ["--run-dir", str(run_dir)])  # the same command again: resumes at 5
    assert values(rows(run_dir)) == values(rows(full))  # bit for bit


def test_sigterm_checkpoints_and_the_rerun_resumes(full, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(ARGS + ["--run-dir", str(run_dir), "--log-every", "1"])
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
    assert "SIGTERM" in output and "Re-run the same command" in output
    last = max(r["step"] for r in rows(run_dir))
    from msa_jax.checkpoint import Checkpointer

    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == last < STEPS
    train_lm.main(ARGS + ["--run-dir", str(run_dir)])
    assert values(rows(run_dir)) == values(rows(full))


def test_resume_on_an_8_device_mesh_gives_the_single_device_losses(full, tmp_path):
    run_dir = tmp_path / "run"
    train_lm.main(ARGS + ["--run-dir", str(run_dir), "--stop-at", "3"])  # one device
    proc = run_cli(ARGS + ["--run-dir", str(run_dir), "--mesh", "data=2,fsdp=2,tensor=2"],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "8 device(s)" in output and "'data': 2, 'fsdp': 2, 'tensor': 2" in output and "resumed from" in output
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


def test_init_from_dense_converts_then_warms_up(tmp_path):
    from msa_jax import data
    from msa_jax.checkpoint import Checkpointer
    from msa_jax.train import loss_fn

    dense_dir, cpt_dir = tmp_path / "dense", tmp_path / "cpt"
    common = ARGS + ["--steps", "4", "--eval-every", "4"]
    train_lm.main(common + ["--attention", "dense", "--run-dir", str(dense_dir)])
    with pytest.raises(SystemExit, match="--attention msa"):
        train_lm.main(common + ["--attention", "dense", "--init-from", str(dense_dir), "--run-dir", str(cpt_dir)])
    train_lm.main(common + ["--init-from", str(dense_dir), "--run-dir", str(cpt_dir)])
    # Step 1 of the converted run (dense warmup, before its first update) sees the dense model's weights:
    # its LM loss equals the trained dense model's loss on batch 0.
    cfg = json.loads((dense_dir / "config.json").read_text())
    dense = train_lm.model_from_config(cfg)
    with Checkpointer(dense_dir / "checkpoints", read_only=True) as ckpt:
        ckpt.restore(dense)
    corpus = data.load_corpus(cfg["max_bytes"], sources=tuple(cfg["sources"].split(",")))
    batch = data.batch_at(corpus.train, cfg["batch_size"], cfg["seq_len"], seed=cfg["seed"], step=0)
    _, m = loss_fn(dense, jnp.asarray(batch), sparse=False, kl_weight=0.0)
    first = rows(cpt_dir)[0]
    np.testing.assert_allclose(first["loss"], float(m["lm_loss"]), rtol=1e-5)
    assert first["kl"] > 0 and not first["sparse"]
    assert [r["sparse"] for r in rows(cpt_dir) if r["kind"] == "train"] == [False] * 3 + [True]


def test_resume_refuses_a_different_run(full, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    with pytest.raises(SystemExit, match="d_model"):
        train_lm.main(ARGS + ["--run-dir", str(run_dir), "--d-model", "32"])
    with pytest.raises(ValueError, match="devices"):
        train_lm.main(ARGS + ["--run-dir", str(tmp_path / "x"), "--mesh", f"data={jax.device_count() + 1}"])


def test_eval_retrieval_on_trained_runs(full, tmp_path):
    out = tmp_path / "ret"
    res = eval_retrieval.main([str(full), "--lengths", "256,384", "--depths", "0,1", "--n", "2", "--out", str(out)])
    assert len(res["rows"]) == 3 * 2 * 2  # tasks x lengths x depths
    assert {r["task"] for r in res["rows"]} == {"passkey", "multikey", "variable_tracking"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 and r["attention"] == "msa" for r in res["rows"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == res["rows"] and "passkey" in saved["table"]
    assert (out / "retrieval.png").stat().st_size > 10_000 and (out / "retrieval_bytes.png").exists()
    assert all(0.0 <= r["byte_accuracy"] <= 1.0 for r in res["rows"])
    with pytest.raises(SystemExit, match="checkpoints"):
        eval_retrieval.main([str(tmp_path / "nothing")])
