"""How flat vectors are made and split: the one place that picks a strategy.

* Traced values (inside ``jit``, ``grad``, ``vmap``): plain ``jnp`` ops, a
  ``concatenate`` and a ``lax.split`` whose transpose is one concatenate.
* Concrete arrays on one CPU device: a host path through numpy views
  (no XLA compile at all), so the first call of a new structure is fast.
* Anything else (accelerators, meshes): one jitted program per structure,
  cached, with the output shardings pinned.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# spec: tuple of (shape, dtype) per parameter, in flat order.
Spec = tuple[tuple[tuple[int, ...], Any], ...]


def sizes(spec: Spec) -> list[int]:
    return [int(np.prod(shape, dtype=np.int64)) for shape, _ in spec]


def _traced(xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _on_host(xs: Any) -> jax.Device | None:
    """The CPU device all concrete arrays live on, or None if the host path
    does not apply (a tracer, an accelerator, several devices, a mesh)."""
    device = None
    for x in xs:
        if isinstance(x, np.ndarray):
            continue
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        devs = x.sharding.device_set
        if len(devs) != 1:
            return None
        d: Any = next(iter(devs))
        if d.platform != "cpu" or (device is not None and d != device):
            return None
        device = d
    if device is None and jax.default_backend() == "cpu":
        device = jax.devices("cpu")[0]  # numpy leaves only
    return device


# ---------------------------------------------------------------- flatten


def _concat_traced(params: list[Any], dtype: Any) -> jax.Array:
    if not params:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate([jnp.ravel(p).astype(dtype) for p in params])


@functools.lru_cache(maxsize=256)
def _concat_program(dtype: Any, sharding: Any) -> Any:
    return jax.jit(functools.partial(_concat_traced, dtype=dtype), out_shardings=sharding)


def concat(params: list[Any], dtype: Any, sharding: Any = None) -> jax.Array:
    """All ``params`` raveled and cast to ``dtype``, as one 1-D array."""
    if _traced(params):
        return _concat_traced(params, dtype)
    device = None if sharding is not None else _on_host(params)
    if device is not None:
        host = [np.asarray(p).reshape(-1) for p in params]
        out = np.concatenate(host, dtype=dtype) if host else np.zeros((0,), dtype)
        return jax.device_put(out, device)
    return _concat_program(jnp.dtype(dtype), sharding)(list(params))


# ---------------------------------------------------------------- rebuild


def _cast(x: Any, dtype: Any, xp: Any) -> Any:
    if xp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = xp.real(x)
    return x.astype(dtype) if x.dtype != dtype else x


def _split_traced(spec: Spec, v: jax.Array) -> list[jax.Array]:
    if not spec:
        return []
    pieces = lax.split(v, sizes(spec), axis=v.ndim - 1)
    return [_cast(p.reshape(*v.shape[:-1], *shape), dtype, jnp) for p, (shape, dtype) in zip(pieces, spec)]


@functools.lru_cache(maxsize=256)
def _split_program(spec: Spec, shardings: Any) -> Any:
    return jax.jit(functools.partial(_split_traced, spec), out_shardings=shardings)


def _split_primal(spec: Spec, shardings: Any, v: jax.Array) -> list[jax.Array]:
    if isinstance(v, jax.core.Tracer):
        return _split_traced(spec, v)
    device = None if shardings is not None else _on_host([v])
    if device is not None:
        a = np.asarray(v)
        stops = np.cumsum(sizes(spec)).tolist()
        starts = [0, *stops[:-1]]
        host = [
            _cast(a[i:j].reshape(shape), dtype, np)
            for i, j, (shape, dtype) in zip(starts, stops, spec)
        ]
        return jax.device_put(host, device)
    return _split_program(spec, shardings)(v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def split(spec: Spec, shardings: Any, v: jax.Array) -> list[jax.Array]:
    """``v`` cut into parameters of the given shapes and dtypes.

    A custom JVP keeps the fast primal path in eager ``jax.grad`` while the
    tangent is a plain ``lax.split``, which transposes to one concatenate.
    """
    return _split_primal(spec, shardings, v)


@split.defjvp
def _split_jvp(spec: Spec, shardings: Any, primals: Any, tangents: Any) -> Any:
    (v,), (t,) = primals, tangents
    return split(spec, shardings, v), _split_traced(spec, t)
