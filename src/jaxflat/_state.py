"""state and loadmodel: a model's values as plain containers, and back."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from . import _predicates as P
from ._errors import describe, raise_all, where
from ._walk import EMPTY, FRAME, LEAF, Frame, Item, Walk, walk

T = TypeVar("T")
_SCALARS = (bool, int, float, complex, str, type(None))


def _isarray(x: Any) -> bool:
    return isinstance(x, (*P.ARRAY_TYPES, np.generic, jax.ShapeDtypeStruct))


def _state_leaf(x: Any) -> Any:
    if isinstance(x, np.generic):  # before _SCALARS: np.float64 is a float
        return np.asarray(x)
    if _isarray(x) or isinstance(x, _SCALARS):
        return x
    return ()


def _state_empty(x: Any) -> Any:
    return x if x is None or type(x) in (tuple, list, dict) else ()


def _state_node(frame: Frame, values: list[Any]) -> Any:
    node = frame.node
    if P.is_wrapper(node):
        return values[0] if len(values) == 1 else ()
    if type(node) in (tuple, list):
        return type(node)(values)
    return {
        P.keyname(k): v
        for k, v, c in zip(frame.keys, values, frame.items, strict=True)
        if not _hidden(c)
    }


def state(tree: Any, /) -> Any:
    """The tree's values as plain containers: what to save and load.

    Mirrors the tree's children, trainable and not, using only dict, list,
    tuple, arrays, Python numbers, bools, str and None: objects with named
    children (modules, dataclasses, namedtuples) become dicts of their
    children, an ``nnx.Variable`` becomes its value, numpy scalars become
    0-d arrays, and a function or any other object becomes ``()``. PRNG key
    arrays stay key arrays (``save`` stores them bit-exactly).

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> from flax import nnx
      >>> s = jaxflat.state(nnx.BatchNorm(1, rngs=nnx.Rngs(0)))
      >>> sorted(s)
      ['bias', 'mean', 'scale', 'var']
      >>> s["mean"]
      Array([0.], dtype=float32)
    """
    w = walk(tree)
    return w.build([_state_leaf(x) for x in w.leaves], _state_node, _state_empty)


# ---------------------------------------------------------------- loadmodel


def _iskey(x: Any) -> bool:
    return bool(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _inactive(x: Any) -> bool:
    return x is None or x is False


class _Absent:
    """The one value meaning "no such child" (``getattr``/``dict.get`` default)."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


