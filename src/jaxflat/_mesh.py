"""Meshes: flatten and rebuild for parameters sharded over one mesh, without
replicating the model on any device, and where the flat vector goes.

A plain ``jnp.concatenate`` of sharded parameters (or a ``lax.split`` of a
sharded flat vector) is correct, but XLA's SPMD partitioner lays it out by
gathering far more than it keeps: for an 8-way FSDP model of 32 MB per
device it needs ~500 MB of temporaries. Here the moves are written out by
hand, inside one ``jax.shard_map`` over the whole mesh:

* The flat vector is cut into *chunks* in flat order: a chunk is a run of
  whole small parameters, or a band of rows of one large parameter (rows
  ``a:b`` of every device's local block). No chunk is larger than about an
  eighth of a device's block of ``flat`` (``CHUNK_FRACTION``), unless a
  single row of a parameter is.
* flatten (``concat``): for each chunk in turn, the devices ``all_gather``
  its pieces (so each holds the chunk, raveled, cast to the flat dtype)
  and every device copies into its own block of ``flat`` the part that
  falls there: a few static ``dynamic_update_slice`` of a select (taken
  on the one device whose block it is, a no-op write elsewhere).
* rebuild (``split``): for each chunk in turn, every device puts the part
  of the chunk its block holds into a zero buffer and the devices add
  these up as unsigned integers (bit-exact: each element is non-zero on
  one device only). When the axes splitting the parameter's rows are all
  flat axes (FSDP), that is a ``psum_scatter`` that hands each device its
  own rows (then an ``all_gather`` over the remaining flat axes, if any);
  otherwise a ``psum`` of the chunk, of which each device slices its block.

Chunks are processed one after another: the next chunk's input depends on
the previous chunk's output through a select whose predicate is never true
at run time (``device index >= device count``), which the compiler cannot
see through, so at most one chunk is in flight and the temporaries stay at
about one chunk per device. (``lax.optimization_barrier``, the documented
tool, does not keep XLA:CPU from running every chunk's ``all_gather`` at
once: 302 MB against 37 MB per device on the 67M-parameter FSDP test.)

Values are moved, never combined: the result is bit-identical to the plain
formulation (signed zeros and NaN payloads included).

Differentiation, batching: both directions are one primitive,
``jaxflat_sharded``, linear in its operands; its JVP is itself and its
transpose is the other direction (the transpose of the rebuild is the
flatten, so ``jax.grad`` through a rebuild costs one flatten). Under
``jax.vmap`` it is applied per batch element by vmapping the shard_map
body (the batch axis unsharded). Higher derivatives and any nesting work.

Where the scheme does not apply (no common ``Mesh``, a sharding other than
``NamedSharding``, a dimension that a mesh axis does not divide, a flat
length its axes do not divide, manual axes of an enclosing shard_map,
leaves whose shardings are unknown under ``jit`` on an Auto mesh), the
plain formulation is used.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from . import _layout
from ._layout import Layout, cast

__all__ = ["concat", "flatten", "placement", "rebuild", "same_mesh", "split", "spread_sharding"]

# The largest chunk, as a fraction of a device's block of the flat vector
# (elements), and a floor so tiny models are not cut into tiny pieces.
CHUNK_FRACTION = 8
CHUNK_FLOOR = 1 << 16


# ------------------------------------------------------------------ plan


class Rows(NamedTuple):
    """Rows ``start:stop`` of parameter ``leaf``'s local block (all rows for a whole one)."""

    leaf: int
    start: int
    stop: int


class Run(NamedTuple):
    """``length`` elements of a chunk's buffer, from offset ``buf``, are ``flat[at:at + length]``."""

    buf: int
    at: int
    length: int


class Piece(NamedTuple):
    """``length`` elements of a chunk's buffer, from offset ``buf``, that live in
    device block ``block`` of ``flat``, at ``offset`` within it."""

    block: int
    offset: int
    buf: int
    length: int


