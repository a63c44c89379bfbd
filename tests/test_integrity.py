"""Checkpoints that prove they are intact, and the adversarial findings of issue 15."""

import enum
import errno
import json
import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflat
from jaxflat import LoadError, _codec, _store
from jaxflat.__main__ import main


def version(path):
    return path / json.loads((path / "jaxflat.json").read_text())["version"]


def random_tree(n=4, size=4096):
    """Arrays of random bits: incompressible, so their bytes lie verbatim in Orbax's files."""
    rng = np.random.default_rng(0)
    return {
        f"layer{i}": {"w": jnp.asarray(rng.integers(0, 2**32, size, dtype=np.uint32))}
        for i in range(n)
    }


def _where_stored(path, x):
    """(file, offset) of the array ``x``'s bytes in the checkpoint's data files."""
    needle = np.asarray(x).tobytes()[256:320]
    for f in version(path).rglob("*"):
        if f.is_file():
            at = f.read_bytes().find(needle)
            if at >= 0:
                return f, at + 32
    raise AssertionError("array bytes not found in the data files")


def _flip(file, offset, bit):
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


@pytest.fixture
def orbax_stray_errors(monkeypatch):
    """Orbax's abandoned reads of a damaged file may raise "Event loop is
    closed" through sys.unraisablehook later; keep them in this test."""
    import sys
    import time

    previous = sys.unraisablehook

    def hook(args):
        e = args.exc_value
        if not (
            (isinstance(e, RuntimeError) and "Event loop is closed" in str(e))
            or (isinstance(e, RuntimeWarning) and "was never awaited" in str(e))
        ):
            previous(args)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    yield
    time.sleep(0.2)


def test_a_bit_flip_in_each_array_is_detected_every_time(tmp_path, orbax_stray_errors):
    path = tmp_path / "ckpt"
    tree = random_tree()
    jaxflat.save(path, tree)
    for name, layer in tree.items():
        file, offset = _where_stored(path, layer["w"])
        original = file.read_bytes()
        for bit in (0, 3, 7):
            _flip(file, offset + 17 * bit, bit)
            with pytest.raises(LoadError, match=re.escape(f"['{name}']['w']")) as info:
                jaxflat.load(path)
            assert "1 damaged array" in str(info.value), str(info.value)
            file.write_bytes(original)
    jaxflat.load(path)  # intact again


def test_verify_false_skips_the_check(tmp_path):
    path = tmp_path / "ckpt"
    tree = random_tree(1)
    jaxflat.save(path, tree)
    file, offset = _where_stored(path, tree["layer0"]["w"])
    _flip(file, offset, 5)
    got = jaxflat.load(path, verify=False)  # the damage is real: values differ
    assert not np.array_equal(got["layer0"]["w"], tree["layer0"]["w"])
    with pytest.raises(LoadError, match="do not match the hash saved with it"):
        jaxflat.load(path)


def test_a_bit_flip_with_like_and_other_dtype_is_detected(tmp_path):
    path = tmp_path / "ckpt"
    tree = random_tree(2)
    jaxflat.save(path, tree)
    file, offset = _where_stored(path, tree["layer1"]["w"])
    _flip(file, offset, 1)
    like = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
    with pytest.raises(LoadError, match=re.escape("['layer1']['w']")):
        jaxflat.load(path, like=like)


def test_every_bit_flip_in_the_description_is_detected(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(
        path, {"a": jnp.ones(3), "b": {1: np.arange(2.0)}, "n": 7, "s": "x", "k": jax.random.key(0)}
    )
    data = (path / "jaxflat.json").read_bytes()
    parse = jaxflat._checkpoint._parser(path, True)
    missed = []
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                parse(bytes(flipped).decode())
            except (UnicodeDecodeError, LoadError):
                continue  # read_text turns a decode error into a LoadError
            missed.append((i, bit))
    assert not missed, f"{len(missed)} of {8 * len(data)} flips loaded: {missed[:5]}"


@pytest.mark.parametrize("at", [0.3, 0.7])
def test_a_flipped_description_fails_the_load(tmp_path, at):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"a": jnp.ones(3), "b": jnp.zeros(2)})
    meta = path / "jaxflat.json"
    data = bytearray(meta.read_bytes())
    data[int(len(data) * at)] ^= 1
    meta.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=re.escape(str(meta))):
        jaxflat.load(path)