class _Matcher:
    """Pairs ``dst``'s walk with ``src``'s walk by child names.

    ``problems``: every mismatch, with its key path. ``assigned``: dst leaf
    index -> (the src value for it, its path); a src value of None means
    zeros (an inactive parameter). ``zero_checks``: src values that must be
    all zero (loaded into an inactive parameter).
    """

    def __init__(self, dst: Any, src: Any) -> None:
        self.w: Walk = walk(dst)
        self.src: Walk = walk(src)
        self.problems: list[str] = []
        self.assigned: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.zero_checks: list[tuple[Any, tuple[Any, ...]]] = []
        self._item(self.w.root, self.src.root, ())

    def _value(self, item: Item) -> Any:
        kind, i = item
        if kind == LEAF:
            return self.src.leaves[i]
        return self.src.frames[i].node if kind == FRAME else i.unflatten([])

    def _named(self, walk_: Walk, item: Item) -> dict[Any, tuple[Any, Item]]:
        """A node's visible children: name -> (key, item)."""
        if item[0] != FRAME:
            return {}
        fr = walk_.frames[item[1]]
        return {
            P.keyname(k): (k, it)
            for k, it in zip(fr.keys, fr.items, strict=True)
            if not _hidden(it)
        }

    def _unvalue(self, s: Item) -> Item:
        """``{"value": x}`` (Orbax's layout of an nnx.State) stands for ``x``."""
        named = self._named(self.src, s)
        if list(named) == ["value"] and isinstance(self._value(s), dict):
            return named["value"][1]
        return s

    def _item(self, d: Item, s: Item, path: tuple[Any, ...]) -> None:
        kind, i = d
        if (
            kind == LEAF
            and _isarray(self.w.leaves[i])
            or kind == FRAME
            and P.is_wrapper(self.w.frames[i].node)
        ):
            s = self._unvalue(s)
        if kind == LEAF:
            self._leaf(i, self.w.leaves[i], s, path)
        elif kind == EMPTY:
            self._empty(i.unflatten([]), s, path)
        else:
            self._frame(self.w.frames[i], d, s, path)

    def _frame(self, fr: Frame, d: Item, s: Item, path: tuple[Any, ...]) -> None:
        src = self._value(s)
        if P.is_wrapper(fr.node) and not P.is_wrapper(src):
            ((k, it),) = self._named(self.w, d).values()  # a Variable's state is its value
            return self._item(it, s, (*path, k))
        if s[0] == LEAF or src is None:
            self.problems.append(
                f"{where(path)}: cannot load {_describe(src)} into a {type(fr.node).__name__}"
            )
            return
        theirs = self._named(self.src, s)
        by_text = {str(n): n for n in theirs}  # int keys that went through text
        used = set()
        for name, (k, it) in self._named(self.w, d).items():
            match = name if name in theirs else by_text.get(str(name), _ABSENT)
            if match is not _ABSENT:
                used.add(match)
                self._item(it, theirs[match][1], (*path, k))
            elif _inactive(getattr(src, str(name), _ABSENT)):  # e.g. use_bias=False in src
                self._item(it, (EMPTY, jtu.tree_structure(None)), (*path, k))
            else:
                self.problems.append(f"{where(path)}: {name!r} is missing in src")
        for name, (k, it) in theirs.items():
            if name in used:
                continue
            if _inactive(getattr(fr.node, str(name), _ABSENT)):  # e.g. use_bias=False in dst
                self._empty(None, it, (*path, k))
            else:
                self.problems.append(f"{where(path)}: {name!r} in src has no place in dst")

    def _empty(self, d: Any, s: Item, path: tuple[Any, ...]) -> None:
        src = self._value(s)
        if d is None and P.is_wrapper(src):  # a Variable's state is its value
            ((_, s),) = self._named(self.src, s).values()
            src = self._value(s)
        if d is None and s[0] == LEAF and _isarray(src):  # an inactive parameter (bias=None)
            self.zero_checks.append((src, path))
        elif self._named(self.src, s):
            self.problems.append(f"{where(path)}: cannot load {_describe(src)} into {describe(d)}")

    def _leaf(self, i: int, d: Any, s: Item, path: tuple[Any, ...]) -> None:
        src = self._value(s)
        if _isarray(d):
            if src is True:
                self.problems.append(f"{where(path)}: cannot load True into an array")
            elif _inactive(src):
                self._assign(i, None, path)
            elif s[0] != LEAF or not _isarray(src):
                self.problems.append(
                    f"{where(path)}: cannot load {_describe(src)} into {describe(d)}"
                )
            elif _iskey(src) != _iskey(d) or (_iskey(src) and src.dtype != d.dtype):
                self.problems.append(
                    f"{where(path)}: cannot load {describe(src)} into {describe(d)}"
                )
            elif tuple(src.shape) != tuple(d.shape):
                self.problems.append(
                    f"{where(path)}: cannot load shape {tuple(src.shape)} into {tuple(d.shape)}"
                )
            else:
                self._assign(i, src, path)
        elif s[0] == LEAF and _isarray(src):
            if d is False:
                self.zero_checks.append((src, path))
            else:
                self.problems.append(
                    f"{where(path)}: cannot load {describe(src)} into {describe(d)}"
                )

    def _assign(self, i: int, s: Any, path: tuple[Any, ...]) -> None:
        if i in self.assigned:
            prev, ppath = self.assigned[i]
            if not _same(prev, s):
                self.problems.append(
                    f"{where(path)}: shared with {where(ppath)}, but loaded with different values"
                )
            return
        self.assigned[i] = (s, path)


def _hidden(it: Item) -> bool:
    return it[0] == EMPTY and P.is_hidden(it[1].unflatten([]))


def _describe(x: Any) -> str:
    if P.is_wrapper(x):
        return (
            f"an nnx.{type(x).__name__} wrapper (src holds nnx Variables where dst holds "
            "arrays: are dst and src swapped? loadmodel(dst, src) loads src into dst)"
        )
    return describe(x)


