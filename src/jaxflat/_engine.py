"""How flat vectors are made and cut: the one place that picks a strategy.

``Engine(spec, dtype, shardings, flat_sharding)`` serves one plan. Its
``flatten(params)`` and ``split(v)`` take one of four paths, chosen in
``_path``:

* ``traced`` (inside ``jit``, ``grad``, ``vmap``): one ``jnp.concatenate``;
  one ``lax.split`` whose transpose is one concatenate.
* ``mesh`` (parameters sharded over a mesh): ``_mesh``'s memory-bounded
  moves, in one jitted program per plan.
* ``host`` (concrete arrays on one CPU device): numpy views, no compile: a
  new structure costs milliseconds. On the ``COMPILE_AT_CALL``-th host call
  of one plan (a structure met that often is being called in a loop), its
  programs are compiled, synchronously, and used from then on: one
  concatenate, and one split (XLA's, up to ``XLA_SPLIT_MAX_LEAVES`` leaves;
  above, where XLA:CPU's compile grows by ~10 ms a leaf, a host callback
  that cuts the vector, one custom call per ``CALLBACK_CHUNK`` leaves).
  Measured on 2 cores: the compiles cost about 1 s at 100 and at 1000
  leaves (most at 256 leaves: ~2 s), and repay themselves within about 150
  and 30 calls respectively; structures above
  ``MAX_CONCAT_LEAVES`` leaves or ``HOST_ONLY_BYTES`` never compile their
  concatenate, where numpy is as fast and XLA's compile is not bounded.
* ``compiled`` (any other single device, e.g. a GPU): one jitted program
  per plan.

The compiled concatenate is a ``jax.stages.Compiled``, which checks the
types, shapes and devices of every call: a mismatch falls back to the host
path, so a program is never applied to inputs it was not built for.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Spec = tuple[tuple[tuple[int, ...], np.dtype], ...]  # (shape, dtype) per parameter

COMPILE_AT_CALL = 4  # host calls of one plan after which its programs are compiled
MAX_CONCAT_LEAVES = 2048  # XLA:CPU's concatenate compile grows faster than linearly
XLA_SPLIT_MAX_LEAVES = 256  # above this, the callback cutter (XLA's split: ~2 s at 256)
HOST_ONLY_BYTES = 64 * 2**20  # above this, numpy's copy beats XLA:CPU's
CALLBACK_CHUNK = 1024  # leaves per host callback (a callback's compile is superlinear)
ALIGN = 64  # device_put aliases a 64-byte aligned numpy buffer instead of copying


def sizes(spec: Spec) -> list[int]:
    return [math.prod(shape) for shape, _ in spec]


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype`` (numpy or jax): complex into real keeps the real part."""
    if x.dtype == dtype:
        return x
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = x.real
    return x.astype(dtype)


def flat_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """``jnp.result_type`` of the parameters; float8 types, which JAX does not
    promote implicitly, give way to the widest other float present."""
    dtypes = list(dict.fromkeys(dtypes))  # the join is order-free; few distinct dtypes
    if not dtypes:
        return np.dtype(jnp.float32)
    try:
        return np.dtype(jnp.result_type(*dtypes))
    except jax.dtypes.TypePromotionError:
        wide = [d for d in dtypes if np.dtype(d).itemsize > 1]
        return np.dtype(jnp.result_type(*wide)) if wide else np.dtype(jnp.float32)


def placement(params: Sequence[Any], sharding: Any, name: Callable[[int], str]) -> tuple[Any, Any, Any]:
    """Where the flat vector goes, decided once per plan: ``(shardings,
    flat_sharding, target)``: the parameters' shardings over a mesh (None:
    all on one device, or traced), the flat vector's layout for the moves,
    and where the result is finally put when ``sharding`` is not on the
    parameters' mesh (else None).

    Raises:
      ValueError: parameters on different single devices (``name(i)`` names
        parameter ``i``).
    """
    seen: dict[Any, int] = {}
    for i, p in enumerate(params):
        if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer):
            seen.setdefault(p.sharding, i)
    single = {s: i for s, i in seen.items() if len(s.device_set) == 1}
    devices = {next(iter(s.device_set)): i for s, i in single.items()}
    if len(devices) > 1:
        (d1, i1), (d2, i2) = list(devices.items())[:2]
        raise ValueError(
            f"destructure: parameters live on different devices: {name(i1)} on {d1} and "
            f"{name(i2)} on {d2}; put them on one device (jax.device_put) or shard them over one mesh"
        )
    if len(single) == len(seen) and sharding is None:
        return None, None, None
    if len(seen) < len(params):  # numpy or traced among sharded: let XLA lay them out
        return None, sharding, None
    from . import _mesh

    shardings = tuple(p.sharding for p in params)
    mesh = next((s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)), None)
    if sharding is None:
        return shardings, _mesh.flat_sharding(list(params)), None
    if mesh is not None and not (
        isinstance(sharding, jax.sharding.NamedSharding) and _mesh.same_mesh(sharding.mesh, mesh)
    ):  # e.g. one device for the vector of a model sharded over a mesh
        return shardings, _mesh.flat_sharding(list(params)), sharding
    return shardings, sharding, None