def test_a_missing_data_file_names_the_arrays(tmp_path, orbax_stray_errors):
    path = tmp_path / "ckpt"
    jaxflat.save(path, random_tree(2))
    for f in version(path).rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    with pytest.raises(LoadError, match=r"(?s)damaged.*\['layer0'\]\['w'\].*\['layer1'\]\['w'\]"):
        jaxflat.load(path)


def test_cli_verify(tmp_path, capsys):
    path = tmp_path / "ckpt"
    tree = random_tree(3)
    jaxflat.save(path, tree)
    assert main(["verify", str(path)]) == 0
    assert "every array matches" in capsys.readouterr().out
    for name in ("layer0", "layer2"):
        file, offset = _where_stored(path, tree[name]["w"])
        _flip(file, offset, 2)
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("damaged: ") for line in out), out
    assert "['layer0']['w']" in out[0] and "['layer2']['w']" in out[1]


def test_cli_verify_of_no_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and not err.startswith("error: load:")


# ------------------------------------------------------------ threads, keys, fsync


def test_eight_threads_save_to_eight_paths(tmp_path):
    errors, barrier = [], threading.Barrier(8)

    def run(i):
        try:
            barrier.wait()
            for _ in range(2):
                jaxflat.save(tmp_path / f"c{i}", {"i": i, "w": jnp.full(256, i)}, overwrite=True)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for i in range(8):
        got = jaxflat.load(tmp_path / f"c{i}")
        assert got["i"] == i and np.unique(np.asarray(got["w"])).tolist() == [i]


class Color(str, enum.Enum):  # noqa: UP042 - the reported case: a str Enum (StrEnum's str() differs)
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_str_and_int_subclass_keys_are_saved_as_plain_keys(tmp_path):
    tree = {
        "s": {np.str_("a"): jnp.ones(1), Color.RED: 1, "plain": Color.RED},
        "i": {Level.HIGH: {"x": 2.0}},
    }
    jaxflat.save(tmp_path / "ckpt", tree)
    got = jaxflat.load(tmp_path / "ckpt")
    assert got == {"s": {"a": got["s"]["a"], "red": 1, "plain": "red"}, "i": {3: {"x": 2.0}}}
    assert [type(k) for k in [*got["s"], *got["i"]]] == [str, str, str, int]
    assert type(got["s"]["plain"]) is str
    out = jaxflat.load(tmp_path / "ckpt", like=tree)  # and back into the tree with subclass keys
    assert out["i"][Level.HIGH]["x"] == 2.0


def test_keys_with_dots_and_slashes_are_orbax_names(tmp_path):
    tree = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(3)}, "../x": jnp.ones(1), "": jnp.ones(4)}
    jaxflat.save(tmp_path / "ckpt", tree)
    got = jaxflat.load(tmp_path / "ckpt")
    for k in tree:
        np.testing.assert_array_equal(jax.tree.leaves(got[k]), jax.tree.leaves(tree[k]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_every_file_is_fsynced_before_the_commit(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    synced, committed = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    def replace(a, b, **kw):
        if str(b).endswith("jaxflat.json"):
            committed.append(set(synced))
        real_replace(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    jaxflat.save(path, {"w": jnp.zeros(2), "v": np.ones((3, 3))}, overwrite=True)
    monkeypatch.undo()
    folder = version(path)
    files = [folder, *folder.rglob("*")]
    names = {p.name for p in files}
    assert {"_METADATA", "array_metadatas", "manifest.ocdbt"} <= names, names
    before = committed[0]
    missing = [
        str(p.relative_to(path)) for p in files if (p.stat().st_dev, p.stat().st_ino) not in before
    ]
    assert not missing, f"not fsynced before the commit: {missing}"


# ------------------------------------------------------------ reading the description safely


def test_description_linked_to_dev_zero_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / "jaxflat.json").unlink()
    (path / "jaxflat.json").symlink_to("/dev/zero")
    with pytest.raises((LoadError, FileNotFoundError), match=re.escape(str(path))):
        jaxflat.load(path)


def test_description_that_is_a_fifo_does_not_hang(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    (path / "jaxflat.json").unlink()
    os.mkfifo(path / "jaxflat.json")
    with pytest.raises(LoadError, match="not a regular file"):
        _store.read_text(path / "jaxflat.json")
    with pytest.raises((LoadError, FileNotFoundError), match=re.escape(str(path))):
        jaxflat.load(path)


def test_description_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    monkeypatch.setattr(_store, "MAX_META_BYTES", 100)
    monkeypatch.setattr(_store.read_text, "__defaults__", (100,))
    with pytest.raises(LoadError, match="more than the 100"):
        jaxflat.load(path)


def test_version_folder_that_is_a_link_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})
    folder = version(path)
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LoadError, match="not a folder"):
        jaxflat.load(path)


def test_key_without_impl_is_a_load_error(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"k": jax.random.key(0)})
    meta = json.loads((path / "jaxflat.json").read_text())
    del meta["arrays"][0]["impl"]
    del meta["sha256"]
    (path / "jaxflat.json").write_text(_codec.dumps(meta))
    with pytest.raises(LoadError, match="without its implementation"):
        jaxflat.load(path)


