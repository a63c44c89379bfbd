"""state and loadmodel: a model's values as plain containers, and back."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import _predicates as P
from ._errors import describe, raise_all, where
from ._walk import EMPTY, LEAF, Frame, Walk, walk

T = TypeVar("T")
_SCALARS = (bool, int, float, complex, str, type(None))


def _isarray(x: Any) -> bool:
    return isinstance(x, (*P.ARRAY_TYPES, jax.ShapeDtypeStruct))


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
    if isinstance(node, nnx.Variable):
        return values[0] if len(values) == 1 else ()
    if type(node) in (tuple, list):
        return type(node)(values)
    return {
        P.keyname(k): v
        for k, v, c in zip(frame.keys, values, frame.items)
        if not (c[0] == EMPTY and P.hidden(k, c[1].unflatten([])))
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


def _src_children(s: Any) -> dict[Any, Any] | None:
    kids = P.children(s)
    if kids is None:
        return None
    return {P.keyname(k): c for k, c in kids[1] if not P.hidden(k, c)}


def _lookup(src: dict[Any, Any], name: Any) -> tuple[bool, Any]:
    if name in src:
        return True, src[name]
    alt = {str(k): v for k, v in src.items()}  # int keys that went through text
    return (True, alt[str(name)]) if str(name) in alt else (False, None)


def _iskey(x: Any) -> bool:
    return bool(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _inactive(x: Any) -> bool:
    return x is None or x is False


class _Matcher:
    """Walks ``dst`` (via the shared walk) and ``src`` by child names."""

    def __init__(self, dst: Any) -> None:
        self.w: Walk = walk(dst)
        self.problems: list[str] = []
        self.assigned: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.zero_checks: list[tuple[Any, tuple[Any, ...]]] = []

    def run(self, src: Any) -> None:
        self._item(self.w.root, src, ())

    def _item(self, item: tuple[int, Any], s: Any, path: tuple[Any, ...]) -> None:
        kind, i = item
        if kind == LEAF:
            self._leaf(i, self.w.leaves[i], s, path)
        elif kind == EMPTY:
            self._empty(i.unflatten([]), s, path)
        else:
            self._frame(self.w.frames[i], s, path)

    def _frame(self, fr: Frame, s: Any, path: tuple[Any, ...]) -> None:
        visible = [(k, it) for k, it in zip(fr.keys, fr.items) if not _hidden_item(k, it)]
        if isinstance(fr.node, nnx.Variable) and not isinstance(s, nnx.Variable):
            (k, it), = visible  # a Variable's state is its value
            return self._item(it, s, (*path, k))
        if _isarray(s) or _inactive(s) or P.children(s) is None:
            self.problems.append(f"{where(path)}: cannot load {describe(s)} into a {type(fr.node).__name__}")
            return
        src = _src_children(s) or {}
        names = [P.keyname(k) for k, _ in visible]
        used = set()
        for (k, it), name in zip(visible, names):
            found, child = _lookup(src, name)
            if not found:
                self.problems.append(f"{where(path)}: {name!r} is missing in src")
                continue
            used.add(name if name in src else str(name))
            self._item(it, child, (*path, k))
        extra = [n for n in src if n not in used and str(n) not in {str(u) for u in used}]
        for n in extra:
            self.problems.append(f"{where(path)}: {n!r} in src has no place in dst")

    def _empty(self, d: Any, s: Any, path: tuple[Any, ...]) -> None:
        if d is None and _isarray(s):  # an inactive parameter (e.g. bias=None)
            self.zero_checks.append((s, path))
        elif _src_children(s):
            self.problems.append(f"{where(path)}: cannot load {describe(s)} into {describe(d)}")

    def _leaf(self, i: int, d: Any, s: Any, path: tuple[Any, ...]) -> None:
        if _isarray(d):
            if s is True:
                self.problems.append(f"{where(path)}: cannot load True into an array")
            elif _inactive(s):
                self._assign(i, None, path)
            elif not _isarray(s):
                self.problems.append(f"{where(path)}: cannot load {describe(s)} into {describe(d)}")
            elif _iskey(s) != _iskey(d) or (_iskey(s) and s.dtype != d.dtype):
                self.problems.append(f"{where(path)}: cannot load {describe(s)} into {describe(d)}")
            elif tuple(s.shape) != tuple(d.shape):
                self.problems.append(
                    f"{where(path)}: cannot load shape {tuple(s.shape)} into {tuple(d.shape)}"
                )
            else:
                self._assign(i, s, path)
        elif _isarray(s):
            if d is False:
                self.zero_checks.append((s, path))
            else:
                self.problems.append(f"{where(path)}: cannot load {describe(s)} into {describe(d)}")

    def _assign(self, i: int, s: Any, path: tuple[Any, ...]) -> None:
        if i in self.assigned:
            prev, ppath = self.assigned[i]
            if not _same(prev, s):
                self.problems.append(
                    f"{where(path)}: shared with {where(ppath)}, but loaded with different values"
                )
            return
        self.assigned[i] = (s, path)


def _hidden_item(k: Any, it: tuple[int, Any]) -> bool:
    return it[0] == EMPTY and P.hidden(k, it[1].unflatten([]))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if a is None or b is None or isinstance(a, jax.ShapeDtypeStruct) or isinstance(b, jax.ShapeDtypeStruct):
        return (a is None) == (b is None)
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return True  # cannot compare traced values; trust the caller
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _nonzero(s: Any) -> bool:
    if isinstance(s, jax.ShapeDtypeStruct) or isinstance(s, jax.core.Tracer):
        return False
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
        return True
    return bool(np.any(np.asarray(s)))


_MOVE = object()  # _place's answer: "device_put me to this sharding", batched by the caller


def _place(d: Any, s: Any) -> Any:
    """``s`` with ``d``'s dtype, kind (numpy or jax) and device/sharding;
    or ``(_MOVE, value, sharding)`` for a device_put left to the caller."""
    if s is None:
        s = np.zeros(d.shape, d.dtype) if not jax.dtypes.issubdtype(d.dtype, jax.dtypes.prng_key) else d
    dtype = d.dtype
    if isinstance(d, np.ndarray):
        return np.asarray(s).astype(dtype, copy=False)
    if isinstance(d, jax.core.Tracer) or isinstance(s, jax.core.Tracer):
        return jnp.asarray(s).astype(dtype)
    if s.dtype != dtype:
        s = np.asarray(s).astype(dtype) if isinstance(s, np.ndarray) else jnp.asarray(s).astype(dtype)
    sharding = getattr(d, "sharding", None)
    if sharding is None:
        return jnp.asarray(s)
    if isinstance(s, jax.Array) and s.sharding == sharding:
        return s
    return (_MOVE, s, sharding)


def match(dst: Any, src: Any) -> _Matcher:
    m = _Matcher(dst)
    m.run(src)
    return m


def loadmodel(dst: T, src: Any, /) -> T:
    """A new tree shaped like ``dst`` holding ``src``'s values.

    ``src`` is a tree of the same kind or a :func:`state` (or a restored
    checkpoint). Both are walked by child names. Arrays take ``dst``'s dtype
    and ``dst``'s device or sharding; non-array leaves (functions, sizes,
    flags) are kept from ``dst`` and need not match. Inactive parameters
    (None, or False): an all-zero array may be loaded into one, a non-zero
    one may not; None/False loaded into an array zeros it, True is an error.
    A shared (tied) ``dst`` node must receive equal values from every place.

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
        if type(leaves[i]) is tuple and leaves[i][0] is _MOVE:
            moves.append(i)
    if moves:  # one batched transfer for all of them
        values = jax.device_put([leaves[i][1] for i in moves], [leaves[i][2] for i in moves])
        for i, v in zip(moves, values):
            leaves[i] = v
    return m.w.build(leaves)  # type: ignore[no-any-return]


__all__ = ["loadmodel", "match", "state"]
