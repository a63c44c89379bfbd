"""summary: a printable overview of a tree, in the spirit of Flux's show."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _predicates as P
from ._walk import FRAME, LEAF, walk

_ARRAYS: Any = (*P.ARRAY_TYPES, jax.ShapeDtypeStruct)


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3f} {unit}"
    raise AssertionError  # pragma: no cover


def _nbytes(x: Any) -> int:
    size = int(np.prod(x.shape, dtype=np.int64))
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return size * 8
    return size * np.dtype(x.dtype).itemsize


def _counts(text: list[int]) -> str:
    trained, tn, other, on = text
    out = f"{tn:_} parameters" if trained else ""
    if other:
        out += (", plus " if out else "") + f"{on:_} non-trainable"
    return out


def summary(tree: Any, /) -> str:
    """A printable overview: one line per module, and a total line.

    Each line gives a node's trainable parameter count (and its
    non-trainable count where there is one), counted over its whole
    subtree; the total line gives the trainable arrays and parameters, the
    non-trainable arrays and elements, and the total size in human units.
    Parameters are exactly what :func:`destructure` puts in the flat vector.

    Example:
      >>> import jaxflat
      >>> from flax import nnx
      >>> m = nnx.Sequential(nnx.Linear(784, 64, rngs=nnx.Rngs(0)), nnx.BatchNorm(64, rngs=nnx.Rngs(0)))
      >>> print(jaxflat.summary(m))
      Sequential                               # 50_368 parameters, plus 128 non-trainable
        .layers: List                          # 50_368 parameters, plus 128 non-trainable
          [0]: Linear                          # 50_240 parameters
          [1]: BatchNorm                       # 128 parameters, plus 128 non-trainable
      # Total: 4 trainable arrays, 50_368 parameters, plus 2 non-trainable, 128 parameters, summary size 197.250 KiB.
    """
    w = walk(tree)
    leaf_counts = []
    for leaf, t in zip(w.leaves, w.train, strict=True):
        x: Any = leaf
        if not isinstance(x, _ARRAYS):
            leaf_counts.append([0, 0, 0, 0, 0])
            continue
        size = int(np.prod(x.shape, dtype=np.int64))
        param = t and jnp.issubdtype(x.dtype, jnp.inexact) and not P.is_registered_leaf(x)
        leaf_counts.append([1, size, 0, 0, _nbytes(x)] if param else [0, 0, 1, size, _nbytes(x)])
    frame_counts: list[list[int]] = []
    for fr in w.frames:
        c = [0, 0, 0, 0, 0]
        for kind, i in fr.items:
            src = leaf_counts[i] if kind == LEAF else frame_counts[i] if kind == FRAME else None
            if src is not None:
                c = [a + b for a, b in zip(c, src, strict=True)]
        frame_counts.append(c)
    lines: list[str] = []

    def show(item: tuple[int, Any], label: str, depth: int) -> None:
        kind, i = item
        if kind != FRAME:
            return
        fr = w.frames[i]
        c = frame_counts[i]
        if P.is_wrapper(fr.node) or not (c[0] or c[2]):
            return
        text = "  " * depth + label + type(fr.node).__name__
        lines.append(f"{text:<40} # {_counts(c[:4])}")
        for k, it in zip(fr.keys, fr.items, strict=True):
            show(it, f"{_keylabel(k)}: ", depth + 1)

    show(w.root, "", 0)
    total = [0, 0, 0, 0, 0]
    for c in leaf_counts:
        total = [a + b for a, b in zip(total, c, strict=True)]
    ta, tn, na, nn, nbytes = total
    text = f"# Total: {ta} trainable arrays, {tn:_} parameters"
    if na:
        text += f", plus {na} non-trainable, {nn:_} parameters"
    lines.append(f"{text}, summary size {_human(nbytes)}.")
    return "\n".join(lines)


def _keylabel(k: Any) -> str:
    from jax import tree_util as jtu

    return jtu.keystr((k,))
