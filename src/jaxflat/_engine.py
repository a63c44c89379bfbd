"""How flat vectors are made and split: the one place that picks a strategy.

* Traced values (inside ``jit``, ``grad``, ``vmap``): plain ``jnp`` ops, a
  ``concatenate`` and a ``lax.split`` whose transpose is one concatenate.
* Concrete arrays on one CPU device (eager use on CPU):
  - flatten: the first calls of a structure go through numpy views (no XLA
    compile at all, so a new structure costs milliseconds); from the second
    call on, one concatenate program is compiled in a background thread
    and used once ready (its dispatch is a single C++ call).
  - rebuild: a program holding one host callback that cuts the vector into
    numpy views (XLA compiles one custom call, not one kernel per leaf, so
    a 1000-leaf structure compiles in a fraction of a second, where one
    slice per leaf takes XLA:CPU ~10 ms each). For structures of at most
    ``XLA_SPLIT_MAX_LEAVES`` leaves, the plain XLA split is compiled in the
    background from the second call on, and used once ready.
* Anything else (accelerators, meshes): one jitted program per structure
  and sharding, cached. Over a mesh, the moves are written out by hand
  (``_sharded``) so that no device ever holds much more than its share.

The compiled concatenate is a ``jax.stages.Compiled`` object, which checks
the argument types and shardings of every call; a mismatch falls back to
the general path, so a cached program is never applied to the wrong input.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _sharded

# spec: tuple of (shape, dtype) per parameter, in flat order.
Spec = tuple[tuple[tuple[int, ...], Any], ...]

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxflat")
# XLA:CPU compiles a split at ~10 ms per output: worth it in the background
# for small structures only (a plain copy beats the host callback there).
XLA_SPLIT_MAX_LEAVES = 256
CALLBACK_CHUNK = 1024
# Above this, numpy's memcpy beats XLA:CPU's concatenate and split, and the
# host path is kept for good.
HOST_ONLY_BYTES = 64 * 2**20
ALIGN = 64


def sizes(spec: Spec) -> list[int]:
    return [int(np.prod(shape, dtype=np.int64)) for shape, _ in spec]


def _traced(xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _on_host(xs: Any) -> jax.Device | None:
    """The CPU device all concrete arrays live on, or None if the host path
    does not apply (a tracer, an accelerator, several devices, a mesh)."""
    device: Any = None
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
    return device  # type: ignore[no-any-return]


def _cast(x: Any, dtype: Any, xp: Any) -> Any:
    if xp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = xp.real(x)
    return x.astype(dtype) if x.dtype != dtype else x


class Programs:
    """The compiled fast paths of one plan (see the module docstring)."""

    def __init__(self, spec: Spec, dtype: Any, shardings: Any = None, flat_sharding: Any = None) -> None:
        self.spec = spec
        self.dtype = dtype
        self.shardings = shardings  # the leaves' shardings over a mesh, or None
        self.flat_sharding = flat_sharding
        stops = np.cumsum(sizes(spec)).tolist() if spec else []
        self.slices = [slice(a, b) for a, b in zip([0, *stops[:-1]], stops)]
        self.nbytes = (stops[-1] if stops else 0) * np.dtype(dtype).itemsize
        self.concat: Any = None  # a Compiled concatenate, once built
        self.split: Any = None  # a callable v -> pieces (Compiled programs), once built
        self.flatten_calls = self.split_calls = 0

    # ------------------------------------------------------------ flatten
    def flatten(self, params: list[Any], sharding: Any) -> jax.Array:
        if not params:
            return jnp.zeros((0,), self.dtype)
        if _traced(params):
            return _concat_traced(params, self.dtype, sharding, self.shardings)
        if self.concat is not None:
            try:
                return self.concat(*params)  # type: ignore[no-any-return]
            except (TypeError, ValueError):
                pass  # other types or devices than compiled for
        device = None if sharding is not None else _on_host(params)
        if device is None:
            program = _concat_program(jnp.dtype(self.dtype), sharding, self.shardings)
            return program(list(params))  # type: ignore[no-any-return]
        out = _aligned(sum(int(np.prod(p.shape)) for p in params), self.dtype)
        np.concatenate([np.asarray(p).reshape(-1) for p in params], out=out)
        self.flatten_calls += 1
        if self.flatten_calls == 2 and self.nbytes < HOST_ONLY_BYTES:
            avals = [_abstract(p, device) for p in params]
            _POOL.submit(self._compile_concat, avals)
        return jax.device_put(out, device)  # aliases the aligned buffer: no copy

    def _compile_concat(self, avals: list[Any]) -> None:
        fn = functools.partial(_concat_varargs, dtype=self.dtype)
        self.concat = jax.jit(fn).lower(*avals).compile()

    # ------------------------------------------------------------ rebuild
    def unflatten(self, v: jax.Array, shardings: Any) -> list[Any]:
        if isinstance(v, jax.core.Tracer):
            return _split_traced(self.spec, v, shardings, self.flat_sharding)
        device = None if shardings is not None else _on_host([v])
        if device is None:
            program = _split_program(self.spec, shardings, self.flat_sharding)
            return program(v)  # type: ignore[no-any-return]
        if self.split is not None:
            try:
                return self.split(v)  # type: ignore[no-any-return]
            except (TypeError, ValueError):
                pass  # another dtype or device than compiled for
        a = np.asarray(v)
        vdt = np.dtype(v.dtype)
        out = jax.device_put([_piece(a, s, shape, vdt, dt) for s, (shape, dt) in
                              zip(self.slices, self.spec)], device)
        self.split_calls += 1
        if self.split_calls == 2 and self.nbytes < HOST_ONLY_BYTES:
            aval = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            _POOL.submit(self._compile_split, aval)
        return out  # type: ignore[no-any-return]

    def _compile_split(self, aval: Any) -> None:
        if len(self.spec) <= XLA_SPLIT_MAX_LEAVES:  # a plain XLA split
            fn = functools.partial(_split_traced, self.spec)
            self.split = jax.jit(fn).lower(aval).compile()
            return
        # Host callbacks over chunks of leaves: XLA compiles one custom call
        # per chunk, not one kernel per leaf (and a callback of 10000 outputs
        # compiles superlinearly, so chunks stay at CALLBACK_CHUNK).
        chunks = []
        for i in range(0, len(self.spec), CALLBACK_CHUNK):
            chunks.append(self._callback(aval, slice(i, i + CALLBACK_CHUNK)))

        def run(v: jax.Array) -> list[Any]:
            return [x for c in chunks for x in c(v)]

        self.split = run

    def _callback(self, aval: Any, part: slice) -> Any:
        spec, slices = self.spec[part], self.slices[part]
        out = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in spec]

        vdt = np.dtype(aval.dtype)
        same = [np.dtype(dt) == vdt for _, dt in spec]

        def host(a: Any) -> list[Any]:
            a = np.asarray(a)
            if a.dtype != vdt:
                return [_piece(a, s, shape, a.dtype, dt) for s, (shape, dt) in zip(slices, spec)]
            return [
                a[s].reshape(shape) if ok else _piece(a, s, shape, vdt, dt)
                for s, (shape, dt), ok in zip(slices, spec, same)
            ]

        def program(v: jax.Array) -> Any:
            return jax.pure_callback(host, out, v)

        # A plain jit (its C++ dispatch; a Compiled object holding a host
        # callback is called through a slow Python path), warmed up here.
        fn = jax.jit(program)
        jax.block_until_ready(fn(jnp.zeros(aval.shape, aval.dtype, device=aval.sharding)))
        return fn


def _piece(a: np.ndarray, s: slice, shape: Any, vdt: Any, dt: Any) -> np.ndarray:
    """One parameter's numpy view of the flat vector, cast if it must be."""
    x = a[s]
    if np.dtype(dt) != vdt:
        x = (x.real if _drops_imag(vdt, dt) else x).astype(dt)
    return x.reshape(shape)


