"""The seed page (Flux docs, "Flat and nested structures") in JAX form.

Every destructure / Restructure / trainable / modules example on the page,
with Flux's ``Chain(Dense(2=>1, tanh), Dense(1=>1))`` written as
``nnx.Sequential(nnx.Linear(2, 1), jax.nn.tanh, nnx.Linear(1, 1))``. Julia's
``x = rand(Float32, 2, 16)`` (features x batch) is a (16, 2) batch here.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import assert_tree_equal, l2, seed_chain, seed_model
from jax import tree_util as jtu

from jaxflat import destructure, modules

X = jax.random.uniform(jax.random.key(0), (16, 2), jnp.float32)


def nested_loss(m):
    """``m -> sum(abs2, m(x))``."""
    return jnp.sum(m(X) ** 2)


def seed():
    model = seed_model()
    flat, rebuild = destructure(model)

    def loss(v):
        m = rebuild(v)
        y = m(X)
        return jnp.sum(y**2)

    return model, flat, rebuild, loss


# ================================================================ destructure(model)


def test_seed_model_has_five_parameters():
    model, flat, rebuild, _ = seed()
    assert flat.shape == (5,) and flat.dtype == jnp.float32
    assert repr(rebuild) == "Restructure(Sequential, ..., 5)"
    # tree_leaves order: attributes in jax's key order (bias before kernel).
    first, last = model.layers[0], model.layers[2]
    expected = np.concatenate(
        [
            np.ravel(first.bias[...]),
            np.ravel(first.kernel[...]),
            np.ravel(last.bias[...]),
            np.ravel(last.kernel[...]),
        ]
    )
    np.testing.assert_array_equal(flat, expected)


def test_seed_rebuild_zeros():
    model, flat, rebuild, _ = seed()
    zero = rebuild(jnp.zeros(5))  # the same structure with new parameters
    assert type(zero) is nnx.Sequential and zero is not model
    assert [type(x) for x in zero.layers] == [nnx.Linear, type(jax.nn.tanh), nnx.Linear]
    assert zero.layers[1] is model.layers[1]
    for layer, old in ((zero.layers[0], model.layers[0]), (zero.layers[2], model.layers[2])):
        for name in ("kernel", "bias"):
            new = getattr(layer, name)[...]
            assert new.shape == getattr(old, name)[...].shape and new.dtype == jnp.float32
            assert not np.any(new)
        assert (layer.in_features, layer.out_features) == (old.in_features, old.out_features)
    assert not np.any(zero(X))
    np.testing.assert_array_equal(destructure(model)[0], flat)  # the model is untouched


def test_seed_rebuild_from_float64_numpy_zeros():
    # Julia's zeros(5) is Float64; Restructure projects back to Float32.
    _, _, rebuild, _ = seed()
    zero = rebuild(np.zeros(5))
    assert zero.layers[0].kernel[...].dtype == jnp.float32
    assert not np.any(zero.layers[2].kernel[...])


# ================================================================ gradients


def test_seed_nested_gradient_destructured_equals_flat_gradient():
    model, flat, _, loss = seed()
    flat_grad = jax.jit(jax.grad(loss))(flat)  # the "small" gradient
    assert flat_grad.shape == (5,) and np.all(np.asarray(flat_grad) != 0)
    nested = nnx.jit(nnx.grad(nested_loss))(model)  # the nested gradient
    np.testing.assert_allclose(destructure(nested)[0], flat_grad, rtol=1e-5)
    nested_jax = jax.jit(jax.grad(nested_loss))(model)
    np.testing.assert_allclose(destructure(nested_jax)[0], flat_grad, rtol=1e-5)


def test_seed_destructure_of_gradient_tuple():
    # Flux.destructure(grad) -> (..., Restructure(Tuple, ..., 5)): Zygote's
    # gradient is a tuple, as jax.grad's with argnums=(0,).
    model, flat, _, loss = seed()
    grad = jax.jit(jax.grad(nested_loss, argnums=(0,)))(model)
    assert isinstance(grad, tuple)
    gflat, gre = destructure(grad)
    assert repr(gre) == "Restructure(tuple, ..., 5)"
    np.testing.assert_allclose(gflat, jax.jit(jax.grad(loss))(flat), rtol=1e-5)
    rebuilt = gre(gflat)
    assert isinstance(rebuilt, tuple) and isinstance(rebuilt[0], nnx.Sequential)


def test_seed_hessian_over_all_parameters():
    model, flat, _, loss = seed()
    h = jax.jit(jax.hessian(loss))(flat)
    assert h.shape == (5, 5) and h.dtype == jnp.float32
    np.testing.assert_allclose(h, h.T, rtol=1e-4, atol=1e-5)
    off = np.asarray(h)[~np.eye(5, dtype=bool)]
    assert np.any(off != 0)  # off-diagonal terms: not a nested structure

    leaves, treedef = jtu.tree_flatten(model)
    nested = jax.jit(jax.hessian(lambda ls: nested_loss(treedef.unflatten(ls))))(leaves)
    sizes = [x.size for x in leaves]
    raveled = np.block(
        [
            [np.asarray(nested[i][j]).reshape(si, sj) for j, sj in enumerate(sizes)]
            for i, si in enumerate(sizes)
        ]
    )
    np.testing.assert_allclose(h, raveled, rtol=1e-4, atol=1e-5)


# ================================================================ the Optimisers.destructure example


def complex_example():
    return {"x": jnp.array([1.0, 2.0]), "y": (jnp.sin, jnp.array([3.0 + 4.0j]))}


def test_seed_complex_example_flat():
    v, re = destructure(complex_example())
    assert v.dtype == jnp.complex64 and v.shape == (3,)
    np.testing.assert_array_equal(v, [1 + 0j, 2 + 0j, 3 + 4j])
    assert repr(re) == "Restructure(dict, ..., 3)"


def test_seed_complex_example_rebuild():
    _, re = destructure(complex_example())
    for given in (jnp.array([3, 5, 7 + 11j]), [3, 5, 7 + 11j]):
        out = re(given)
        assert set(out) == {"x", "y"}
        assert out["x"].dtype == jnp.float32
        np.testing.assert_array_equal(out["x"], [3.0, 5.0])
        assert isinstance(out["y"], tuple) and out["y"][0] is jnp.sin
        assert out["y"][1].dtype == jnp.complex64
        np.testing.assert_array_equal(out["y"][1], [7 + 11j])


def test_seed_python_lists_of_numbers_are_not_parameters():
    # In JAX a Python list is a container and Python floats are
    # hyper-parameters: only arrays hold parameters.
    tree = {"x": [1.0, 2.0], "y": (jnp.sin, [3 + 4j])}
    v, re = destructure(tree)
    assert v.shape == (0,) and v.dtype == jnp.float32
    assert_tree_equal(tree, re(v))


def test_seed_mixed_number_types_promoted_and_restored():
    tree = {"a": jnp.ones(2, jnp.float16), "b": jnp.ones(2, jnp.float32)}
    v, re = destructure(tree)
    assert v.dtype == jnp.float32
    out = re(v + 0.25)
    assert out["a"].dtype == jnp.float16 and out["b"].dtype == jnp.float32
    np.testing.assert_array_equal(out["a"], np.full(2, 1.25, np.float16))


# ================================================================ trainable, isnumeric


def test_seed_functions_and_integer_fields_are_ignored():
    # "Fields of struct Layer holding functions or integers, such as sizes,
    # are always ignored."
    class Layer(eqx.Module):
        w: jax.Array
        size: int
        act: object

    layer = Layer(jnp.ones(3), 3, jax.nn.relu)
    v, re = destructure(layer)
    assert [e.path for e in re.layout] == [".w"]
    out = re(2 * v)
    assert out.size == 3 and out.act is jax.nn.relu
    np.testing.assert_array_equal(out.w, [2.0, 2.0, 2.0])


# ================================================================ Flux.modules


def test_seed_modules_example():
    m2 = seed_chain()
    got = modules(m2)
    assert len(got) == 7
    assert got[0] is m2 and sum(isinstance(x, nnx.Linear) for x in got) == 2
    assert l2(m2).dtype == jnp.float32  # L2(m2) isa Float32
