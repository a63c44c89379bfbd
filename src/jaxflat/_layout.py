"""What a flat vector is: the :class:`Layout`, and the reference
concatenate and split that define ``flat`` and ``re(v)``.

A ``Layout`` is built from one tree in one pass (:func:`build`) and says
everything static about its flat vector: the structure, which leaves are
parameters, their shapes, dtypes and offsets, the flat dtype and, for
parameters sharded over a mesh, their shardings. It is a frozen value:
equal trees give equal layouts, so ``jax.jit`` caches on it.

:func:`concat` and :func:`split` are the semantics. Every faster way of
making or cutting a flat vector (numpy on the host, compiled programs, the
memory-bounded moves over a mesh) must give exactly their bits; the tests
pin that.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax import tree_util as jtu

from . import _predicates as P
from ._walk import LRU, Structure, structure

# A leaf's kind in a layout: its index among the parameters (>= 0), or one of
ARRAY = -1  # a non-parameter array: a child of the Restructure (may change under jit)
CONST = -2  # anything else: static, kept as it was

Shape = tuple[int, ...]


class LayoutEntry(NamedTuple):
    """Where one parameter lives in the flat vector: ``flat[start:stop]``."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True, eq=False)
class Layout:
    """Everything static about one flat vector; equal and hashing alike
    exactly when built from the same structure, parameter choice, shapes,
    dtypes and shardings. ``state`` is the engine's per-layout memory
    (compiled programs, counters); it never takes part in equality."""

    structure: Structure
    kinds: tuple[int, ...]  # per leaf: parameter index, ARRAY or CONST
    shapes: tuple[Shape, ...]  # per parameter
    dtypes: tuple[np.dtype, ...]  # per parameter, as JAX holds it (float64 numpy: float32 without x64)
    given: tuple[np.dtype, ...]  # per parameter, as given (what ``layout`` reports)
    shardings: tuple[Any, ...] | None  # per parameter when sharded over a mesh, else None
    sharding: Any  # what the caller asked for ``flat``, or None
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = (self.structure.key, self.kinds, self.shapes, self.dtypes, self.given,
               self.shardings, self.sharding)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "hash", hash(key))

    key: Any = field(init=False, compare=False, repr=False)
    hash: int = field(init=False, compare=False, repr=False)

    # Derived on first use (a layout found in the cache was built before).
    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.sizes, initial=0))[:-1]

    @functools.cached_property
    def length(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def dtype(self) -> np.dtype:
        return flat_dtype(self.dtypes)

    @functools.cached_property
    def params(self) -> tuple[int, ...]:
        """The parameters' leaf indices."""
        return tuple(i for i, k in enumerate(self.kinds) if k >= 0)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layout) and self.key == other.key)

    def __hash__(self) -> int:
        return self.hash

    def entries(self) -> tuple[LayoutEntry, ...]:
        """One :class:`LayoutEntry` per parameter, in flat order."""
        paths = self.structure.paths
        return tuple(
            LayoutEntry(jtu.keystr(paths[i]), a, a + n, s, d)
            for i, a, n, s, d in zip(self.params, self.starts, self.sizes, self.shapes, self.given,
                                     strict=True)
        )


# ---------------------------------------------------------------- the semantics


def concat(params: Sequence[Any], dtype: Any) -> jax.Array:
    """The reference flatten: every parameter raveled, cast to ``dtype``,
    concatenated (works on arrays and tracers alike)."""
    if not params:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate([jnp.ravel(p).astype(dtype) for p in params])