def _device(arrays: Sequence[Any]) -> Any:
    """The one CPU device all concrete arrays live on, for the host path;
    None where it does not apply (a tracer, an accelerator, several devices)."""
    device: Any = None
    for x in arrays:
        if isinstance(x, np.ndarray):
            continue
        if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
            return None
        devices = x.sharding.device_set
        if len(devices) != 1:
            return None
        d: Any = next(iter(devices))
        if d.platform != "cpu" or (device is not None and d != device):
            return None
        device = d
    if device is None and jax.default_backend() == "cpu":
        device = jax.devices("cpu")[0]  # numpy leaves only
    return device


def _aligned(n: int, dtype: Any) -> np.ndarray:
    """An uninitialised 1-D numpy buffer that ``device_put`` can alias."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + n * itemsize].view(dtype)


def concat_traced(params: Sequence[Any], dtype: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(p).astype(dtype) for p in params])


def split_traced(spec: Spec, v: jax.Array) -> list[jax.Array]:
    """``v`` (or a batch of them, on its last axis) cut into the parameters."""
    pieces = lax.split(v, sizes(spec), axis=v.ndim - 1)
    lead = v.shape[:-1]
    return [cast(p.reshape(*lead, *shape), dt) for p, (shape, dt) in zip(pieces, spec, strict=True)]


class Engine:
    """Flatten and split for one plan; holds its compiled programs."""

    def __init__(self, spec: Spec, dtype: np.dtype, shardings: Any = None,
                 flat_sharding: Any = None, target: Any = None) -> None:
        self.spec = spec
        self.dtype = dtype
        self.shardings = shardings  # the parameters' shardings over a mesh, or None
        self.flat_sharding = flat_sharding  # the flat vector's layout (see placement)
        self.target = target  # where the flat vector finally goes, if elsewhere
        stops = np.cumsum([0, *sizes(spec)]).tolist()
        self.slices = [slice(a, b) for a, b in itertools.pairwise(stops)]
        self.length = stops[-1]
        nbytes = self.length * dtype.itemsize
        small = nbytes < HOST_ONLY_BYTES
        self.compiles = {"concat": small and len(spec) <= MAX_CONCAT_LEAVES, "split": small}
        self.host_calls = {"concat": 0, "split": 0}
        self.concat: Any = None  # Compiled concatenate, on the host path
        self.cutter: Any = None  # (dtype, device, callable) for the host path
        self.programs: dict[str, Any] = {}  # mesh and compiled paths: jitted functions

    def _path(self, arrays: Sequence[Any]) -> tuple[str, Any]:
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return "traced", None
        if self.shardings is not None or self.flat_sharding is not None:
            return "mesh", None
        device = _device(arrays)
        return ("host", device) if device is not None else ("compiled", None)

    def _due(self, kind: str) -> bool:
        """Count a host call; True when this plan's ``kind`` program is to be compiled."""
        self.host_calls[kind] += 1
        return self.compiles[kind] and self.host_calls[kind] >= COMPILE_AT_CALL

    def _program(self, name: str, make: Callable[[], Any]) -> Any:
        fn = self.programs.get(name)
        if fn is None:
            fn = self.programs[name] = make()
        return fn

    # ---------------------------------------------------------------- flatten

    def flatten(self, params: list[Any]) -> jax.Array:
        if not params:
            return jnp.zeros((0,), self.dtype)
        path, device = self._path(params)
        if path == "traced":
            return self._concat_traced(params)
        if path == "mesh":
            out = self._program("concat", lambda: _jit(self._concat_traced))(params)
            return out if self.target is None else jax.device_put(out, self.target)  # type: ignore[no-any-return]
        if path == "compiled":
            return jax.device_put(self._program("concat", lambda: _jit(concat_traced, dtype=self.dtype))(params))  # type: ignore[no-any-return]
        if self.concat is not None:
            try:
                return self.concat(*params)  # type: ignore[no-any-return]
            except (TypeError, ValueError):
                pass  # not what it was compiled for: the host path
        out = _aligned(self.length, self.dtype)
        np.concatenate([np.asarray(p).reshape(-1) for p in params], out=out)
        flat = jax.device_put(out, device)
        if self._due("concat") and self.concat is None:
            avals = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=jax.sharding.SingleDeviceSharding(device)) for p in params]
            self.concat = _jit(_concat_varargs, dtype=self.dtype).lower(*avals).compile()
        return flat

    def _concat_traced(self, params: list[Any]) -> jax.Array:
        from . import _mesh

        sharding = self.flat_sharding
        if sharding is None:  # explicitly sharded tracers: replicate unless told
            mesh = _mesh.explicit_mesh(params)
            if mesh is not None:
                sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if sharding is None:
            return concat_traced(params, self.dtype)
        return _mesh.concat(params, self.dtype, sharding, shardings=self.shardings)

    # ---------------------------------------------------------------- split

    def split(self, v: jax.Array) -> list[Any]:
        path, device = self._path([v])
        if path == "traced":
            return self._split_traced(v)
        if path == "mesh":
            if self.target is not None:
                v = jax.device_put(v, self.flat_sharding)
            return self._program("split", lambda: _jit(self._split_traced))(v)  # type: ignore[no-any-return]
        if path == "compiled":
            return self._program("split", lambda: _jit(split_traced, self.spec))(v)  # type: ignore[no-any-return]
        if self.cutter is not None and self.cutter[:2] == (v.dtype, device):
            return self.cutter[2](v)  # type: ignore[no-any-return]
        a = np.asarray(v)
        out = jax.device_put(
            [cast(a[s].reshape(shape), dt) for s, (shape, dt) in zip(self.slices, self.spec, strict=True)],
            device,
        )
        if self._due("split") and self.cutter is None:
            cut: Any
            if len(self.spec) <= XLA_SPLIT_MAX_LEAVES:
                aval = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
                cut = _jit(split_traced, self.spec).lower(aval).compile()
            else:
                cut = self._callbacks(v)
            self.cutter = (v.dtype, device, cut)
        return out  # type: ignore[no-any-return]

    def _split_traced(self, v: jax.Array) -> list[jax.Array]:
        if self.shardings is not None and v.ndim == 1:
            from . import _mesh

            return _mesh.split(v, self.spec, self.shardings, flat_sharding=self.flat_sharding)
        return split_traced(self.spec, v)

    def _callbacks(self, v: jax.Array) -> Callable[[jax.Array], list[Any]]:
        """Jitted host callbacks cutting ``v``, one per CALLBACK_CHUNK leaves."""
        def chunk(part: slice) -> Any:
            spec, slices = self.spec[part], self.slices[part]
            out = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in spec]

            def host(a: Any) -> list[Any]:
                a = np.asarray(a)
                return [cast(a[s].reshape(shape), dt) for s, (shape, dt) in zip(slices, spec, strict=True)]

            fn = jax.jit(lambda v: jax.pure_callback(host, out, v))
            jax.block_until_ready(fn(v))  # compile now, not on first use
            return fn

        chunks = [chunk(slice(i, i + CALLBACK_CHUNK)) for i in range(0, len(self.spec), CALLBACK_CHUNK)]
        return lambda v: [x for c in chunks for x in c(v)]


def _jit(fn: Callable[..., Any], *bound: Any, **kw: Any) -> Any:
    """``jax.jit`` of ``fn`` with ``bound`` arguments first, through a new
    function object. jax's tracing caches are keyed weakly on the function
    jitted: had it been ``fn`` itself (module-level, never freed), every
    program compiled from it would stay cached, about 1.5 MiB each on XLA:CPU
    (tests/test_engine.py). A new object is freed, its entries with it, when
    the plan holding the program goes."""
    return jax.jit(functools.partial(fn, *bound, **kw))


def _concat_varargs(*params: Any, dtype: Any) -> jax.Array:
    return concat_traced(params, dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def split_differentiable(engine: Engine, v: jax.Array) -> list[Any]:
    """``v`` cut into the parameters. A custom JVP keeps eager ``jax.grad``
    on the fast concrete path while the tangent is a plain ``lax.split``,
    which transposes to one concatenate."""
    return engine.split(v)


@split_differentiable.defjvp
def _split_jvp(engine: Engine, primals: Any, tangents: Any) -> Any:
    (v,), (t,) = primals, tangents
    return split_differentiable(engine, v), engine._split_traced(t)
