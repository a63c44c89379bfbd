"""destructure: a tree's parameters as one flat vector, and the way back."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from . import _engine
from . import _predicates as P
from ._walk import LRU, Structure, structure

T = TypeVar("T")
_ARRAY, _CONST = -1, -2  # kinds of non-parameter leaves; a parameter's kind is its index


class LayoutEntry(NamedTuple):
    """Where one parameter lives in the flat vector: ``flat[start:stop]``."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: np.dtype


class Plan:
    """Everything static about a Restructure: frozen, hashable, and equal to
    any plan built from the same structure, leaf kinds, shapes, dtypes and
    shardings (``jit`` caches on it). Its engine holds compiled programs,
    which never take part in equality."""

    __slots__ = ("key", "hash", "st", "kinds", "spec", "given", "dtype", "length",
                 "engine", "params", "others", "_layout")

    def __init__(self, st: Structure, kinds: tuple[int, ...], spec: _engine.Spec,
                 given: tuple[np.dtype, ...], placement: tuple[Any, Any, Any]) -> None:
        self.key = (st.key, kinds, spec, given, placement)
        self.hash = hash(self.key)
        self.st = st
        self.kinds = kinds
        self.spec = spec
        self.given = given  # the parameters' own dtypes (float64 numpy stays float64 here)
        self.dtype = _engine.flat_dtype([d for _, d in spec])
        self.engine = _engine.Engine(spec, self.dtype, *placement)
        self.length = self.engine.length
        self.params = [i for i, k in enumerate(kinds) if k >= 0]
        self.others = [i for i, k in enumerate(kinds) if k < 0]
        self._layout: tuple[LayoutEntry, ...] | None = None

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Plan) and self.key == other.key)

    def __hash__(self) -> int:
        return self.hash

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        if self._layout is None:  # built on first use: a pure function of the plan
            sizes = _engine.sizes(self.spec)
            stops = itertools.accumulate(sizes)
            self._layout = tuple(
                LayoutEntry(jtu.keystr(self.st.paths[i]), stop - size, stop, shape, dtype)
                for i, stop, size, (shape, _), dtype in zip(
                    self.params, stops, sizes, self.spec, self.given, strict=True
                )
            )
        return self._layout

    def fits(self, leaves: list[Any]) -> bool:
        """Do the non-parameter leaves still sort as they did? (Parameters
        are checked by the compiled program they are passed to.)"""
        train = self.st.train
        for i in self.others:
            x = leaves[i]
            if isinstance(x, P.ARRAY_TYPES) != (self.kinds[i] == _ARRAY) or (train[i] and P.isnumeric(x)):
                return False
        return True

    def restructure(self, leaves: list[Any], root: str) -> Restructure[Any]:
        arrays = [leaves[i] for i, k in enumerate(self.kinds) if k == _ARRAY]
        consts = _Consts(leaves[i] for i, k in enumerate(self.kinds) if k == _CONST)
        return Restructure(self, tuple(arrays), consts, root)


# Plans, interned: an equal plan found here has the same key, so it is the
# plan this call would build (and it keeps its compiled programs). _LATEST:
# the last plan of each cached structure, for the compiled fast path, which
# is taken only when ``Plan.fits`` and the compiled program accept the leaves.
# Bounded at 64 plans: a plan's compiled programs take about 1.5 MiB of host
# memory on XLA:CPU and are freed with the plan (when no ``Restructure``
# holds it), so the cache holds at most ~100 MiB of programs.
_PLANS: LRU[Any, Plan] = LRU(64)
_LATEST: LRU[Any, Plan] = LRU(64)


def _clear_caches() -> None:
    """Forget every structure and plan (for tests)."""
    from ._walk import _STRUCTURES

    for cache in (_STRUCTURES, _PLANS, _LATEST):
        cache.clear()


_CANONICAL: dict[tuple[np.dtype, bool], np.dtype] = {}


def _canonical(dtype: np.dtype, x64: bool) -> np.dtype:
    """The dtype JAX holds (float64 numpy leaves are float32 without x64);
    memoised: a pure function of the dtype and the x64 flag in the key."""
    key = (dtype, x64)
    out = _CANONICAL.get(key)
    if out is None:
        out = _CANONICAL[key] = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    return out


