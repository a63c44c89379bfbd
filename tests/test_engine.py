"""The eager engine: every path gives the bits of the reference; a layout's
programs are compiled only once its host path has cost as much (rent or
buy), synchronously, bounded, and never in a forked process."""

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
from jaxflat import _engine, _layout


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test meets its structures for the first time."""
    jaxflat.clear_caches()
    yield
    jaxflat.clear_caches()


def tree_of(n, dtype=jnp.float32):
    return {f"l{i:05d}": jnp.arange(i % 5 + 1, dtype=dtype) * (i + 1) / 7 for i in range(n)}


@pytest.fixture
def compile_at_once(monkeypatch):
    """Programs are bought on the first host call."""
    monkeypatch.setattr(_engine, "COMPILE_COST", (0.0, 0.0))


def host_of(re):
    return re._layout.state.get("host")


@pytest.mark.parametrize("n", [3, 64, 150])  # one callback / one chunk / three, no concat
def test_every_path_is_bit_identical_to_the_traced_path(n, monkeypatch, compile_at_once):
    monkeypatch.setattr(_engine, "MAX_COMPILE_LEAVES", 64)  # as 2048, but cheaper to compile
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
    host = host_of(re)
    assert (host.concat is not None) == (n <= 64) and host.cutter is not None


def test_programs_are_bought_once_the_host_path_has_cost_their_compile(monkeypatch):
    monkeypatch.setattr(_engine, "COMPILE_COST", (float("inf"), 0.0))
    tree = tree_of(50)
    flat, re = jaxflat.destructure(tree)
    for _ in range(4):
        jaxflat.destructure(tree), re(flat)
    host = host_of(re)
    assert host.concat is None and host.cutter is None
    spent = dict(host.spent)
    assert 0 < spent["concat"] and 0 < spent["split"]
    # a compile that costs what has been spent so far: bought on the next call
    monkeypatch.setattr(_engine, "COMPILE_COST", (spent["concat"], 0.0))
    np.testing.assert_array_equal(jaxflat.destructure(tree)[0], flat)
    assert host.concat is not None and host.cutter is None
    monkeypatch.setattr(_engine, "COMPILE_COST", (host.spent["split"], 0.0))
    out = re(flat)
    assert host.cutter is not None
    np.testing.assert_array_equal(out["l00007"], tree["l00007"])
    before = dict(host.spent)
    np.testing.assert_array_equal(jaxflat.destructure(tree)[0], flat)  # the compiled programs:
    np.testing.assert_array_equal(re(flat)["l00007"], tree["l00007"])
    assert host.spent == before  # no host time spent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_never_compiles_and_does_not_hang():
    """A multiprocessing 'fork' pool: the children use numpy only (XLA cannot
    compile in a forked child: it hung for good on the 4th call, issue 17)."""
    script = textwrap.dedent(
        """
        import multiprocessing as mp
        import jax, jax.numpy as jnp, jaxflat, numpy as np
        from jaxflat import _engine
        _engine.COMPILE_COST = (0.0, 0.0)  # the parent buys at once
        tree = {f"l{i}": jnp.arange(i + 1, dtype=jnp.float32) for i in range(30)}
        flat, re = jaxflat.destructure(tree)
        re(flat); jaxflat.destructure(tree)
        assert re._layout.state["host"].concat is not None  # the parent compiled
        ref = np.asarray(flat)

        def work(k):  # no jnp here: jax's own new programs would hang too
            other = {f"m{i}": jax.device_put(np.full((i + 2,), k, np.float32)) for i in range(20)}
            for _ in range(20):
                v, r = jaxflat.destructure(other)
                back = r(v)
                f, _ = jaxflat.destructure(tree)
            host = r._layout.state["host"]
            return (host.concat is None and host.cutter is None
                    and np.asarray(back["m3"])[0] == k and np.array_equal(np.asarray(f), ref))

        with mp.get_context("fork").Pool(2) as pool:
            print("ok", pool.map(work, range(4)))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        try:  # the pool's children too, should any hang
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-2000:]
    assert "ok [True, True, True, True]" in stdout


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
    host = host_of(re)
    assert host.compiles == {"concat": False, "split": False}
    assert host.concat is None and host.cutter is None
    np.testing.assert_array_equal(re(flat)["w"], tree["w"])


