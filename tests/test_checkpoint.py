"""jaxflat.save / jaxflat.load: state on disk through Orbax."""

import errno
import json
import math
import pickle
import re
import sys
import time

import equinox as eqx
import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxflat
from jaxflat import LoadError


def Net(seed=0):  # noqa: N802 - the shared test model, 16 wide
    return helpers.Net(seed, width=16)


X = jax.random.normal(jax.random.key(1), (4, 3))


def trained_net():
    m = Net()
    m(X)  # moves the batch statistics and the dropout's counter
    return m


def assert_exact(a, b, path="<root>"):
    """``a`` and ``b`` are equal, with the same Python types all the way down."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b) or set(a) == set(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{path}: key {k!r}"
            assert_exact(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_exact(x, y, f"{path}[{i}]")
    elif isinstance(a, jax.Array | np.ndarray):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(b)), path
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def esc(p):
    return re.escape(str(p))


def version(path):
    """The folder of a jaxflat checkpoint's current arrays (an Orbax item)."""
    return path / json.loads((path / "jaxflat.json").read_text())["version"]


def rewrite_meta(path, meta):
    """Write a description with a valid SHA-256, to reach the validator behind the hash."""
    from jaxflat import _codec

    meta = {k: v for k, v in meta.items() if k != "sha256"}
    (path / "jaxflat.json").write_text(_codec.dumps(meta))


# ------------------------------------------------------------ round trips


def test_round_trip_nnx_state(tmp_path):
    m = trained_net()
    jaxflat.save(tmp_path / "ckpt", m)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), jaxflat.state(m))


def test_round_trip_nnx_with_like(tmp_path):
    m = trained_net()
    jaxflat.save(tmp_path / "ckpt", m)
    out = jaxflat.load(tmp_path / "ckpt", like=Net(seed=7))
    assert type(out) is helpers.Net
    assert_exact(jaxflat.state(out), jaxflat.state(m))


def test_round_trip_linen_variables(tmp_path):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))

    v = M().init(jax.random.key(0), jnp.ones((1, 2)))
    jaxflat.save(tmp_path / "ckpt", v)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), v)
    like = M().init(jax.random.key(1), jnp.ones((1, 2)))
    assert_exact(jaxflat.load(tmp_path / "ckpt", like=like), v)


def test_round_trip_equinox_module(tmp_path):
    m = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0))
    jaxflat.save(tmp_path / "ckpt", m)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), jaxflat.state(m))
    out = jaxflat.load(tmp_path / "ckpt", like=eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(1)))
    assert type(out) is eqx.nn.MLP
    assert out.activation is m.activation
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(m), strict=True):
        np.testing.assert_array_equal(a, b)


def test_round_trip_optax_state(tmp_path):
    params = {"w": jnp.ones(3)}
    tx = optax.adam(1e-3)
    opt = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)[1]
    jaxflat.save(tmp_path / "ckpt", opt)
    out = jaxflat.load(tmp_path / "ckpt", like=tx.init(params))
    assert jax.tree.structure(out) == jax.tree.structure(opt)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(opt), strict=True):
        np.testing.assert_array_equal(a, b)


def test_round_trip_plain_dict(tmp_path):
    tree = {"w": jnp.ones((2, 3)), "b": np.arange(3.0), "opt": {"step": jnp.array(4)}}
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


def test_round_trip_python_types_exactly(tmp_path):
    tree = {
        "ints": {0: "zero", -3: None, 2**70: 1},
        "tuple": (1, 2.5, True, "s"),
        "list": [False, None, "x", 0],
        "empty": ({}, [], ()),
        "nested": ((), [[]], {"a": ()}),
        "float": 0.1,
        "int": 7,
        "bool": True,
        "none": None,
        "complex": 1 - 2j,
        "str": "ünïcode",
        "array": jnp.ones(2),
    }
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


def test_round_trip_non_finite_floats(tmp_path):
    tree = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "w": jnp.ones(1)}
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


@pytest.mark.parametrize("tree", [{"step": 3, "name": "run"}, {}], ids=["scalars", "empty"])
def test_round_trip_tree_without_arrays(tmp_path, tree):
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


