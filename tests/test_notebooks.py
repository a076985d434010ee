"""Every notebook in notebooks/ runs top to bottom (small mode: MSA_NOTEBOOK_SMALL=1) without a cell error."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MSA_NOTEBOOK_SMALL", "1")  # the kernel inherits the environment
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    kinds = lambda cell: {k for o in cell.outputs for k in o.get("data", {})} | {o.output_type for o in cell.outputs}  # noqa: E731
    for i, (old, new) in enumerate(zip(committed.cells, nb.cells)):
        if new.cell_type != "code":
            continue
        assert "error" not in kinds(new), f"cell {i}"
        # the committed copy's outputs come from a full run: each kind (a figure, a table) shows again
        assert kinds(old) <= kinds(new), f"cell {i}: committed {sorted(kinds(old))}, now {sorted(kinds(new))}"
