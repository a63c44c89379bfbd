"""jaxflat.state: a tree's values as plain containers (Flux's ``state``)."""

import dataclasses
from collections import namedtuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxflat

ones = nnx.initializers.ones
PLAIN = (dict, list, tuple, jax.Array, np.ndarray, bool, int, float, complex, str, type(None))


def assert_plain(s, path="<root>"):
    """Every node of ``s`` is one of the plain types ``state`` promises."""
    assert type(s) in PLAIN or isinstance(s, jax.Array), f"{path}: {type(s).__name__}"
    if isinstance(s, dict):
        for k, v in s.items():
            assert type(k) in (str, int), f"{path}: key {k!r}"
            assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(s, list | tuple):
        for i, v in enumerate(s):
            assert_plain(v, f"{path}[{i}]")


def two_layer():
    return nnx.Sequential(
        nnx.Linear(1, 2, kernel_init=ones, rngs=nnx.Rngs(0)),
        jnp.tanh,
        nnx.Linear(2, 1, kernel_init=ones, rngs=nnx.Rngs(1)),
    )


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))


P2 = namedtuple("P2", "a b")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Affine:
    w: jax.Array
    b: jax.Array


def corpus():
    return {
        "nnx_two_layer": two_layer(),
        "nnx_dropout": nnx.Dropout(0.2, rngs=nnx.Rngs(0)),
        "nnx_batchnorm": nnx.BatchNorm(1, rngs=nnx.Rngs(0)),
        "equinox_mlp": eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0)),
        "linen_vars": LinenNet().init(jax.random.key(0), jnp.ones((1, 2))),
        "optax_adam": optax.adam(1e-3).init({"w": jnp.ones(2)}),
        "namedtuple": P2(jnp.ones(2), 3),
        "dataclass": Affine(jnp.ones(2), jnp.zeros(2)),
        "plain": {"a": [1, 2.5, None, "s", True], "b": (jnp.ones(2), np.zeros(3)), "f": jnp.tanh},
        "int_keys": {0: jnp.ones(2), 1: {2: np.zeros(3), 3: 1.5}},
    }


CORPUS = list(corpus())


# ------------------------------------------------------------ the page's examples


def test_state_two_layer_model():
    s = jaxflat.state(two_layer())
    assert set(s) == {"layers"}
    assert set(s["layers"]) == {0, 2}  # tanh is static in NNX: not a child
    first, last = s["layers"][0], s["layers"][2]
    assert set(first) == set(last) == {"kernel", "bias"}
    np.testing.assert_array_equal(first["kernel"], np.ones((1, 2)))
    np.testing.assert_array_equal(first["bias"], np.zeros(2))
    np.testing.assert_array_equal(last["kernel"], np.ones((2, 1)))
    np.testing.assert_array_equal(last["bias"], np.zeros(1))


def test_state_dropout_has_no_rng_object():
    s = jaxflat.state(nnx.Dropout(0.2, rngs=nnx.Rngs(0)))
    assert_plain(s)
    leaves = jax.tree.leaves(s)
    assert leaves, "the dropout's key and count are state"
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves)
    assert any(jnp.issubdtype(x.dtype, jnp.integer) for x in leaves)  # the count


def test_state_batchnorm_has_mean_and_var():
    s = jaxflat.state(nnx.BatchNorm(1, rngs=nnx.Rngs(0)))
    assert {"mean", "var", "scale", "bias"} <= set(s)
    np.testing.assert_array_equal(s["mean"], np.zeros(1))
    np.testing.assert_array_equal(s["var"], np.ones(1))


# ------------------------------------------------------------ plain types only


@pytest.mark.parametrize("name", CORPUS)
def test_state_uses_only_plain_types(name):
    assert_plain(jaxflat.state(corpus()[name]))


@pytest.mark.parametrize("name", CORPUS)
def test_state_keeps_every_array(name):
    tree = corpus()[name]
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array | np.ndarray)]
    got = [x for x in jax.tree.leaves(jaxflat.state(tree)) if isinstance(x, jax.Array | np.ndarray)]
    assert len(got) == len(arrays)