@pytest.mark.parametrize(
    "x",
    [
        jnp.arange(3),
        jnp.array([True, False]),
        jnp.ones(2, jnp.bfloat16),
        jnp.array([1 + 2j], jnp.complex64),
        jnp.float32(3.0),
        np.arange(3, dtype=np.uint8),
        np.ones(2, np.float16),
        np.arange(2.0),
    ],
    ids=lambda x: f"{type(x).__name__}-{x.dtype}",
)
def test_round_trip_array_dtypes(tmp_path, x):
    jaxflat.save(tmp_path / "ckpt", {"x": x})
    assert_exact(jaxflat.load(tmp_path / "ckpt"), {"x": x})


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_round_trip_prng_keys_bit_exact(tmp_path, impl):
    tree = {
        "k": jax.random.key(42, impl=impl),
        "ks": jax.random.split(jax.random.key(5, impl=impl), 3),
    }
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


@pytest.mark.parametrize("like", ["eval_shape", "model"])
def test_dropout_draws_same_masks_after_load(tmp_path, like):
    m = trained_net()
    jaxflat.save(tmp_path / "ckpt", m)
    before = m(X)
    assert not np.array_equal(before, m(X)), "dropout should draw new masks on each call"
    template = nnx.eval_shape(lambda: Net(seed=9)) if like == "eval_shape" else Net(seed=9)
    restored = jaxflat.load(tmp_path / "ckpt", like=template)
    np.testing.assert_array_equal(restored(X), before)


# ------------------------------------------------------------ overwrite


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    with pytest.raises(FileExistsError, match=esc(path)):
        jaxflat.save(path, {"w": jnp.zeros(2)})
    np.testing.assert_array_equal(jaxflat.load(path)["w"], np.ones(2))


def test_save_overwrite_replaces(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    jaxflat.save(path, {"v": jnp.zeros(3), "n": 1}, overwrite=True)
    assert_exact(jaxflat.load(path), {"n": 1, "v": jnp.zeros(3)})


def test_save_leaves_only_the_checkpoint(tmp_path):
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.ones(2)})
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.zeros(2)}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ------------------------------------------------------------ like: dtypes, devices, shardings


def test_like_from_jax_eval_shape_sets_dtype(tmp_path):
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.arange(4.0)})
    like = jax.eval_shape(lambda: {"w": jnp.zeros(4, jnp.bfloat16)})
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], jnp.arange(4.0, dtype=jnp.bfloat16))


def test_like_from_nnx_eval_shape_sets_dtype(tmp_path):
    jaxflat.save(tmp_path / "ckpt", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    like = nnx.eval_shape(lambda: nnx.Linear(2, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    assert isinstance(out, nnx.Linear)
    assert out.kernel[...].dtype == jnp.bfloat16 and out.bias[...].dtype == jnp.bfloat16
    assert isinstance(out.kernel[...], jax.Array)


@pytest.mark.parametrize("form", ["array", "abstract"])
def test_like_sets_device(tmp_path, form):
    dev = jax.devices()[2]
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.ones(3)})
    if form == "array":
        like = {"w": jax.device_put(jnp.zeros(3), dev)}
    else:
        like = {
            "w": jax.ShapeDtypeStruct(
                (3,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(dev)
            )
        }
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    assert out["w"].devices() == {dev}
    np.testing.assert_array_equal(out["w"], np.ones(3))


def test_like_sets_named_sharding(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    w = jnp.arange(32.0).reshape(4, 8)
    jaxflat.save(tmp_path / "ckpt", {"w": w, "b": jnp.ones(8)})
    like = {
        "w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding),
        "b": jax.ShapeDtypeStruct((8,), jnp.float32),
    }
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    assert out["w"].sharding == sharding
    assert len(out["w"].addressable_shards) == 8
    np.testing.assert_array_equal(out["w"], w)


def test_like_sets_sharding_of_nnx_model(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "y"))
    m = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    jaxflat.save(tmp_path / "ckpt", m)
    like = nnx.eval_shape(lambda: nnx.Linear(4, 8, rngs=nnx.Rngs(1)))
    like.kernel.set_value(jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding))
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    assert out.kernel[...].sharding == sharding
    np.testing.assert_array_equal(out.kernel[...], m.kernel[...])


# ------------------------------------------------------------ errors


def test_load_missing_path(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=esc(path)):
        jaxflat.load(path)


def test_load_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "plain")):
        jaxflat.load(tmp_path / "plain")


def test_load_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "file").write_text("hello")
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "file")):
        jaxflat.load(tmp_path / "file")


