"""The one traversal every jaxflat feature shares, and its one cache.

``walk(tree)`` visits a pytree depth first with key paths, in
``jax.tree_util`` child order, honouring registered leaves, the trainable
rules and tied mutable nodes (an ``nnx.Variable`` or ``nnx.Module`` seen
twice by identity is visited once). It returns a :class:`Walk`: the leaves
in order with their paths and trainability, and the nodes as *frames*, from
which any feature rebuilds a tree of its own (the same type for
``Restructure``, plain containers for ``state``).

``structure(tree)`` is the walk as the hot path needs it: the leaves, and a
:class:`Structure` (paths, trainability, how to rebuild), cached.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar, cast

from jax import tree_util as jtu

from . import _predicates as P

LEAF, FRAME, EMPTY = 0, 1, 2
Item = tuple[int, Any]  # (LEAF, leaf index) | (FRAME, frame index) | (EMPTY, its treedef)
Path = tuple[Any, ...]


class Frame(NamedTuple):
    node: Any  # the original node object
    treedef: jtu.PyTreeDef  # one level: unflatten(children) rebuilds the node
    keys: tuple[Any, ...]  # jax key entries of the children
    items: tuple[Item, ...]
    train: tuple[bool, ...]  # trainable mask of the children
    path: Path  # key path of the node


Skeleton = tuple[tuple[tuple[jtu.PyTreeDef, tuple[Item, ...]], ...], Item]


@dataclass
class Walk:
    leaves: list[Any] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    train: list[bool] = field(default_factory=list)  # reached via trainable children only
    frames: list[Frame] = field(default_factory=list)  # post-order: children first
    preorder: list[int] = field(default_factory=list)  # frame indices, parents first
    root: Item = (LEAF, 0)
    take: list[int] = field(default_factory=list)  # each leaf's index in jax's flat leaves
    tied: bool = False  # some mutable node was met twice
    mutable: bool = False  # some mutable node was met at all
    dynamic: bool = False  # a callable trainable rule was consulted

    def skeleton(self) -> Skeleton:
        """What rebuilding needs, hashable, without references to the tree."""
        return tuple((f.treedef, f.items) for f in self.frames), self.root

    def build(self, leaves: list[Any], node_fn: Any = None, empty_fn: Any = None) -> Any:
        """Rebuild from new ``leaves``; ``node_fn(frame, values)`` makes each
        node and ``empty_fn(node)`` each childless node (default: the
        original types). Tied frames are built once."""
        return rebuild(self.skeleton(), leaves, node_fn, self.frames, empty_fn)


def rebuild(
    skeleton: Skeleton,
    leaves: list[Any],
    node_fn: Callable[[Frame, list[Any]], Any] | None = None,
    frames: list[Frame] | None = None,
    empty_fn: Callable[[Any], Any] | None = None,
) -> Any:
    """Build a tree from a walk's skeleton and new leaves (see Walk.build)."""
    shapes, (kind, i) = skeleton

    def empty(treedef: Any) -> Any:
        node = treedef.unflatten([])
        return node if empty_fn is None else empty_fn(node)

    built: list[Any] = []
    for n, (treedef, items) in enumerate(shapes):
        vals = [leaves[j] if k == LEAF else built[j] if k == FRAME else empty(j) for k, j in items]
        built.append(treedef.unflatten(vals) if node_fn is None else node_fn(frames[n], vals))  # type: ignore[index]
    if kind == EMPTY:
        return empty(i)
    return leaves[i] if kind == LEAF else built[i]


def walk(tree: Any) -> Walk:
    """Walk ``tree`` once; see the module docstring."""
    P.check_root(tree)
    w = Walk()
    memo: dict[int, int] = {}
    position = 0  # index into jax's own flat leaves (which repeat tied subtrees)
    is_leaf = P.is_registered_leaf if P.REGISTRY.leaves else None

    def visit(node: Any, path: Path, train: bool) -> Item:
        nonlocal position
        kids = P.children(node)
        if kids is None:
            w.leaves.append(node)
            w.paths.append(path)
            w.train.append(train)
            w.take.append(position)
            position += 1
            return LEAF, len(w.leaves) - 1
        treedef, pairs = kids
        if not pairs:
            return EMPTY, treedef
        mutable = P.is_mutable(node)
        if mutable:
            w.mutable = True
            if id(node) in memo:
                w.tied = True
                position += len(jtu.tree_leaves(node, is_leaf=is_leaf))
                return FRAME, memo[id(node)]
        slot = len(w.preorder)
        w.preorder.append(-1)
        mask, dynamic = P.trainable_mask(node, pairs)
        w.dynamic |= dynamic
        items = tuple(
            visit(c, (*path, k), train and m) for (k, c), m in zip(pairs, mask, strict=True)
        )
        w.frames.append(Frame(node, treedef, tuple(k for k, _ in pairs), items, tuple(mask), path))
        index = len(w.frames) - 1
        w.preorder[slot] = index
        if mutable:
            memo[id(node)] = index
        return FRAME, index

    w.root = visit(tree, (), True)
    return w


