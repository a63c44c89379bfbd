"""The single source of truth: what is a leaf, a number, a trainable child.

Every jaxflat function (destructure, modules, state, loadmodel, summary)
consults these predicates and registries and nothing else. Library
knowledge (Flax NNX, in ``_nnx``) is expressed through the same registries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

Names = tuple[Any, ...] | None  # None: every child
Rule = Names | Callable[[Any], Iterable[Any]]

ARRAY_TYPES: tuple[type, ...] = (jax.Array, np.ndarray)


class _Registry:
    """Every registration in one place, with a version bumped on each change
    (caches keyed on it expire) and a private snapshot/restore for tests."""

    def __init__(self) -> None:
        self.leaves: tuple[type, ...] = ()
        self.mutable: tuple[type, ...] = ()  # the same object at two places is one tie
        self.hidden: tuple[type, ...] = ()  # library internals, children only in jax's eyes
        self.per_instance: tuple[type, ...] = (jax.core.Tracer,)  # see is_mutable
        self.wrappers: tuple[type, ...] = ()  # nodes whose state is their one value
        self.refused: dict[type, str] = {}  # roots that are a TypeError, and why
        self.mutable_by_type: dict[type, bool] = {}  # see is_mutable
        self.trainable: dict[type, Rule] = {}
        self.version = 0

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.leaves,
            self.mutable,
            self.hidden,
            self.per_instance,
            self.wrappers,
            dict(self.refused),
            dict(self.trainable),
        )

    def restore(self, snap: tuple[Any, ...]) -> None:
        (
            self.leaves,
            self.mutable,
            self.hidden,
            self.per_instance,
            self.wrappers,
            refused,
            trainable,
        ) = snap
        self.refused = dict(refused)
        self.trainable = dict(trainable)
        self.mutable_by_type = {}
        self.version += 1


REGISTRY = _Registry()


@contextlib.contextmanager
def _scoped_registrations() -> Iterator[None]:
    """Undo every registration made inside the block (for tests)."""
    snap = REGISTRY.snapshot()
    try:
        yield
    finally:
        REGISTRY.restore(snap)


def _check_class(fn: str, cls: Any) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"{fn} expects a class, got {cls!r}")


def register_leaf(cls: type) -> type:
    """Make every instance of ``cls`` (and its subclasses) an opaque leaf.

    No jaxflat function descends into a registered leaf: it is kept whole by
    ``destructure`` (never a parameter), ``state`` turns it into ``()`` and
    ``loadmodel`` keeps the destination's.

    Args:
      cls: the class to treat as a leaf. Returned, so this works as a decorator.

    Raises:
      TypeError: ``cls`` is not a class.

    Example:
      >>> import jax, jaxflat
      >>> @jaxflat.register_leaf
      ... @jax.tree_util.register_static
      ... class Config:
      ...     def __init__(self): self.width = 3
      >>> jaxflat.isleaf(Config())
      True
    """
    _check_class("register_leaf", cls)
    if cls not in REGISTRY.leaves:
        REGISTRY.leaves = (*REGISTRY.leaves, cls)
        REGISTRY.version += 1
    return cls


def register_mutable(
    cls: type,
    *,
    hidden: tuple[type, ...] = (),
    per_instance: tuple[type, ...] = (),
    wrapper: bool = False,
) -> None:
    """Library hook (see ``_nnx``): instances of ``cls`` are mutable nodes,
    tied by identity; children of the ``hidden`` types are not shown to users;
    ``isinstance(x, cls)`` looks at more than ``type(x)`` for instances of
    the ``per_instance`` types (see ``is_mutable``); a ``wrapper`` (an
    ``nnx.Variable``) stands for its one value: ``state`` gives the value,
    ``modules`` and ``summary`` do not list it."""
    REGISTRY.mutable = (*REGISTRY.mutable, cls)
    REGISTRY.hidden = (*REGISTRY.hidden, *hidden)
    REGISTRY.per_instance = (*REGISTRY.per_instance, *per_instance)
    REGISTRY.wrappers = (*REGISTRY.wrappers, cls) if wrapper else REGISTRY.wrappers
    REGISTRY.mutable_by_type = {}
    REGISTRY.version += 1


def register_trainable(cls: type, fields: Iterable[Any] | Callable[[Any], Iterable[Any]]) -> None:
    """Say which children of ``cls`` instances optimisers should see.

    A name that is not a child of the node is an error when such a node is
    first met (naming it and the node's real children), never a silent
    model without parameters. A child whose own class is registered with no
    trainable fields is not a trainable child of its parent either.

    Args:
      cls: the node class; the rule applies to its subclasses too.
      fields: child names (attribute names, dict keys or positions, as in the
        node's jax key path), or a function ``node -> names``, called on each
        node every time (so it may look at the node's values).

    Raises:
      TypeError: ``cls`` is not a class, or ``fields`` is a string.

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
    _check_class("register_trainable", cls)
    rule: Rule
    if callable(fields):
        rule = fields
    elif isinstance(fields, str):
        raise TypeError(
            f"register_trainable({cls.__name__}, ...): fields must be an iterable "
            f"of names, got the string {fields!r}; write [{fields!r}]"
        )
    else:
        rule = tuple(fields)
    _set_rule(cls, rule)


def _set_rule(cls: type, rule: Rule) -> None:
    REGISTRY.trainable[cls] = rule
    REGISTRY.version += 1


def refuse_root(cls: type, why: str) -> None:
    """Library hook (see ``_nnx``): a tree whose root is a ``cls`` instance is
    a ``TypeError`` saying ``why`` (e.g. a Flax Linen module holds no arrays)."""
    REGISTRY.refused[cls] = why
    REGISTRY.version += 1


def is_wrapper(x: Any) -> bool:
    """A node that stands for its one value (an ``nnx.Variable``)."""
    return bool(REGISTRY.wrappers) and isinstance(x, REGISTRY.wrappers)


def check_root(tree: Any) -> None:
    """Refuse a class where an instance is expected, and registered roots.

    Raises:
      TypeError: ``tree`` is a class, or an instance of a refused type.
    """
    if isinstance(tree, type):
        raise TypeError(
            f"got the class {tree.__module__}.{tree.__qualname__} where an instance was "
            f"expected; build one first, e.g. {tree.__name__}(...)"
        )
    for cls, why in REGISTRY.refused.items():
        if isinstance(tree, cls):
            raise TypeError(f"got a {type(tree).__name__}: {why}")


def is_registered_leaf(x: Any) -> bool:
    return bool(REGISTRY.leaves) and isinstance(x, REGISTRY.leaves)


def is_mutable(x: Any) -> bool:
    """``isinstance(x, REGISTRY.mutable)``, memoised by type.

    Validity: the registered classes (``nnx.Variable``, ``nnx.Pytree``)
    answer instance checks from ``x.__class__`` alone, except for instances
    of the ``per_instance`` types (jax tracers, NNX's hijax variables),
    which are asked every time. An answer is remembered only for an object
    whose ``__class__`` is its type (not a proxy) and used only for such
    objects; the memo is emptied whenever the registrations change.
    """
    t = type(x)
    plain = x.__class__ is t
    if plain:
        known = REGISTRY.mutable_by_type.get(t)
        if known is not None:
            return known
    answer = isinstance(x, REGISTRY.mutable)
    if plain and not issubclass(t, REGISTRY.per_instance):
        REGISTRY.mutable_by_type[t] = answer
    return answer


def is_hidden(x: Any) -> bool:
    return isinstance(x, REGISTRY.hidden)


def children(node: Any) -> tuple[Any, list[tuple[Any, Any]]] | None:
    """One level of ``node``: its treedef and ``(key, child)`` pairs.

    Returns ``None`` for a real leaf (an array, a function, a registered
    leaf). A node without children (None, ``()``, ``{}``) gives an empty list.
    """
    if isinstance(node, ARRAY_TYPES) or is_registered_leaf(node):
        return None
    pairs, treedef = jtu.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    treedef = cast(Any, treedef)  # jaxlib ships no stub for PyTreeDef's attributes
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    return treedef, [(path[0], child) for path, child in pairs]


def keyname(key: Any) -> Any:
    """The child name of a jax key-path entry: attribute name, dict key or index."""
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


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


_INEXACT: dict[Any, bool] = {}


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
    return isinstance(x, ARRAY_TYPES) and numeric_array(x)


def numeric_array(x: Any) -> bool:
    """:func:`isnumeric` of ``x``, known to be an array (of ``ARRAY_TYPES``)."""
    if REGISTRY.leaves and isinstance(x, REGISTRY.leaves):
        return False
    dtype = x.dtype
    # A cache that cannot go stale: the answer is a pure function of the dtype.
    ok = _INEXACT.get(dtype)
    if ok is None:
        ok = _INEXACT[dtype] = bool(jnp.issubdtype(dtype, jnp.inexact))
    return ok


def _rule(node: Any) -> Rule:
    for cls in type(node).__mro__:
        if cls in REGISTRY.trainable:
            return REGISTRY.trainable[cls]
    return None


def _closed(node: Any) -> bool:
    """A node registered with no trainable children at all (e.g. nnx.BatchStat)."""
    return bool(REGISTRY.trainable) and _rule(node) == ()


def trainable_mask(node: Any, pairs: list[tuple[Any, Any]]) -> tuple[list[bool], bool]:
    """For each ``(key, child)`` of ``node``, whether that child is trainable;
    and whether a callable rule decided it (such answers depend on values).

    Raises:
      ValueError: the node's rule names something that is not a child.
    """
    rule = _rule(node) if REGISTRY.trainable else None
    dynamic = callable(rule)
    allowed = None if rule is None else set(rule(node) if callable(rule) else rule)
    if allowed is not None:
        names = [keyname(k) for k, _ in pairs]
        unknown = [n for n in allowed if n not in names]
        if unknown:
            real = ", ".join(
                repr(n) for n, (_, c) in zip(names, pairs, strict=True) if not is_hidden(c)
            )
            raise ValueError(
                f"register_trainable({type(node).__name__}, ...): "
                f"{', '.join(map(repr, unknown))} is not a child of {type(node).__name__}; "
                f"its children are {real or 'none'}"
            )
    mask = [
        not is_hidden(c) and not _closed(c) and (allowed is None or keyname(k) in allowed)
        for k, c in pairs
    ]
    return mask, dynamic


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
    mask, _ = trainable_mask(node, pairs)
    return {keyname(k): c for (k, c), m in zip(pairs, mask, strict=True) if m}