def test_load_unfinished_checkpoint_without_json(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / "jaxflat.json").unlink()
    with pytest.raises(FileNotFoundError, match=esc(path)):
        jaxflat.load(path)


def test_load_checkpoint_without_arrays_folder(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    folder = version(path)
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()
    with pytest.raises(LoadError, match=esc(path) + ".*arrays-.* is missing"):
        jaxflat.load(path)


@pytest.fixture
def orbax_stray_errors(monkeypatch):
    """Catch the "Event loop is closed" errors and "coroutine ... was never
    awaited" warnings that Orbax's abandoned reads sometimes raise through
    ``sys.unraisablehook`` 10-40 ms after a failed restore, so that they land
    in this test instead of the next one."""
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


def _data_files(path):
    return [p for p in version(path).rglob("*") if p.is_file() and p.parent.name == "d"]


def _delete(p):
    p.unlink()


def _truncate_half(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _truncate_all(p):
    p.write_bytes(b"")


@pytest.mark.parametrize(
    "damage", [_delete, _truncate_half, _truncate_all], ids=lambda f: f.__name__[1:]
)
def test_load_damaged_array_files(tmp_path, damage, orbax_stray_errors):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.arange(1000.0), "b": jnp.ones(3)})
    files = _data_files(path)
    assert files, "expected Orbax data files under arrays/"
    for f in files:
        damage(f)
    with pytest.raises((LoadError, FileNotFoundError), match=esc(path)):
        jaxflat.load(path)


def test_load_emptied_arrays_folder(tmp_path, orbax_stray_errors):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.arange(1000.0)})
    for p in sorted(version(path).rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    with pytest.raises((LoadError, FileNotFoundError), match=esc(path)):
        jaxflat.load(path)


def _edit_meta(**changes):
    def edit(text):
        meta = json.loads(text)
        for key, fn in changes.items():
            meta[key] = fn(meta[key])
        return json.dumps(meta)

    return edit


def _set_first_array(field, value):
    def fn(entries):
        entries[0][field] = value
        return entries

    return fn


CORRUPT_JSON = {
    "garbage": lambda t: "\x00\xffnot json",
    "empty": lambda t: "",
    "truncated": lambda t: t[: len(t) // 2],
    "not_an_object": lambda t: "[]",
    "other_format": lambda t: json.dumps({"format": "something-else/9"}),
    "format_only": lambda t: json.dumps({"format": json.loads(t)["format"]}),
    "array_index_out_of_range": lambda t: t.replace('"i":0', '"i":99'),
    "unknown_dtype": _edit_meta(arrays=_set_first_array("dtype", "float99")),
    "unknown_node_type": lambda t: t.replace('"t":"dict"', '"t":"frobnicator"', 1),
}


@pytest.mark.parametrize("corrupt", list(CORRUPT_JSON))
def test_load_corrupt_json(tmp_path, corrupt):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.arange(4.0), "b": jnp.ones(3)})
    meta = path / "jaxflat.json"
    new = CORRUPT_JSON[corrupt](meta.read_text())
    assert new != meta.read_text()
    meta.write_text(new)
    with pytest.raises(LoadError, match=esc(path)):
        jaxflat.load(path)


def test_load_other_model_with_like_lists_key_paths(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(
        path, nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(0)))
    )
    other = nnx.Sequential(
        nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 1, use_bias=False, rngs=nnx.Rngs(0))
    )
    with pytest.raises(LoadError, match=esc(path)) as info:
        jaxflat.load(path, like=other)
    msg = str(info.value)
    assert ".layers[0].kernel" in msg and "(2, 3)" in msg and "(2, 4)" in msg
    assert ".layers[1].kernel" in msg
    assert ".layers[0].bias" in msg


def test_load_other_model_with_like_missing_and_extra_names(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(LoadError, match=r"'b'(.|\n)*'c'|'c'(.|\n)*'b'"):
        jaxflat.load(path, like={"a": jnp.ones(2), "c": jnp.ones(2)})


def test_load_key_of_other_impl_with_like(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"k": jax.random.key(0, impl="rbg")})
    with pytest.raises(LoadError, match=esc("['k']")):
        jaxflat.load(path, like={"k": jax.random.key(1, impl="threefry2x32")})


