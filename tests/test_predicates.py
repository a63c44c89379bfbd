"""The predicates every walk consults: isleaf, isnumeric, register_leaf,
trainable and register_trainable (DESIGN.md, "Leaves, numbers, trainable
children"). Each class registered here is local to its test: the registries
are global.
"""

import collections
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import Affine, Point, seed_model
from jax import tree_util as jtu

from jaxflat import (
    destructure,
    isleaf,
    isnumeric,
    modules,
    register_leaf,
    register_trainable,
    trainable,
)

# ================================================================ isleaf


@pytest.mark.parametrize(
    "x",
    [
        jnp.ones(3),
        np.ones(3),
        jnp.float32(1.0),
        1.5,
        3,
        True,
        "relu",
        None,
        jnp.sin,
        jax.random.key(0),
        {},
        (),
        [],
    ],
    ids=lambda x: type(x).__name__,
)
def test_isleaf_true_for_things_without_children(x):
    assert isleaf(x)


@pytest.mark.parametrize(
    "x",
    [
        {"a": 1},
        (jnp.ones(1),),
        [None, 2],
        Point(1, 2),
        Affine(jnp.ones(1), jnp.ones(1)),
        nnx.Linear(1, 1, rngs=nnx.Rngs(0)),
        nnx.Param(jnp.ones(2)),
        eqx.nn.Linear(1, 1, key=jax.random.key(0)),
    ],
    ids=lambda x: type(x).__name__,
)
def test_isleaf_false_for_nodes_with_children(x):
    assert not isleaf(x)


# ================================================================ isnumeric

FLOAT8 = [
    getattr(jnp, n)
    for n in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3b11fnuz",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e3m4",
        "float8_e4m3",
    )
    if hasattr(jnp, n)
]


@pytest.mark.parametrize(
    "dtype",
    [jnp.float32, jnp.float16, jnp.bfloat16, jnp.complex64, *FLOAT8],
    ids=lambda d: jnp.dtype(d).name,
)
def test_isnumeric_true_for_inexact_jax_arrays(dtype):
    assert isnumeric(jnp.zeros((2,), dtype))
    assert isnumeric(jnp.zeros((), dtype))  # 0-d arrays are arrays


def test_isnumeric_has_float8_variants():
    assert len(FLOAT8) >= 2


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.complex128])
def test_isnumeric_true_for_inexact_numpy_arrays(dtype):
    assert isnumeric(np.zeros(3, dtype))
    assert isnumeric(np.array(1.0, dtype))


@pytest.mark.parametrize(
    "x",
    [
        jnp.arange(3),
        jnp.array([True, False]),
        jnp.zeros(2, jnp.uint8),
        np.arange(3),
        jax.random.key(0),
        jax.random.split(jax.random.key(0), 3),
        jax.random.PRNGKey(0),
        np.float32(1.0),
        np.float64(1.0),
        np.complex64(1j),
        1e-5,
        1.0 + 2.0j,
        3,
        True,
        "x",
        jnp.sin,
        None,
        nnx.Param(jnp.ones(2)),
        [jnp.ones(2)],
    ],
    ids=lambda x: f"{type(x).__name__}-{getattr(x, 'dtype', '')}",
)
def test_isnumeric_false_for_everything_else(x):
    assert not isnumeric(x)


def test_isnumeric_on_tracers_inside_jit():
    seen = {}

    @jax.jit
    def f(x, i, k):
        seen.update(x=isnumeric(x), i=isnumeric(i), k=isnumeric(k), leaf=isleaf(x))
        return x

    f(jnp.ones(2), jnp.arange(2), jax.random.key(0))
    assert seen == {"x": True, "i": False, "k": False, "leaf": True}


def test_isnumeric_on_tracers_inside_grad_and_vmap():
    seen = []

    def f(x):
        seen.append(isnumeric(x))
        return jnp.sum(x)

    jax.grad(f)(jnp.ones(2))
    jax.vmap(f)(jnp.ones((3, 2)))
    jax.vmap(f)(jnp.ones((3, 2), jnp.int32))
    assert seen == [True, True, False]


# ================================================================ register_leaf


