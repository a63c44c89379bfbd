"""The notebooks run top to bottom (CI executes them, so they cannot rot)."""

import re
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def check_flat_and_nested(nb, text):
    assert "Restructure(Sequential, ..., 5)" in str(nb.cells[3].outputs)
    assert "all parameters zero: True" in text


def check_curvature(nb, text):
    assert "first step with sharpness >= 2/lr" in text  # the sharpness reached 2 / lr
    assert text.count("mass 1.000") == 2  # both densities integrate to 1
    # sharpness tracked every few steps: only the first call compiles
    first, later = re.search(
        r"first call ([\d.]+) s \(compiles\), then (\d+) ms per call", text
    ).groups()
    assert float(later) / 1e3 < float(first) / 5
    assert re.search(r"smallest eigenvalues \[[-\d., ]+\]: converged True", text)
    # per-layer traces from re(diagonal) add up to the whole
    layers = [float(t) for t in re.findall(r"\.value\s+trace\s+(-?[\d.]+)", text)]
    total = float(re.search(r"all layers\s+trace\s+(-?[\d.]+)", text).group(1))
    assert len(layers) == 6 and abs(sum(layers) - total) < 0.01
    # the Gauss-Newton matrix is positive semi-definite
    ggn = re.search(r"Gauss-Newton top 3 eigenvalues \[([^\]]+)\]", text).group(1)
    assert all(float(g) >= 0 for g in ggn.split(","))


CHECKS = {"flat_and_nested.ipynb": check_flat_and_nested, "curvature.ipynb": check_curvature}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_executes(name):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    saved = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in saved[:3]), "the notebook is stored with its outputs"
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    CHECKS[name](nb, text)
    assert time.perf_counter() - start < 240
