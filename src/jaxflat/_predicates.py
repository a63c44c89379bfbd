"""The single source of truth: what is a leaf, a number, a trainable child.

Every jaxflat function (destructure, modules, state, loadmodel, summary)
consults these predicates and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import tree_util as jtu

_LEAF_TYPES: tuple[type, ...] = ()
_TRAINABLE: dict[type, Iterable[Any] | Callable[[Any], Iterable[Any]]] = {}
# Bumped on every registry change, so that caches keyed on structure expire.
_VERSION = [0]

# Mutable nodes: the same object at two places is one tied node.
MUTABLE_TYPES: tuple[type, ...] = (nnx.Variable, nnx.Pytree)
ARRAY_TYPES: tuple[type, ...] = (jax.Array, np.ndarray)


def register_leaf(cls: type) -> type:
    """Make every instance of ``cls`` (and its subclasses) an opaque leaf.

    No jaxflat function descends into a registered leaf: it is kept whole by
    ``destructure`` (never a parameter), ``state`` turns it into ``()`` and
    ``loadmodel`` keeps the destination's.

    Args:
      cls: the class to treat as a leaf. Returned, so this works as a decorator.

    Example:
      >>> import jax, jaxflat
      >>> @jaxflat.register_leaf
      ... @jax.tree_util.register_static
      ... class Config:
      ...     def __init__(self): self.width = 3
      >>> jaxflat.isleaf(Config())
      True
    """
    global _LEAF_TYPES
    if cls not in _LEAF_TYPES:
        _LEAF_TYPES = (*_LEAF_TYPES, cls)
        _VERSION[0] += 1
    return cls


def is_registered_leaf(x: Any) -> bool:
    return bool(_LEAF_TYPES) and isinstance(x, _LEAF_TYPES)


def children(node: Any) -> tuple[jtu.PyTreeDef, list[tuple[Any, Any]]] | None:
    """One level of ``node``: its treedef and ``(key, child)`` pairs.

    Returns ``None`` for a real leaf (an array, a function, a registered
    leaf). A node without children (None, ``()``, ``{}``) gives an empty list.
    """
    if isinstance(node, ARRAY_TYPES) or is_registered_leaf(node):
        return None
    pairs, treedef = jtu.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    treedef = cast(Any, treedef)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    return treedef, [(path[0], child) for path, child in pairs]


def keyname(key: Any) -> Any:
    """The child name of a jax key-path entry: attribute name, dict key or index."""
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def hidden(key: Any, child: Any) -> bool:
    """Library internals that are children in jax's eyes but not to users."""
    return isinstance(child, nnx.pytreelib.PytreeState)


def isleaf(x: Any) -> bool:
    """True if jaxflat does not descend into ``x``.

    That is: ``x`` has no children in ``jax.tree_util``'s eyes (arrays,
    functions, numbers, None, empty containers), or its type was given to
    :func:`register_leaf`.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> jaxflat.isleaf(jnp.ones(3)), jaxflat.isleaf(None), jaxflat.isleaf({"a": 1})
      (True, True, False)
    """
    kids = children(x)
    return kids is None or not kids[1]


def isnumeric(x: Any) -> bool:
    """True exactly for leaf arrays of inexact dtype: the values optimisers move.

    Arrays are ``jax.Array`` (tracers included) and ``numpy.ndarray``; inexact
    means floating (float64/32/16, bfloat16, float8) or complex. Integer,
    bool and PRNG-key arrays, Python and numpy scalars, strings, functions and
    None are not numeric.

    Example:
      >>> import jax, jax.numpy as jnp, jaxflat
      >>> jaxflat.isnumeric(jnp.ones(2)), jaxflat.isnumeric(jnp.arange(2)), jaxflat.isnumeric(1e-5)
      (True, False, False)
      >>> jaxflat.isnumeric(jax.random.key(0))
      False
    """
    return (
        isinstance(x, ARRAY_TYPES)
        and not is_registered_leaf(x)
        and jnp.issubdtype(cast(Any, x).dtype, jnp.inexact)
    )


def register_trainable(
    cls: type, fields: Iterable[Any] | Callable[[Any], Iterable[Any]]
) -> None:
    """Say which children of ``cls`` instances optimisers should see.

    Args:
      cls: the node class; the rule applies to its subclasses too.
      fields: child names (attribute names, dict keys or positions, as in the
        node's jax key path), or a function ``node -> names``.

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp, jaxflat
      >>> @jax.tree_util.register_dataclass
      ... @dataclasses.dataclass
      ... class Affine:
      ...     w: jax.Array
      ...     b: jax.Array
      >>> jaxflat.register_trainable(Affine, ["w"])
      >>> list(jaxflat.trainable(Affine(jnp.ones(2), jnp.zeros(2))))
      ['w']
      >>> jaxflat.destructure(Affine(jnp.ones(2), jnp.zeros(2)))[1].length
      2
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_trainable expects a class, got {cls!r}")
    if not callable(fields):
        if isinstance(fields, str):
            raise TypeError(
                f"register_trainable({cls.__name__}, ...): fields must be an iterable "
                f"of names, got the string {fields!r}; write [{fields!r}]"
            )
        fields = tuple(fields)
    _TRAINABLE[cls] = fields
    _VERSION[0] += 1


def _rule(node: Any) -> Iterable[Any] | Callable[[Any], Iterable[Any]] | None:
    if not _TRAINABLE:
        return None
    for cls in type(node).__mro__:
        if cls in _TRAINABLE:
            return _TRAINABLE[cls]
    return None


def _frozen_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable) and not isinstance(x, nnx.Param)


def trainable_mask(node: Any, pairs: list[tuple[Any, Any]]) -> list[bool]:
    """For each ``(key, child)`` of ``node``, whether that child is trainable."""
    if _frozen_variable(node):
        return [False] * len(pairs)
    rule = _rule(node)
    allowed = None if rule is None else set(rule(node) if callable(rule) else rule)
    return [
        not hidden(k, c)
        and not _frozen_variable(c)
        and (allowed is None or keyname(k) in allowed)
        for k, c in pairs
    ]


def trainable(node: Any) -> dict[Any, Any]:
    """The children of one node that optimisers should see, as ``{name: child}``.

    Names are attribute names, dict keys or sequence positions, as in the
    node's jax key path. By default every child is trainable;
    :func:`register_trainable` overrides that for a class. Built in: a Flax
    NNX ``Param`` is trainable, every other ``nnx.Variable`` (BatchStat,
    RngState, ...) is not. A leaf has no children: ``{}``.

    Example:
      >>> import jaxflat
      >>> from flax import nnx
      >>> sorted(jaxflat.trainable(nnx.BatchNorm(3, rngs=nnx.Rngs(0))))
      ['bias', 'scale']
      >>> sorted(jaxflat.trainable({"a": 1, "b": 2}))
      ['a', 'b']
    """
    kids = children(node)
    if kids is None:
        return {}
    pairs = kids[1]
    return {keyname(k): c for (k, c), m in zip(pairs, trainable_mask(node, pairs)) if m}