# ---------------------------------------------------------------- the cache

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A small thread-safe least-recently-used map, bounded in count."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Structure(NamedTuple):
    """What the walk of a tree says, apart from the leaves themselves."""

    key: Any  # hashable; equal keys mean equal walks (see ``structure``)
    unflatten: Callable[[list[Any]], Any]  # leaves (walk order) -> a new tree
    paths: tuple[Path, ...]
    train: tuple[bool, ...]
    take: tuple[int, ...] | None  # tied trees: which of jax's flat leaves are the walk's
    mutable: bool
    dynamic: bool  # a callable trainable rule decided it: not cached, not reused


class NeedsTies:
    """Cached under a treedef's plain key when its trees hold mutable nodes:
    their walk depends on ties too, so look up again with the tie pattern."""


_STRUCTURES: LRU[Any, Structure | NeedsTies] = LRU(256)


def _flatten_with_ties(tree: Any, registered: Any) -> tuple[list[Any], Any, tuple[int, ...]]:
    """jax's flatten, also recording which mutable nodes are the same object:
    the pattern lists, per mutable node in visiting order, the index of its
    first occurrence (``Holder(s, s)`` gives (0, 1, 1), ``Holder(a, b)`` (0, 1, 2))."""
    first: dict[int, int] = {}
    pattern: list[int] = []

    def is_leaf(x: Any) -> bool:
        if P.is_mutable(x):
            pattern.append(first.setdefault(id(x), len(first)))
        return registered is not None and bool(registered(x))

    leaves, treedef = jtu.tree_flatten(tree, is_leaf=is_leaf)
    return leaves, treedef, tuple(pattern)


def structure(tree: Any) -> tuple[list[Any], Structure]:
    """The tree's leaves (walk order) and its :class:`Structure`.

    Validity of the cache: a walk's result is a function of (a) the treedef
    (node types, their static data, child keys, where the leaves are),
    (b) the registries (their version), (c) which mutable nodes are the same
    object (the tie pattern of ``_flatten_with_ties``), and (d) the answers
    of callable trainable rules. The cache key holds (a), (b) and, for trees
    with mutable nodes, (c); walks that consulted a callable rule are never
    cached, since (d) may depend on values. Leaf values are not part of a
    structure: whether a leaf is a parameter is decided per call. So a
    cached Structure is exactly what a fresh walk of the tree would give.
    """
    P.check_root(tree)
    version = P.REGISTRY.version
    registered = P.is_registered_leaf if P.REGISTRY.leaves else None
    w = None
    if not P.is_mutable(tree):
        leaves, treedef = jtu.tree_flatten(tree, is_leaf=registered)
        treedef = cast(Any, treedef)  # jaxlib ships no stub for PyTreeDef's attributes
        hit = _STRUCTURES.get((treedef, version, None))
        if isinstance(hit, Structure):
            return leaves, hit
        if hit is None:
            w = walk(tree)
            if not w.mutable:
                return w.leaves, _remember(w, (treedef, version, None), treedef.unflatten)
            _STRUCTURES.put((treedef, version, None), NeedsTies())
    full, treedef, pattern = _flatten_with_ties(tree, registered)
    key = (treedef, version, pattern)
    hit = _STRUCTURES.get(key)
    if isinstance(hit, Structure):
        return (full if hit.take is None else [full[i] for i in hit.take]), hit
    w = w or walk(tree)
    unflatten = functools.partial(rebuild, w.skeleton()) if w.tied else treedef.unflatten
    return w.leaves, _remember(w, key, unflatten)


def _remember(w: Walk, key: Any, unflatten: Callable[[list[Any]], Any]) -> Structure:
    take = tuple(w.take) if w.tied else None
    st = Structure(key, unflatten, tuple(w.paths), tuple(w.train), take, w.mutable, w.dynamic)
    if not w.dynamic:
        _STRUCTURES.put(key, st)
    return st
