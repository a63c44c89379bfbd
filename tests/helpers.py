"""Shared fixtures for the jaxflat tests: a corpus of named trees and oracles.

Optimisers.jl tests against named fixture models ``m1`` ... ``m9``; this is
the same idea for JAX. ``CORPUS`` maps a name to a factory (NNX models are
mutable, so every test gets a fresh tree). The oracles here are written with
``jax.tree_util`` and ``flax.nnx`` only, never with jaxflat, so that a test
comparing jaxflat to them can fail.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from jax import tree_util as jtu

from jaxflat import modules

ARRAYS = (jax.Array, np.ndarray)

# ---------------------------------------------------------------- containers

Point = collections.namedtuple("Point", ["x", "y"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Affine:
    """A ``register_dataclass`` node with a static (meta) field."""

    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(default="affine", metadata=dict(static=True))


class StaticWidth(eqx.Module):
    """An Equinox module with a static field and a function leaf."""

    w: jax.Array
    width: int = eqx.field(static=True)
    act: Callable[[Any], Any] = jax.nn.relu


# ---------------------------------------------------------------- models


def seed_model(seed: int = 0) -> nnx.Sequential:
    """The seed page's ``Chain(Dense(2=>1, tanh), Dense(1=>1))``: 5 parameters."""
    return nnx.Sequential(
        nnx.Linear(2, 1, rngs=nnx.Rngs(seed)),
        jax.nn.tanh,
        nnx.Linear(1, 1, rngs=nnx.Rngs(seed + 1)),
    )


def bn_dropout_model(seed: int = 0) -> nnx.Sequential:
    """Linear, BatchNorm (trainable scale/bias, BatchStat mean/var), Dropout
    (an RNG stream: a key and a uint32 count), Linear."""
    return nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(seed)),
        nnx.BatchNorm(4, rngs=nnx.Rngs(seed)),
        nnx.Dropout(0.5, rngs=nnx.Rngs(seed + 1)),
        nnx.Linear(4, 2, rngs=nnx.Rngs(seed + 2)),
    )


def tied_linear_model(seed: int = 0) -> nnx.Sequential:
    """The same ``nnx.Linear`` object used twice: 6 parameters, not 12."""
    lin = nnx.Linear(2, 2, rngs=nnx.Rngs(seed))
    return nnx.Sequential(lin, jax.nn.tanh, lin)


def seed_chain():
    """Flux: ``m2 = Chain(Chain(Dense(784, 64), BatchNorm(64, relu)), Dense(64, 10))``."""
    m1 = nnx.Sequential(nnx.Linear(784, 64, rngs=nnx.Rngs(0)), nnx.BatchNorm(64, rngs=nnx.Rngs(1)))
    return nnx.Sequential(m1, nnx.Linear(64, 10, rngs=nnx.Rngs(2)))


def l2(m):
    """Flux: ``L2(m) = sum(sum(abs2, l.weight) for l in Flux.modules(m) if l isa Dense)``."""
    return sum(
        jnp.sum(layer.kernel[...] ** 2) for layer in modules(m) if isinstance(layer, nnx.Linear)
    )


class TiedParam(nnx.Module):
    """One ``nnx.Param`` object held under two attribute names."""

    def __init__(self, n: int = 3):
        p = nnx.Param(jnp.arange(1.0, n + 1.0))
        self.a = p
        self.b = p


def linen_params() -> dict:
    return nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))


def _f32(*shape: int, start: float = 0.0) -> jax.Array:
    # Built in numpy: no eager jnp op, hence no compile per shape.
    n = int(np.prod(shape, dtype=np.int64))
    return jnp.asarray((np.arange(n, dtype=np.float32) * 0.5 + start).reshape(shape))


