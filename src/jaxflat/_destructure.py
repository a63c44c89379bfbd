"""destructure: a tree's parameters as one flat vector, and the way back."""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import tree_util as jtu

from . import _engine
from . import _predicates as P
from ._walk import rebuild, walk

T = TypeVar("T")
_NONPARAM_ARRAY, _CONST = -1, -2


class LayoutEntry(NamedTuple):
    """Where one parameter lives in the flat vector: ``flat[start:stop]``."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: np.dtype


class _Structure(NamedTuple):
    """What a tree's shape alone decides: cached per treedef for plain trees."""

    key: Any  # hashable: the treedef, or the walk's frames for trees with ties
    unflatten: Callable[[list[Any]], Any]
    paths: list[tuple[Any, ...]]
    train: list[bool]
    root: str
    tied: bool  # rebuilt from a walk (ties); never cached
    mutable: bool  # has nnx Variables: check for ties before using the cache


class _Plan:
    """Everything static about a Restructure. Interned per structure, so
    identity equality is structural equality (``jit`` caches on it)."""

    def __init__(self, st: _Structure, kinds: tuple[int, ...], spec: _engine.Spec,
                 paths: list[str], shardings: Any, flat_sharding: Any,
                 given: tuple[Any, ...] | None = None) -> None:
        self.unflatten = st.unflatten
        self.root = st.root
        self.kinds = kinds
        self.spec = spec
        self.shardings = shardings
        self.flat_sharding = flat_sharding
        self.dtype = jnp.dtype(jnp.result_type(*(d for _, d in spec))) if spec else jnp.dtype(jnp.float32)
        stops = list(itertools.accumulate(_engine.sizes(spec)))
        dtypes = given or [d for _, d in spec]  # as given (float64 numpy stays float64 here)
        self.layout = tuple(
            LayoutEntry(p, stop - size, stop, shape, np.dtype(dtype))
            for p, stop, size, (shape, _), dtype in zip(
                paths, stops, _engine.sizes(spec), spec, dtypes
            )
        )
        self.length = stops[-1] if stops else 0
        self.programs = _engine.Programs(spec, self.dtype, shardings, flat_sharding)
        # Index lists for the hot path (see destructure).
        self.idx = [i for i, k in enumerate(kinds) if k >= 0]
        self.array_idx = [i for i, k in enumerate(kinds) if k == _NONPARAM_ARRAY]
        self.const_idx = [i for i, k in enumerate(kinds) if k == _CONST]
        self.check_idx = [i for i, k in enumerate(kinds) if k < 0 and st.train[i]]

    def fits(self, leaves: list[Any]) -> bool:
        """Do the non-parameter leaves still sort as they did? (The
        parameters are checked by the compiled program itself.)"""
        for i in self.check_idx:
            x = leaves[i]
            if _numeric(x) or isinstance(x, P.ARRAY_TYPES) != (self.kinds[i] == _NONPARAM_ARRAY):
                return False
        return True

    def restructure(self, leaves: list[Any]) -> Restructure[Any]:
        return Restructure(
            self,
            tuple(leaves[i] for i in self.array_idx),
            _Consts(leaves[i] for i in self.const_idx),
        )


_STRUCTURES: dict[Any, _Structure] = {}
_HOT: dict[Any, _Plan] = {}  # the latest plan of each plain structure
_PLANS: collections.OrderedDict[Any, _Plan] = collections.OrderedDict()
_CACHE_SIZE = 512


def _remember(cache: Any, key: Any, value: Any) -> Any:
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return value


def _untied(tree: Any) -> bool:
    """No nnx.Variable at two places (one C++ flatten that stops at them)."""
    nodes = jtu.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ids = {id(x) for x in nodes if isinstance(x, nnx.Variable)}
    return len(ids) == sum(isinstance(x, nnx.Variable) for x in nodes)


