"""destructure / Restructure / load over a mesh of the 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxflat


def sharded_tree(kind, n_rows=8):
    mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(kind, kind))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    tree = {
        "w": put(jnp.arange(n_rows * 8.0).reshape(n_rows, 8) / 10, P("d", "m")),
        "b": put(jnp.linspace(-1, 1, 8), P("m")),
        "r": put(jnp.ones(8), P()),
        "step": put(jnp.arange(4), P("m")),  # an int array: not a parameter
        "act": "tanh",
    }
    return mesh, tree


def plain(tree):
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def loss(t):
    return jnp.sum(jnp.tanh(t["w"]) ** 2) + jnp.sum(t["b"] * t["r"]) + jnp.sum(t["w"] ** 3)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_flat_is_spread_over_the_mesh_and_leaves_keep_their_sharding(kind):
    mesh, tree = sharded_tree(kind)
    with jax.sharding.set_mesh(mesh):
        flat, re = jaxflat.destructure(tree)
        assert flat.shape == (80,)
        assert len(flat.sharding.device_set) == 8
        assert {s.data.shape for s in flat.addressable_shards} == {(10,)}  # no device holds it all
        arrays = lambda t: {k: v for k, v in t.items() if k != "act"}  # noqa: E731
        assert re(flat)["act"] == "tanh"
        # re passed to jit as an argument (it is a pytree): every leaf keeps its sharding
        for out in (arrays(re(flat)), jax.jit(lambda v, re: arrays(re(v)))(flat, re)):
            for k in ("w", "b", "r", "step"):
                assert out[k].sharding.is_equivalent_to(tree[k].sharding, out[k].ndim), k
                np.testing.assert_array_equal(out[k], tree[k])
        # re closed over: its parameters keep their shardings (the rest are constants)
        out = jax.jit(lambda v: arrays(re(v)))(flat)
        for k in ("w", "b", "r"):
            assert out[k].sharding.is_equivalent_to(tree[k].sharding, out[k].ndim), k
            np.testing.assert_array_equal(out[k], tree[k])


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_derivatives_over_a_mesh_equal_single_device(kind):
    mesh, tree = sharded_tree(kind)
    t = jnp.linspace(0, 1, 80)
    flat1, re1 = jaxflat.destructure(plain(tree))  # one device, numpy leaves
    f1 = lambda v: loss(re1(v))  # noqa: E731
    want = {
        "grad": jax.grad(f1)(flat1),
        "hvp": jax.jvp(jax.grad(f1), (flat1,), (t,))[1],
        "jvp": jax.jvp(f1, (flat1,), (t,)),
    }
    with jax.sharding.set_mesh(mesh):
        flat, re = jaxflat.destructure(tree)
        f = lambda v: loss(re(v))  # noqa: E731
        np.testing.assert_array_equal(flat, flat1)
        np.testing.assert_allclose(jax.jit(jax.grad(f))(flat), want["grad"], rtol=1e-6)
        np.testing.assert_allclose(jax.grad(f)(flat), want["grad"], rtol=1e-6)
        hvp = jax.jit(lambda v: jax.jvp(jax.grad(f), (v,), (t,))[1])(flat)
        np.testing.assert_allclose(hvp, want["hvp"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jax.jvp(f, (flat,), (t,)), want["jvp"], rtol=1e-6)


def test_length_that_does_not_divide_the_mesh():
    mesh, tree = sharded_tree(AxisType.Auto)
    tree["r"] = jax.device_put(jnp.ones(3), NamedSharding(mesh, P()))  # 75 elements
    flat, re = jaxflat.destructure(tree)
    assert flat.shape == (75,)
    assert flat.sharding.is_fully_replicated  # 75 is divisible by neither 2 nor 4
    np.testing.assert_array_equal(re(flat)["w"], tree["w"])


def test_largest_dividing_axes_are_used():
    mesh, tree = sharded_tree(AxisType.Auto)
    tree["r"] = jax.device_put(jnp.ones(4), NamedSharding(mesh, P()))  # 76 = 4 * 19
    flat, _ = jaxflat.destructure(tree)
    assert flat.sharding.spec == P(("m",))
    assert {s.data.shape for s in flat.addressable_shards} == {(19,)}


def test_sharding_argument_overrides():
    mesh, tree = sharded_tree(AxisType.Auto)
    want = NamedSharding(mesh, P())
    flat, re = jaxflat.destructure(tree, sharding=want)
    assert flat.sharding.is_equivalent_to(want, 1)
    assert re(flat)["w"].sharding.spec == P("d", "m")


def test_restructure_inside_jit_keeps_shardings_and_batches_with_vmap():
    mesh, tree = sharded_tree(AxisType.Auto)
    flat, re = jaxflat.destructure(tree)
    batch = jax.vmap(lambda v: re(v)["w"])(jnp.stack([flat, 2 * flat]))
    np.testing.assert_allclose(batch[1], 2 * np.asarray(tree["w"]), rtol=1e-6)


@pytest.mark.parametrize("n_devices", [4, 1])
def test_checkpoint_saved_on_8_devices_restores_onto_fewer(tmp_path, n_devices):
    _, tree = sharded_tree(AxisType.Auto)
    jaxflat.save(tmp_path / "ckpt", tree)
    small = jax.make_mesh(
        (n_devices,), ("x",), devices=jax.devices()[:n_devices], axis_types=(AxisType.Auto,)
    )
    like = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(small, P("x")))
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )
    out = jaxflat.load(tmp_path / "ckpt", like=like)
    for k in ("w", "b", "r", "step"):
        np.testing.assert_array_equal(out[k], tree[k])
        assert out[k].sharding.device_set == set(jax.devices()[:n_devices]), k
    assert out["act"] == "tanh"


def test_loadmodel_puts_values_on_dst_sharding():
    mesh, tree = sharded_tree(AxisType.Auto)
    out = jaxflat.loadmodel(tree, plain(jaxflat.state(tree)))
    for k in ("w", "b", "r", "step"):
        assert out[k].sharding == tree[k].sharding, k
        np.testing.assert_array_equal(out[k], tree[k])


def test_abstract_sharded_tree_plans_the_flat_vector_without_allocating_it():
    mesh, tree = sharded_tree(AxisType.Auto)
    abstract = {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if k != "act" else x
        for k, x in tree.items()
    }
    flat, re = jaxflat.destructure(abstract)
    real, re_real = jaxflat.destructure(tree)
    assert isinstance(flat, jax.ShapeDtypeStruct)
    assert (flat.shape, flat.dtype) == (real.shape, real.dtype)
    assert flat.sharding == real.sharding and len(flat.sharding.device_set) == 8
    out = re(real)  # a real vector into the planned tree: parameters get their shardings
    for k in ("w", "b", "r"):
        assert out[k].sharding.is_equivalent_to(tree[k].sharding, out[k].ndim), k
        np.testing.assert_array_equal(out[k], tree[k])
    assert out["step"] == abstract["step"] and out["act"] == "tanh"  # non-parameters as they were
