"""The eager engine's tiers give the same bits as the traced path."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflat
from jaxflat import _engine


def wait_for_background_compiles():
    _engine._POOL.submit(lambda: None).result(timeout=120)


def tree_of(n, dtype=jnp.float32):
    return {f"l{i:05d}": jnp.arange(i % 5 + 1, dtype=dtype) * (i + 1) / 7 for i in range(n)}


def traced_rebuild(re, v):
    return jax.jit(lambda v: re(v))(v)


@pytest.mark.parametrize("n", [3, 300, 1100])  # xla split / one callback chunk / two chunks
def test_every_tier_is_bit_identical_to_the_traced_path(n, monkeypatch):
    monkeypatch.setattr(_engine, "CALLBACK_CHUNK", 1024)
    tree = tree_of(n)
    flat, re = jaxflat.destructure(tree)
    want_flat = jax.jit(lambda t: jaxflat.destructure(t)[0])(tree)
    want = traced_rebuild(re, flat)
    for call in range(4):  # host path, then the background-compiled programs
        flat_now = jaxflat.destructure(tree)[0]
        got = re(flat)
        np.testing.assert_array_equal(flat_now, want_flat)
        for k in tree:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
        if call == 1:
            wait_for_background_compiles()
    programs = re._plan.programs
    assert programs.concat is not None and programs.split is not None


def test_compiled_programs_refuse_other_inputs_and_fall_back():
    tree = tree_of(20)
    flat, re = jaxflat.destructure(tree)
    re(flat), re(flat), jaxflat.destructure(tree)
    wait_for_background_compiles()
    other = jax.device_put(flat, jax.devices()[1])  # another device than compiled for
    out = re(other)
    assert out["l00000"].devices() == {jax.devices()[1]}
    np.testing.assert_array_equal(out["l00003"], tree["l00003"])
    as_int = re(jnp.arange(flat.size))  # another dtype: cast per leaf
    assert as_int["l00001"].dtype == jnp.float32


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


def test_large_structures_stay_on_the_host_path(monkeypatch):
    monkeypatch.setattr(_engine, "HOST_ONLY_BYTES", 1024)
    tree = {"w": jnp.ones((64, 64))}
    flat, re = jaxflat.destructure(tree)
    for _ in range(3):
        jaxflat.destructure(tree), re(flat)
    wait_for_background_compiles()
    time.sleep(0.01)
    assert re._plan.programs.concat is None and re._plan.programs.split is None
    np.testing.assert_array_equal(re(flat)["w"], tree["w"])


def test_flatten_buffer_is_aligned():
    buf = _engine._aligned(1000, np.float32)
    assert buf.ctypes.data % _engine.ALIGN == 0 and buf.shape == (1000,)