def _structure(tree: Any) -> tuple[list[Any], _Structure]:
    """The tree's leaves and structure, cached on the treedef. Trees whose
    nnx Variables are tied (one object at two places) are walked each time,
    since identity is not part of a treedef."""
    is_leaf = P.is_registered_leaf if P._LEAF_TYPES else None
    leaves, td = jtu.tree_flatten(tree, is_leaf=is_leaf)
    treedef: Any = td
    ckey = (treedef, P._VERSION[0])
    st = _STRUCTURES.get(ckey)
    if st is not None and (not st.mutable or _untied(tree)):
        return leaves, st
    w = walk(tree)
    root = type(tree).__name__
    if not w.tied:
        st = _Structure(treedef, treedef.unflatten, w.paths, w.train, root, False, w.mutable)
        return w.leaves, _remember(_STRUCTURES, ckey, st)
    key = w.skeleton()
    return w.leaves, _Structure(key, functools.partial(rebuild, key), w.paths, w.train, root, True, True)


_INEXACT: dict[Any, bool] = {}
_CANONICAL: dict[Any, Any] = {}


def _canonical(dtype: Any) -> Any:
    """The dtype JAX will hold (float64 numpy leaves are float32 without x64)."""
    key = (dtype, jax.config.read("jax_enable_x64"))
    out = _CANONICAL.get(key)
    if out is None:
        out = _CANONICAL[key] = jax.dtypes.canonicalize_dtype(dtype)
    return out


def _numeric(x: Any) -> bool:
    if not isinstance(x, P.ARRAY_TYPES):
        return False
    dt = cast(Any, x).dtype
    ok = _INEXACT.get(dt)
    if ok is None:
        ok = _INEXACT[dt] = bool(jnp.issubdtype(dt, jnp.inexact))
    return ok and not P.is_registered_leaf(x)


def _placement(params: list[Any], paths: list[tuple[Any, ...]], idx: list[int], sharding: Any) -> Any:
    """The per-parameter shardings (None: all on one device, or traced) and
    the flat vector's sharding; ValueError for parameters on different
    single devices."""
    seen: dict[Any, int] = {}
    for i, p in zip(idx, params):
        if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer):
            seen.setdefault(p.sharding, i)
    single = {s: i for s, i in seen.items() if len(s.device_set) == 1}
    devices = {next(iter(s.device_set)): i for s, i in single.items()}
    if len(devices) > 1:
        (d1, i1), (d2, i2) = list(devices.items())[:2]
        raise ValueError(
            "destructure: parameters live on different devices: "
            f"{jtu.keystr(paths[i1])} on {d1} and {jtu.keystr(paths[i2])} on {d2}; put "
            "them on one device (jax.device_put) or shard them over one mesh"
        )
    if len(single) == len(seen) and sharding is None:
        return None, None
    if len(seen) < len(params):  # numpy or traced among sharded: let XLA lay them out
        return None, sharding
    from ._sharding import flat_sharding

    shardings = tuple(p.sharding for p in params)
    return shardings, sharding if sharding is not None else flat_sharding(params)


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

    __slots__ = ("_plan", "_arrays", "_consts", "__weakref__")

    def __init__(self, plan: _Plan, arrays: tuple[Any, ...], consts: Any) -> None:
        self._plan = plan
        self._arrays = arrays
        self._consts = consts

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
        return f"Restructure({self._plan.root}, ..., {self._plan.length})"

    def __call__(self, flat: Any) -> T:
        """Rebuild the tree with the parameters taken from ``flat``.

        Raises:
          ValueError: ``flat`` is not a vector of length ``self.length``.
        """
        plan = self._plan
        v = flat if isinstance(flat, jax.Array) else jnp.asarray(flat)
        if v.shape != (plan.length,):
            hint = "; for a batch of vectors use jax.vmap(re)" if v.ndim == 2 else ""
            raise ValueError(
                f"Restructure expected a vector of shape ({plan.length},), got {v.shape}{hint}"
            )
        if not plan.spec:
            pieces = []
        elif isinstance(v, jax.core.Tracer):
            pieces = _engine.split(plan.programs, plan.shardings, v)
        else:
            pieces = plan.programs.unflatten(v, plan.shardings)
        arrays, consts = iter(self._arrays), iter(self._consts)
        leaves = [
            pieces[k] if k >= 0 else next(arrays) if k == _NONPARAM_ARRAY else next(consts)
            for k in plan.kinds
        ]
        return plan.unflatten(leaves)  # type: ignore[no-any-return]