def test_state_function_child_becomes_empty_tuple():
    assert jaxflat.state({"f": jnp.tanh}) == {"f": ()}
    assert jaxflat.state([jax.nn.relu, 1]) == [(), 1]


def test_state_other_object_becomes_empty_tuple():
    class Opaque:
        pass

    assert jaxflat.state({"o": Opaque()}) == {"o": ()}


def test_state_variable_becomes_its_value():
    s = jaxflat.state({"v": nnx.Param(jnp.ones(3)), "c": nnx.BatchStat(jnp.zeros(2))})
    assert type(s["v"]) is not nnx.Param and isinstance(s["v"], jax.Array)
    np.testing.assert_array_equal(s["v"], np.ones(3))
    np.testing.assert_array_equal(s["c"], np.zeros(2))


def test_state_namedtuple_becomes_dict():
    s = jaxflat.state(P2(jnp.ones(2), 3))
    assert type(s) is dict and set(s) == {"a", "b"} and s["b"] == 3


def test_state_dataclass_becomes_dict():
    s = jaxflat.state(Affine(jnp.ones(2), jnp.zeros(2)))
    assert type(s) is dict and set(s) == {"w", "b"}


def test_state_keeps_python_scalars_and_containers():
    tree = {"l": [1, 2.5], "t": (None, "relu"), "b": False, "c": 1 + 2j, "i": {3: "x"}}
    s = jaxflat.state(tree)
    assert s == tree
    assert type(s["l"]) is list and type(s["t"]) is tuple and type(s["b"]) is bool


@pytest.mark.parametrize(
    "x", [np.float32(2.0), np.float64(2.0), np.int64(2), np.bool_(True)], ids=repr
)
def test_state_numpy_scalar_becomes_array(x):
    # the docstring: "numpy scalars become 0-d arrays"
    s = jaxflat.state({"x": x})
    assert type(s["x"]) is np.ndarray and s["x"].shape == () and s["x"].dtype == x.dtype
    assert s["x"] == x


def test_state_plain_dict_of_arrays_is_itself():
    tree = {"w": jnp.ones(2), "n": np.arange(3)}
    s = jaxflat.state(tree)
    assert s["w"] is tree["w"] and s["n"] is tree["n"]


def test_state_equinox_module():
    m = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0))
    s = jaxflat.state(m)
    assert s["activation"] == () and s["final_activation"] == ()
    assert type(s["layers"]) is tuple and len(s["layers"]) == 2
    np.testing.assert_array_equal(s["layers"][0]["weight"], m.layers[0].weight)
    np.testing.assert_array_equal(s["layers"][1]["bias"], m.layers[1].bias)


def test_state_linen_variables():
    v = LinenNet().init(jax.random.key(0), jnp.ones((1, 2)))
    s = jaxflat.state(v)
    assert set(s) == {"params", "batch_stats"}
    assert set(s["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
    assert set(s["params"]["Dense_0"]) == {"kernel", "bias"}
    np.testing.assert_array_equal(
        s["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"]
    )


def test_state_optax_state():
    params = {"w": jnp.ones(2)}
    s = jaxflat.state(optax.adam(1e-3).init(params))
    assert type(s) is tuple and len(s) == 2
    adam = s[0]
    assert set(adam) == {"count", "mu", "nu"}
    np.testing.assert_array_equal(adam["mu"]["w"], np.zeros(2))


def test_state_empty_namedtuple_is_plain():
    # optax.EmptyState() is a namedtuple without fields (the tail of every
    # optax.chain state); as an object with named children it is a dict.
    assert jaxflat.state(optax.EmptyState()) in ({}, ())
    assert type(jaxflat.state({"s": optax.EmptyState()})["s"]) in (dict, tuple)


def test_state_prng_key_stays_a_key():
    s = jaxflat.state({"k": jax.random.key(3)})
    assert jax.dtypes.issubdtype(s["k"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(s["k"]), jax.random.key_data(jax.random.key(3))
    )


def test_state_does_not_change_the_model():
    m = two_layer()
    before = jax.tree.leaves(nnx.state(m))
    jaxflat.state(m)
    after = jax.tree.leaves(nnx.state(m))
    assert all(a is b for a, b in zip(before, after, strict=True))
