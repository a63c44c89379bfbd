"""The eager engine: every path gives the bits of the traced path; compiles
happen only for structures called in a loop, synchronously, bounded."""

import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflat
from jaxflat import _destructure, _engine


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test meets its structures for the first time."""
    _destructure._clear_caches()
    yield
    _destructure._clear_caches()


def tree_of(n, dtype=jnp.float32):
    return {f"l{i:05d}": jnp.arange(i % 5 + 1, dtype=dtype) * (i + 1) / 7 for i in range(n)}


@pytest.fixture
def compile_at_once(monkeypatch):
    """Programs are compiled on the first host call."""
    monkeypatch.setattr(_engine, "COMPILE_AT_CALL", 1)


@pytest.mark.parametrize("n", [3, 300, 1100])  # XLA's split / one callback chunk / two
def test_every_path_is_bit_identical_to_the_traced_path(n, monkeypatch, compile_at_once):
    monkeypatch.setattr(_engine, "CALLBACK_CHUNK", 1024)
    tree = tree_of(n)
    flat, re = jaxflat.destructure(tree)
    want_flat = jax.jit(lambda t: jaxflat.destructure(t)[0])(tree)
    want = jax.jit(lambda v: re(v))(flat)
    for _ in range(3):  # the host path, then the compiled programs
        np.testing.assert_array_equal(jaxflat.destructure(tree)[0], want_flat)
        got = re(flat)
        for k in tree:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
    engine = re._plan.engine
    assert engine.concat is not None and engine.cutter is not None
    xla_split = isinstance(engine.cutter[2], jax.stages.Compiled)
    assert xla_split == (n <= _engine.XLA_SPLIT_MAX_LEAVES)


def test_programs_are_compiled_on_a_structures_fourth_call_not_before():
    assert _engine.COMPILE_AT_CALL == 4
    tree = tree_of(50)
    flat, re = jaxflat.destructure(tree)
    engine = re._plan.engine
    for _ in range(2):
        jaxflat.destructure(tree)
    for _ in range(3):
        re(flat)
    assert engine.concat is None and engine.cutter is None
    assert engine.host_calls == {"concat": 3, "split": 3}
    np.testing.assert_array_equal(jaxflat.destructure(tree)[0], flat)  # the 4th: compiles
    assert engine.concat is not None and engine.cutter is None
    out = re(flat)
    assert engine.cutter is not None
    np.testing.assert_array_equal(out["l00007"], tree["l00007"])
    np.testing.assert_array_equal(jaxflat.destructure(tree)[0], flat)  # the compiled program
    assert engine.host_calls["concat"] == 4


def test_compiled_programs_refuse_other_inputs_and_fall_back(compile_at_once):
    tree = tree_of(20)
    flat, re = jaxflat.destructure(tree)
    re(flat), re(flat), jaxflat.destructure(tree)
    other = jax.device_put(flat, jax.devices()[1])  # another device than compiled for
    out = re(other)
    assert out["l00000"].devices() == {jax.devices()[1]}
    np.testing.assert_array_equal(out["l00003"], tree["l00003"])
    as_int = re(jnp.arange(flat.size))  # another dtype: cast per leaf
    assert as_int["l00001"].dtype == jnp.float32
    moved = {k: jax.device_put(x, jax.devices()[2]) for k, x in tree.items()}
    assert jaxflat.destructure(moved)[0].devices() == {jax.devices()[2]}


def test_rebuilt_leaves_survive_donating_the_flat_vector():
    tree = {"a": jnp.ones((16,)), "b": jnp.full((16,), 2.0)}
    flat, re = jaxflat.destructure(tree)
    v = flat * 1
    out = re(v)  # host path: pieces may alias v's buffer
    before = {k: np.array(x) for k, x in out.items()}
    result = jax.jit(lambda x: x * 0 + 7, donate_argnums=0)(v)
    jax.block_until_ready(result)
    for k in out:
        np.testing.assert_array_equal(out[k], before[k])


def test_large_structures_stay_on_the_host_path(monkeypatch, compile_at_once):
    monkeypatch.setattr(_engine, "HOST_ONLY_BYTES", 1024)
    tree = {"w": jnp.ones((64, 64))}
    flat, re = jaxflat.destructure(tree)
    for _ in range(3):
        jaxflat.destructure(tree), re(flat)
    engine = re._plan.engine
    assert engine.compiles == {"concat": False, "split": False}
    assert engine.concat is None and engine.cutter is None
    np.testing.assert_array_equal(re(flat)["w"], tree["w"])


def test_many_leaves_never_compile_a_concatenate(monkeypatch, compile_at_once):
    monkeypatch.setattr(_engine, "MAX_CONCAT_LEAVES", 10)
    tree = tree_of(11)
    flat, re = jaxflat.destructure(tree)
    for _ in range(3):
        jaxflat.destructure(tree)
    assert re._plan.engine.concat is None and not re._plan.engine.compiles["concat"]


def test_no_thread_is_started(compile_at_once):
    before = threading.active_count()
    for n in (3, 40, 200):
        tree = tree_of(n)
        flat, re = jaxflat.destructure(tree)
        for _ in range(3):
            jaxflat.destructure(tree), re(flat)
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("jaxflat")]


def test_flatten_buffer_is_aligned():
    buf = _engine._aligned(1000, np.float32)
    assert buf.ctypes.data % _engine.ALIGN == 0 and buf.shape == (1000,)


@pytest.mark.parametrize(
    "dtypes, want",
    [
        ((jnp.float8_e4m3fn, jnp.float32), jnp.float32),
        ((jnp.float8_e5m2, jnp.bfloat16), jnp.bfloat16),
        ((jnp.float8_e4m3fn, jnp.float8_e5m2), jnp.float32),
        ((jnp.float8_e4m3fn, jnp.float8_e4m3fn), jnp.float8_e4m3fn),
        ((jnp.bfloat16, jnp.float32), jnp.float32),
        ((), jnp.float32),
    ],
)
def test_flat_dtype_takes_the_widest_float_over_float8(dtypes, want):
    assert _engine.flat_dtype([np.dtype(d) for d in dtypes]) == np.dtype(want)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_of_compiled_programs_stays_bounded_over_many_structures():
    """140 structures, each called until its programs are compiled: past the
    plan cache's size, host memory stops growing (bug: jax's caches kept
    every program compiled from a module-level function, ~1.5 MiB each)."""
    script = textwrap.dedent(
        """
        import jax, jaxflat, numpy as np
        from jaxflat import _engine
        _engine.COMPILE_AT_CALL = 1
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        marks = []
        for n in range(140):
            # numpy via device_put: jnp.asarray would compile per shape itself
            tree = {f"s{n}_{i}": jax.device_put(np.full((n + 1 + i,), n, np.float32)) for i in range(8)}
            flat, re = jaxflat.destructure(tree)
            jax.block_until_ready(re(flat))
            if n in (69, 139):
                marks.append(rss())
        print("growth", marks[1] - marks[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.split()[-1])
    assert growth < 40, f"RSS grew {growth:.0f} MiB over the last 70 structures"