def test_many_leaves_never_compile_a_concatenate(monkeypatch, compile_at_once):
    monkeypatch.setattr(_engine, "MAX_COMPILE_LEAVES", 10)
    tree = tree_of(11)
    flat, re = jaxflat.destructure(tree)
    for _ in range(3):
        jaxflat.destructure(tree)
    assert host_of(re).concat is None and not host_of(re).compiles["concat"]


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
    assert _layout.flat_dtype([np.dtype(d) for d in dtypes]) == np.dtype(want)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_of_compiled_programs_stays_bounded_over_many_structures():
    """140 structures, each called until its programs are compiled: past the
    plan cache's size, host memory stops growing (bug: jax's caches kept
    every program compiled from a module-level function, ~1.5 MiB each)."""
    script = textwrap.dedent(
        """
        import jax, jaxflat, numpy as np
        from jaxflat import _engine
        _engine.COMPILE_COST = (0.0, 0.0)
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
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.split()[-1])
    assert growth < 40, f"RSS grew {growth:.0f} MiB over the last 70 structures"


def _bits(x):
    x = np.asarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}") if x.dtype.kind in "fc" else x


# Repeated sizes, more leaves than one reduce of offsets takes, an empty
# leaf, a scalar; leaves narrower than the vector (cast back).
SPLIT_CASES = [
    (
        [(3,), (2, 2), (3,), (4,), (0,), (), (1, 3)] * 6,
        [jnp.float32, jnp.bfloat16, jnp.float16] * 14,
    ),
    ([(5,)] * (_layout.GROUP + 3) + [(7,)], [jnp.float16] * (_layout.GROUP + 4)),
    ([(2,), (3,)], [jnp.complex64, jnp.float32]),
]


@pytest.mark.parametrize(("shapes", "dtypes"), SPLIT_CASES)
def test_traced_split_is_bit_identical_to_the_reference(shapes, dtypes):
    dtypes = [np.dtype(d) for d in dtypes]
    flat_dtype = _layout.flat_dtype(dtypes)
    n = sum(int(np.prod(s)) for s in shapes)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 6e4, -1e-7], np.float32)
    v = np.resize(np.concatenate([special, np.linspace(-3, 3, 11, dtype=np.float32)]), n)
    if flat_dtype.kind == "c":
        v = v + np.complex64(1j) * np.nan_to_num(v[::-1])
    v = jnp.asarray(v.astype(flat_dtype))
    if flat_dtype == np.float32:  # a NaN with a payload keeps it
        v = v.at[1].set(jax.lax.bitcast_convert_type(np.uint32(0x7FC01234), jnp.float32))
    want = jax.jit(lambda v: _layout.split(v, shapes, dtypes))(v)
    got = jax.jit(lambda v: _layout.split_traced(v, shapes, dtypes))(v)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))
    batch = jnp.stack([v, v[::-1]])
    got = jax.vmap(lambda v: _layout.split_traced(v, shapes, dtypes))(batch)
    want = _layout.split(batch, shapes, dtypes)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_gradient_through_the_traced_split_is_one_concatenate():
    tree = {f"l{i}": {"w": jnp.ones((3, 3)), "b": jnp.ones(3)} for i in range(40)}
    flat, re = jaxflat.destructure(tree)

    def loss(v):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(re(v)))

    g = jax.grad(loss)(flat)
    np.testing.assert_array_equal(g, 2 * flat)
    hlo = jax.jit(jax.grad(loss)).lower(flat).as_text()
    whole = f"-> tensor<{flat.size}xf32>"
    assert sum("stablehlo.concatenate" in ln and whole in ln for ln in hlo.splitlines()) == 1
    assert "stablehlo.pad" not in hlo and "dynamic_update_slice" not in hlo