def split(v: jax.Array, shapes: Sequence[Shape], dtypes: Sequence[Any]) -> list[jax.Array]:
    """The reference rebuild: ``v`` (or a batch of vectors, on its last
    axis) cut into pieces of ``shapes``, each cast back to its dtype. One
    ``lax.split``: its transpose is one concatenate."""
    if not shapes:
        return []
    pieces = lax.split(v, [math.prod(s) for s in shapes], axis=v.ndim - 1)
    lead = v.shape[:-1]
    return [cast(p.reshape(*lead, *s), d) for p, s, d in zip(pieces, shapes, dtypes, strict=True)]


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype`` (numpy or jax): complex into real keeps the real part."""
    if x.dtype == dtype:
        return x
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = x.real
    return x.astype(dtype)


def flat_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """``jnp.result_type`` of the parameters; float8 types, which JAX does not
    promote implicitly, give way to the widest other float present."""
    dtypes = list(dict.fromkeys(dtypes))  # the join is order-free; few distinct dtypes
    if not dtypes:
        return np.dtype(jnp.float32)
    try:
        return np.dtype(jnp.result_type(*dtypes))
    except jax.dtypes.TypePromotionError:
        wide = [d for d in dtypes if np.dtype(d).itemsize > 1]
        return np.dtype(jnp.result_type(*wide)) if wide else np.dtype(jnp.float32)


# ---------------------------------------------------------------- building one

_CANONICAL: dict[tuple[np.dtype, bool], np.dtype] = {}


def canonical(dtype: Any, x64: bool) -> np.dtype:
    """The dtype JAX holds (float64 numpy leaves are float32 without x64).
    Memoised: a pure function of the dtype and the x64 flag in the key."""
    key = (dtype, x64)
    out = _CANONICAL.get(key)
    if out is None:
        out = _CANONICAL[key] = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    return out


# Layouts, interned: an equal layout found here has the same key, so it is
# the layout this call would build, and it carries the programs compiled
# for it (``Layout.state``). Bounded at 64: a layout's compiled programs take
# about 1.5 MiB of host memory on XLA:CPU and are freed with it (when no
# ``Restructure`` holds it), so the cache holds at most ~100 MiB of programs.
_LAYOUTS: LRU[Layout, Layout] = LRU(64)


def of(tree: Any, filter: Callable[[Any, Any], bool] | None, sharding: Any) -> tuple[list[Any], Layout]:
    """The tree's leaves (walk order) and its layout, interned."""
    leaves, st = structure(tree)
    new = build(leaves, st, filter, sharding)
    return leaves, _LAYOUTS.get(new) or _LAYOUTS.put(new, new)


def build(leaves: list[Any], st: Structure, filter: Callable[[Any, Any], bool] | None,
          sharding: Any) -> Layout:
    """The layout of a tree with these leaves (walk order), in one pass.

    A ``jax.ShapeDtypeStruct`` leaf (an abstract tree, from ``jax.eval_shape``)
    is a parameter where an array of its shape and dtype would be; as a
    non-parameter it is static, kept as it was.

    Raises:
      ValueError: parameters on different single devices.
    """
    kinds = [ARRAY if isinstance(x, P.ARRAY_TYPES) else CONST for x in leaves]
    params: list[Any] = []
    paths = st.paths
    for i, t in enumerate(st.train):
        x = leaves[i]
        if t and (P.isnumeric(x) if kinds[i] == ARRAY else _abstract_number(x)) and (
            filter is None or filter(paths[i], x)
        ):
            kinds[i] = len(params)
            params.append(x)
    given = tuple([np.dtype(p.dtype) for p in params])
    x64 = bool(jax.config.read("jax_enable_x64"))
    where = [i for i, k in enumerate(kinds) if k >= 0]
    shardings = mesh_shardings(params, lambda j: jtu.keystr(paths[where[j]]), sharding is not None)
    return Layout(st, tuple(kinds), tuple([tuple(p.shape) for p in params]),
                  tuple([canonical(d, x64) for d in given]), given, shardings, sharding)


def _abstract_number(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct) and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _sharding_of(x: Any) -> Any:
    """A concrete array's sharding, an abstract leaf's if it has one, else None."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return x.sharding
    return x.sharding if isinstance(x, jax.ShapeDtypeStruct) else None


def mesh_shardings(params: Sequence[Any], name: Callable[[int], str],
                   asked: bool = False) -> tuple[Any, ...] | None:
    """The parameters' shardings, when every parameter has one (a concrete
    array, or an abstract leaf with a sharding) and some spans several
    devices (a mesh) or a sharding was ``asked`` for ``flat``; else None
    (one device; or numpy or tracers among them: XLA lays them out).

    Raises:
      ValueError: parameters on different single devices (``name(i)`` names
        parameter ``i``).
    """
    seen: dict[int, tuple[Any, int]] = {}  # by id: equal shardings are often one object
    known = 0
    for i, p in enumerate(params):
        s = _sharding_of(p)
        if s is not None:
            known += 1
            if id(s) not in seen:
                seen[id(s)] = (s, i)
    devices: dict[Any, int] = {}
    spread = False
    for s, i in seen.values():
        if len(s.device_set) == 1:
            devices.setdefault(next(iter(s.device_set)), i)
        else:
            spread = True
    if len(devices) > 1:
        (d1, i1), (d2, i2) = list(devices.items())[:2]
        raise ValueError(
            f"destructure: parameters live on different devices: {name(i1)} on {d1} and "
            f"{name(i2)} on {d2}; put them on one device (jax.device_put) or shard them over one mesh"
        )
    if not (spread or asked) or known < len(params):
        return None
    return tuple(_sharding_of(p) for p in params)