def test_nothing_is_pickled(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"m": trained_net(), "k": jax.random.key(0), "n": 3, "s": "x", "t": (None,)})
    names = [p.name.lower() for p in path.rglob("*")]
    assert not [
        n for n in names if n.endswith((".pkl", ".pickle", ".npy", ".npz")) or "pickle" in n
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", refuse)
    out = jaxflat.load(path)
    assert out["n"] == 3 and out["s"] == "x" and out["t"] == (None,)


# ------------------------------------------------------------ overwrite only replaces a checkpoint


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_refuses_a_plain_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("the user's data")
    with pytest.raises(FileExistsError, match=esc(path) + ".*is a file, not a jaxflat checkpoint"):
        jaxflat.save(path, {"w": jnp.ones(2)}, overwrite=True)
    assert path.read_text() == "the user's data"
    assert _listing(tmp_path) == ["afile"]


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match=esc(path) + r".*not a jaxflat checkpoint \(it holds notes.txt\)"
    ):
        jaxflat.save(path, {"w": jnp.ones(2)}, overwrite=True)
    assert (path / "notes.txt").read_text() == "keep me"
    assert _listing(tmp_path) == ["results", "results/notes.txt"]


def test_overwrite_refuses_a_checkpoint_holding_other_files(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"it holds notes.txt"):
        jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    assert (path / "notes.txt").read_text() == "keep me"
    np.testing.assert_array_equal(jaxflat.load(path)["w"], np.ones(2))


def test_overwrite_refuses_a_symbolic_link(tmp_path):
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.ones(2)})
    (tmp_path / "latest").symlink_to(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match=esc(tmp_path / "latest") + ".*symbolic link"):
        jaxflat.save(tmp_path / "latest", {"w": jnp.zeros(2)}, overwrite=True)
    assert (tmp_path / "latest").is_symlink()
    np.testing.assert_array_equal(jaxflat.load(tmp_path / "latest")["w"], np.ones(2))


def test_overwrite_replaces_an_empty_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    jaxflat.save(tmp_path / "ckpt", {"w": jnp.ones(2)}, overwrite=True)
    np.testing.assert_array_equal(jaxflat.load(tmp_path / "ckpt")["w"], np.ones(2))


def test_save_removes_what_killed_saves_left(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / ("arrays-" + "0" * 32 + ".orbax-checkpoint-tmp-1")).mkdir()  # killed in Orbax
    (path / ("arrays-" + "1" * 32)).mkdir()  # killed before its commit
    (path / ".jaxflat.json.tmp-abc").write_text("{")  # killed while writing the pointer
    np.testing.assert_array_equal(jaxflat.load(path)["w"], np.ones(2))
    jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    assert _listing(tmp_path) == [
        "ckpt",
        "ckpt/.jaxflat.lock",
        *_listing_of_version(path),
        "ckpt/jaxflat.json",
    ]


def _listing_of_version(path):
    v = version(path)
    return sorted(str(p.relative_to(path.parent)) for p in [v, *v.rglob("*")])


def test_threads_saving_to_one_path_take_turns(tmp_path):
    import threading

    path = tmp_path / "ckpt"
    errors = []

    def saves(v):
        try:
            for _ in range(3):
                jaxflat.save(path, {"v": v, "w": jnp.full(64, v)}, overwrite=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=saves, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    got = jaxflat.load(path)
    assert np.unique(np.asarray(got["w"])).tolist() == [got["v"]]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ------------------------------------------------------------ failed saves clean up


NO_SPACE = (
    'RESOURCE_EXHAUSTED: Error writing "a0/0.0" in OCDBT database at local file '
    '"/x/arrays.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 3634901 bytes '
    "to file 4: No space left on device [os_error_code='28']"
)


def _fail_orbax_save(monkeypatch, exc):
    import orbax.checkpoint as ocp

    def save(self, directory, *args, **kwargs):
        directory.mkdir(parents=True)  # as if Orbax had started writing
        (directory / "partial").write_bytes(b"x" * 100)
        raise exc

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save)


def _assert_old_checkpoint_only(tmp_path):
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[0] == ".jaxflat.lock" and names[2] == "jaxflat.json" and len(names) == 3, names
    np.testing.assert_array_equal(jaxflat.load(tmp_path / "ckpt")["w"], np.ones(2))


def test_disk_full_in_orbax_is_a_plain_error_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    _fail_orbax_save(monkeypatch, ValueError(NO_SPACE))
    with pytest.raises(OSError, match="no space left on device while writing " + esc(path)) as info:
        jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_old_checkpoint_only(tmp_path)


