"""The notebook runs top to bottom (CI executes it, so it cannot rot)."""

import time
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "flat_and_nested.ipynb"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    saved = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in saved[:3]), "the notebook is stored with its outputs"
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Restructure(Sequential, ..., 5)" in str(nb.cells[3].outputs)
    assert "all parameters zero: True" in text
    assert time.perf_counter() - start < 240
