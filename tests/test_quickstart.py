"""Smoke test of experiments/quickstart.py at toy size (runs in the default suite; ~30 s on 2 CPU cores)."""

import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = [
    "--seq-len", "64", "--block-size", "8", "--top-k", "2",  # 16 of 64 keys per query: really sparse
    "--steps", "4", "--warmup-steps", "2", "--eval-every", "2", "--eval-batches", "1",
    "--batch-size", "2", "--d-model", "32", "--n-layers", "2", "--n-dense-layers", "1",
    "--n-heads", "2", "--n-kv-heads", "1", "--head-dim", "16", "--index-dim", "8", "--d-ff", "64",
    "--max-bytes", "40000",
]  # fmt: skip


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "experiments" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart():
    return _load_quickstart()


def test_help(quickstart, capsys):
    with pytest.raises(SystemExit) as exc:
        quickstart.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--seq-len", "--block-size", "--top-k", "--attention", "--impl", "--preset", "--out"):
        assert flag in out


def test_presets_are_valid_and_sparse(quickstart):
    for name in quickstart.PRESETS:
        cfg = quickstart.resolve(quickstart.build_parser().parse_args(["--preset", name]))
        mcfg, tcfg = quickstart.make_configs(cfg, "msa")
        assert mcfg.msa.dense_span < tcfg.seq_len  # MSA really drops keys at this context
        assert 0 < mcfg.msa.warmup_steps < tcfg.steps
        assert mcfg.n_msa_layers >= 1


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart, tmp_path, capsys):
    out = tmp_path / "qs"
    results = quickstart.main([*TOY, "--out", str(out)])
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert (out / "loss.png").stat().st_size > 1000
    assert set(saved["runs"]) == {"dense", "msa"}
    assert saved["config"]["seq_len"] == 64 and saved["config"]["warmup_steps"] == 2
    for name, run in saved["runs"].items():
        assert len(run["train_loss"]) == 4
        assert [h["step"] for h in run["history"]] == [2, 4]
        assert all(math.isfinite(x) for x in run["train_loss"])
    msa = saved["runs"]["msa"]
    assert msa["sparse"] == [False, False, True, True]  # dense warmup, then top-k routing
    assert not any(saved["runs"]["dense"]["sparse"])
    final = {row["model"]: row for row in saved["table"]}
    assert final["dense"]["block_recall"] is None
    assert 0.0 <= final["msa"]["block_recall"] <= 1.0 and 0.0 <= final["msa"]["score_recall"] <= 1.0
    for row in final.values():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < 7.0  # below ~uniform over bytes (5.55) + slack
        assert math.isclose(row["val_bpb"], row["val_loss"] / math.log(2))

    # The final table is printed.
    assert "block recall" in printed and "val bits/B" in printed
    table_lines = [line for line in printed.splitlines() if line.startswith(("dense ", "msa "))]
    assert len(table_lines) == 2
    assert results["table_text"] in printed
    assert "jax " in printed and "backend" in printed