class _Chunk:
    """One step: which parameters (or rows of one) it holds, and where.

    ``items``: the :class:`Rows` it holds. Its buffer (as gathered on every
    device) holds them raveled, one after another (a band of rows: device
    0's rows, then device 1's, ...). ``runs``: where the buffer lies in
    ``flat``; ``segs``: the same as :class:`Piece` s, cut at the device
    blocks of ``flat``. For the rebuild, ``order`` lists ``(buf, length)``
    stretches of the buffer in the order the reduction wants them, ``cut``
    is them as pieces, and ``scatter`` names the axes to ``psum_scatter``
    over (the flat axes that do not split the leaf, then those that do) and
    the ones to ``all_gather`` back over, or is None (a full ``psum``).
    """

    __slots__ = ("items", "size", "ranges", "segs", "scatter", "cut")

    def __init__(
        self,
        items: list[Rows],
        runs: list[Run],
        block: int,
        scatter: Any = None,
        order: list[tuple[int, int]] | None = None,
    ) -> None:
        self.items = tuple(items)
        self.ranges = tuple(_merge(runs))
        self.size = sum(r.length for r in self.ranges)
        self.segs = tuple(self._pieces(0, self.size, block))
        self.scatter = scatter
        cut: list[Piece] = []
        at = 0
        for start, length in order or [(0, self.size)]:
            for p in self._pieces(start, length, block):
                last = cut[-1] if cut else None
                if last and last.block == p.block and last.offset + last.length == p.offset:
                    cut[-1] = last._replace(length=last.length + p.length)
                else:
                    cut.append(Piece(p.block, p.offset, at, p.length))
                at += p.length
        self.cut = tuple(cut)

    def _pieces(self, start: int, length: int, block: int) -> list[Piece]:
        """Buffer ``[start, start + length)`` cut at the device blocks of ``flat``."""
        out = []
        for run in self.ranges:
            lo, hi = max(run.buf, start), min(run.buf + run.length, start + length)
            f, stop = run.at + lo - run.buf, run.at + hi - run.buf  # in flat
            while f < stop:
                j = f // block
                end = min(stop, (j + 1) * block)
                out.append(Piece(j, f - j * block, lo, end - f))
                lo, f = lo + end - f, end
        return out


def _merge(runs: list[Run]) -> list[Run]:
    """Adjacent runs (in the buffer and in ``flat``) as one; empty ones dropped."""
    out: list[Run] = []
    for r in runs:
        if r.length == 0:
            continue
        last = out[-1] if out else None
        if last and last.buf + last.length == r.buf and last.at + last.length == r.at:
            out[-1] = last._replace(length=last.length + r.length)
        else:
            out.append(r)
    return out


