"""Regression tests for the core rewrite (issue 9) and the silent mistakes of
issue 10: caches that never change an answer, bounded memory, no threads,
clear errors."""

import dataclasses
import re
import subprocess
import sys
import textwrap
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_equal

import jaxflat
from jaxflat import _layout, _walk
from jaxflat._errors import LoadError

esc = re.escape


# ------------------------------------------------------------ ties after a cache hit


class Raw(nnx.Module):
    def __init__(self):
        self.w = nnx.data(jnp.ones(3))


class Holder(nnx.Module):
    def __init__(self, a, b):
        self.a = a
        self.b = b


def test_ties_are_found_after_a_cache_hit_of_the_untied_structure():
    flat, _ = jaxflat.destructure(Holder(Raw(), Raw()))
    assert flat.shape == (6,)
    s = Raw()
    flat, re_ = jaxflat.destructure(Holder(s, s))
    assert flat.shape == (3,)
    out = re_(jnp.arange(3.0))
    assert out.a is out.b
    np.testing.assert_array_equal(out.a.w, [0, 1, 2])
    # and back: the untied tree after the tied one
    flat, re_ = jaxflat.destructure(Holder(Raw(), Raw()))
    assert flat.shape == (6,)
    out = re_(jnp.arange(6.0))
    assert out.a is not out.b
    np.testing.assert_array_equal(out.b.w, [3, 4, 5])


def test_ties_of_variables_after_a_cache_hit():
    def pair(tied):
        a = nnx.Param(jnp.ones(2))
        return {"x": a, "y": a if tied else nnx.Param(jnp.ones(2))}

    assert jaxflat.destructure(pair(False))[0].shape == (4,)
    assert jaxflat.destructure(pair(True))[0].shape == (2,)
    assert jaxflat.destructure(pair(False))[0].shape == (4,)


# ------------------------------------------------------------ callable trainable rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gate:
    w: jax.Array
    b: jax.Array
    on: jax.Array


def test_callable_trainable_rule_is_asked_on_every_call():
    jaxflat.register_trainable(Gate, lambda g: ["w", "b"] if int(g.on) else ["w"])
    a = Gate(jnp.ones(2), jnp.ones(1), jnp.array(0))
    b = Gate(jnp.ones(2), jnp.ones(1), jnp.array(1))
    assert jaxflat.destructure(a)[0].shape == (2,)
    assert jaxflat.destructure(b)[0].shape == (3,)
    assert jaxflat.destructure(a)[0].shape == (2,)
    assert "3" in jaxflat.summary(b).splitlines()[-1].replace(",", "")
    assert jaxflat.destructure(b)[0].shape == (3,)


# ------------------------------------------------------------ repr


def test_repr_names_this_calls_root():
    jaxflat.destructure(jnp.sin)
    _, re_ = jaxflat.destructure(jnp.ones(3))
    assert repr(re_) == "Restructure(ArrayImpl, ..., 3)"
    _, re_ = jaxflat.destructure(jnp.ones(3))
    assert repr(re_) == "Restructure(ArrayImpl, ..., 3)"


# ------------------------------------------------------------ bounded caches, threads, exit


def _tree(i):
    n = 1 + i % 37
    return {f"k{j}_{i}": jnp.full((1 + j % 3,), float(j), jnp.float32) for j in range(n)}


def test_caches_stay_bounded_over_many_structures():
    jaxflat.clear_caches()
    for i in range(700):
        flat, re_ = jaxflat.destructure(_tree(i))
        re_(flat)
    assert len(_walk._STRUCTURES._items) <= _walk._STRUCTURES.size
    assert len(_layout._LAYOUTS._items) <= _layout._LAYOUTS.size
    assert threading.active_count() == 1


