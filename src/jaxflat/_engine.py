"""The accelerator: faster ways to make and cut a layout's flat vector.

One contract: every path gives exactly the bits of the reference
(``_layout.concat`` / ``_layout.split``); the tests pin that. Paths, chosen
per call in :func:`_path`:

* ``traced`` (inside ``jit``, ``grad``, ``vmap``): the reference concatenate
  and, for the rebuild, ``_layout.split_traced`` (the reference's bits in a
  form XLA compiles faster; its tangent is the reference), or the mesh
  backend's moves for parameters sharded over a mesh.
* ``mesh`` (concrete parameters sharded over a mesh, or ``sharding=``): the
  mesh backend (``_mesh``), one jitted program per layout.
* ``host`` (concrete arrays on one CPU device): numpy, no compile, so a new
  structure costs milliseconds. Rent or buy: once the host time spent on one
  layout's concatenate (or split) has reached the estimated compile time of
  a program doing it (``COMPILE_COST``, ``SPLIT_COST``), that program is
  compiled, synchronously, and used from then on: XLA's concatenate, and
  XLA's split where most leaves share their size with others (whose pieces
  share kernels: ``_layout.split_traced``), else a host callback that cuts
  the vector (one per ``MAX_COMPILE_LEAVES`` leaves). So
  a structure never costs more than twice what the numpy path alone would
  have, and one called in a loop runs compiled. Never compiled: layouts of
  more than ``MAX_COMPILE_LEAVES`` leaves (concatenate) or
  ``HOST_ONLY_BYTES``, and any call in a process that was forked (XLA
  cannot compile there; numpy serves it).
* ``device`` (any other single device, e.g. a GPU): the reference, jitted
  once per layout.

A compiled program is a ``jax.stages.Compiled``, which checks the types,
shapes and devices of every call: a mismatch falls back to numpy.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from . import _layout, _mesh
from ._layout import Layout, Place, cast

ALIGN = 64  # device_put aliases a 64-byte aligned numpy buffer instead of copying it
# Above this the numpy copy is as fast as XLA:CPU's (1e8 parameters: numpy
# 0.73 s against jit 0.71 s, issue 4), so nothing is compiled.
HOST_ONLY_BYTES = 64 * 2**20
# Above this XLA:CPU's concatenate compile grows faster than linearly
# (0.78 s at 1000 leaves, issue 9) and a callback's too (2048 leaves: 0.69 s
# against 0.16 s at 1000, this issue), so no automatic compile is unbounded.
MAX_COMPILE_LEAVES = 2048
# Estimated compile time of one program, (seconds, seconds per leaf): measured
# on 2 cores, concatenate 67 ms at 100 leaves, 0.78 s at 1000; callback cutter
# 0.03 s at 100, 0.16-0.39 s at 1000. A layout buys its program once its host
# path has cost this much (rent or buy).
COMPILE_COST = (0.05, 0.8e-3)
# The split bought where most leaves share their size with others is XLA's
# (``_layout.split_traced``, whose equal-sized pieces share kernels): 0.42 ms
# against the callback's 1.85 ms at 100 leaves, 4.4 ms against 10 ms at 1000
# (the jitted reference split: 0.38 ms at 100). It compiled in 0.26 s for 100
# leaves of 2 sizes, 2.86 s for 1000 of 2 sizes, 1.87 s for 100 of 100 sizes
# (2 loaded cores): per leaf and per distinct size, in multiples of
# ``COMPILE_COST``'s per-leaf time.
SPLIT_COST = (3.6, 20.0)

_FORKED = False  # set in a child made by os.fork: XLA cannot compile there


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Host:
    """A layout's host-path memory: time spent per direction, and the
    programs bought."""

    __slots__ = ("spent", "leaves", "concat", "cutter", "compiles", "shared")

    def __init__(self, layout: Layout) -> None:
        n, sizes = len(layout.shapes), len(set(layout.sizes))
        small = layout.length * layout.dtype.itemsize < HOST_ONLY_BYTES
        self.compiles = {"concat": small and n <= MAX_COMPILE_LEAVES, "split": small}
        self.spent = {"concat": 0.0, "split": 0.0}
        self.concat: Any = None  # Compiled concatenate
        self.cutter: Any = None  # (dtype, device, cut)
        # distinct sizes, 4 leaves or more each on average: XLA's split
        self.shared = n <= MAX_COMPILE_LEAVES and 4 * sizes <= n
        # each program's compile cost, in COMPILE_COST's per-leaf units
        split = SPLIT_COST[0] * n + SPLIT_COST[1] * sizes if self.shared else n
        self.leaves = {"concat": n, "split": split}

    def due(self, kind: str, seconds: float) -> bool:
        """Add a host call's time; True when ``kind``'s program is to be bought."""
        self.spent[kind] += seconds
        base, per_leaf = COMPILE_COST
        cost = base + per_leaf * self.leaves[kind]
        return self.compiles[kind] and not _FORKED and self.spent[kind] >= cost


def _state(layout: Layout, name: str, make: Callable[[], Any]) -> Any:
    got = layout.state.get(name)
    if got is None:
        got = layout.state.setdefault(name, make())
    return got


def _path(layout: Layout, place: Place) -> str:
    if place.traced:
        return "traced"
    if layout.shardings is not None or layout.sharding is not None:
        return "mesh"
    device = place.device
    if device is None and not place.spread and jax.default_backend() == "cpu":
        return "host"  # numpy leaves only
    return "host" if device is not None and device.platform == "cpu" else "device"


def _place_of(v: jax.Array) -> Place:
    if isinstance(v, jax.core.Tracer):
        return Place(None, False, False, True)
    devices = v.sharding.device_set
    one = len(devices) == 1
    return Place(next(iter(devices)) if one else None, not one, v.committed, False)


# ---------------------------------------------------------------- flatten


def flatten(layout: Layout, params: list[Any], place: Place) -> jax.Array:
    """``_layout.concat(params, layout.dtype)``, the fastest way that applies
    to parameters at ``place``. ``flat`` is committed to its device exactly
    when a parameter was."""
    if not params:
        return _layout.concat(params, layout.dtype)
    path = _path(layout, place)
    if path == "traced":
        return _mesh.flatten(layout, params)
    if path == "mesh":
        out = _state(layout, "mesh concat", lambda: _jit(_mesh.flatten, layout))(params)
        target = _mesh.placement(layout)[1]
        return out if target is None else jax.device_put(out, target)  # type: ignore[no-any-return]
    committed, device = place.committed, place.device
    if path == "device":
        out = _state(layout, "concat", lambda: _jit(_concat, layout))(params)
        return out if committed else jax.device_put(out)  # type: ignore[no-any-return]
    host: _Host = _state(layout, "host", lambda: _Host(layout))
    if host.concat is not None and not _FORKED:
        try:
            out = host.concat(*params)
            return jax.device_put(out, device) if committed else out  # type: ignore[no-any-return]
        except (TypeError, ValueError):
            pass  # not what it was compiled for: numpy below
    t0 = time.perf_counter()
    buf = _aligned(layout.length, layout.dtype)
    np.concatenate([np.asarray(p).reshape(-1) for p in params], out=buf)
    flat = jax.device_put(buf, device if committed else None)
    if host.due("concat", time.perf_counter() - t0) and host.concat is None:
        avals = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
        host.concat = _jit(_concat_varargs, layout).lower(*avals).compile()
    return flat


def _concat(layout: Layout, params: Sequence[Any]) -> jax.Array:
    return _layout.concat(params, layout.dtype)


def _concat_varargs(layout: Layout, *params: Any) -> jax.Array:
    return _layout.concat(params, layout.dtype)


def _reference_split(layout: Layout, v: jax.Array) -> list[jax.Array]:
    return _layout.split(v, layout.shapes, layout.dtypes)


def _aligned(n: int, dtype: Any) -> np.ndarray:
    """An uninitialised 1-D numpy buffer that ``device_put`` can alias."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + n * itemsize].view(dtype)


