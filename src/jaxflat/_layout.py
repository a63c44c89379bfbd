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
import operator
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
    dtypes: tuple[
        np.dtype, ...
    ]  # per parameter, as JAX holds it (float64 numpy: float32 without x64)
    given: tuple[np.dtype, ...]  # per parameter, as given (what ``layout`` reports)
    shardings: tuple[Any, ...] | None  # per parameter when sharded over a mesh, else None
    sharding: Any  # what the caller asked for ``flat``, or None
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = (
            self.structure.key,
            self.kinds,
            self.shapes,
            self.dtypes,
            self.given,
            self.shardings,
            self.sharding,
        )
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

    @functools.cached_property
    def others(self) -> tuple[int, ...]:
        """The other leaves' indices."""
        return tuple(i for i, k in enumerate(self.kinds) if k < 0)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layout) and self.key == other.key)

    def __hash__(self) -> int:
        return self.hash

    def entries(self) -> tuple[LayoutEntry, ...]:
        """One :class:`LayoutEntry` per parameter, in flat order."""
        paths = self.structure.paths
        return tuple(
            LayoutEntry(jtu.keystr(paths[i]), a, a + n, s, d)
            for i, a, n, s, d in zip(
                self.params, self.starts, self.sizes, self.shapes, self.given, strict=True
            )
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


# Offsets per reduce in :func:`split_traced`: one reduce of 1000 outputs took
# 8.6 s to compile (7 MB of LLVM IR), 25 per reduce 7.6 s for the whole loss.
GROUP = 25


def split_traced(v: Any, shapes: Sequence[Shape], dtypes: Sequence[Any]) -> list[Any]:
    """:func:`split`'s bits, in a form XLA:CPU compiles several times faster
    under ``jit``: a loss through ``split`` compiled in 5-11x the time of the
    same loss on the tree (issue 17).

    Why: XLA:CPU compiles one kernel per distinct fusion, and equal fusions
    (the same ops on the same shapes) share one. A loss on the tree gives
    equal fusions for equal-shaped leaves; a slice of ``v`` is fused into
    its consumer with its offset as a constant, so every leaf's consumer is
    a kernel of its own. Here each piece is a ``dynamic_slice`` whose offset
    XLA cannot fold (the offset plus ``min(bits of v[0], 0)``, which is 0
    for every ``v``, computed by a variadic reduce of ``GROUP`` offsets that
    XLA does not fuse into consumers), so the consumers of equal-shaped
    pieces are equal fusions. The offsets are in bounds, so the pieces are
    the same bits. The tangent is :func:`split`, whose transpose is one
    concatenate. ``v`` of several dimensions, empty, or of 2**31 elements or
    more: :func:`split`.
    """
    n = v.shape[-1]
    if v.ndim != 1 or len(shapes) < 2 or n == 0 or n >= 2**31:
        return split(v, shapes, dtypes)
    return _split_traced(tuple(shapes), tuple(dtypes), v)  # type: ignore[no-any-return]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _split_traced(shapes: tuple[Shape, ...], dtypes: tuple[Any, ...], v: Any) -> list[Any]:
    # Under vmap the offsets would be batched (from v[0]): dynamic slices at
    # batched offsets are gathers, 1.8x slower to run. A batch takes split.
    cut = jax.custom_batching.custom_vmap(functools.partial(_cut, shapes, dtypes))
    cut.def_vmap(lambda _, batched, v: (split(v, shapes, dtypes), [batched[0]] * len(shapes)))
    return cut(v)  # type: ignore[no-any-return]


def _cut(shapes: tuple[Shape, ...], dtypes: tuple[Any, ...], v: Any) -> list[Any]:
    sizes = [math.prod(s) for s in shapes]
    starts = list(itertools.accumulate(sizes, initial=0))[:-1]
    x = v[0].real if jnp.issubdtype(v.dtype, jnp.complexfloating) else v[0]
    bits = lax.bitcast_convert_type(x, np.dtype(f"uint{8 * x.dtype.itemsize}"))
    zero = jnp.minimum(bits, 0).astype(np.int32)
    offsets: list[Any] = []
    for k in range(0, len(starts), GROUP):
        pairs = [jnp.stack([np.int32(s), zero]) for s in starts[k : k + GROUP]]
        offsets += lax.reduce(pairs, [np.int32(0)] * len(pairs), _add, (0,))
    return [
        cast(lax.dynamic_slice_in_dim(v, o, n).reshape(s), d)
        for o, n, s, d in zip(offsets, sizes, shapes, dtypes, strict=True)
    ]


def _add(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    return [x + y for x, y in zip(a, b, strict=True)]


@_split_traced.defjvp
def _split_traced_jvp(
    shapes: tuple[Shape, ...], dtypes: tuple[Any, ...], primals: Any, tangents: Any
) -> Any:
    return _split_traced(shapes, dtypes, primals[0]), split(tangents[0], shapes, dtypes)


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype`` (numpy or jax): complex into real keeps the real part."""
    if x.dtype == dtype:
        return x
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and not jnp.issubdtype(
        dtype, jnp.complexfloating
    ):
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
# for it (``Layout.state``). Also, under its structure's key, the layout last
# built for a structure; ``_reuse`` returns it only after checking that
# ``build`` would give an equal one (the same parameter types, shapes and
# dtypes; the other leaves sorting as before). Bounded at 64 entries: a
# layout's compiled programs take about 1.5 MiB of host memory on XLA:CPU and
# are freed with it (when no ``Restructure`` holds it), so the cache holds at
# most ~100 MiB of programs.
_LAYOUTS: LRU[Any, Layout] = LRU(64)


class Place(NamedTuple):
    """Where one call's parameters are. Not part of the layout: one layout
    serves arrays on any device (and under ``jit`` alike)."""

    device: Any  # the one device of all concrete parameters; None: none, or several
    spread: bool  # the concrete parameters span several devices
    committed: bool  # some parameter is committed to its device
    traced: bool  # some parameter is a tracer
    abstract: bool = False  # the parameters are ``jax.ShapeDtypeStruct`` s (an abstract tree)


def of(
    tree: Any, filter: Callable[[Any, Any], bool] | None, sharding: Any
) -> tuple[list[Any], Layout, Place]:
    """The tree's leaves (walk order), its layout (interned) and where its
    parameters are."""
    leaves, st = structure(tree)
    plain = filter is None and sharding is None and not st.dynamic
    if plain:
        last = _LAYOUTS.get(("last", st.key))
        place = None if last is None else _reuse(last, leaves)
        if last is not None and place is not None:
            return leaves, last, place
    new, place = build(leaves, st, filter, sharding)
    layout = _LAYOUTS.get(new) or _LAYOUTS.put(new, new)
    if plain:
        _LAYOUTS.put(("last", st.key), layout)
    return leaves, layout, place


_shape, _dtype = operator.attrgetter("shape"), operator.attrgetter("dtype")
_sharding, _committed = operator.attrgetter("sharding"), operator.attrgetter("committed")


def _reuse(layout: Layout, leaves: list[Any]) -> Place | None:
    """Where the parameters are, if ``build`` would give ``layout`` for these
    leaves of its structure; None if it might not. Checked with C-level maps:
    every parameter a concrete array on one device (as when ``layout`` was
    built, with no mesh shardings) of the same shape and dtype, and every
    other leaf sorting as it did."""
    if layout.shardings is not None:
        return None
    params = [leaves[i] for i in layout.params]
    if set(map(type, params)) - {_ArrayImpl}:
        return None
    if tuple(map(_shape, params)) != layout.shapes or tuple(map(_dtype, params)) != layout.given:
        return None
    train = layout.structure.train
    for i in layout.others:
        x = leaves[i]
        if layout.kinds[i] == ARRAY:
            if not isinstance(x, P.ARRAY_TYPES) or (train[i] and P.numeric_array(x)):
                return None
        elif isinstance(x, P.ARRAY_TYPES) or (train[i] and _abstract_number(x)):
            return None
    shardings = list(map(_sharding, params))
    distinct = dict(zip(map(id, shardings), shardings, strict=True)).values()
    devices = {d for s in distinct for d in s.device_set}
    if len(devices) != 1:
        return None
    return Place(devices.pop(), False, any(map(_committed, params)), False)


_ArrayImpl: Any = None  # the concrete array type, for a fast path through the common case
try:
    from jax._src.array import ArrayImpl as _ArrayImpl
except ImportError:  # pragma: no cover
    pass


def build(
    leaves: list[Any], st: Structure, filter: Callable[[Any, Any], bool] | None, sharding: Any
) -> tuple[Layout, Place]:
    """The layout of a tree with these leaves (walk order), and where its
    parameters are: one pass over the leaves, one over the parameters.

    A ``jax.ShapeDtypeStruct`` leaf (an abstract tree, from ``jax.eval_shape``)
    is a parameter where an array of its shape and dtype would be; as a
    non-parameter it is static, kept as it was.

    Raises:
      ValueError: parameters on different single devices.
    """
    kinds: list[int] = []
    params: list[Any] = []
    train, paths = st.train, st.paths
    for i, x in enumerate(leaves):
        if type(x) is _ArrayImpl or isinstance(x, P.ARRAY_TYPES):
            kind, numeric = ARRAY, train[i] and P.numeric_array(x)
        else:
            kind, numeric = CONST, train[i] and _abstract_number(x)
        if numeric and (filter is None or filter(paths[i], x)):
            kind = len(params)
            params.append(x)
        kinds.append(kind)
    seen: dict[
        int, tuple[Any, int]
    ] = {}  # distinct shardings, by id: equal ones are often one object
    committed = traced = abstract = False
    known = 0  # parameters whose sharding is known
    for j, p in enumerate(params):
        if type(p) is _ArrayImpl or (
            isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer)
        ):
            s = p.sharding
            committed = committed or p.committed
        elif isinstance(p, jax.ShapeDtypeStruct):
            abstract = True
            if p.sharding is None:
                continue
            s = p.sharding
        else:
            traced = traced or isinstance(p, jax.core.Tracer)
            continue  # numpy or a tracer
        known += 1
        if id(s) not in seen:
            seen[id(s)] = (s, j)
    devices: dict[Any, int] = {}
    spread = False
    for s, j in seen.values():
        if len(s.device_set) == 1:
            devices.setdefault(next(iter(s.device_set)), j)
        else:
            spread = True
    if len(devices) > 1:
        where = [i for i, k in enumerate(kinds) if k >= 0]
        (d1, i1), (d2, i2) = list(devices.items())[:2]
        raise ValueError(
            f"destructure: parameters live on different devices: {jtu.keystr(paths[where[i1]])} on "
            f"{d1} and {jtu.keystr(paths[where[i2]])} on {d2}; put them on one device "
            "(jax.device_put) or shard them over one mesh"
        )
    shardings = None  # per parameter: over a mesh (or when ``sharding`` is asked), all known
    if (spread or sharding is not None) and known == len(params):
        shardings = tuple(p.sharding for p in params)
    x64 = bool(jax.config.read("jax_enable_x64"))
    given = tuple([p.dtype for p in params])  # numpy dtypes (jax's too)
    held = {d: canonical(d, x64) for d in set(given)}  # few distinct dtypes
    layout = Layout(
        st,
        tuple(kinds),
        tuple([tuple(p.shape) for p in params]),
        tuple([held[d] for d in given]),
        given,
        shardings,
        sharding,
    )
    device = next(iter(devices)) if len(devices) == 1 and not spread else None
    return layout, Place(device, spread, committed, traced, abstract)


def _abstract_number(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct) and bool(jnp.issubdtype(x.dtype, jnp.inexact))