# Each factory returns a fresh tree. Values are chosen exactly representable
# in every dtype they appear in, so round trips can be compared exactly.
CORPUS: dict[str, Callable[[], Any]] = {
    "m01_array": lambda: _f32(2, 3),
    "m02_dict": lambda: {"w": _f32(2, 2), "b": _f32(2, start=1.0)},
    "m03_tuple": lambda: (_f32(3), _f32(2, 2, start=-1.0)),
    "m04_list": lambda: [_f32(2), [_f32(1, 3), _f32(1)]],
    "m05_namedtuple": lambda: Point(x=_f32(2), y=_f32(3, start=2.0)),
    "m06_dataclass": lambda: Affine(w=_f32(2, 3), b=_f32(3)),
    "m07_nnx_seed": lambda: seed_model(0),
    "m08_nnx_batchnorm_dropout": lambda: bn_dropout_model(0),
    "m09_eqx_mlp": lambda: eqx.nn.MLP(2, 1, 3, 2, key=jax.random.key(0)),
    "m10_eqx_static": lambda: StaticWidth(w=_f32(3), width=3),
    "m11_linen_params": linen_params,
    "m12_optax_adam": lambda: optax.adam(1e-3).init({"w": _f32(2, 2), "b": _f32(2)}),
    "m13_mixed_leaves": lambda: {
        "w": _f32(2),
        "f": jnp.sin,
        "s": "relu",
        "n": 3,
        "flag": True,
        "eps": 1e-5,
        "key": jax.random.key(0),
        "raw_key": jax.random.PRNGKey(1),
        "steps": jnp.arange(3),
        "mask": jnp.array([True, False]),
        "none": None,
        "v": _f32(2, 1, start=4.0),
    },
    "m14_complex": lambda: {"x": jnp.array([1.0, 2.0]), "y": (jnp.sin, jnp.array([3.0 + 4.0j]))},
    "m15_float_mix": lambda: {
        "f32": _f32(2),
        "bf16": jnp.asarray(np.arange(3.0).astype(jnp.bfloat16)),
        "f16": jnp.asarray(np.arange(4.0).reshape(2, 2).astype(np.float16)),
    },
    "m16_float64_numpy": lambda: {
        "a": np.arange(3.0) / 4,
        "b": _f32(2),
        "c": np.ones(2, np.float32),
    },
    "m17_empty": lambda: {},
    "m18_none": lambda: None,
    "m19_no_params": lambda: {"n": jnp.arange(3), "s": "x", "k": jax.random.key(2)},
}

# Trees whose leaves are all trainable float arrays: jax.flatten_util.ravel_pytree
# is an oracle for them.
ALL_FLOAT = [
    "m01_array",
    "m02_dict",
    "m03_tuple",
    "m04_list",
    "m05_namedtuple",
    "m06_dataclass",
    "m07_nnx_seed",
    "m11_linen_params",
    "m15_float_mix",
]


def make(name: str) -> Any:
    return CORPUS[name]()


# ---------------------------------------------------------------- oracles


def canonical(dtype: Any) -> np.dtype:
    """The dtype JAX stores ``dtype`` as (float64 is float32 without x64)."""
    if jnp.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys
        return dtype
    return jax.dtypes.canonicalize_dtype(dtype)


def _is_inexact_array(x: Any) -> bool:
    return isinstance(x, ARRAYS) and jnp.issubdtype(x.dtype, jnp.inexact)


def expected_params(tree: Any) -> list[tuple[str, Any]]:
    """``(keystr path, leaf)`` of every parameter, from jax.tree_util and nnx
    alone: inexact array leaves, in tree_leaves order, skipping the contents
    of every ``nnx.Variable`` that is not an ``nnx.Param``. (No ties, no
    register_trainable: the corpus has neither.)"""
    out = []
    flat = jtu.tree_flatten_with_path(tree, is_leaf=lambda y: isinstance(y, nnx.Variable))[0]
    for path, x in flat:
        if isinstance(x, nnx.Variable):
            if not isinstance(x, nnx.Param):
                continue
            pairs = jtu.tree_flatten_with_path(x)[0]
        else:
            pairs = [((), x)]
        for sub, leaf in pairs:
            if _is_inexact_array(leaf):
                out.append((jtu.keystr((*path, *sub)), leaf))
    return out


def expected_dtype(leaves: list[Any]) -> np.dtype:
    """``jnp.result_type`` of the leaves' (canonical) dtypes; float32 if none."""
    if not leaves:
        return np.dtype(np.float32)
    return np.dtype(jnp.result_type(*(canonical(x.dtype) for x in leaves)))


def expected_flat(tree: Any) -> np.ndarray:
    params = [np.asarray(x) for _, x in expected_params(tree)]
    dtype = expected_dtype(params)
    if not params:
        return np.zeros((0,), dtype)
    return np.concatenate([p.reshape(-1).astype(dtype) for p in params])