def test_disk_full_writing_the_json_is_a_plain_error_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})

    def write(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from jaxflat import _store

    monkeypatch.setattr(_store.os, "replace", write)
    with pytest.raises(OSError, match="no space left on device while writing " + esc(path)):
        jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    monkeypatch.undo()
    _assert_old_checkpoint_only(tmp_path)


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_any_failed_save_cleans_up(tmp_path, monkeypatch, exc):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    _fail_orbax_save(monkeypatch, exc)
    with pytest.raises(type(exc), match="boom" if str(exc) else None):
        jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    monkeypatch.undo()
    _assert_old_checkpoint_only(tmp_path)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_orbax_save(monkeypatch, ValueError(NO_SPACE))
    with pytest.raises(OSError, match="no space left on device"):
        jaxflat.save(tmp_path / "ckpt", {"w": jnp.zeros(2)})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ arrays Orbax cannot store


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((0,), np.float32),
        np.zeros((3, 0), np.int64),
        jnp.zeros((0, 4)),
        jnp.zeros((2, 0, 3), jnp.bfloat16),
        jax.random.split(jax.random.key(0), 0),
    ],
    ids=lambda x: f"{type(x).__name__}-{x.shape}",
)
def test_round_trip_zero_size_arrays(tmp_path, x):
    tree = {"e": x, "w": jnp.ones(2)}
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt", like=tree), tree)


def test_round_trip_only_zero_size_arrays(tmp_path):
    tree = {"e": jnp.zeros((0, 2))}
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


def test_zero_size_array_takes_like_sharding(tmp_path):
    dev = jax.devices()[3]
    jaxflat.save(tmp_path / "ckpt", {"e": jnp.zeros((0, 2))})
    out = jaxflat.load(
        tmp_path / "ckpt", like={"e": jax.device_put(jnp.zeros((0, 2), jnp.bfloat16), dev)}
    )
    assert out["e"].devices() == {dev} and out["e"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "x, what",
    [
        (np.array([1, "a"], dtype=object), "object"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), "structured"),
        (np.array(["ab", "c"]), "str"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
    ],
    ids=["object", "structured", "str", "datetime"],
)
def test_unstorable_numpy_arrays_are_a_type_error_naming_the_key_path(tmp_path, x, what):
    with pytest.raises(
        TypeError,
        match=esc("save: ['layers'][1]['x']: cannot store a numpy array of dtype " + what),
    ):
        jaxflat.save(tmp_path / "ckpt", {"layers": [{}, {"x": x, "w": jnp.ones(2)}]})
    assert list(tmp_path.iterdir()) == []


def test_load_like_with_numpy_scalar_leaf(tmp_path):
    x = {"s": np.float32(2.0), "w": jnp.ones(2)}
    jaxflat.save(tmp_path / "ckpt", x)
    out = jaxflat.load(tmp_path / "ckpt", like=x)
    assert float(out["s"]) == 2.0
    np.testing.assert_array_equal(out["w"], np.ones(2))


# ------------------------------------------------------------ malformed jaxflat.json


def _tree_nested(depth, kind):
    if kind == "list":
        return '{"t": "list", "v": [' * depth + '{"t": "none"}' + "]}" * depth
    return '{"t": "dict", "k": [["str", "a"]], "v": [' * depth + '{"t": "none"}' + "]}" * depth


@pytest.mark.parametrize("depth", [10**4, 10**5])
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_load_deeply_nested_json_is_a_load_error(tmp_path, depth, kind):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    meta = json.loads((path / "jaxflat.json").read_text())
    text = json.dumps({**meta, "tree": "@"}).replace('"@"', _tree_nested(depth, kind))
    (path / "jaxflat.json").write_text(text)  # too deep to parse: found before the hash is checked
    with pytest.raises(LoadError, match=esc(path / "jaxflat.json") + ".*nested too deeply"):
        jaxflat.load(path)


def test_load_nested_tree_without_recursion(tmp_path):
    tree = {"w": jnp.ones(2)}
    for i in range(150):
        tree = [tree, i] if i % 2 else {"k": tree}
    jaxflat.save(tmp_path / "ckpt", tree)
    assert_exact(jaxflat.load(tmp_path / "ckpt"), tree)


def _first_array_node(meta):
    stack = [meta["tree"]]
    while stack:
        node = stack.pop()
        if node.get("t") == "array":
            return node
        stack.extend(node.get("v", []) if isinstance(node.get("v"), list) else [])
    raise AssertionError("no array node")


