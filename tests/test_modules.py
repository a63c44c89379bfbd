"""modules(tree): every non-leaf node, tree first, depth first in child order,
each object once by identity, plain containers included (DESIGN.md, "modules"),
and the seed page's Chain/BatchNorm example with its L2 regulariser.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import CORPUS, Affine, Point, l2, make, seed_chain, seed_model, tied_linear_model

from jaxflat import destructure, isleaf, modules, register_leaf


def ids(xs):
    return [id(x) for x in xs]


# ================================================================ order


def test_modules_tree_first():
    tree = {"a": [jnp.ones(1)]}
    assert modules(tree)[0] is tree


def test_modules_preorder_depth_first_in_child_order():
    a, b = [jnp.ones(1)], {"y": jnp.ones(2)}
    inner = (a, b)
    c = [jnp.ones(3)]
    tree = {"z": c, "k": inner}  # jax orders dict children by key: k before z
    assert ids(modules(tree)) == ids([tree, inner, a, b, c])


def test_modules_of_a_leaf_is_empty():
    for x in (jnp.ones(2), 1.0, None, "s", jnp.sin, {}):
        assert modules(x) == []


def test_modules_only_lists_nodes():
    for name in CORPUS:
        for node in modules(make(name)):
            assert not isleaf(node), (name, type(node))


def test_modules_node_kinds():
    p = Point(x=[jnp.ones(1)], y=jnp.ones(1))
    a = Affine(jnp.ones(1), jnp.ones(1))
    mlp = eqx.nn.MLP(2, 1, 2, 1, key=jax.random.key(0))
    tree = (p, a, mlp)
    got = modules(tree)
    assert got[:4] == [tree, p, p.x, a]
    assert got[4] is mlp and mlp.layers in got and mlp.layers[0] in got
    assert all(isinstance(m, (tuple, list, dict, eqx.Module, Point, Affine)) for m in got)


# ================================================================ identity


def test_modules_shared_module_listed_once():
    m = tied_linear_model()
    got = modules(m)
    assert [type(x).__name__ for x in got] == ["Sequential", "List", "Linear"]
    assert got[2] is m.layers[0] is m.layers[2]


def test_modules_same_container_twice_listed_once():
    d = {"w": jnp.ones(2)}
    tree = [d, d, {"w": jnp.ones(2)}]
    got = modules(tree)
    assert len(got) == 3 and got[0] is tree and got[1] is d and got[2] is tree[2]


def test_modules_equal_but_distinct_containers_listed_each():
    tree = ([jnp.ones(1)], [jnp.ones(1)])
    assert ids(modules(tree)) == ids([tree, tree[0], tree[1]])


# ================================================================ NNX


def test_modules_nnx_variables_not_listed():
    lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    assert modules(lin) == [lin]
    for name in ("m07_nnx_seed", "m08_nnx_batchnorm_dropout"):
        assert not any(isinstance(x, nnx.Variable) for x in modules(make(name)))


def test_modules_seed_chain_types():
    m2 = seed_chain()
    got = modules(m2)
    # Flux lists Chain, Tuple, Chain, Tuple, Dense, BatchNorm, Dense: NNX's
    # Sequential keeps its layers in an nnx.List where Flux has a Tuple.
    assert [type(x) for x in got] == [
        nnx.Sequential,
        nnx.List,
        nnx.Sequential,
        nnx.List,
        nnx.Linear,
        nnx.BatchNorm,
        nnx.Linear,
    ]
    m1 = m2.layers[0]
    assert ids(got) == ids([m2, m2.layers, m1, m1.layers, m1.layers[0], m1.layers[1], m2.layers[1]])


def test_modules_l2_regulariser_is_float32():
    m2 = seed_chain()
    value = l2(m2)
    assert value.dtype == jnp.float32 and value.shape == ()
    expected = sum(
        np.sum(np.asarray(k, np.float64) ** 2)
        for k in (m2.layers[0].layers[0].kernel[...], m2.layers[1].kernel[...])
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_modules_l2_regulariser_is_differentiable():
    m2 = seed_chain()
    g = nnx.jit(nnx.grad(l2))(m2)
    np.testing.assert_allclose(
        g["layers"][1]["kernel"][...], 2 * m2.layers[1].kernel[...], rtol=1e-6
    )
    np.testing.assert_array_equal(g["layers"][1]["bias"][...], np.zeros(10))
    np.testing.assert_array_equal(g["layers"][0]["layers"][1]["scale"][...], np.zeros(64))


# ================================================================ traced trees


def test_modules_inside_jax_grad_on_a_traced_tree():
    m = seed_model()
    seen = []

    def loss(model):
        found = modules(model)
        seen.append([type(x) for x in found])
        assert isinstance(found[2].kernel[...], jax.core.Tracer)
        return l2(model)

    g = jax.jit(jax.grad(loss))(m)
    assert seen == [[nnx.Sequential, nnx.List, nnx.Linear, nnx.Linear]]
    np.testing.assert_allclose(g.layers[0].kernel[...], 2 * m.layers[0].kernel[...], rtol=1e-6)
    np.testing.assert_array_equal(g.layers[2].bias[...], np.zeros(1))


def test_modules_inside_grad_over_a_plain_tree():
    tree = {"layers": [{"w": jnp.ones((2, 2))}, {"w": 2 * jnp.ones((2, 2))}], "scale": jnp.ones(1)}

    def loss(t):
        return sum(jnp.sum(m["w"] ** 3) for m in modules(t) if isinstance(m, dict) and "w" in m)

    g = jax.grad(loss)(tree)
    np.testing.assert_array_equal(g["layers"][1]["w"], 12 * np.ones((2, 2)))
    np.testing.assert_array_equal(g["scale"], np.zeros(1))


# ================================================================ agreement with the predicates


def test_modules_and_destructure_agree_on_registered_leaves():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Opaque:
        w: jax.Array
        more: list

    register_leaf(Opaque)
    o = Opaque(jnp.ones(2), [jnp.ones(3)])
    tree = {"o": o, "v": [jnp.ones(1)]}
    assert ids(modules(tree)) == ids([tree, tree["v"]])
    assert destructure(tree)[1].length == 1