def nonparam_arrays(tree: Any) -> list[Any]:
    """The array leaves of ``tree`` (jax.tree_util's view) that are not parameters."""
    param_ids = {id(x) for _, x in expected_params(tree)}
    return [x for x in jtu.tree_leaves(tree) if isinstance(x, ARRAYS) and id(x) not in param_ids]


def probe_vector(n: int, dtype: Any) -> jax.Array:
    """A length-``n`` vector of small integers (exact in bfloat16/float16)
    that differs from any corpus tree's flat vector."""
    v = (np.arange(n) % 11 - 5).astype(np.float32) * 2 + 1
    if jnp.issubdtype(dtype, jnp.complexfloating):
        v = v + 1j * (v - 3)
    return jnp.asarray(v.astype(dtype))


# ---------------------------------------------------------------- comparisons


def _comparable(x: Any) -> np.ndarray:
    a = np.asarray(jax.random.key_data(x) if _is_key(x) else x)
    if a.dtype.kind == "V" or (jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4):
        a = a.astype(np.float32)  # bfloat16, float16, float8: compare as float32
    return a


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_leaf_equal(expected: Any, got: Any, where: str = "") -> None:
    if isinstance(expected, ARRAYS):
        assert isinstance(got, ARRAYS), f"{where}: expected an array, got {type(got)}"
        assert got.shape == expected.shape, f"{where}: shape {got.shape} != {expected.shape}"
        if _is_key(expected):
            assert _is_key(got) and got.dtype == expected.dtype, f"{where}: {got.dtype}"
        else:
            assert canonical(got.dtype) == canonical(expected.dtype), (
                f"{where}: dtype {got.dtype} != {expected.dtype}"
            )
        np.testing.assert_array_equal(_comparable(got), _comparable(expected), err_msg=where)
    else:
        assert type(got) is type(expected), f"{where}: {type(got)} != {type(expected)}"
        assert got is expected or got == expected, f"{where}: {got!r} != {expected!r}"


def assert_tree_equal(expected: Any, got: Any) -> None:
    """Same structure (jax treedef) and equal leaves with equal dtypes."""
    pe, te = jtu.tree_flatten_with_path(expected)
    pg, tg = jtu.tree_flatten_with_path(got)
    assert te == tg, f"structure differs:\n{te}\n{tg}"
    for (path, e), (_, g) in zip(pe, pg, strict=True):
        assert_leaf_equal(e, g, jtu.keystr(path))


# ---------------------------------------------------------------- eager / jit


def apply(mode: Callable[[Any], Any], f: Callable[..., Any], *trees: Any) -> Any:
    """``mode(f)(*trees)`` for trees that may hold functions, strings, numpy
    arrays and the like: under ``jax.jit`` the ``jax.Array`` leaves are the
    traced arguments, every other leaf is closed over, and the non-array
    leaves of the result come back as they were returned. Eager: ``f(*trees)``.
    """

    def probe() -> None:
        return None

    if mode(probe) is probe:  # the eager mode is the identity
        return f(*trees)
    leaves, treedef = jtu.tree_flatten(trees)
    dynamic = [isinstance(x, jax.Array) for x in leaves]
    static_out: list[Any] = []

    def traced(arrays: list[jax.Array]) -> list[jax.Array]:
        it = iter(arrays)
        args = treedef.unflatten(
            [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        )
        out = f(*args)
        oleaves, otreedef = jtu.tree_flatten(out)
        odyn = [isinstance(x, jax.Array) for x in oleaves]
        static_out.append(
            (otreedef, odyn, [None if d else x for x, d in zip(oleaves, odyn, strict=True)])
        )
        return [x for x, d in zip(oleaves, odyn, strict=True) if d]

    arrays_out = mode(traced)([x for x, d in zip(leaves, dynamic, strict=True) if d])
    otreedef, odyn, consts = static_out[-1]
    it = iter(arrays_out)
    return otreedef.unflatten([next(it) if d else c for c, d in zip(consts, odyn, strict=True)])


class Net(nnx.Module):
    """Linear -> BatchNorm -> Dropout: params, batch stats and RNG state."""

    def __init__(self, seed: int = 0, width: int = 4):
        rngs = nnx.Rngs(seed)
        self.lin = nnx.Linear(3, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.lin(x)))