def _committed(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """``arrays`` with uncommitted jax arrays committed to their device (the
    same values, no copy), so that a ``re`` passed to ``jit`` looks like one
    returned from it, and a step ``(v, re) -> (v', re')`` compiles once."""
    loose = [i for i, x in enumerate(arrays) if isinstance(x, jax.Array)
             and not isinstance(x, jax.core.Tracer) and not x.committed]
    if not loose:
        return arrays
    out = list(arrays)
    moved = jax.device_put([out[i] for i in loose], [out[i].sharding for i in loose])
    for i, x in zip(loose, moved, strict=True):
        out[i] = x
    return tuple(out)


class Restructure(Generic[T]):
    """The inverse of :func:`destructure`: ``re(flat)`` rebuilds the tree.

    A registered pytree whose children are the template's non-parameter
    array leaves (batch-norm statistics, integer arrays, PRNG keys); all else
    is static. So ``re`` can be an argument or a result of a jitted function,
    and new non-parameter values do not force a recompile.

    Attributes:
      length: the number of elements of the flat vector (also ``len(re)``).
      layout: one :class:`LayoutEntry` per parameter, in flat order, with
        ``path``, ``start``, ``stop``, ``shape`` and ``dtype``.
      dtype: the flat vector's dtype.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> flat, re = jaxflat.destructure({"w": jnp.ones((2, 2)), "n": 3})
      >>> re
      Restructure(dict, ..., 4)
      >>> re(jnp.arange(4.0))["w"]
      Array([[0., 1.],
             [2., 3.]], dtype=float32)
      >>> [(e.path, e.start, e.stop) for e in re.layout]
      [("['w']", 0, 4)]
    """

    __slots__ = ("_plan", "_arrays", "_consts", "_root", "_children", "__weakref__")

    def __init__(self, plan: Plan, arrays: tuple[Any, ...], consts: Any, root: str) -> None:
        self._plan = plan
        self._arrays = arrays  # what re(v) puts back, as they were
        self._consts = consts
        self._root = root
        self._children: tuple[Any, ...] | None = None  # the arrays as pytree children

    def _tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if self._children is None:  # committed once: arrays are immutable values
            self._children = _committed(self._arrays)
        return self._children, (self._plan, self._consts, self._root)

    @property
    def length(self) -> int:
        return self._plan.length

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        return self._plan.layout

    @property
    def dtype(self) -> np.dtype:
        return self._plan.dtype

    def __len__(self) -> int:
        return self._plan.length

    def __repr__(self) -> str:
        return f"Restructure({self._root}, ..., {self._plan.length})"

    def __call__(self, flat: Any) -> T:
        """Rebuild the tree with the parameters taken from ``flat``.

        Raises:
          ValueError: ``flat`` is not a vector of length ``self.length``.
        """
        plan = self._plan
        v = flat if isinstance(flat, jax.Array) else _as_vector(flat, plan.length)
        if v.shape != (plan.length,):
            hint = "; for a batch of vectors use jax.vmap(re)" if v.ndim == 2 else ""
            raise ValueError(
                f"Restructure expected a vector of shape ({plan.length},), got {v.shape}{hint}"
            )
        if not plan.spec:
            pieces: list[Any] = []
        elif isinstance(v, jax.core.Tracer):
            pieces = _engine.split_differentiable(plan.engine, v)
        else:
            pieces = plan.engine.split(v)
        arrays, consts = iter(self._arrays), iter(self._consts)
        leaves = [
            pieces[k] if k >= 0 else next(arrays) if k == _ARRAY else next(consts)
            for k in plan.kinds
        ]
        return plan.st.unflatten(leaves)  # type: ignore[no-any-return]


def _as_vector(x: Any, length: int) -> jax.Array:
    if isinstance(x, np.ndarray | np.generic | list | tuple) or hasattr(x, "__jax_array__"):
        try:
            return jnp.asarray(x)
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"Restructure expected a flat vector of shape ({length},), got a {type(x).__name__}"
    )