class _Moves:
    """Everything static about one sharded flatten or rebuild: the chunks
    (parameters, or bands of rows of one) moved one at a time. Interned (see
    ``_moves``), so identity is equality: it is a primitive parameter."""

    def __init__(
        self,
        mesh: Any,
        shapes: tuple[tuple[int, ...], ...],
        dtypes: tuple[Any, ...],
        dims: tuple[tuple[tuple[str, ...], ...], ...],
        dtype: Any,
        flat_axes: tuple[str, ...],
        specs: tuple[Any, ...],
        budget: int,
    ) -> None:
        self.mesh = mesh
        self.shapes = shapes
        self.dtypes = dtypes
        self.dims = dims  # per leaf, per dimension: the mesh axes splitting it
        self.dtype = dtype
        self.flat_axes = flat_axes
        size = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
        self.axis_size = size
        self.flat_devices = int(np.prod([size[a] for a in flat_axes], dtype=np.int64))
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        self.length = sum(self.sizes)
        self.block = self.length // self.flat_devices
        self.starts = np.cumsum([0, *self.sizes])[:-1].tolist()
        self.parts = [
            tuple(int(np.prod([size[a] for a in ax], dtype=np.int64)) for ax in d) for d in dims
        ]
        self.local = [
            tuple(s // m for s, m in zip(sh, pt, strict=True))
            for sh, pt in zip(shapes, self.parts, strict=True)
        ]
        self.flat_spec = specs[-1]  # as given: explicit types compare specs as written
        self.leaf_specs = specs[:-1]
        self.budget = budget
        self.memo: dict[Any, Any] = {}  # jitted moves and output types (see _impl)
        self.concat_chunks = self._chunks(budget, False)
        self.split_chunks = self._chunks(budget, True)

    def _scatter(self, i: int) -> Any:
        """For the rebuild of leaf ``i``: (psum_scatter axes, all_gather
        axes), when the axes splitting its rows are all flat axes."""
        t0 = self.dims[i][0] if self.shapes[i] else ()
        if self.flat_devices == 1 or not t0 or not set(t0) <= set(self.flat_axes):
            return None
        rest = tuple(a for a in self.flat_axes if a not in t0)
        return rest + t0, rest

    def _chunks(self, budget: int, rebuild: bool) -> list[_Chunk]:
        """The parameters in flat order, cut into chunks of about ``budget``
        elements at most (``budget // 2`` for a rebuild's ``psum``, which
        holds two copies): runs of whole small parameters, and bands of rows
        of the large ones (see ``_bands``)."""
        chunks: list[_Chunk] = []
        group: list[Rows] = []  # whole small parameters waiting to form a chunk
        group_size = 0
        small = max(budget // 8, 1)
        cap = budget // 2 if rebuild else budget

        def flush() -> None:
            nonlocal group, group_size
            if group:
                runs, at = [], 0
                for rows in group:
                    runs.append(Run(at, self.starts[rows.leaf], self.sizes[rows.leaf]))
                    at += self.sizes[rows.leaf]
                chunks.append(_Chunk(group, runs, self.block))
            group, group_size = [], 0

        for i, shape in enumerate(self.shapes):
            size = self.sizes[i]
            if size == 0:
                continue
            if size <= small:
                if group_size + size > cap:
                    flush()
                group.append(Rows(i, 0, self.local[i][0] if shape else 1))
                group_size += size
            else:
                flush()
                chunks.extend(self._bands(i, budget, cap, rebuild))
        flush()
        return chunks

    def _bands(self, i: int, budget: int, cap: int, rebuild: bool) -> list[_Chunk]:
        """Large parameter ``i`` as chunks of whole rows of its local blocks.

        A rebuild band that can be scattered (FSDP: the axes splitting the
        rows are flat axes) takes a multiple of ``step`` rows, so that the
        ``psum_scatter`` hands every flat device an equal share; other bands
        are cut to ``cap``."""
        shape, rows = self.shapes[i], self.local[i][0]
        row_blocks = self.parts[i][0]  # devices that split its rows
        row_size = self.sizes[i] // shape[0]  # elements per (global) row
        scatter = self._scatter(i) if rebuild else None
        per_block = self.flat_devices // row_blocks if scatter else 1  # flat devices per row block
        step = per_block // math.gcd(row_size, per_block)
        limit = budget if scatter or not rebuild else cap
        band_rows = max(step, limit // (row_blocks * row_size) // step * step)
        plain_rows = max(1, min(rows, cap // (row_blocks * row_size)))  # bands that cannot scatter
        out = []
        for a0 in range(0, rows, band_rows):
            b0 = min(rows, a0 + band_rows)
            fits = scatter is not None and (b0 - a0) % step == 0
            width = b0 - a0 if fits else plain_rows
            for a in range(a0, b0, width):
                b = min(b0, a + width)
                band = (b - a) * row_size  # elements of the band in one row block
                runs = [
                    Run(c * band, self.starts[i] + (c * rows + a) * row_size, band)
                    for c in range(row_blocks)
                ]
                if fits:
                    q = band // per_block  # device (r, c) gets piece r of row block c
                    order = [
                        (c * band + j * q, q) for j in range(per_block) for c in range(row_blocks)
                    ]
                    out.append(_Chunk([Rows(i, a, b)], runs, self.block, scatter, order))
                else:
                    out.append(_Chunk([Rows(i, a, b)], runs, self.block))
        return out


@functools.lru_cache(maxsize=128)
def _moves(
    mesh: Any, shapes: Any, dtypes: Any, dims: Any, dtype: Any, flat_axes: Any, specs: Any
) -> _Moves:
    """The interned _Moves for these arguments. Cache validity: _Moves is a
    pure function of its (hashable, immutable) arguments, so a cached one
    equals a fresh one; and interning makes it usable as a primitive param."""
    n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    size = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    k = int(np.prod([size[a] for a in flat_axes], dtype=np.int64))
    budget = max((n // k) // CHUNK_FRACTION, CHUNK_FLOOR)
    return _Moves(mesh, shapes, dtypes, dims, dtype, flat_axes, specs, budget)


def _axes(entry: Any) -> tuple[str, ...] | None:
    """The mesh axes of one PartitionSpec entry (None: not understood)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
        return entry
    return None


def _dims(sharding: Any, shape: tuple[int, ...], mesh: Any) -> tuple[tuple[str, ...], ...] | None:
    if not isinstance(sharding, NamedSharding) or not same_mesh(sharding.mesh, mesh):
        return None
    if sharding.memory_kind not in (None, "device"):
        return None
    spec = sharding.spec
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
        return None
    if len(spec) > len(shape):
        return None
    size = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    out = []
    for d, n in enumerate(shape):
        ax = _axes(spec[d]) if d < len(spec) else ()
        if ax is None or any(a not in size for a in ax):
            return None
        if n % int(np.prod([size[a] for a in ax], dtype=np.int64)):
            return None  # uneven: padded shards, left to XLA
        out.append(ax)
    return tuple(out)


def same_mesh(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Mesh) and isinstance(b, Mesh):
        return a == b
    return bool(a.axis_names == b.axis_names and a.axis_sizes == b.axis_sizes)


def _manual() -> bool:
    """Inside a shard_map: values are per-device blocks."""
    ctx = jax.sharding.get_abstract_mesh()
    return any(t == AxisType.Manual for t in getattr(ctx, "axis_types", ()) or ())


def _mesh_ok(mesh: Any) -> bool:
    if not isinstance(mesh, Mesh) or _manual():
        return False
    return not any(t == AxisType.Manual for t in getattr(mesh, "axis_types", ()))


def _make_moves(shapes: Any, dtypes: Any, shardings: Any, dtype: Any, flat: Any) -> _Moves | None:
    if not isinstance(flat, NamedSharding) or not _mesh_ok(flat.mesh) or not shapes:
        return None
    mesh = flat.mesh
    if len(flat.spec) > 1 or flat.memory_kind not in (None, "device"):
        return None
    fax = _axes(flat.spec[0]) if len(flat.spec) else ()
    if fax is None or any(a not in mesh.axis_names for a in fax):
        return None
    if shardings is None or len(shardings) != len(shapes):
        return None
    dims = []
    for s, shape in zip(shardings, shapes, strict=True):
        d = _dims(s, shape, mesh)
        if d is None:
            return None
        dims.append(d)
    n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    k = int(np.prod([mesh.shape[a] for a in fax], dtype=np.int64))
    if n == 0 or n % k:
        return None
    specs = (*(s.spec for s in shardings), flat.spec)
    return _moves(
        mesh,
        tuple(shapes),
        tuple(np.dtype(d) for d in dtypes),
        tuple(dims),
        np.dtype(dtype),
        tuple(fax),
        specs,
    )


# ---------------------------------------------------------- the moves


def _index(axes: tuple[str, ...]) -> Any:
    return lax.axis_index(axes if len(axes) > 1 else axes[0]) if axes else 0


def _never(plan: _Moves) -> Any:
    """A run-time false the compiler cannot fold: orders the chunks."""
    names = tuple(plan.mesh.axis_names)
    if plan.mesh.size == 1:
        return None
    return lax.axis_index(names if len(names) > 1 else names[0]) >= plan.mesh.size


def _tie(x: Any, never: Any, dep: Any) -> Any:
    """``x``, made to depend on ``dep`` (a scalar) without changing it."""
    if never is None or dep is None:
        return x
    dep = lax.convert_element_type(jnp.real(dep) if not jnp.iscomplexobj(x) else dep, x.dtype)
    return lax.select(jnp.broadcast_to(never, x.shape), jnp.broadcast_to(dep, x.shape), x)


def _concat_body(plan: _Moves, *params: Any) -> Any:
    never = _never(plan)
    j = _index(plan.flat_axes)
    buf = jnp.zeros((plan.block,), plan.dtype)
    dep = None
    for ch in plan.concat_chunks:
        pieces = []
        for i, a, b in ch.items:
            x = params[i]
            if x.ndim == 0:
                x = x.reshape(1)
            if b - a != x.shape[0]:
                x = lax.slice_in_dim(x, a, b, axis=0)
            x = _tie(x, never, dep)
            for d in range(x.ndim - 1, -1, -1):
                ax = plan.dims[i][d] if plan.dims[i] else ()
                if ax:
                    x = lax.all_gather(x, ax if len(ax) > 1 else ax[0], axis=d, tiled=True)
            pieces.append(x.reshape(-1).astype(plan.dtype))
        g = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
        for p in ch.segs:
            upd = lax.slice_in_dim(g, p.buf, p.buf + p.length)
            if plan.flat_devices > 1:
                old = lax.slice_in_dim(buf, p.offset, p.offset + p.length)
                upd = lax.select(jnp.broadcast_to(j == p.block, (p.length,)), upd, old)
            buf = lax.dynamic_update_slice(buf, upd, (p.offset,))
        dep = buf[ch.segs[-1].offset]
    return buf


def _bits(x: Any) -> tuple[list[Any], Any]:
    """``x`` as unsigned integers whose sum with zeros is exact."""
    planes = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    out = []
    for p in planes:
        width = p.dtype.itemsize
        u = lax.bitcast_convert_type(
            p, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[width]
        )
        out.append(u.astype(jnp.uint32) if width < 4 else u)
    return out, x.dtype


def _unbits(planes: list[Any], dtype: Any) -> Any:
    vals = []
    for u in planes:
        real = jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype
        width = np.dtype(real).itemsize
        if width < 4:
            u = u.astype({1: jnp.uint8, 2: jnp.uint16}[width])
        vals.append(lax.bitcast_convert_type(u, real))
    return lax.complex(*vals) if len(vals) == 2 else vals[0]


def _split_body(plan: _Moves, v: Any) -> list[Any]:
    never = _never(plan)
    j = _index(plan.flat_axes)
    parts: list[list[Any]] = [[] for _ in plan.shapes]
    dep = None
    for ch in plan.split_chunks:
        cut = []
        for p in ch.cut:
            x = lax.slice_in_dim(v, p.offset, p.offset + p.length)
            if plan.flat_devices > 1:
                x = lax.select(jnp.broadcast_to(j == p.block, (p.length,)), x, jnp.zeros_like(x))
            cut.append(x)
        c = cut[0] if len(cut) == 1 else jnp.concatenate(cut)
        c = _tie(c, never, dep)
        if plan.flat_devices > 1:
            planes, dt = _bits(c)
            if ch.scatter:
                over, back = ch.scatter
                planes = [
                    lax.psum_scatter(p, _name(over), scatter_dimension=0, tiled=True)
                    for p in planes
                ]
                if back:
                    planes = [lax.all_gather(p, _name(back), axis=0, tiled=True) for p in planes]
            else:
                planes = [lax.psum(p, _name(plan.flat_axes)) for p in planes]
            c = _unbits(planes, dt)
        g = 0
        for i, a, b in ch.items:
            shape, dims, local = plan.shapes[i], plan.dims[i], plan.local[i]
            if not shape:
                parts[i].append(cast(lax.slice_in_dim(c, g, g + 1).reshape(()), plan.dtypes[i]))
                g += 1
                continue
            rows = b - a
            m0 = 1 if ch.scatter else plan.parts[i][0]
            full = (m0 * rows, *shape[1:])
            size = int(np.prod(full, dtype=np.int64))
            x = lax.slice_in_dim(c, g, g + size).reshape(full)
            g += size
            start = [(0 if ch.scatter else _index(dims[0])) * rows]
            start += [_index(ax) * n for ax, n in zip(dims[1:], local[1:], strict=True)]
            if any(not isinstance(s, int) or s for s in start) or x.shape != (rows, *local[1:]):
                x = lax.dynamic_slice(x, start, (rows, *local[1:]))
            parts[i].append(cast(x, plan.dtypes[i]))
        dep = c[0]
    out = []
    for i, ps in enumerate(parts):
        if not ps:
            out.append(jnp.zeros(plan.local[i], plan.dtypes[i]))
        else:
            out.append(ps[0] if len(ps) == 1 else jnp.concatenate(ps))
    return out


def _name(axes: tuple[str, ...]) -> Any:
    return axes if len(axes) > 1 else axes[0]


def _shard_mapped(plan: _Moves, forward: bool) -> Any:
    if forward:
        return jax.shard_map(
            functools.partial(_concat_body, plan),
            mesh=plan.mesh,
            in_specs=plan.leaf_specs,
            out_specs=plan.flat_spec,
            check_vma=False,
        )
    return jax.shard_map(
        lambda v: _split_body(plan, v),
        mesh=plan.mesh,
        in_specs=plan.flat_spec,
        out_specs=list(plan.leaf_specs),
        check_vma=False,
    )


def _raw(*args: Any, plan: _Moves, forward: bool, batch: int) -> list[Any]:
    """The move itself, on ``batch`` leading (unsharded) batch axes."""
    fn = _shard_mapped(plan, forward)
    if forward:

        def run(*xs: Any) -> list[Any]:
            return [fn(*xs)]
    else:

        def run(*xs: Any) -> list[Any]:
            return list(fn(*xs))

    for _ in range(batch):
        run = jax.vmap(run)
    return run(*args)


# ------------------------------------------------------------ primitive

_p = Primitive("jaxflat_sharded")
_p.multiple_results = True


def _impl(*args: Any, plan: _Moves, forward: bool, batch: int) -> Any:
    key = ("jit", forward, batch)  # memoised on the interned plan, freed with it
    fn = plan.memo.get(key)
    if fn is None:
        fn = plan.memo[key] = jax.jit(
            functools.partial(_raw, plan=plan, forward=forward, batch=batch)
        )
    return fn(*args)


def _out_avals(plan: _Moves, forward: bool, batch: int, avals: tuple[Any, ...]) -> Any:
    key = ("avals", forward, batch, avals)  # a pure function of the key: memoised on the plan
    out = plan.memo.get(key)
    if out is None:
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_typed_sharding(a)) for a in avals]
        fn = functools.partial(_raw, plan=plan, forward=forward, batch=batch)
        out = plan.memo[key] = tuple(jax.make_jaxpr(fn)(*args).out_avals)
    return out


def _typed_sharding(aval: Any) -> Any:
    s = getattr(aval, "sharding", None)
    if isinstance(s, NamedSharding) and any(
        t == AxisType.Explicit for t in getattr(s.mesh, "axis_types", ())
    ):
        return s
    return None


def _abstract(*avals: Any, plan: _Moves, forward: bool, batch: int) -> Any:
    return list(_out_avals(plan, forward, batch, tuple(avals)))


_p.def_impl(_impl)
_p.def_abstract_eval(_abstract)
mlir.register_lowering(_p, mlir.lower_fun(_raw, multiple_results=True))


def _jvp(primals: Any, tangents: Any, *, plan: _Moves, forward: bool, batch: int) -> Any:
    out = _p.bind(*primals, plan=plan, forward=forward, batch=batch)
    ts = [ad.instantiate_zeros(t) for t in tangents]
    return out, _p.bind(*ts, plan=plan, forward=forward, batch=batch)


def _transpose(cts: Any, *args: Any, plan: _Moves, forward: bool, batch: int) -> Any:
    cts = [ad.instantiate_zeros(c) for c in cts]
    return _p.bind(*cts, plan=plan, forward=not forward, batch=batch)


def _batch(args: Any, dims: Any, *, plan: _Moves, forward: bool, batch: int) -> Any:
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jnp.moveaxis(x, d, 0) if d is not None else jnp.broadcast_to(x, (size, *x.shape))
        for x, d in zip(args, dims, strict=True)
    ]
    out = _p.bind(*moved, plan=plan, forward=forward, batch=batch + 1)
    return out, [0] * len(out)


ad.primitive_jvps[_p] = _jvp
ad.primitive_transposes[_p] = _transpose
batching.primitive_batchers[_p] = _batch


# ---------------------------------------------------------- plain path


def _explicit(sharding: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _plain_concat(params: list[Any], dtype: Any, flat_sharding: Any) -> jax.Array:
    """The reference concatenate, laid out as ``flat_sharding``."""

    def cat(*ps: Any) -> jax.Array:
        return _layout.concat(ps, dtype)

    if _explicit(flat_sharding):
        return jax.sharding.auto_axes(cat, out_sharding=flat_sharding)(*params)  # type: ignore[no-any-return]
    out = cat(*params)
    if isinstance(flat_sharding, jax.sharding.Sharding) and not _manual():
        out = lax.with_sharding_constraint(out, flat_sharding)
    return out


def _plain_split(v: Any, spec: Any, shardings: Any) -> list[Any]:
    """The reference split, each piece laid out as its entry of ``shardings``."""

    def cut(v: Any) -> list[Any]:
        return _layout.split(v, [shape for shape, _ in spec], [dt for _, dt in spec])

    if (
        v.ndim != 1
        or _manual()
        or shardings is None
        or any(not isinstance(s, jax.sharding.Sharding) for s in shardings)
    ):
        return cut(v)  # batched rows: the layout is left to XLA
    if _explicit(shardings[0]):
        return jax.sharding.auto_axes(cut, out_sharding=list(shardings))(v)  # type: ignore[no-any-return]
    return [lax.with_sharding_constraint(p, s) for p, s in zip(cut(v), shardings, strict=True)]


# ------------------------------------------------------- a layout's vector


def placement(layout: Layout) -> tuple[Any, Any]:
    """Where a layout's flat vector goes: ``(flat_sharding, target)``: the
    vector's layout for the moves (None: one device, or left to XLA), and
    where the result is finally put when ``sharding=`` is not on the
    parameters' mesh (else None). Memoised on the layout (a pure function
    of it)."""
    got = layout.state.get("placement")
    if got is not None:
        return got  # type: ignore[no-any-return]
    shardings, asked = layout.shardings, layout.sharding
    if shardings is None:
        got = (asked, None)
    else:
        mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
        spread = spread_sharding(layout.shapes, shardings)
        if asked is None:
            got = (spread, None)
        elif mesh is not None and not (
            isinstance(asked, NamedSharding) and same_mesh(asked.mesh, mesh)
        ):
            got = (spread, asked)  # e.g. one device for the vector of a model sharded over a mesh
        else:
            got = (asked, None)
    return layout.state.setdefault("placement", got)  # type: ignore[no-any-return]


def flatten(layout: Layout, params: list[Any]) -> jax.Array:
    """A layout's flat vector (traced or under ``jit``): the moves where the
    parameters are sharded over a mesh, else the reference."""
    sharding = placement(layout)[0]
    if sharding is None:  # explicitly sharded tracers: replicate unless told
        mesh = _explicit_mesh(params)
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec())
    if sharding is None:
        return _layout.concat(params, layout.dtype)
    return concat(params, layout.dtype, sharding, shardings=layout.shardings)


def rebuild(layout: Layout, v: Any) -> list[Any]:
    """A layout's parameters cut from ``v`` (traced or under ``jit``): the
    moves where they are sharded over a mesh, else the reference."""
    if layout.shardings is not None and v.ndim == 1:
        spec = tuple(zip(layout.shapes, layout.dtypes, strict=True))
        return split(v, spec, layout.shardings, flat_sharding=placement(layout)[0])
    return _layout.split(v, layout.shapes, layout.dtypes)


# ---------------------------------------------------------------- API


def _explicit_mesh(params: list[Any]) -> Any:
    """The mesh of the first parameter whose type carries an explicit sharding."""
    typed = [getattr(jax.typeof(p), "sharding", None) for p in params]
    return next((t.mesh for t in typed if t is not None and _explicit(t)), None)


def spread_sharding(shapes: Any, shardings: Any) -> Any:
    """A 1-D sharding for the flat vector of parameters of these shapes,
    sharded over a mesh as ``shardings`` say.

    The vector is spread over as many of the mesh's devices as its length
    allows: the largest product of mesh axes that divides the length (all
    axes when it divides evenly), replicated over the rest.
    """
    mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
    if mesh is None:
        return None  # some other multi-device sharding: let XLA choose
    length = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
    names = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    best: tuple[str, ...] = ()
    best_size = 1
    for r in range(len(names), 0, -1):
        for axes in itertools.combinations(names, r):
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if length % size == 0 and size > best_size:
                best, best_size = axes, size
    return NamedSharding(mesh, PartitionSpec(best if best else None))


def _typeof_sharding(x: Any) -> Any:
    """A concrete array's sharding, or a tracer's explicit sharding type."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return x.sharding
    s = getattr(jax.typeof(x), "sharding", None)
    return s if _explicit(s) and isinstance(s, NamedSharding) else None


def concat(params: list[Any], dtype: Any, flat_sharding: Any, shardings: Any = None) -> jax.Array:
    """The parameters raveled, cast to ``dtype`` and concatenated, laid out
    as ``flat_sharding``; bit-identical to ``jnp.concatenate``.

    ``shardings``: the parameters' ``NamedSharding`` s, needed under ``jit``
    on an Auto mesh, where tracers do not carry them (on an Explicit mesh,
    and for concrete arrays, they are read off the parameters). Without
    them, or where the scheme does not apply, the plain formulation runs.
    """
    params = list(params)
    dtype = np.dtype(dtype)
    if not params:
        return jnp.zeros((0,), dtype)
    given = list(shardings) if shardings is not None else [None] * len(params)
    if len(given) != len(params):
        return _plain_concat(params, dtype, flat_sharding)
    typed = [_typeof_sharding(p) for p in params]
    shardings = [
        _concrete(t if t is not None else s, flat_sharding)
        for t, s in zip(typed, given, strict=True)
    ]
    plan = _make_moves(
        [tuple(p.shape) for p in params], [p.dtype for p in params], shardings, dtype, flat_sharding
    )
    if plan is None:
        return _plain_concat(params, dtype, flat_sharding)
    (out,) = _p.bind(*params, plan=plan, forward=True, batch=0)
    return out  # type: ignore[no-any-return]


def split(v: Any, spec: Any, shardings: Any, flat_sharding: Any = None) -> list[Any]:
    """``v`` cut into parameters of ``spec`` (``((shape, dtype), ...)``),
    each cast to its dtype and laid out as its entry of ``shardings``;
    bit-identical to ``lax.split`` and a reshape.

    ``flat_sharding``: the layout ``v`` has (or should have); by default
    ``v``'s own (concrete or explicitly typed), else the one
    ``spread_sharding`` gives these parameters. Where the scheme
    does not apply, the plain formulation runs.
    """
    spec = tuple((tuple(shape), np.dtype(dt)) for shape, dt in spec)
    if not spec:
        return []
    if shardings is None or v.ndim != 1:
        return _plain_split(v, spec, shardings)
    typed = _typeof_sharding(v)
    flat_sharding = typed if typed is not None else flat_sharding
    if flat_sharding is None:
        flat_sharding = spread_sharding([shape for shape, _ in spec], shardings)
    flat_sharding = _concrete(flat_sharding, shardings[0])
    shardings = [_concrete(s, flat_sharding) for s in shardings]
    plan = _make_moves(
        [shape for shape, _ in spec],
        [dt for _, dt in spec],
        shardings,
        np.dtype(v.dtype),
        flat_sharding,
    )
    if plan is None or v.shape != (plan.length,):
        return _plain_split(v, spec, shardings)
    return _p.bind(v, plan=plan, forward=False, batch=0)  # type: ignore[no-any-return]


def _concrete(s: Any, other: Any) -> Any:
    """``s`` on a concrete ``Mesh``: an abstract-mesh sharding (a tracer's
    type) takes ``other``'s mesh when that is concrete and alike."""
    if not isinstance(s, NamedSharding) or isinstance(s.mesh, Mesh):
        return s
    mesh = getattr(other, "mesh", None)
    if isinstance(mesh, Mesh) and same_mesh(s.mesh, mesh) and s.mesh.axis_types == mesh.axis_types:
        return NamedSharding(mesh, s.spec, memory_kind=s.memory_kind)
    return s