def test_register_leaf_makes_instances_opaque_to_destructure():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Frozen:
        table: jax.Array

    tree = {"w": jnp.ones(2), "frozen": Frozen(jnp.ones(3))}
    assert destructure(tree)[1].length == 5  # a plain pytree node before
    assert register_leaf(Frozen) is Frozen  # usable as a decorator
    flat, re = destructure(tree)
    assert re.length == 2 and [e.path for e in re.layout] == ["['w']"]
    assert re(flat)["frozen"] is tree["frozen"]
    assert jtu.tree_leaves(re) == []  # not an array, so static in re
    assert isleaf(tree["frozen"]) and trainable(tree["frozen"]) == {}


def test_register_leaf_is_never_descended_by_modules():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        inner: dict

    inner = {"x": [jnp.ones(1)]}
    tree = [Box(inner)]
    assert any(m is inner for m in modules(tree))
    register_leaf(Box)
    assert modules(tree) == [tree]


def test_register_leaf_covers_subclasses():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Base:
        w: jax.Array

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Child(Base):
        b: jax.Array

    register_leaf(Base)
    child = Child(jnp.ones(2), jnp.ones(3))
    assert isleaf(child)
    flat, re = destructure({"c": child, "v": jnp.ones(1)})
    assert re.length == 1 and re(flat)["c"] is child


def test_register_leaf_nnx_module_is_not_a_parameter_source():
    class Embedding(nnx.Module):
        def __init__(self):
            self.table = nnx.Param(jnp.ones((4, 2)))

    register_leaf(Embedding)
    emb = Embedding()
    model = {"emb": emb, "w": jnp.ones(3)}
    flat, re = destructure(model)
    assert re.length == 3
    assert re(flat)["emb"] is emb
    assert all(m is not emb for m in modules(model))


# ================================================================ trainable: defaults


def test_trainable_default_dict_is_all_children():
    d = {"b": jnp.ones(1), "a": 2}
    assert trainable(d) == {"a": 2, "b": d["b"]}


def test_trainable_default_sequences_use_positions():
    x, y = jnp.ones(1), jnp.zeros(1)
    assert trainable((x, y)) == {0: x, 1: y}
    assert trainable([x, y]) == {0: x, 1: y}


def test_trainable_default_namedtuple_uses_field_names():
    p = Point(x=jnp.ones(1), y=3)
    assert list(trainable(p)) == ["x", "y"]
    assert trainable(p)["x"] is p.x


def test_trainable_default_dataclass_uses_data_fields():
    a = Affine(jnp.ones(2), jnp.zeros(2), name="static")
    t = trainable(a)
    assert list(t) == ["w", "b"] and t["w"] is a.w and t["b"] is a.b


def test_trainable_of_a_leaf_is_empty():
    for x in (jnp.ones(2), 1.0, "s", None, jnp.sin):
        assert trainable(x) == {}


def test_trainable_names_match_jax_key_paths():
    lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    t = trainable(lin)
    assert set(t) == {"kernel", "bias"}
    assert t["kernel"] is lin.kernel and t["bias"] is lin.bias


# ================================================================ trainable: NNX built-ins


def test_nnx_param_trainable_batchstat_not():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    t = trainable(bn)
    assert set(t) == {"scale", "bias"}
    assert isinstance(t["scale"], nnx.Param)


def test_nnx_other_variables_are_not_trainable():
    class Holder(nnx.Module):
        def __init__(self):
            self.p = nnx.Param(jnp.ones(2))
            self.s = nnx.BatchStat(jnp.ones(2))
            self.c = nnx.Cache(jnp.ones(2))
            self.i = nnx.Intermediate(jnp.ones(2))
            self.r = nnx.Rngs(0)

    h = Holder()
    t = trainable(h)
    assert "p" in t and not {"s", "c", "i"} & set(t)
    assert [e.path for e in destructure(h)[1].layout] == [".p.value"]


def test_nnx_variable_subclasses():
    class LoRA(nnx.Param):
        pass

    class Frozen(nnx.Variable):
        pass

    class M(nnx.Module):
        def __init__(self):
            self.a = LoRA(jnp.ones(2))
            self.b = Frozen(jnp.ones(3))

    m = M()
    assert set(trainable(m)) == {"a"}
    assert destructure(m)[1].length == 2