def _same(a: Any, b: Any) -> bool:
    """Equal values for one shared node; None (an inactive parameter) is zeros."""
    if a is b:
        return True
    if a is None or b is None:
        return not _nonzero(b if a is None else a)
    if isinstance(a, jax.ShapeDtypeStruct) or isinstance(b, jax.ShapeDtypeStruct):
        return True
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return True  # cannot compare traced values; trust the caller
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _nonzero(s: Any) -> bool:
    if isinstance(s, jax.ShapeDtypeStruct) or isinstance(s, jax.core.Tracer):
        return False
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
        return True
    return bool(np.any(np.asarray(s)))


class _Move(NamedTuple):
    """``_place``'s answer "device_put ``value`` to ``sharding``", batched by the caller."""

    value: Any
    sharding: Any


def _place(d: Any, s: Any) -> Any:
    """``s`` with ``d``'s dtype, kind (numpy or jax) and device/sharding;
    or a :class:`_Move` for a device_put left to the caller."""
    if s is None:
        s = (
            np.zeros(d.shape, d.dtype)
            if not jax.dtypes.issubdtype(d.dtype, jax.dtypes.prng_key)
            else d
        )
    dtype = d.dtype
    if isinstance(d, np.generic):
        return np.asarray(s).astype(dtype)[()]
    if isinstance(d, np.ndarray):
        return np.asarray(s).astype(dtype, copy=False)
    if isinstance(d, jax.core.Tracer) or isinstance(s, jax.core.Tracer):
        return jnp.asarray(s).astype(dtype)
    if s.dtype != dtype:
        s = (
            np.asarray(s).astype(dtype)
            if isinstance(s, np.ndarray)
            else jnp.asarray(s).astype(dtype)
        )
    sharding = getattr(d, "sharding", None)
    if sharding is None:
        return jnp.asarray(s)
    if isinstance(s, jax.Array) and s.sharding == sharding:
        return s
    return _Move(s, sharding)


def match(dst: Any, src: Any) -> _Matcher:
    return _Matcher(dst, src)


def loadmodel(dst: T, src: Any, /) -> T:
    """A new tree shaped like ``dst`` holding ``src``'s values.

    ``src`` is a tree of the same kind or a :func:`state` (or a restored
    checkpoint). Both are walked by child names. Arrays take ``dst``'s dtype
    and ``dst``'s device or sharding; non-array leaves (functions, sizes,
    flags) are kept from ``dst`` and need not match. Inactive parameters
    (None, or False): an all-zero array may be loaded into one, a non-zero
    one may not; None/False loaded into an array zeros it, True is an error.
    A shared (tied) ``dst`` node must receive equal values from every place.
    A ``{"value": x}`` in ``src`` (Orbax's layout of an ``nnx.State``) stands
    for ``x`` where ``dst`` holds an array or an ``nnx.Variable``.

    Raises:
      LoadError: listing the key path of every mismatch at once: names on
        one side only, different shapes, an array into a non-array or the
        reverse. ``dst`` is never modified.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> dst = {"w": jnp.ones((2, 2)), "act": jnp.tanh}
      >>> out = jaxflat.loadmodel(dst, {"w": jnp.zeros((2, 2)), "act": ()})
      >>> out["w"].sum(), out["act"] is jnp.tanh
      (Array(0., dtype=float32), True)
    """
    m = match(dst, src)
    problems = m.problems + [
        f"{where(p)}: cannot load a non-zero {describe(s)} into an inactive parameter"
        for s, p in m.zero_checks
        if _nonzero(s)
    ]
    raise_all("loadmodel", problems)
    leaves = list(m.w.leaves)
    moves = []
    for i, (s, _) in m.assigned.items():
        leaves[i] = _place(leaves[i], s)
        if isinstance(leaves[i], _Move):
            moves.append(i)
    if moves:  # one batched transfer for all of them
        values = jax.device_put(
            [leaves[i].value for i in moves], [leaves[i].sharding for i in moves]
        )
        for i, v in zip(moves, values, strict=True):
            leaves[i] = v
    return m.w.build(leaves)  # type: ignore[no-any-return]


__all__ = ["loadmodel", "match", "state"]
