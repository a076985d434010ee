"""The scripts of experiments/ as a user runs them: every one answers --help, and the quickstart and
the training benchmark run end to end at toy size (the training loop itself is tested in
test_loop.py, the benchmark helpers in test_bench.py)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))


def run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def test_scripts_import_no_script_and_edit_no_path():
    for name in SCRIPTS:
        text = (ROOT / "experiments" / name).read_text()
        assert "sys.path" not in text, name
        for other in SCRIPTS:
            stem = other.removesuffix(".py")
            assert not re.search(rf"^\s*(import {stem}\b|from {stem} import)", text, re.M), (name, other)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run(script, "--help", timeout=120)
    assert "usage" in out and "--" in out
    assert "(default: None)" not in out and "(default: True)" not in out, "a default that says nothing"
    assert "ArgumentDefaultsHelpFormatter" not in (ROOT / "experiments" / script).read_text()  # the shared one


def test_help_formatter_states_the_defaults_that_mean_something():
    import argparse

    from msa_jax.presets import HelpFormatter

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=300)  # no help text: the default alone
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    p.add_argument("--seed", type=int, default=None, help="the preset's")  # None: nothing appended
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the plot")  # a switch: off unless given
    p.add_argument("--out", default="runs/x", help="where (default: %(default)s, a folder)")  # stated once
    text = " ".join(p.format_help().split())
    assert "--steps STEPS (default: 300)" in text and "learning rate (default: 0.0003)" in text
    assert "the preset's --no-plot" in text and "skip the plot --out" in text
    assert text.count("runs/x") == 1 and "None" not in text


def test_run_flags_cover_the_run_config():
    out = run("train_lm.py", "--help", timeout=120)
    for flag in ("--attention", "--impl", "--steps", "--seed", "--run-dir", "--ckpt-every", "--mesh", "--init-from",
                 "--msa-warmup-steps", "--kl-weight", "--eval-every", "--seq-len", "--batch-size", "--preset",
                 "--stop-at", "--no-plot", "--lr-warmup-steps", "--task-mix", "--task-mix-tasks", "--index-lr-scale"):
        assert flag in out, flag


TOY = [
    "--seq-len", "64", "--block-size", "8", "--top-k", "2",  # 16 of 64 keys per query: really sparse
    "--steps", "4", "--msa-warmup-steps", "2", "--eval-every", "2", "--eval-batches", "1",
    "--batch-size", "2", "--d-model", "32", "--n-layers", "2", "--n-dense-layers", "1",
    "--n-heads", "2", "--n-kv-heads", "1", "--head-dim", "16", "--index-dim", "16", "--d-ff", "64",
    "--max-bytes", "40000",
]  # fmt: skip


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    printed = run("quickstart.py", *TOY, "--out", str(out))
    saved = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 1000
    table = {row["attention"]: row for row in saved["table"]}
    assert set(table) == {"dense", "msa"}
    for kind in ("dense", "msa"):
        rows = [json.loads(x) for x in (out / kind / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        assert all(math.isfinite(r["loss"]) for r in train)
        assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]
        assert (out / kind / "checkpoints").is_dir()
    msa_rows = [json.loads(x) for x in (out / "msa" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparse"] for r in msa_rows if r["kind"] == "train"] == [False, False, True, True]  # warmup, routing
    assert [r["sparse"] for r in msa_rows if r["kind"] == "eval"] == [False, True]  # evaluated in the mode in force
    assert table["dense"]["block_recall"] is None
    assert 0.0 <= table["msa"]["block_recall"] <= 1.0 and 0.0 <= table["msa"]["score_recall"] <= 1.0
    for row in table.values():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < 7.0  # below ~uniform over bytes (5.55) + slack
        assert math.isclose(row["val_bpb"], row["val_loss"] / math.log(2))
    assert saved["markdown"] in printed and "block recall" in printed


def test_bench_train_cpu_preset_end_to_end(tmp_path):
    # impl=xla: the script's plumbing is the same for every impl, and interpret-mode compiles of the
    # pallas kernels would double the time (the kernels' gradients have their own tests)
    run("bench_train.py", "--preset", "cpu", "--seq-lens", "128", "--reps", "1", "--impls", "xla", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "speedup.png").stat().st_size > 0
    for key in ("device", "jax", "dtype", "config", "impls", "grad_check", "attention", "train_step"):
        assert key in saved, key
    checks = saved["grad_check"]
    assert checks["status"] == "ok", checks
    c = checks["xla_vs_reference"]  # float32 gradients on fresh inputs
    assert c["status"] == "ok" and c["max_rel_err"] < 1e-3 and c["select_match"] > 0.9, c
    assert [r["T"] for r in saved["attention"]] == [128]
    for row in saved["attention"]:
        assert row["dense"]["status"] == "ok" and row["dense"]["ms"] > 0
        m = row["impls"]["xla"]
        for part in ("indexer", "main", "kl", "total"):
            assert m[part]["status"] == "ok" and math.isfinite(m[part]["ms"]) and m[part]["ms"] > 0, (part, m[part])
        assert m["main"]["tflops"] > 0 and m["pairs"] > 0
        assert m["total"]["speedup"] == pytest.approx(row["dense"]["ms"] / m["total"]["ms"])
    (ts,) = saved["train_step"]  # one entry per --train-T length
    assert ts["T"] == 256 and ts["batch"] == 1
    for name in ("dense", "xla"):
        assert ts["runs"][name]["status"] == "ok" and ts["runs"][name]["tokens_per_s"] > 0
        assert math.isfinite(ts["runs"][name]["loss"])
    assert ts["runs"]["xla"]["ratio"] > 0