# ================================================================ register_trainable


def test_register_trainable_names_list():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        b: jax.Array

    layer = Layer(jnp.ones(2), jnp.zeros(3))
    assert destructure(layer)[1].length == 5  # default: all children
    assert register_trainable(Layer, ["w"]) is None
    assert list(trainable(layer)) == ["w"]
    flat, re = destructure(layer)
    assert re.length == 2 and re(flat).b is layer.b


def test_register_trainable_generator_of_names():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        b: jax.Array

    register_trainable(Layer, (n for n in ["b"]))  # any iterable, consumed once
    layer = Layer(jnp.ones(2), jnp.zeros(3))
    assert list(trainable(layer)) == ["b"]
    assert list(trainable(layer)) == ["b"]


def test_register_trainable_callable():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        b: jax.Array
        train_bias: bool = dataclasses.field(default=False, metadata=dict(static=True))

    register_trainable(Layer, lambda node: ["w", "b"] if node.train_bias else ["w"])
    assert list(trainable(Layer(jnp.ones(2), jnp.ones(3)))) == ["w"]
    assert list(trainable(Layer(jnp.ones(2), jnp.ones(3), train_bias=True))) == ["w", "b"]
    assert destructure(Layer(jnp.ones(2), jnp.ones(3), train_bias=True))[1].length == 5


def test_register_trainable_sequence_positions():
    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b

    jtu.register_pytree_with_keys(
        Pair,
        lambda p: (((jtu.SequenceKey(0), p.a), (jtu.SequenceKey(1), p.b)), None),
        lambda _, c: Pair(*c),
    )
    register_trainable(Pair, [1])
    pair = Pair(jnp.ones(2), jnp.zeros(3))
    assert trainable(pair) == {1: pair.b}
    assert [e.path for e in destructure(pair)[1].layout] == ["[1]"]


def test_register_trainable_namedtuple():
    Triple = collections.namedtuple("Triple", "x y z")
    register_trainable(Triple, ["x", "z"])
    t = Triple(jnp.ones(1), jnp.ones(2), jnp.ones(3))
    assert list(trainable(t)) == ["x", "z"]
    assert destructure(t)[1].length == 4


def test_register_trainable_subclasses_inherit():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Base:
        w: jax.Array
        b: jax.Array

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Child(Base):
        extra: jax.Array

    register_trainable(Base, ["w"])
    child = Child(jnp.ones(2), jnp.ones(3), jnp.ones(4))
    assert list(trainable(child)) == ["w"]
    assert destructure(child)[1].length == 2


def test_register_trainable_nnx_subclass():
    class KernelOnly(nnx.Linear):
        pass

    register_trainable(KernelOnly, ["kernel"])
    lin = KernelOnly(3, 2, rngs=nnx.Rngs(0))
    assert [e.path for e in destructure(lin)[1].layout] == [".kernel.value"]
    assert destructure(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))[1].length == 8  # base class unaffected


def test_register_trainable_excludes_whole_subtrees():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Net:
        body: dict
        frozen: dict

    register_trainable(Net, ["body"])
    net = Net(body={"w": jnp.ones(2)}, frozen={"emb": [jnp.ones(5)], "model": seed_model()})
    flat, re = destructure(net)
    assert [e.path for e in re.layout] == [".body['w']"]
    assert re(flat).frozen["emb"][0] is net.frozen["emb"][0]


def test_register_trainable_rejects_a_non_class():
    with pytest.raises(TypeError, match="register_trainable expects a class, got 'Affine'"):
        register_trainable("Affine", ["w"])
    with pytest.raises(TypeError, match="expects a class"):
        register_trainable(Affine(jnp.ones(1), jnp.ones(1)), ["w"])


def test_register_trainable_rejects_a_bare_string():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        wb: jax.Array

    with pytest.raises(TypeError, match=r"iterable of names, got the string 'w'; write \['w'\]"):
        register_trainable(Layer, "w")
    assert list(trainable(Layer(jnp.ones(1), jnp.ones(1)))) == ["w", "wb"]  # nothing registered