def _aligned(n: int, dtype: Any) -> np.ndarray:
    """An uninitialised 1-D numpy buffer aligned so that device_put aliases it."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + n * itemsize].view(dtype)


def _drops_imag(src: Any, dst: Any) -> bool:
    return bool(jnp.issubdtype(src, jnp.complexfloating)) and not jnp.issubdtype(dst, jnp.complexfloating)


def _abstract(p: Any, device: Any) -> jax.ShapeDtypeStruct:
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding)


# ---------------------------------------------------------------- traced ops


def _concat_traced(
    params: list[Any], dtype: Any, sharding: Any = None, shardings: Any = None
) -> jax.Array:
    if not params:
        return jnp.zeros((0,), dtype)
    if sharding is None:
        typed: list[Any] = [getattr(jax.typeof(p), "sharding", None) for p in params]
        mesh = next((t.mesh for t in typed if _sharded._explicit(t)), None)
        if mesh is not None:  # explicitly sharded tracers: replicate unless told
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if sharding is not None:  # a mesh: memory-bounded moves (see _sharded)
        return _sharded.concat(params, dtype, sharding, shardings=shardings)
    return jnp.concatenate([jnp.ravel(p).astype(dtype) for p in params])


def _concat_varargs(*params: Any, dtype: Any) -> jax.Array:
    return _concat_traced(list(params), dtype)


@functools.lru_cache(maxsize=256)
def _concat_program(dtype: Any, sharding: Any, shardings: Any) -> Any:
    return jax.jit(
        functools.partial(_concat_traced, dtype=dtype, sharding=sharding, shardings=shardings)
    )


def _split_traced(
    spec: Spec, v: jax.Array, shardings: Any = None, flat_sharding: Any = None
) -> list[jax.Array]:
    if not spec:
        return []
    if shardings is not None and v.ndim == 1:  # a mesh: see _sharded
        return _sharded.split(v, spec, shardings, flat_sharding=flat_sharding)
    pieces = lax.split(v, sizes(spec), axis=v.ndim - 1)
    lead = v.shape[:-1]
    return [_cast(p.reshape(*lead, *shape), dt, jnp) for p, (shape, dt) in zip(pieces, spec)]


@functools.lru_cache(maxsize=256)
def _split_program(spec: Spec, shardings: Any, flat_sharding: Any) -> Any:
    return jax.jit(
        functools.partial(_split_traced, spec, shardings=shardings, flat_sharding=flat_sharding)
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def split(programs: Programs, shardings: Any, v: jax.Array) -> list[jax.Array]:
    """``v`` cut into parameters of the given shapes and dtypes, for a traced
    ``v`` (a concrete one goes straight to ``programs.unflatten``).

    A custom JVP keeps the fast primal path in eager ``jax.grad`` while the
    tangent is a plain ``lax.split``, which transposes to one concatenate.
    """
    return programs.unflatten(v, shardings)


@split.defjvp
def _split_jvp(programs: Programs, shardings: Any, primals: Any, tangents: Any) -> Any:
    (v,), (t,) = primals, tangents
    tangent = _split_traced(programs.spec, t, shardings, programs.flat_sharding)
    return split(programs, shardings, v), tangent
