"""modules: every node of a tree, Flux-style."""

from __future__ import annotations

from typing import Any

from . import _predicates as P
from ._walk import walk


def modules(tree: Any, /) -> list[Any]:
    """Every non-leaf node reachable from ``tree``: ``tree`` first, then depth
    first in child order, each object once (by identity), plain containers
    (tuples, lists, dicts) included.

    Flax NNX ``Variable`` wrappers count as the arrays they hold and are not
    listed. Works on traced trees, e.g. inside a loss under ``jax.grad``.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> from flax import nnx
      >>> m = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
      >>> [type(x).__name__ for x in jaxflat.modules(m)]
      ['Sequential', 'List', 'Linear', 'Linear']
      >>> def l2(m):
      ...     return sum(jnp.sum(l.kernel[...] ** 2) for l in jaxflat.modules(m) if isinstance(l, nnx.Linear))
      >>> l2(m).dtype
      dtype('float32')
    """
    w = walk(tree)
    seen: set[int] = set()
    out = []
    for i in w.preorder:
        node = w.frames[i].node
        if id(node) not in seen and not P.is_wrapper(node):
            seen.add(id(node))
            out.append(node)
    return out
