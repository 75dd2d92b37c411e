"""notebooks/quickstart.ipynb runs top to bottom (on a reduced budget) in a fresh kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FISHERTUNE_NOTEBOOK_REDUCED", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "| FisherTune |" in outputs and "max |reloaded - trained|" in outputs
    assert (tmp_path / "predictions.png").is_file() and (tmp_path / "fishertune_adapter").is_dir()
    assert os.environ["FISHERTUNE_NOTEBOOK_REDUCED"] == "1"
