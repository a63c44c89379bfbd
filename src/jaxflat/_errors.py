"""Errors and the one way jaxflat names places and values in messages."""

from __future__ import annotations

from typing import Any

from jax import tree_util as jtu

MAX_LINES = 20  # never build a message that embeds a whole model (Flux PR #2241)


class LoadError(ValueError):
    """A state or checkpoint does not fit the model it is loaded into.

    The message lists every mismatch (capped) with its key path.

    Example:
      >>> import jax.numpy as jnp, jaxflat
      >>> try:
      ...     jaxflat.loadmodel({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
      ... except jaxflat.LoadError as e:
      ...     print(e)
      loadmodel: 1 mismatch:
        ['w']: cannot load shape (3,) into (2,)
    """


def where(path: tuple[Any, ...]) -> str:
    """A key path as text, the same way everywhere; the root is ``<root>``."""
    return jtu.keystr(path) if path else "<root>"


def describe(x: Any) -> str:
    """A short description of a value: never the value itself if it is big."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"array {tuple(shape)} {dtype}"
    if x is None or isinstance(x, bool | int | float):
        return repr(x)
    return type(x).__name__


def raise_all(context: str, problems: list[str], cls: type[Exception] = LoadError) -> None:
    """Raise one ``cls`` listing all ``problems`` (at most MAX_LINES of them)."""
    if not problems:
        return
    n = len(problems)
    lines = [f"  {p}" for p in problems[:MAX_LINES]]
    if n > MAX_LINES:
        lines.append(f"  ... and {n - MAX_LINES} more")
    raise cls(f"{context}: {n} mismatch{'es' if n > 1 else ''}:\n" + "\n".join(lines))