class _Consts(tuple):  # type: ignore[type-arg]
    """Static non-array leaves: equal when each pair is identical or ==."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Consts)
            and len(self) == len(other)
            and all(a is b or _safe_eq(a, b) for a, b in zip(self, other))
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
    lambda re: (re._arrays, (re._plan, re._consts)),
    lambda aux, arrays: Restructure(aux[0], tuple(arrays), aux[1]),
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
        no parameters give shape ``(0,)`` float32. ``re(v)`` projects each
        piece back: float64 into float32 rounds, complex into real keeps the
        real part.
      * Everything else (non-trainable arrays, ints, keys, functions,
        strings, None) comes back from ``re`` as it was.
      * Ties: an ``nnx.Variable`` or ``nnx.Module`` found at several places
        by identity is one set of parameters, stored once and rebuilt
        shared; its gradient is the sum over its uses. Equal arrays are not
        ties.
      * Devices: ``flat`` lives where the parameters live; parameters on two
        different single devices are a ``ValueError``; parameters sharded
        over a mesh give a ``flat`` spread over that mesh (or ``sharding``).
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

    Example:
      >>> import jax, jax.numpy as jnp, jaxflat
      >>> flat, re = jaxflat.destructure({"x": jnp.array([1.0, 2.0]), "y": (jnp.sin, jnp.array([3.0 + 4.0j]))})
      >>> flat
      Array([1.+0.j, 2.+0.j, 3.+4.j], dtype=complex64)
      >>> re(jnp.array([3, 5, 7 + 11j]))
      {'x': Array([3., 5.], dtype=float32), 'y': (<PjitFunction of <function sin at ...>>, Array([7.+11.j], dtype=complex64))}
    """
    leaves, st = _structure(tree)
    hot_key = (st.key, P._VERSION[0]) if filter is None and sharding is None and not st.tied else None
    if hot_key is not None:
        plan = _HOT.get(hot_key)
        if plan is not None and plan.programs.concat is not None and plan.fits(leaves):
            try:
                flat = plan.programs.concat(*[leaves[i] for i in plan.idx])
                return flat, plan.restructure(leaves)
            except (TypeError, ValueError):
                pass  # new shapes, dtypes or devices: the general path below
    idx = [
        i
        for i, (x, t) in enumerate(zip(leaves, st.train))
        if t and _numeric(x) and (filter is None or filter(st.paths[i], x))
    ]
    params = [leaves[i] for i in idx]
    shardings, flat_sharding = _placement(params, st.paths, idx, sharding)
    spec = tuple((tuple(p.shape), _canonical(p.dtype)) for p in params)
    dts = tuple(p.dtype for p in params)
    given = dts if any(g != d for g, (_, d) in zip(dts, spec)) else None
    pkey = (st.key, P._VERSION[0], tuple(idx), spec, given, shardings, flat_sharding)
    plan = _PLANS.get(pkey)
    if plan is None:
        kinds, n = [], 0
        for x in leaves:
            kinds.append(_NONPARAM_ARRAY if isinstance(x, P.ARRAY_TYPES) else _CONST)
        for n, i in enumerate(idx):
            kinds[i] = n
        paths = [jtu.keystr(st.paths[i]) for i in idx]
        plan = _Plan(st, tuple(kinds), spec, paths, shardings, flat_sharding, given)
        _remember(_PLANS, pkey, plan)
    if hot_key is not None:
        _remember(_HOT, hot_key, plan)
    return plan.programs.flatten(params, plan.flat_sharding), plan.restructure(leaves)