def _set(getter, field, value):
    def fn(meta):
        getter(meta)[field] = value

    return fn


def _entry0(meta):
    return meta["arrays"][0]


MALFORMED = {
    "index_minus_one": (_set(_first_array_node, "i", -1), "array index -1 out of range"),
    "index_true": (_set(_first_array_node, "i", True), "array index True out of range"),
    "index_out_of_range": (_set(_first_array_node, "i", 2), "array index 2 out of range"),
    "index_string": (_set(_first_array_node, "i", "0"), "array index '0' out of range"),
    "keys_longer_than_values": (
        _set(lambda m: m["tree"], "k", [["str", "b"], ["str", "w"], ["str", "x"]]),
        "dict node with 3 keys and 2 values",
    ),
    "values_not_a_list": (_set(lambda m: m["tree"], "v", {"a": 1}), "without a list of values"),
    "bad_key_type": (
        _set(lambda m: m["tree"], "k", [["float", 1.5], ["str", "w"]]),
        "bad dict key",
    ),
    "int_key_as_bool": (
        _set(lambda m: m["tree"], "k", [["int", True], ["str", "w"]]),
        "bad dict key",
    ),
    "repeated_keys": (
        _set(lambda m: m["tree"], "k", [["str", "w"], ["str", "w"]]),
        "repeated keys",
    ),
    "node_without_type": (
        _set(lambda m: m["tree"]["v"][0], "t", None),
        r"a node without a type at \['b'\]",
    ),
    "unknown_node_type": (
        _set(lambda m: m["tree"], "t", "frobnicator"),
        "unknown node type 'frobnicator'",
    ),
    "node_not_an_object": (
        lambda m: m["tree"]["v"].__setitem__(0, 3),
        r"without a type at \['b'\]",
    ),
    "int_value_string": (
        lambda m: (
            m["tree"]["v"].append({"t": "int", "v": "7"}) or m["tree"]["k"].append(["str", "z"])
        ),
        "bad int value '7'",
    ),
    "int_value_bool": (
        lambda m: (
            m["tree"]["v"].append({"t": "int", "v": True}) or m["tree"]["k"].append(["str", "z"])
        ),
        "bad int value True",
    ),
    "float_value_junk": (
        lambda m: (
            m["tree"]["v"].append({"t": "float", "v": "1e5x"})
            or m["tree"]["k"].append(["str", "z"])
        ),
        "bad float value",
    ),
    "negative_shape": (_set(_entry0, "shape", [-3]), "shape .* is not a list of non-negative ints"),
    "float_shape": (_set(_entry0, "shape", [3.0]), "shape .* is not a list of non-negative ints"),
    "bool_shape": (
        _set(_entry0, "stored_shape", [True]),
        "stored_shape .* is not a list of non-negative ints",
    ),
    "shape_not_a_list": (_set(_entry0, "shape", 3), "shape 3 is not a list"),
    "stored_shape_differs": (_set(_entry0, "stored_shape", [4]), r"stored as \(4,\)"),
    "object_dtype": (_set(_entry0, "dtype", "object"), "dtype 'object' is not a numeric dtype"),
    "unknown_dtype": (_set(_entry0, "dtype", "float99"), "dtype 'float99' is not a numeric dtype"),
    "unknown_kind": (_set(_entry0, "kind", "torch"), "kind 'torch'"),
    "unknown_key_impl": (
        lambda m: _entry0(m).update(kind="key", impl="nope", dtype="key"),
        "unknown PRNG implementation 'nope'",
    ),
    "entry_not_an_object": (
        lambda m: m["arrays"].__setitem__(0, [1]),
        "array entry 0 is not an object",
    ),
    "arrays_not_a_list": (lambda m: m.__setitem__("arrays", {}), "no list of arrays"),
    "no_tree": (lambda m: m.pop("tree"), "no tree"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_load_malformed_json_names_the_file(tmp_path, case):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.arange(3.0), "b": np.ones(2)})
    edit, message = MALFORMED[case]
    meta = path / "jaxflat.json"
    edited = json.loads(meta.read_text())
    edit(edited)
    rewrite_meta(path, edited)
    with pytest.raises(LoadError, match=esc(meta) + ": corrupt jaxflat.json: .*" + message):
        jaxflat.load(path)
