"""python -m jaxflat demo / inspect."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    grads = [
        line for line in text.splitlines() if line.startswith(("destructure(nested)", "jax.grad"))
    ]
    assert len(grads) == 2 and grads[0].split(":")[1].strip() == grads[1].split(":")[1].strip()
    assert "['Sequential', 'List', 'Sequential', 'List', 'Linear', 'BatchNorm', 'Linear']" in text


def test_inspect_reads_metadata_only(tmp_path, capsys):
    tree = {"w": jnp.ones((3, 4)), "b": np.zeros(4, np.float64), "step": 3}
    jaxflat.save(tmp_path / "c", tree)
    # Delete the array data: inspect must not need it.
    import shutil

    version = json.loads((tmp_path / "c" / "jaxflat.json").read_text())["version"]
    shutil.rmtree(tmp_path / "c" / version, ignore_errors=True)
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "['w']" in out and "(3, 4)" in out and "float32" in out
    assert "['b']" in out and "float64" in out
    assert "16 elements" in out and "80 bytes" in out


def test_inspect_missing_path_is_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------ errors: one line, non-zero exit


def _dumps(meta):
    """A description with a valid hash, to reach the validator behind it."""
    from jaxflat import _codec

    return _codec.dumps({"format": _codec.FORMAT, "version": "arrays-" + "0" * 32, **meta})


def _corrupt(path, text):
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / "jaxflat.json").write_text(text)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"format": "jaxflat-checkpoint/2", "arrays": [], "tree": '
            + '{"t": "list", "v": [' * 50000
            + "]}" * 50000
            + "}",
            "nested too deeply",
        ),
        (_dumps({"arrays": [], "tree": {"t": "array", "i": -1}}), "array index -1 out of range"),
        (
            _dumps(
                {
                    "arrays": [
                        {
                            "path": "x",
                            "key": ["x"],
                            "kind": "jax",
                            "shape": [-1],
                            "stored_shape": [-1],
                            "dtype": "float32",
                            "stored_dtype": "float32",
                        }
                    ],
                    "tree": {"t": "none"},
                }
            ),
            "not a list of non-negative ints",
        ),
        ("{not json", "not valid JSON"),
    ],
    ids=["deep", "index", "shape", "garbage"],
)
def test_inspect_malformed_json_prints_one_line(tmp_path, capsys, text, message):
    _corrupt(tmp_path / "c", text)
    assert main(["inspect", str(tmp_path / "c")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[:500]
    assert str(tmp_path / "c" / "jaxflat.json") in lines[0] and message in lines[0]


def test_inspect_malformed_json_from_the_shell(tmp_path):
    _corrupt(
        tmp_path / "c",
        '{"format": "jaxflat-checkpoint/2", "arrays": [], "tree": '
        + "[" * 100000
        + "]" * 100000
        + "}",
    )
    out = subprocess.run(
        [sys.executable, "-m", "jaxflat", "inspect", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr[-2000:]
    assert "nested too deeply" in out.stderr


def test_inspect_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "plain")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint: it holds no jaxflat.json" in err


# ------------------------------------------------------------ plain Orbax checkpoints


@pytest.fixture
def manager_folder(tmp_path):
    """The README's recipe: a CheckpointManager keeping the two latest steps."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "mgr", options=options) as mngr:
        for i in range(3):
            tree = {
                "params": {"w": jnp.full((3, 4), i, jnp.float32), "b": np.zeros(4, np.float16)},
                "step": i,
            }
            mngr.save(i, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
    return tmp_path / "mgr"


@pytest.fixture
def no_array_reads(monkeypatch):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import metadata as om

    def refuse(*args, **kwargs):
        raise AssertionError("inspect must not read array data")

    real = ocp.PyTreeCheckpointer.restore

    def values_only(self, directory, *args, **kwargs):  # Python scalars and strings may be read
        leaves = jax.tree.leaves(kwargs["args"].item)
        if any(
            isinstance(x, om.ArrayMetadata)
            and not isinstance(x, om.ScalarMetadata)
            or hasattr(x, "sharding")
            and not isinstance(x, om.ScalarMetadata)
            for x in leaves
        ):
            refuse()
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refuse)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", values_only)


def _rows(out):
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}


