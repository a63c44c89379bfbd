"""The one traversal every jaxflat feature shares.

``walk(tree)`` visits a pytree depth first with key paths, in
``jax.tree_util`` child order, honouring registered leaves, the trainable
rules and tied mutable nodes (an ``nnx.Variable`` or ``nnx.Module`` seen
twice by identity is visited once). It returns a :class:`Walk`: the leaves
in order with their paths and trainability, and the nodes as *frames*, from
which any feature rebuilds a tree of its own (the same type for
``Restructure``, plain containers for ``state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from jax import tree_util as jtu

from . import _predicates as P

LEAF, FRAME, EMPTY = 0, 1, 2


class Frame(NamedTuple):
    node: Any  # the original node object
    treedef: jtu.PyTreeDef  # one level: unflatten(children) rebuilds the node
    keys: tuple[Any, ...]  # jax key entries of the children
    items: tuple[tuple[int, Any], ...]  # (LEAF, leaf index) | (FRAME, index) | (EMPTY, its treedef)
    train: tuple[bool, ...]  # trainable mask of the children
    path: tuple[Any, ...]  # key path of the node


@dataclass
class Walk:
    leaves: list[Any] = field(default_factory=list)
    paths: list[tuple[Any, ...]] = field(default_factory=list)
    train: list[bool] = field(default_factory=list)  # reached via trainable children only
    frames: list[Frame] = field(default_factory=list)  # post-order: children first
    preorder: list[int] = field(default_factory=list)  # frame indices, parents first
    root: tuple[int, Any] = (LEAF, 0)
    tied: bool = False  # some mutable node was met twice
    mutable: bool = False  # some mutable node was met at all

    def skeleton(self) -> tuple[Any, ...]:
        """What rebuilding needs, hashable, without references to the tree."""
        return tuple((f.treedef, f.items) for f in self.frames), self.root

    def build(self, leaves: list[Any], node_fn: Any = None, empty_fn: Any = None) -> Any:
        """Rebuild from new ``leaves``; ``node_fn(frame, values)`` makes each
        node and ``empty_fn(node)`` each childless node (default: the
        original types). Tied frames are built once."""
        return rebuild(self.skeleton(), leaves, node_fn, self.frames, empty_fn)


def _same(x: Any) -> Any:
    return x


def rebuild(
    skeleton: Any,
    leaves: list[Any],
    node_fn: Any = None,
    frames: Any = None,
    empty_fn: Any = _same,
) -> Any:
    """Build a tree from a walk's skeleton and new leaves (see Walk.build)."""
    shapes, (kind, i) = skeleton
    empty_fn = empty_fn or _same
    built: list[Any] = []
    for n, (treedef, items) in enumerate(shapes):
        vals = [
            leaves[j] if k == LEAF else built[j] if k == FRAME else empty_fn(j.unflatten([]))
            for k, j in items
        ]
        built.append(treedef.unflatten(vals) if node_fn is None else node_fn(frames[n], vals))
    if kind == EMPTY:
        return empty_fn(i.unflatten([]))
    return leaves[i] if kind == LEAF else built[i]


def walk(tree: Any) -> Walk:
    """Walk ``tree`` once; see the module docstring."""
    w = Walk()
    memo: dict[int, int] = {}

    def visit(node: Any, path: tuple[Any, ...], train: bool) -> tuple[int, Any]:
        kids = P.children(node)
        if kids is None:
            w.leaves.append(node)
            w.paths.append(path)
            w.train.append(train)
            return LEAF, len(w.leaves) - 1
        treedef, pairs = kids
        if not pairs:
            return EMPTY, treedef
        mutable = isinstance(node, P.MUTABLE_TYPES)
        if mutable:
            w.mutable = True
            if id(node) in memo:
                w.tied = True
                return FRAME, memo[id(node)]
        slot = len(w.preorder)
        w.preorder.append(-1)
        mask = P.trainable_mask(node, pairs)
        items = tuple(visit(c, (*path, k), train and m) for (k, c), m in zip(pairs, mask))
        keys = tuple(k for k, _ in pairs)
        w.frames.append(Frame(node, treedef, keys, items, tuple(mask), path))
        index = len(w.frames) - 1
        w.preorder[slot] = index
        if mutable:
            memo[id(node)] = index
        return FRAME, index

    w.root = visit(tree, (), True)
    return w
