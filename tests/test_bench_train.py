"""experiments/bench_train.py end to end with the cpu preset (interpret mode), one rep per timing."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import bench_train  # noqa: E402


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--seq-lens", "--impls", "--reps", "--xla-max-T", "--no-train-step", "--train-T",
                 "--train-batch", "--out"):
        assert flag in text, flag


def test_measurement_errors_are_recorded_not_raised():
    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")

    assert bench_train.guarded("x", oom)["status"] == "oom"
    assert bench_train.guarded("x", lambda: 1 / 0)["status"] == "error"
    assert bench_train.guarded("x", lambda: dict(ms=1.0)) == dict(ms=1.0, status="ok")


def _finite_ms(m: dict) -> float:
    assert m["status"] == "ok", m
    assert math.isfinite(m["ms"]) and m["ms"] > 0, m
    return m["ms"]


def test_cpu_preset_end_to_end(tmp_path):
    # impl=xla: the script's plumbing is the same for every impl, and interpret-mode compiles of the
    # pallas kernels would double the time (the kernels' gradients have their own tests)
    result = bench_train.main(["--preset", "cpu", "--seq-lens", "128", "--reps", "1", "--impls", "xla",
                               "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert saved["attention"] == json.loads(json.dumps(result["attention"]))
    for key in ("device", "jax", "dtype", "config", "impls", "grad_check", "attention", "train_step"):
        assert key in saved, key

    # float32 gradient checks on fresh inputs: pallas vs xla, xla vs the reference
    checks = saved["grad_check"]
    assert checks["status"] == "ok", checks
    for name in ("xla_vs_reference",):
        c = checks[name]
        assert c["status"] == "ok", (name, c)
        assert c["max_rel_err"] < bench_train.CHECK_TOL_F32, (name, c)
        assert set(bench_train.GRAD_NAMES) <= set(c)
        assert c["select_match"] > 0.9, (name, c)

    assert [r["T"] for r in saved["attention"]] == [128]
    for row in saved["attention"]:
        dense = _finite_ms(row["dense"])
        assert row["dense"]["tflops"] > 0
        m = row["impls"]["xla"]
        assert m["grad_check"]["status"] == "ok"  # (xla is the check's baseline: nothing to compare)
        for part in ("indexer", "main", "kl", "total"):
            _finite_ms(m[part])
        assert m["main"]["tflops"] > 0 and m["pairs"] > 0
        assert m["total"]["speedup"] == pytest.approx(dense / m["total"]["ms"])

    ts = saved["train_step"]
    assert ts["T"] == bench_train.PRESETS["cpu"]["train_T"] and ts["batch"] == 1
    for name in ("dense", "xla"):
        _finite_ms(ts["runs"][name])
        assert ts["runs"][name]["tokens_per_s"] > 0 and math.isfinite(ts["runs"][name]["loss"])
    assert ts["runs"]["xla"]["ratio"] > 0