def test_full_disk_while_committing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    jaxflat.save(path, {"w": jnp.ones(2)})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_store.os, "fsync", fsync)
    with pytest.raises(OSError, match="no space left on device"):
        jaxflat.save(path, {"w": jnp.zeros(2)}, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(jaxflat.load(path)["w"], np.ones(2))
    assert len(list(path.iterdir())) == 3


@pytest.mark.parametrize("spec", [("a", "b"), (None, "b"), ("b", None)])
def test_hash_of_a_sharded_array_streams_rows_and_equals_the_whole(monkeypatch, spec):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    x = jnp.arange(64 * 24, dtype=jnp.float32).reshape(64, 24)
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    monkeypatch.setattr(_codec, "HASH_BLOCK", 24 * 4 * 5)  # 5 rows a block: 13 blocks
    assert _codec.digest(sharded) == _codec.digest(np.asarray(x))


def test_a_sharded_load_is_verified(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    path = tmp_path / "ckpt"
    tree = {
        "w": jnp.asarray(np.random.default_rng(1).integers(0, 2**32, (64, 128), dtype=np.uint32))
    }
    jaxflat.save(path, tree)
    like = {"w": jax.ShapeDtypeStruct((64, 128), jnp.uint32, sharding=sharding)}
    assert jaxflat.load(path, like=like)["w"].sharding == sharding
    file, offset = _where_stored(path, tree["w"])
    _flip(file, offset, 4)
    with pytest.raises(LoadError, match=re.escape("['w']")):
        jaxflat.load(path, like=like)


def _hash(*pieces):
    h = _codec.Hasher()
    for p in pieces:
        h.update(p)
    return h.digest()


def test_hash_of_pieces_equals_hash_of_the_whole():
    rng = np.random.default_rng(0)
    whole = rng.standard_normal(3 * _codec.SEGMENT + 12345).astype(np.float32).view(np.uint8)
    cuts = np.sort(rng.integers(0, whole.size, 25))
    assert _hash(*np.split(whole, cuts)) == _hash(whole) == _codec.digest(whole)


def test_hash_sees_every_single_bit_flip():
    x = np.random.default_rng(1).standard_normal(37).astype(np.float16).view(np.uint8)
    base = _hash(x)
    for i in range(x.size):
        for bit in range(8):
            y = x.copy()
            y[i] ^= 1 << bit
            assert _hash(y) != base, (i, bit)


def test_hash_sees_moved_data_and_length():
    rng = np.random.default_rng(2)
    m = rng.standard_normal((32, 32)).astype(np.float32)
    assert _codec.digest(m) != _codec.digest(np.ascontiguousarray(m.T))
    big = rng.standard_normal((3, 2 * _codec.SEGMENT)).astype(np.float32)
    assert _codec.digest(big) != _codec.digest(big[[1, 0, 2]])  # two segments swapped
    assert _hash(np.zeros(3, np.uint8)) != _hash(np.zeros(4, np.uint8))


def test_hash_keys_are_fixed():  # a checkpoint written today verifies with any numpy
    assert int(_codec._splitmix64(2)[1]) == 0x6E789E6AA1B965F5
    assert _codec.digest(np.arange(10, dtype=np.float32)) == 0x96E5684023636348