@pytest.mark.parametrize("where", ["step", "item", "manager"])
def test_inspect_reads_orbax_checkpoint_manager_folders(
    manager_folder, capsys, no_array_reads, where
):
    path = {
        "step": manager_folder / "2",
        "item": manager_folder / "2" / "default",
        "manager": manager_folder,
    }[where]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(Orbax): 2 arrays, 1 other values" in out
    rows = _rows(out)
    assert rows["['params']['w']"][:4] == ["(3,", "4)", "float32", "12"]
    assert rows["['params']['b']"][:3] == ["(4,)", "float16", "4"]
    assert "  ['step'] = 2" in out.splitlines()  # a Python int, shown with its value
    assert "# Total: 16 elements, 56 bytes" in out
    if where == "manager":
        assert "latest of 2 steps" in out and str(manager_folder / "2") in out


@pytest.fixture
def orbax_stray_errors(monkeypatch):
    """Catch the "Event loop is closed" errors that Orbax's abandoned reads of
    a damaged folder raise through ``sys.unraisablehook`` after it gave up."""
    caught = []
    previous = sys.unraisablehook

    def hook(args):
        e = args.exc_value
        if (isinstance(e, RuntimeError) and "Event loop is closed" in str(e)) or (
            isinstance(e, RuntimeWarning) and "was never awaited" in str(e)
        ):
            caught.append(e)
        else:
            previous(args)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    yield caught
    time.sleep(0.3)


def test_inspect_damaged_orbax_folder_is_one_line(manager_folder, capsys, orbax_stray_errors):
    import shutil

    item = manager_folder / "2" / "default"
    for p in item.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
    assert main(["inspect", str(item)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(item) in err


# ------------------------------------------------------------ --version, help, prog


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "jaxflat", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"jaxflat {jaxflat.__version__}"


def test_help_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "jaxflat", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert out.stdout.startswith("usage: python -m jaxflat ")
    assert "``" not in out.stdout
    assert "inspect PATH" in out.stdout and "--version" in out.stdout


def test_help_as_the_console_script():
    script = Path(sys.executable).parent / "jaxflat"  # installed by `pip install -e .`
    assert script.exists(), script
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: jaxflat "), out.stdout[:300]
    assert "``" not in out.stdout


@pytest.mark.parametrize(
    "argv0, prog",
    [
        ("/venv/bin/jaxflat", "jaxflat"),
        ("/src/jaxflat/__main__.py", "python -m jaxflat"),
        ("-m", "python -m jaxflat"),
    ],
)
def test_prog_follows_how_it_was_run(monkeypatch, capsys, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


# ------------------------------------------------------------ issue 15: --step, --item, values, odd paths


def test_inspect_shows_non_array_values_of_a_jaxflat_checkpoint(tmp_path, capsys):
    jaxflat.save(tmp_path / "c", {"w": jnp.ones(2), "step": 7, "name": "run", "opt": {"lr": 0.5}})
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "1 arrays, 3 other values" in out
    assert (
        "  ['step'] = 7" in out and "  ['name'] = 'run'" in out and "  ['opt']['lr'] = 0.5" in out
    )
    assert main(["inspect", str(tmp_path / "c"), "--item", "opt"]) == 0
    out = capsys.readouterr().out
    assert "0 arrays, 1 other values" in out and "  ['lr'] = 0.5" in out


def test_inspect_step_and_item_of_a_manager(manager_folder, capsys, no_array_reads):
    assert main(["inspect", str(manager_folder), "--step", "1", "--item", "params"]) == 0
    out = capsys.readouterr().out
    assert str(manager_folder / "1") in out and "latest" not in out
    assert set(_rows(out)) == {"['w']", "['b']"}
    assert main(["inspect", str(manager_folder), "--step", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no step 0; its steps: 1, 2" in err


def test_inspect_composite_json_item(tmp_path, capsys):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": jnp.ones(2)}), meta=ocp.args.JsonSave({"lr": 0.1})
            ),
        )
        mngr.wait_until_finished()
    assert main(["inspect", str(tmp_path / "m"), "--item", "meta"]) == 0
    assert "  ['lr'] = 0.1" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass item= one of: meta, state" in err


@pytest.mark.parametrize("where", ["/", "/dev/null", "/proc/self"])
def test_inspect_odd_paths_give_one_clean_line(where, capsys):
    assert main(["inspect", where]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "load:" not in err, err


def test_demo_help_has_a_description():
    out = subprocess.run(
        [sys.executable, "-m", "jaxflat", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "walk-through on a small Flax NNX model" in out.stdout.replace(
        "\n", " "
    )


def test_verify_of_a_plain_orbax_checkpoint_says_it_has_no_hashes(manager_folder, capsys):
    assert main(["verify", str(manager_folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain Orbax checkpoints carry no hashes" in err
