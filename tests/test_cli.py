"""python -m jaxflat demo / inspect."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import jaxflat
from jaxflat.__main__ import main


def test_demo_runs_the_walkthrough():
    out = subprocess.run(
        [sys.executable, "-m", "jaxflat", "demo"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "Restructure(Sequential, ..., 5)" in text
    assert "all zero: True" in text
    assert "symmetric: True" in text
    assert "same parameters: True" in text
    grads = [line for line in text.splitlines() if line.startswith(("destructure(nested)", "jax.grad"))]
    assert len(grads) == 2 and grads[0].split(":")[1].strip() == grads[1].split(":")[1].strip()
    assert "['Sequential', 'List', 'Sequential', 'List', 'Linear', 'BatchNorm', 'Linear']" in text


def test_inspect_reads_metadata_only(tmp_path, capsys):
    tree = {"w": jnp.ones((3, 4)), "b": np.zeros(4, np.float64), "step": 3}
    jaxflat.save(tmp_path / "c", tree)
    # Delete the array data: inspect must not need it.
    import shutil

    shutil.rmtree(tmp_path / "c" / "arrays" / "d", ignore_errors=True)
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "['w']" in out and "(3, 4)" in out and "float32" in out
    assert "['b']" in out and "float64" in out
    assert "16 elements" in out and "80 bytes" in out


def test_inspect_missing_path_is_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