def test_eight_threads_over_many_structures():
    jaxflat.clear_caches()
    trees = [_tree(i) for i in range(600)]
    errors = []

    def work(k):
        try:
            for i in range(k, len(trees), 8):
                t = trees[i]
                flat, re_ = jaxflat.destructure(t)
                assert flat.shape == (sum(x.size for x in t.values()),)
                assert_tree_equal(t, re_(flat))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.slow
def test_a_process_exits_promptly_after_many_structures():
    # Hang detector, not a speed test: before the rewrite a background compile
    # queue kept the interpreter alive for minutes after such a loop.
    code = textwrap.dedent(
        """
        import threading, time, jax.numpy as jnp, jaxflat
        for i in range(400):
            t = {f"k{j}": jnp.ones((1 + j % 3,)) * i for j in range(1 + i % 37)}
            for _ in range(3):
                flat, re = jaxflat.destructure(t)
                re(flat)
        print("threads", threading.active_count(), flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "threads 1" in out.stdout


# ------------------------------------------------------------ mistakes with clear errors (issue 10)


@pytest.mark.parametrize("bad", [None, 3, "Linear", nnx.Linear(1, 1, rngs=nnx.Rngs(0))])
def test_register_leaf_refuses_non_classes(bad):
    with pytest.raises(TypeError, match="class"):
        jaxflat.register_leaf(bad)
    assert jaxflat.destructure({"w": jnp.ones(2)})[0].shape == (2,)


def test_destructure_of_a_class_is_a_type_error():
    with pytest.raises(TypeError, match="class flax.nnx.*Linear.*instance"):
        jaxflat.destructure(nnx.Linear)


def test_register_trainable_with_a_misspelt_child_names_the_children():
    jaxflat.register_trainable(eqx.nn.Linear, ["wieght"])
    lin = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="'wieght' is not a child of .*Linear.*weight.*bias"):
        jaxflat.destructure(lin)


def test_loadmodel_with_swapped_arguments_suggests_the_swap():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(LoadError, match="swapped"):
        jaxflat.loadmodel(jaxflat.state(model), model)


def test_re_of_a_model_is_a_short_error():
    model = nnx.Sequential(*[nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(4)])
    flat, re_ = jaxflat.destructure(model)
    with pytest.raises(
        ValueError, match=r"expected a flat vector of shape \(288,\), got a Sequential"
    ) as e:
        re_(model)
    assert len(str(e.value)) < 200
    with pytest.raises(ValueError, match=r"vmap"):
        re_(jnp.ones((2, 288)))


def test_single_device_flat_for_a_model_sharded_over_a_mesh():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    P = jax.sharding.PartitionSpec
    tree = {
        "a": jax.device_put(jnp.arange(16.0), jax.NamedSharding(mesh, P("x"))),
        "b": jax.device_put(jnp.ones((8, 2)), jax.NamedSharding(mesh, P("x", None))),
    }
    d = jax.devices()[3]
    flat, re_ = jaxflat.destructure(tree, sharding=jax.sharding.SingleDeviceSharding(d))
    assert flat.sharding.device_set == {d}
    np.testing.assert_array_equal(flat, np.concatenate([np.arange(16.0), np.ones(16)]))
    out = re_(flat)
    for k in tree:
        assert out[k].sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), k
        np.testing.assert_array_equal(out[k], tree[k])


def test_loadmodel_tied_bias_from_a_zero_and_a_missing_bias_agree():
    dst = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    holder = nnx.List([dst, dst])
    src = [
        {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
        {"kernel": jnp.ones((2, 2)), "bias": None},
    ]
    out = jaxflat.loadmodel(holder, src)
    assert out[0] is out[1]
    np.testing.assert_array_equal(out[0].bias[...], np.zeros(2))
    np.testing.assert_array_equal(out[0].kernel[...], np.ones((2, 2)))
    src[0]["bias"] = jnp.ones(2)
    with pytest.raises(LoadError, match="bias"):
        jaxflat.loadmodel(holder, src)


def test_loadmodel_and_load_with_numpy_scalar_leaves(tmp_path):
    x = {"s": np.float32(2.0), "w": jnp.ones(2)}
    out = jaxflat.loadmodel(x, jaxflat.state(x))
    assert out["s"] == np.float32(2.0)


# ------------------------------------------------------------ stateful training in jit (issue 10.15)


def test_a_jitted_step_returning_a_new_re_compiles_once():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    import optax

    x = jax.random.normal(jax.random.key(1), (16, 3))
    v, re_ = jaxflat.destructure(Net(nnx.Rngs(0)))
    opt = optax.adam(1e-2)  # its count starts uncommitted: so must v and re (issue 17)
    opt_state = opt.init(v)
    traces, compiles, listening = [], [], [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, fun_name="", **kw: (
            compiles.append(fun_name)
            if listening and event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )

    @jax.jit
    def step(v, re_, opt_state):
        traces.append(1)

        def loss(v):
            m = re_(v)
            return jnp.mean(m(x) ** 2), m

        (_, m), g = jax.value_and_grad(loss, has_aux=True)(v)
        v2, re2 = jaxflat.destructure(m)
        updates, opt_state = opt.update(g, opt_state, v2)
        return optax.apply_updates(v2, updates), re2, opt_state

    means, counts = [], []
    for _ in range(4):
        v, re_, opt_state = step(v, re_, opt_state)
        m = re_(v)
        means.append(np.asarray(m.bn.mean[...]))
        counts.append(int(m.drop.rngs.count[...]))
    listening.clear()
    assert len(traces) == 1
    assert compiles.count("jit(step)") == 1  # XLA compiles, not only Python traces
    assert not np.array_equal(means[0], means[-1])  # statistics move
    assert counts == [1, 2, 3, 4]  # a new dropout key every step


def test_mutable_memo_follows_isinstance_for_proxies_and_plain_objects():
    from jaxflat import _predicates

    class Proxy:  # claims its target's class, as wrapt's proxies do
        def __init__(self, target):
            self._target = target

        @property
        def __class__(self):
            return type(self._target)

    param = nnx.Param(jnp.ones(2))
    for x in (Proxy(param), Proxy(1.0), Proxy(param), param, jnp.ones(2), param):
        assert _predicates.is_mutable(x) == isinstance(x, nnx.Variable)


def test_a_structures_last_layout_is_reused_only_where_a_fresh_build_agrees():
    """destructure reuses a structure's last layout after checking it; each
    variant gives what it gives with every cache emptied (issue 17)."""
    d1 = jax.devices()[1]
    variants = [
        {"a": jnp.ones(3), "b": jnp.arange(2)},
        {"a": jnp.ones(3), "b": jnp.arange(2)},  # the same: reused
        {"a": jnp.ones(4), "b": jnp.arange(2)},  # another shape
        {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.arange(2)},  # another dtype
        {"a": jnp.ones(3), "b": jnp.arange(2.0)},  # b becomes a parameter
        {"a": np.ones(3, np.float32), "b": jnp.arange(2)},  # numpy
        {"a": jax.device_put(jnp.ones(3), d1), "b": jnp.arange(2)},  # committed, another device
        {"a": jnp.ones(3), "b": np.int32(3)},  # b becomes a constant
    ]
    jaxflat.clear_caches()
    got = [jaxflat.destructure(t) for t in variants]
    assert got[1][1]._layout is got[0][1]._layout
    for t, (flat, re_) in zip(variants, got, strict=True):
        jaxflat.clear_caches()
        fresh, fresh_re = jaxflat.destructure(t)
        assert re_._layout == fresh_re._layout and re_.layout == fresh_re.layout
        np.testing.assert_array_equal(flat, fresh)
        assert flat.dtype == fresh.dtype and flat.devices() == fresh.devices()
        assert flat.committed == fresh.committed
        assert_tree_equal(re_(flat), fresh_re(fresh))