# ---------------------------------------------------------------- split


def split(layout: Layout, v: jax.Array) -> list[Any]:
    """``_layout.split(v, layout.shapes, layout.dtypes)``, the fastest way that applies; the
    pieces are committed exactly when ``v`` is. Differentiable: a custom JVP
    keeps eager ``jax.grad`` on the fast concrete path while the tangent
    takes the traced path (whose transpose is one concatenate)."""
    if not layout.shapes:
        return []
    if isinstance(v, jax.core.Tracer):
        return _split_differentiable(layout, v)
    return _split(layout, v)


def _split(layout: Layout, v: jax.Array) -> list[Any]:
    place = _place_of(v)
    path, device = _path(layout, place), place.device
    if path == "traced":
        if layout.shardings is None:
            return _layout.split_traced(v, layout.shapes, layout.dtypes)
        return _mesh.rebuild(layout, v)
    if path == "mesh":
        flat_sharding, target = _mesh.placement(layout)
        if target is not None:  # v was put on ``sharding=``: back onto the mesh for the moves
            v = jax.device_put(v, flat_sharding)
        return _state(layout, "mesh split", lambda: _jit(_mesh.rebuild, layout))(v)  # type: ignore[no-any-return]
    if path == "device":
        out = _state(layout, "split", lambda: _jit(_reference_split, layout))(v)
        return out if v.committed else jax.device_put(out)  # type: ignore[no-any-return]
    host: _Host = _state(layout, "host", lambda: _Host(layout))
    if host.cutter is not None and host.cutter[:2] == (v.dtype, device) and not _FORKED:
        out = host.cutter[2](v)
        return jax.device_put(out, device) if v.committed else out  # type: ignore[no-any-return]
    t0 = time.perf_counter()
    a = np.asarray(v)
    pieces = [
        cast(a[s : s + n].reshape(shape), dt)
        for s, n, shape, dt in zip(
            layout.starts, layout.sizes, layout.shapes, layout.dtypes, strict=True
        )
    ]
    out = jax.device_put(pieces, device if v.committed else None)
    if host.due("split", time.perf_counter() - t0) and host.cutter is None:
        cut = _shared_split(layout, v) if host.shared else _cutter(layout, v)
        host.cutter = (v.dtype, device, cut)
    return out  # type: ignore[no-any-return]