class _Consts(tuple):  # type: ignore[type-arg]
    """Static non-array leaves: equal when each pair is identical or ==."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Consts)
            and len(self) == len(other)
            and all(a is b or _safe_eq(a, b) for a, b in zip(self, other, strict=True))
        )

    def __hash__(self) -> int:
        return hash(tuple(_safe_hash(x) for x in self))


def _safe_eq(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _safe_hash(x: Any) -> int:
    try:
        return hash(x)
    except TypeError:
        return hash(type(x))


jtu.register_pytree_node(
    Restructure,
    Restructure._tree_flatten,
    lambda aux, arrays: Restructure(aux[0], tuple(arrays), aux[1], aux[2]),
)


def destructure(
    tree: T,
    /,
    *,
    filter: Callable[[tuple[Any, ...], Any], bool] | None = None,
    sharding: Any = None,
) -> tuple[jax.Array, Restructure[T]]:
    """All parameters of ``tree`` as one flat vector, and its inverse.

    A *parameter* is a leaf array of inexact dtype (:func:`isnumeric`),
    reached from the root through trainable children only
    (:func:`trainable`), for which ``filter(path, x)`` holds if given.

    Rules:
      * Order: ``jax.tree_util.tree_leaves(tree)``, each raveled in C order.
      * dtype: ``jnp.result_type`` of the parameter dtypes (float32 with
        bfloat16 gives float32; any complex parameter makes it complex);
        float8 types, which JAX does not promote, give way to the widest
        other float present. No parameters give shape ``(0,)`` float32.
        ``re(v)`` projects each piece back: float64 into float32 rounds,
        complex into real keeps the real part.
      * Everything else (non-trainable arrays, ints, keys, functions,
        strings, None) comes back from ``re`` as it was (jax arrays
        committed to their device, so a jitted step that returns a new
        ``re`` compiles once).
      * Ties: an ``nnx.Variable`` or ``nnx.Module`` found at several places
        by identity is one set of parameters, stored once and rebuilt
        shared; its gradient is the sum over its uses. Equal arrays are not
        ties.
      * Devices: ``flat`` lives where the parameters live; parameters on two
        different single devices are a ``ValueError``; parameters sharded
        over a mesh give a ``flat`` spread over that mesh (or ``sharding``;
        ``re(v)`` still gives each leaf its own sharding).
      * Works on traced trees: ``destructure`` is differentiable and
        jit-able, and ``re`` works under ``jit``, ``grad``, ``hessian``,
        ``jvp`` and ``vmap`` (a batch of vectors gives a batch of trees).

    Args:
      tree: any pytree: Flax NNX or Linen, Equinox, optax state, containers.
      filter: optional ``(key_path, leaf) -> bool``; only leaves for which it
        is true are parameters.
      sharding: optional ``jax.sharding.Sharding`` for ``flat``.

    Returns:
      ``(flat, re)``: the 1-D ``jax.Array`` and the :class:`Restructure`.

    Raises:
      TypeError: ``tree`` is a class, not an instance.
      ValueError: parameters on different devices; a trainable rule naming
        something that is not a child.

    Example:
      >>> import jax, jax.numpy as jnp, jaxflat
      >>> flat, re = jaxflat.destructure({"x": jnp.array([1.0, 2.0]), "y": (jnp.sin, jnp.array([3.0 + 4.0j]))})
      >>> flat
      Array([1.+0.j, 2.+0.j, 3.+4.j], dtype=complex64)
      >>> re(jnp.array([3, 5, 7 + 11j]))
      {'x': Array([3., 5.], dtype=float32), 'y': (<PjitFunction of <function sin at ...>>, Array([7.+11.j], dtype=complex64))}
    """
    leaves, st = structure(tree)
    root = "ArrayImpl" if isinstance(tree, jax.core.Tracer) else type(tree).__name__  # as eagerly
    hot = filter is None and sharding is None and not st.dynamic
    if hot:
        plan = _LATEST.get(st.key)
        if plan is not None and plan.engine.concat is not None and plan.fits(leaves):
            try:
                flat = plan.engine.concat(*[leaves[i] for i in plan.params])
                return flat, plan.restructure(leaves, root)
            except (TypeError, ValueError):
                pass  # new shapes, dtypes or devices: the general path below
    kinds = [_ARRAY if isinstance(x, P.ARRAY_TYPES) else _CONST for x in leaves]
    where: list[int] = []  # the parameters' leaf indices
    for i, (x, t) in enumerate(zip(leaves, st.train, strict=True)):
        if t and P.isnumeric(x) and (filter is None or filter(st.paths[i], x)):
            kinds[i] = len(where)
            where.append(i)
    params = [leaves[i] for i in where]
    given = tuple(np.dtype(p.dtype) for p in params)
    x64 = bool(jax.config.read("jax_enable_x64"))
    spec = tuple((tuple(p.shape), _canonical(d, x64)) for p, d in zip(params, given, strict=True))
    placement = _engine.placement(params, sharding, lambda i: jtu.keystr(st.paths[where[i]]))
    new = Plan(st, tuple(kinds), spec, given, placement)
    plan = _PLANS.get(new) or _PLANS.put(new, new)
    if hot:
        _LATEST.put(st.key, plan)
    return plan.engine.flatten(params), plan.restructure(leaves, root)
