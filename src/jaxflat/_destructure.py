"""destructure: a tree's parameters as one flat vector, and the way back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from . import _engine, _layout, _mesh, _predicates, _walk
from ._layout import ARRAY, CONST, Layout, LayoutEntry

T = TypeVar("T")


def clear_caches() -> None:
    """Forget every structure, layout and compiled program jaxflat keeps.

    jaxflat caches what it learns about a tree's structure, and the programs
    it compiled for it, so that repeated calls are fast; each cache is
    bounded and states why a cached answer equals a fresh one. This empties
    all of them (for tests, or to give back memory); later calls rebuild
    what they need. ``Restructure`` objects made before keep working.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> flat, re = jaxflat.destructure({"w": jnp.ones(2)})
      >>> jaxflat.clear_caches()
      >>> re(flat)["w"]
      Array([1., 1.], dtype=float32)
    """
    _walk._STRUCTURES.clear()
    _layout._LAYOUTS.clear()
    _mesh._moves.cache_clear()
    _layout._CANONICAL.clear()
    _predicates._INEXACT.clear()
    _predicates.REGISTRY.mutable_by_type.clear()


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

    __slots__ = ("_layout", "_arrays", "_consts", "_root", "__weakref__")

    def __init__(self, layout: Layout, arrays: tuple[Any, ...], consts: Any, root: str) -> None:
        self._layout = layout
        self._arrays = arrays  # what re(v) puts back, as they were
        self._consts = consts
        self._root = root

    @classmethod
    def _of(cls, layout: Layout, leaves: list[Any], root: str) -> Restructure[Any]:
        kinds = layout.kinds
        arrays = tuple([x for x, k in zip(leaves, kinds, strict=True) if k == ARRAY])
        consts = _Consts([x for x, k in zip(leaves, kinds, strict=True) if k == CONST])
        return cls(layout, arrays, consts, root)

    def _tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return self._arrays, (self._layout, self._consts, self._root)

    @property
    def length(self) -> int:
        return self._layout.length

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        return self._layout.entries()

    @property
    def dtype(self) -> np.dtype:
        return self._layout.dtype

    def __len__(self) -> int:
        return self._layout.length

    def __repr__(self) -> str:
        return f"Restructure({self._root}, ..., {self._layout.length})"

    def __call__(self, flat: Any) -> T:
        """Rebuild the tree with the parameters taken from ``flat``.

        Raises:
          ValueError: ``flat`` is not a vector of length ``self.length``.
        """
        layout = self._layout
        v = flat if isinstance(flat, jax.Array) else _as_vector(flat, layout.length)
        if v.shape != (layout.length,):
            hint = "; for a batch of vectors use jax.vmap(re)" if v.ndim == 2 else ""
            raise ValueError(
                f"Restructure expected a vector of shape ({layout.length},), got {v.shape}{hint}"
            )
        pieces = _engine.split(layout, v)
        arrays, consts = iter(self._arrays), iter(self._consts)
        leaves = [
            pieces[k] if k >= 0 else next(arrays) if k == ARRAY else next(consts)
            for k in layout.kinds
        ]
        return layout.structure.unflatten(leaves)  # type: ignore[no-any-return]


def _abstract_sharding(layout: Layout, params: list[Any]) -> Any:
    """Where an abstract tree's ``flat`` would live: as for real arrays (one
    common device, or spread over the mesh), None where the leaves say nothing."""
    sharding = _mesh.placement(layout)[0]
    if sharding is None:
        given = {getattr(p, "sharding", None) for p in params}
        sharding = given.pop() if len(given) == 1 else None
    return sharding


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
        strings, None) comes back from ``re`` as it was.
      * Commitment: ``flat`` (and ``re(v)``'s pieces) are committed to their
        device exactly when a parameter (``v``) was, as ``jit`` would make
        them, so a jitted step taking and returning ``(v, re, opt_state)``
        compiles once.
      * Abstract trees (``jax.ShapeDtypeStruct`` leaves, from
        ``jax.eval_shape`` / ``nnx.eval_shape``): ``flat`` is a
        ``jax.ShapeDtypeStruct`` of the length, dtype and sharding the real
        tree would give, and ``re(v)`` puts a real ``v``'s parameters into
        the planned tree (non-parameter leaves stay as they were).
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
      TypeError: ``tree`` is a class, not an instance; or a Flax Linen module
        (its arrays are in ``variables["params"]``).
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
    leaves, layout, place = _layout.of(tree, filter, sharding)
    params = [leaves[i] for i in layout.params]
    if place.abstract:  # e.g. from jax.eval_shape: plan, do not allocate
        flat: Any = jax.ShapeDtypeStruct(
            (layout.length,), layout.dtype, sharding=_abstract_sharding(layout, params)
        )
    else:
        flat = _engine.flatten(layout, params, place)
    root = "ArrayImpl" if isinstance(tree, jax.core.Tracer) else type(tree).__name__  # as eagerly
    return flat, Restructure._of(layout, leaves, root)