def _shared_split(layout: Layout, v: jax.Array) -> Callable[[jax.Array], list[Any]]:
    """``_layout.split_traced``, compiled for ``v``'s type and device."""
    aval = jax.ShapeDtypeStruct(v.shape, v.dtype)
    return _jit(_traced_split, layout).lower(aval).compile()  # type: ignore[no-any-return]


def _traced_split(layout: Layout, v: jax.Array) -> list[Any]:
    return _layout.split_traced(v, layout.shapes, layout.dtypes)


def _cutter(layout: Layout, v: jax.Array) -> Callable[[jax.Array], list[Any]]:
    """Jitted host callbacks cutting ``v``, one per MAX_COMPILE_LEAVES leaves
    (XLA's own split of many leaves compiles in seconds: 15.8 s at 1000)."""

    def chunk(lo: int, hi: int) -> Any:
        rows = list(
            zip(
                layout.starts[lo:hi],
                layout.sizes[lo:hi],
                layout.shapes[lo:hi],
                layout.dtypes[lo:hi],
                strict=True,
            )
        )
        out = [jax.ShapeDtypeStruct(shape, dt) for _, _, shape, dt in rows]

        def host(a: Any) -> list[Any]:
            a = np.asarray(a)
            return [cast(a[s : s + n].reshape(shape), dt) for s, n, shape, dt in rows]

        aval = jax.ShapeDtypeStruct(v.shape, v.dtype)
        return jax.jit(lambda v: jax.pure_callback(host, out, v)).lower(aval).compile()

    n = len(layout.shapes)
    chunks = [chunk(i, min(n, i + MAX_COMPILE_LEAVES)) for i in range(0, n, MAX_COMPILE_LEAVES)]
    return lambda v: [x for c in chunks for x in c(v)]


def _jit(fn: Callable[..., Any], *bound: Any) -> Any:
    """``jax.jit`` of ``fn`` with ``bound`` arguments first, through a new
    function object. jax's tracing caches are keyed weakly on the function
    jitted: had it been ``fn`` itself (module-level, never freed), every
    program compiled from it would stay cached, about 1.5 MiB each on XLA:CPU
    (tests/test_engine.py). A new object is freed, its entries with it, when
    the layout holding the program goes."""
    return jax.jit(functools.partial(fn, *bound))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _split_differentiable(layout: Layout, v: jax.Array) -> list[Any]:
    return _split(layout, v)


@_split_differentiable.defjvp
def _split_jvp(layout: Layout, primals: Any, tangents: Any) -> Any:
    (v,), (t,) = primals, tangents
    return _split_differentiable(layout, v), _mesh.rebuild(layout, t)
