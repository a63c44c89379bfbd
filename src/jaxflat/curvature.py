"""Matrix-free curvature of a loss over a flat vector: Hessian- (or Gauss-Newton-)
vector products, extreme eigenvalues, the trace, the diagonal and the spectral
density.

Everything here needs only a flat vector ``x`` and a scalar function ``f`` of
it, typically ``f = lambda v: loss(re(v), batch)`` with
``flat, re = jaxflat.destructure(model)``, or the Gauss-Newton operator
``ggn(model_fn, loss_fn)`` in its place. With ``data=`` ``f`` is called as
``f(x, batch)`` and the operator is that of the mean loss over all examples.

Compiling once. Each function runs one compiled program (or, for a streamed
``data=`` list, a few compiled pieces driven from Python), jitted with ``f``
as a *static* argument: jax's own jit cache, keyed on ``f``'s identity, on
the static options and on the shapes and dtypes of ``x``, ``key`` and the
batches, hands back the program compiled by the first call. A cached program
equals a fresh one because a jitted program depends on nothing else: ``f``
is assumed pure (jax's rule for static functions), so the same ``f`` traced
again would give the same program. The corollary: arrays that ``f`` closes
over are baked in when it is first compiled; pass what changes through
``data=`` (or ``x``), and keep one ``f`` (a new lambda per call compiles
anew). jax's caches are bounded (least recently used), so they hold ``f``
only boundedly.

Memory. ``eigenvalues`` keeps a bounded basis (``basis=`` vectors, default
``max(30, 5 * k)``, fewer where that would exceed 256 MiB but never fewer than
``k + 1 + 2 * block``) and restarts (thick restart, keeping the best Ritz
vectors), so its memory does not grow with ``iters``; the basis is one buffer
updated in place (a restart rotates it by slices of columns), so XLA holds it
once plus a few blocks. Every vector is orthogonalised against the whole kept
basis, so no mode of ``eigenvalues`` returns spurious (ghost) eigenvalues. A
block of ``min(k, 16)`` vectors is multiplied at once (block Lanczos): an
eigenvalue repeated up to that many times comes back repeated. ``density``
runs the plain Lanczos recurrence with the last ``reorth`` vectors kept.

matfree. `matfree <https://github.com/pnkraemer/matfree>`_ implements
Lanczos, stochastic Lanczos quadrature and Hutchinson-type estimators in JAX.
We own this code instead: what jaxflat needs and matfree does not give in
one piece is the thick-restarted *block* Krylov method (bounded memory and
repeated eigenvalues), a Python-driven loop for data streamed one batch at a
time, the Gauss-Newton operator, progress from inside ``jax.jit`` and the
sharded layout of every vector; the building blocks we would take from it
(a Lanczos step, a Rademacher probe) are a few lines each. A dependency for
them would pin jaxflat to another project's release cycle for little code.
"""

from __future__ import annotations

import numbers
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = (
    "EigenInfo",
    "EstimateInfo",
    "GGN",
    "density",
    "diagonal",
    "eigenvalues",
    "ggn",
    "hvp",
    "trace",
)

Array = jax.Array
_WHICH = ("LA", "SA", "LM", "BE")
_PROBE_BLOCK = 5  # probes per block in trace/diagonal: see benchmarks/CURVATURE.md
_BASIS_BYTES = 2**28  # default bases hold at most this much (more only to keep k + 2 blocks)


class EigenInfo(NamedTuple):
    """How far to trust ``eigenvalues``: products used, convergence, residuals.

    ``matvecs``: operator products used; ``converged``: the stopping rule
    (``tol``) was met (or the whole space was spanned) before the budget ran
    out; ``residuals``: ``||H v - lambda v||`` per eigenpair, from the
    Lanczos relation (in the order of the eigenvalues).
    """

    matvecs: Array
    converged: Array
    residuals: Array


class EstimateInfo(NamedTuple):
    """How far to trust ``trace`` / ``diagonal``: products used and standard error.

    ``matvecs``: operator products (exactly ``samples``); ``converged``:
    always true (a fixed number of probes; read ``stderr``); ``stderr``: the
    standard error of the estimate (a scalar for ``trace``, like ``x`` for
    ``diagonal``; NaN with one sample).
    """

    matvecs: Array
    converged: Array
    stderr: Array


@dataclass(frozen=True)
class GGN:
    """The generalised Gauss-Newton operator of ``loss_fn(model_fn(x, ...), ...)``.

    Made by :func:`ggn`; pass it wherever a loss ``f`` goes. Calling it
    evaluates the loss. Two ``GGN`` of the same functions are equal, so a
    second call with ``ggn(model_fn, loss_fn)`` made anew does not compile
    again.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> op = curvature.ggn(lambda x: x ** 2, lambda out: 0.5 * jnp.sum(out ** 2))
      >>> op(jnp.array([1.0, 2.0]))
      Array(8.5, dtype=float32)
    """

    model_fn: Callable[..., Any]
    loss_fn: Callable[..., Any]

    def __call__(self, x: Array, *batch: Any) -> Any:
        return self.loss_fn(self.model_fn(x, *batch), *batch)


def ggn(model_fn: Callable[..., Any], loss_fn: Callable[..., Any]) -> GGN:
    """The generalised Gauss-Newton matrix ``J^T H_loss J``, as an operator.

    ``J`` is the Jacobian of ``model_fn`` at ``x`` and ``H_loss`` the Hessian
    of ``loss_fn`` at the model's output: ``model_fn(x)`` and ``loss_fn(out)``
    without ``data=``, ``model_fn(x, batch)`` and ``loss_fn(out, batch)``
    with it. It is positive semi-definite for a convex ``loss_fn`` (the
    Fisher for the usual likelihood losses). A product costs a forward pass,
    a Jacobian-vector product, a loss Hessian-vector product on the output
    and a vector-Jacobian product back. Every function of this module takes
    it in place of ``f``.

    Args:
      model_fn: the flat vector (and a batch) to the model's output (any pytree).
      loss_fn: the output (and the batch) to a scalar loss.

    Returns:
      A :class:`GGN` (callable: the loss).

    Raises:
      TypeError: an argument is not callable.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> a = jnp.array([[1.0, 2.0], [0.0, 1.0]])
      >>> op = curvature.ggn(lambda x: a @ x, lambda out: 0.5 * jnp.sum(out ** 2))
      >>> curvature.hvp(op, jnp.zeros(2), jnp.array([1.0, 0.0]))  # a.T @ a @ v
      Array([1., 2.], dtype=float32)
    """
    for name, fn in (("model_fn", model_fn), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise TypeError(f"ggn: {name} must be callable, got {type(fn).__name__} {fn!r:.60}")
    return GGN(model_fn, loss_fn)


# ---------------------------------------------------------------- arguments


def _check_x(name: str, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 1:
        raise ValueError(
            f"{name}: x must be a flat (1-D) vector, got shape {shape}; "
            "use `flat, re = jaxflat.destructure(model)`"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be a real floating-point vector, got dtype {x.dtype}")
    if shape[0] == 0:
        raise ValueError(f"{name}: x is empty (shape (0,)): there is no Hessian")


def _check_f(name: str, f: Any) -> None:
    if not callable(f):
        raise TypeError(
            f"{name}: f must be a function of x (or curvature.ggn(...)), got {type(f).__name__}"
        )
    try:
        hash(f)
    except TypeError:
        raise TypeError(
            f"{name}: f must be hashable (it keys the compiled program), got an unhashable "
            f"{type(f).__name__}; pass a function defined once, e.g. `def f(v): return model(v)`"
        ) from None


def _check_int(name: str, arg: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name}: {arg} must be an integer >= {low}, got {value!r} ({type(value).__name__})"
        )
    if value < low:
        raise ValueError(f"{name}: {arg} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_bool(name: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}: {arg} must be True or False, got {value!r}")
    return bool(value)


def _check_key(name: str, key: Any) -> None:
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not ((typed and key.shape == ()) or legacy):
        got = (
            f"{key!r:.60}"
            if not isinstance(key, jax.Array)
            else f"an array {key.dtype}{list(key.shape)}"
        )
        raise TypeError(
            f"{name}: key must be one jax.random key, e.g. jax.random.key(0), got {got}"
        )


def _check_tol(name: str, tol: Any) -> Any:
    if isinstance(tol, bool) or not (
        isinstance(tol, numbers.Real)
        or (isinstance(tol, jax.Array | np.ndarray) and tol.shape == ())
    ):
        raise TypeError(f"{name}: tol must be a number >= 0, got {tol!r} ({type(tol).__name__})")
    if not isinstance(tol, jax.core.Tracer) and not float(tol) >= 0:
        raise ValueError(f"{name}: tol must be a number >= 0, got {tol!r}")
    return tol


# ---------------------------------------------------------------- data


class _Plan(NamedTuple):
    """How a batch is rebuilt from its arrays: static (hashable) for jit."""

    treedef: Any
    consts: tuple[tuple[int, Any], ...]  # (position, value) of the non-array leaves


class _Data(NamedTuple):
    kind: str  # "none", "stacked" (a pytree scanned on device) or "streamed" (an iterable)
    source: Any  # the stacked leaves, or the iterable
    plan: _Plan | None  # stacked: one batch's plan


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def _split(name: str, i: int, batch: Any) -> tuple[list[Any], _Plan, int]:
    """A streamed batch: its arrays, its plan, its size (leading axis of its first array)."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    arrays = [a for a in leaves if _is_array(a)]
    if not arrays:
        raise ValueError(
            f"{name}: data= batch {i} holds no array (got {batch!r:.60}); each batch needs an "
            "array whose leading axis counts its examples"
        )
    if arrays[0].ndim == 0:
        raise ValueError(
            f"{name}: data= batch {i}: its first array has shape (); the leading axis of a "
            "batch's first array is its number of examples"
        )
    plan = _Plan(treedef, tuple((j, a) for j, a in enumerate(leaves) if not _is_array(a)))
    try:
        hash(plan)
    except TypeError:
        raise TypeError(
            f"{name}: data= batch {i} has a non-array leaf that cannot be hashed; "
            "batches may hold arrays and hashable constants (str, int, None)"
        ) from None
    return arrays, plan, int(arrays[0].shape[0])


def _rebuild(plan: _Plan, arrays: Any) -> Any:
    it, consts = iter(arrays), dict(plan.consts)
    leaves = [consts[j] if j in consts else next(it) for j in range(plan.treedef.num_leaves)]
    return jax.tree_util.tree_unflatten(plan.treedef, leaves)


def _prepare(name: str, data: Any) -> _Data:
    if data is None:
        return _Data("none", None, None)
    if isinstance(data, tuple | dict | jax.Array | np.ndarray):
        leaves, treedef = jax.tree_util.tree_flatten(data)
        if not leaves or not all(_is_array(a) and a.ndim >= 1 for a in leaves):
            raise ValueError(
                f"{name}: data= as a {type(data).__name__} is a stack of batches: every leaf must "
                "be an array with a leading batch axis (use a list for batches streamed one at a time)"
            )
        counts = {a.shape[0] for a in leaves}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"{name}: data= stacked batches need one leading axis length > 0 on every leaf, "
                f"got {sorted(counts)}"
            )
        return _Data("stacked", [jnp.asarray(a) for a in leaves], _Plan(treedef, ()))
    if not hasattr(data, "__iter__") or isinstance(data, str | bytes):
        raise TypeError(
            f"{name}: data= must be a list (or other re-iterable) of batches, or a tuple/dict/array "
            f"of stacked batches, got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"{name}: data= is a one-shot iterator ({type(data).__name__}); it is read once per "
            "operator product, so pass a list or a re-iterable data loader"
        )
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(f"{name}: data= is empty; pass at least one batch (or data=None)")
    return _Data("streamed", data, None)


# ---------------------------------------------------------------- layout


def _layout_of(x: Any) -> NamedSharding | None:
    """x's NamedSharding when it is sharded over a mesh (concrete, or traced with Explicit axes)."""
    sharding = None
    if not isinstance(x, jax.core.Tracer):
        sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        try:
            sharding = jax.typeof(x).sharding
        except (TypeError, AttributeError):  # pragma: no cover - numpy input
            return None
    if not isinstance(sharding, NamedSharding) or all(p is None for p in sharding.spec):
        return None
    return sharding


def _lay(sharding: NamedSharding | None, v: Array) -> Array:
    """``v`` (leading unsharded axes, then x's axis) in x's layout."""
    if sharding is None:
        return v
    spec = PartitionSpec(*([None] * (v.ndim - 1)), *sharding.spec)
    target = NamedSharding(sharding.mesh, spec)
    names = [
        a for p in sharding.spec if p is not None for a in (p if isinstance(p, tuple) else (p,))
    ]
    types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True))
    if names and all(types[a] == AxisType.Explicit for a in names):
        return jax.sharding.reshard(v, target)
    return jax.lax.with_sharding_constraint(v, target)


# ---------------------------------------------------------------- operator products


def _products(op: Any, x: Array, vs: Array, *batch: Any) -> Array:
    """The operator at x times each row of ``vs`` (b, n), for one batch (or none)."""
    if isinstance(op, GGN):
        out, jvp_fn = jax.linearize(lambda y: op.model_fn(y, *batch), x)
        vjp_fn = jax.linear_transpose(jvp_fn, x)
        loss_grad = jax.grad(lambda o: op.loss_fn(o, *batch))

        def one(v: Array) -> Array:
            return vjp_fn(jax.jvp(loss_grad, (out,), (jvp_fn(v),))[1])[0]

    else:
        grad = jax.grad(lambda y: op(y, *batch))

        def one(v: Array) -> Array:
            return jax.jvp(grad, (x,), (v,))[1]

    vs = vs.astype(x.dtype)
    return one(vs[0])[None] if vs.shape[0] == 1 else jax.vmap(one)(vs)


def _forms(op: Any, x: Array, vs: Array, *batch: Any) -> Array:
    """``z @ A @ z`` for each row ``z`` of ``vs`` (b, n): a (b,) vector.

    Forward-over-forward (the second derivative of ``f(x + t z)`` in ``t``),
    with no backward pass: about half the work of a Hessian-vector product
    and none of its stored activations (``benchmarks/CURVATURE.md``). For the
    Gauss-Newton matrix, ``(J z) @ H_loss @ (J z)``. Equal to ``z @ (A @ z)``
    up to rounding (tested).
    """
    if isinstance(op, GGN):
        out, jvp_fn = jax.linearize(lambda y: op.model_fn(y, *batch), x)

        def loss(o: Any) -> Any:
            return op.loss_fn(o, *batch)

        def one(v: Array) -> Array:
            u = jvp_fn(v)
            return jax.jvp(lambda o: jax.jvp(loss, (o,), (u,))[1], (out,), (u,))[1]

    else:

        def fn(y: Array) -> Any:
            return op(y, *batch)

        def one(v: Array) -> Array:
            return jax.jvp(lambda y: jax.jvp(fn, (y,), (v,))[1], (x,), (v,))[1]

    vs = vs.astype(x.dtype)
    forms = one(vs[0])[None] if vs.shape[0] == 1 else jax.vmap(one)(vs)
    if forms.shape != vs.shape[:1]:  # f is not scalar: jax.grad says so, as elsewhere
        _products(op, x, vs[:1], *batch)
        raise TypeError(f"f must return a scalar, got shape {forms.shape[1:]}")
    return forms


def _measure(op: Any, x: Array, vs: Array, form: bool, *batch: Any) -> Array:
    """The products ``(b, n)``, or with ``form`` the quadratic forms ``(b,)``, for one batch."""
    return _forms(op, x, vs, *batch) if form else _products(op, x, vs, *batch)


def _device_product(
    op: Any, x: Array, vs: Array, data: _Data, arrays: Any, form: bool = False
) -> Array:
    """Products (or forms) without data, or averaged over stacked batches with a scan."""
    if data.kind == "none":
        return _measure(op, x, vs, form)
    assert data.plan is not None
    plan = data.plan

    def body(acc: Array, leaves: Any) -> tuple[Array, None]:
        return acc + _measure(op, x, vs, form, _rebuild(plan, leaves)), None

    zero = jnp.zeros(vs.shape[:1] if form else vs.shape, x.dtype)
    total, _ = jax.lax.scan(body, zero, arrays)
    return total / arrays[0].shape[0]


@partial(jax.jit, static_argnames=("op", "plan", "form"))
def _accumulate(
    op: Any, x: Array, vs: Array, acc: Array, size: Array, arrays: Any, plan: _Plan, form: bool
) -> Array:
    return acc + size * _measure(op, x, vs, form, _rebuild(plan, arrays))


def _stream_product(
    name: str, op: Any, x: Array, vs: Array, data: Any, form: bool = False
) -> Array:
    """The mean over all examples of a streamed data set: one batch on the device at a time."""
    acc, total = jnp.zeros(vs.shape[:1] if form else vs.shape, x.dtype), 0
    for i, batch in enumerate(data):
        arrays, plan, size = _split(name, i, batch)
        acc = _accumulate(op, x, vs, acc, jnp.asarray(size, x.dtype), arrays, plan, form)
        total += size
    if total == 0:
        raise ValueError(
            f"{name}: data= yielded no batches; pass at least one batch (or data=None)"
        )
    return acc / total


def _dtype(x: Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


def _product_fn(
    name: str, op: Any, x: Array, data: _Data, arrays: Any, sharding: Any, form: bool = False
) -> Callable[[Array], Array]:
    """``vs (b, n) -> products (b, n)`` in the working dtype, laid out like x (with ``form``:
    the quadratic forms ``(b,)``)."""
    dt = _dtype(x)
    lay = (lambda v: v) if form else partial(_lay, sharding)
    if data.kind == "streamed":
        return lambda vs: lay(_stream_product(name, op, x, vs, data.source, form).astype(dt))
    return lambda vs: lay(_device_product(op, x, vs, data, arrays, form).astype(dt))


# ---------------------------------------------------------------- progress

_last_report = [0.0]


def _report(name: str, products: Any, estimate: Any, final: Any) -> None:
    now = time.monotonic()
    if bool(final) or now - _last_report[0] >= 1.0:
        _last_report[0] = now
        est = np.array2string(np.asarray(estimate), precision=6, separator=", ", threshold=8)
        word = "done" if bool(final) else "running"
        print(
            f"jaxflat.curvature.{name}: {word}, {int(products)} products, estimate {est}",
            file=sys.stderr,
            flush=True,
        )


def _progress(on: bool, name: str, products: Any, estimate: Any, final: bool = False) -> None:
    if on:
        jax.debug.callback(partial(_report, name), products, estimate, final)


# ---------------------------------------------------------------- running a loop


def _run(
    name: str,
    op: Any,
    x: Array,
    data: _Data,
    compiled: Callable[..., Any],
    impl: Callable[..., Any],
    stepper: Callable[..., Any],
    args: tuple[Any, ...],
    cfg: Any,
    form: bool = False,
) -> Any:
    """One way to run an algorithm, three ways to feed it products (or, with ``form``,
    quadratic forms).

    No data or stacked data: ``compiled`` (one jitted program with ``op``
    static). Streamed data under a trace (``x`` a tracer): ``impl`` traced
    with the batches unrolled into the program. Streamed data, eager: the
    algorithm's ``stepper`` drives compiled steps from Python, one product
    (one pass over the data) at a time.
    """
    if data.kind != "streamed":
        return compiled(op, x, *args, data.source, cfg=cfg, data=data._replace(source=None))
    product = _product_fn(name, op, x, data, None, cfg.sharding, form)
    if any(isinstance(a, jax.core.Tracer) for a in (x, *args)):
        return impl(product, x, *args, cfg)
    return stepper(product, x, *args, cfg)


# ---------------------------------------------------------------- hvp


@partial(jax.jit, static_argnames=("op", "cfg", "data"))
def _hvp_compiled(op: Any, x: Array, v: Array, arrays: Any, *, cfg: Any, data: _Data) -> Array:
    return _device_product(op, x, v[None], data, arrays)[0]


class _HvpCfg(NamedTuple):
    sharding: Any


def hvp(f: Callable[..., Any], x: Array, v: Array, *, data: Any = None) -> Array:
    """The Hessian-vector product ``H(x) @ v`` (or Gauss-Newton, with ``ggn``), exact to rounding.

    Forward-over-reverse: ``jax.jvp(jax.grad(f), (x,), (v,))[1]``, which costs
    about two to three gradients and no more memory than one. It works under
    ``jax.jit``, ``jax.vmap`` and on sharded vectors (the result is laid out
    like the gradient, i.e. like ``x``). A second call with the same ``f``
    and shapes compiles nothing.

    Args:
      f: scalar function of the flat vector (``f(x, batch)`` with ``data``),
        or a :func:`ggn` operator.
      x: the point, a 1-D floating-point vector (e.g. ``destructure``'s flat).
      v: the direction, shaped like ``x``.
      data: ``None``; a list (or re-iterable loader) of batches, streamed one
        at a time; or a tuple/dict/array of batches stacked on a leading
        axis, scanned on the device. The operator is that of the mean loss
        over all examples (each batch weighted by its size: the leading axis
        of its first array).

    Returns:
      ``H(x) @ v``, shaped like ``x``.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``v`` is not shaped like
        ``x``, or ``data`` is empty or malformed.
      TypeError: ``x`` is not real floating point, ``f`` is not scalar, or
        ``data`` is a one-shot iterator.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: jnp.sum(x ** 3)          # H = diag(6 x)
      >>> curvature.hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
      Array([ 6., 12.], dtype=float32)
      >>> batches = [jnp.ones(3), 3 * jnp.ones(1)]  # 4 examples: mean Hessian diag(2 * 1.5)
      >>> g = lambda x, c: jnp.mean(c) * jnp.sum(x ** 2)
      >>> curvature.hvp(g, jnp.ones(2), jnp.ones(2), data=batches)
      Array([3., 3.], dtype=float32)
    """
    _check_f("hvp", f)
    _check_x("hvp", x)
    if getattr(v, "shape", None) != x.shape:
        raise ValueError(f"hvp: v must be shaped like x {x.shape}, got {getattr(v, 'shape', None)}")
    prepared = _prepare("hvp", data)
    v = jnp.asarray(v, x.dtype)
    cfg = _HvpCfg(_layout_of(x))
    if prepared.kind == "streamed":
        out = _stream_product("hvp", f, x, v[None], prepared.source)[0]
        return _lay(cfg.sharding, out)
    return _hvp_compiled(f, x, v, prepared.source, cfg=cfg, data=prepared._replace(source=None))


# ---------------------------------------------------------------- eigenvalues: block Krylov


class _EigCfg(NamedTuple):
    n: int
    k: int
    b: int  # block size: vectors multiplied at once
    cap: int  # vectors kept
    keep: int  # Ritz vectors kept at a restart
    which: str
    budget: int  # most products
    sharding: Any
    progress: bool


class _EigState(NamedTuple):
    q: Array  # (cap, n): orthonormal rows or zero rows
    t: Array  # (cap, cap): q A q^T, filled for multiplied rows
    s: Array  # first row of the block still to multiply
    live: Array  # (cap,) rows that hold a vector
    vals: Array  # (k,) wanted Ritz values, last step
    coef: Array  # (cap, k) their Ritz vectors' coefficients in q
    res: Array  # (k,) their residual norms
    matvecs: Array
    scale: Array  # largest |A q| seen: the spectrum's scale
    done: Array
    converged: Array
    seed: Array  # for the restart vectors


def _ritz(t: Array, active: Array) -> tuple[Array, Array, Array]:
    """Eigenpairs of t restricted to the active rows: (theta, U, valid), inactive ones marked."""
    mask = active[:, None] & active[None, :]
    big = jnp.max(jnp.where(mask, jnp.abs(t), 0)) * t.shape[0] + 1
    tp = jnp.where(mask, t, 0) + jnp.diag(jnp.where(active, 0, -3 * big))
    theta, u = jnp.linalg.eigh((tp + tp.T) / 2)
    valid = jnp.sum(jnp.where(active[:, None], u * u, 0), axis=0) > 0.5
    return theta, u, valid


def _select(theta: Array, valid: Array, which: str, count: int, low: int) -> Array:
    """Indices of the ``count`` wanted Ritz values (``low`` of them from the bottom for BE)."""
    inf = jnp.asarray(jnp.inf, theta.dtype)
    if which == "BE":
        bottom = jnp.argsort(jnp.where(valid, theta, inf))[:low]
        top = jnp.argsort(jnp.where(valid, -theta, inf))[: count - low]
        return jnp.concatenate([bottom, top])
    key = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[which]
    return jnp.argsort(jnp.where(valid, key, inf))[:count]


def _gram(a: Array, b: Array, sharding: Any = None) -> Array:
    """``a @ b.T``, contracting x's axis (replicated result where that axis is explicitly sharded)."""
    if b.ndim == 1:
        return jnp.sum(a * b[None], axis=1)
    if sharding is not None and any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return jnp.matmul(a, b.T, out_sharding=NamedSharding(sharding.mesh, PartitionSpec()))
    return a @ b.T


def _mix(h: Array) -> Array:
    """A bijective 32-bit integer finaliser (Wellons' lowbias32): every output bit depends on
    every input bit."""
    u32 = jnp.uint32
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ (h >> u32(shift))) * u32(mul)
    return h ^ (h >> u32(16))


def _seed(key: Array) -> Array:
    """One 32-bit seed from a key's words (no random-number program to compile)."""
    data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
    seed = jnp.uint32(0x243F6A88)
    for word in data.reshape(-1):
        seed = _mix(seed ^ word)
    return seed


def _words(seed: Array, first: Any, size: int, m: int) -> Array:
    """Rows ``first .. first + size`` of a stream of 32-bit words (size, m) from ``seed``:
    word ``j`` of row ``p`` a hash of (seed, p, j). Every random start and probe comes from
    here: an integer hash compiles in a fraction of the time of ``jax.random`` in a loop
    body."""
    u32 = jnp.uint32
    rows = _mix(_mix(jnp.asarray(first).astype(u32) + jnp.arange(size, dtype=u32)) ^ seed)
    j = jnp.arange(m, dtype=u32) * u32(0x9E3779B1)
    return _mix(_mix(j[None, :] ^ rows[:, None]) + rows[:, None] * u32(0x85EBCA77))


def _signs(seed: Array, first: Any, size: int, n: int, dtype: Any) -> Array:
    """Rademacher rows (size, n) of the stream: 32 signs from each word."""
    words = _words(seed, first, size, -(-n // 32))
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)[None, None, :]) & jnp.uint32(1)
    return 2 * bits.reshape(size, -1)[:, :n].astype(dtype) - 1


def _noise(
    seed: Array, step: Array, shape: tuple[int, ...], dtype: Any, sharding: Any, row: Any = 0
) -> Array:
    """Vectors in general position (uniform in [-1/2, 1/2)) for starts and restarts: rows
    ``row`` on of the stream of (seed, step). They need not be statistically random, only
    not special."""
    stream = _mix(seed ^ _mix(jnp.asarray(step).astype(jnp.uint32)))
    words = _words(stream, row, shape[0], shape[1])
    return _lay(sharding, (words >> jnp.uint32(8)).astype(dtype) / 2**24 - 0.5)


def _sweep(n: int, rows: int, fn: Callable[..., Any], carry: Any, go: Any = True) -> Any:
    """``carry = fn(start, c, fresh, carry)`` for each slice of ``c`` columns of (rows, n) arrays.

    ``c``: at most 16 MiB of float32 per (rows, c) slice and an eighth of the
    columns, but at least 1024. The last slice starts at ``n - c`` and so
    overlaps the one before: ``fresh``
    (c,) marks its columns that no slice before it had. Runs only where ``go``.
    Unsharded products with a (rows, n) basis go through here: one matrix
    product over all of x.size makes the CPU's matmul library pack a copy of
    an operand (measured: ~240 MiB for 1M parameters and 50 vectors), and
    an update by slices happens in place."""
    c = min(n, max(1024, min(2**22 // rows, -(-n // 8))))

    def body(i: Array, carry: Any) -> Any:
        start = jnp.minimum(i * c, n - c)
        return fn(start, c, (start + jnp.arange(c)) >= i * c, carry)

    return jax.lax.fori_loop(0, jnp.where(go, -(-n // c), 0), body, carry)


def _gram_q(q: Array, w: Array, sharding: Any = None) -> Array:
    """``q @ w.T`` for a basis q (cap, n) and a block w (b, n), by slices of columns unsharded."""
    if sharding is not None:
        return _gram(q, w, sharding)

    def fn(start: Array, c: int, fresh: Array, acc: Array) -> Array:
        cols = jnp.where(fresh, jax.lax.dynamic_slice_in_dim(w, start, c, 1), 0)
        return acc + jax.lax.dynamic_slice_in_dim(q, start, c, 1) @ cols.T

    return _sweep(q.shape[1], q.shape[0], fn, jnp.zeros((q.shape[0], w.shape[0]), w.dtype))


def _minus(w: Array, coef: Array, q: Array, sharding: Any = None) -> Array:
    """``w - coef @ q`` (coef (b, cap)), in place by slices of columns unsharded."""
    if sharding is not None:
        return w - coef @ q

    def fn(start: Array, c: int, fresh: Array, w: Array) -> Array:
        old = jax.lax.dynamic_slice_in_dim(w, start, c, 1)
        new = old - coef @ jax.lax.dynamic_slice_in_dim(q, start, c, 1)
        return jax.lax.dynamic_update_slice_in_dim(w, jnp.where(fresh, new, old), start, 1)

    return _sweep(q.shape[1], q.shape[0], fn, w)


def _project_out(q: Array, w: Array, sharding: Any = None, raw: Array | None = None) -> Array:
    """``w`` (b, n) less its projection on q's rows: classical Gram-Schmidt twice, the first
    pass's coefficients ``raw = q @ w.T`` given where known (a pass over q less). (One sweep
    for the first subtraction and the second coefficients measured 2.3x slower: 0.54 s
    against 0.24 s at 20M parameters and 4 vectors.)"""
    raw = _gram_q(q, w, sharding) if raw is None else raw
    w = _minus(w, raw.T, q, sharding)
    return _minus(w, _gram_q(q, w, sharding).T, q, sharding)


def _new_block(
    q: Array, r: Array, noise: Callable[[Array], Array], thresh: Array, sharding: Any = None
) -> tuple[Array, Array, Array]:
    """Orthonormal rows spanning ``r`` (rows already orthogonal to q), by Gram-Schmidt.

    A row that adds less than ``thresh`` (an invariant subspace, or a
    repeated direction) is replaced by ``noise(i)`` (a generic vector, (n,))
    orthogonal to q and to the rows before it; where none is left (q spans
    the space) the row is zero. Returns (rows, dead, rows @ r.T), the last
    upper triangular. r's rows are overwritten one by one (the coupling is
    computed on the way), so no second block of vectors of x.size is kept;
    a replacement (rare) costs a pass over q for that row alone."""
    eps = jnp.finfo(r.dtype).eps
    b = r.shape[0]

    def orth(rows: Array, i: Array, v: Array) -> Array:  # against the rows before i, twice
        if b == 1:  # no row before: four passes over a vector of x.size saved (k=1)
            return v
        before = (jnp.arange(b) < i).astype(v.dtype)
        for _ in range(2):
            v = v - (before * _gram(rows, v, sharding)) @ rows
        return v

    def body(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        rows, dead, coupling = carry  # rows before i are done, rows from i are r's
        v = orth(rows, i, rows[i])
        norm = jnp.linalg.norm(v)

        def replace() -> tuple[Array, Array]:
            u = noise(i)
            alt = orth(rows, i, _project_out(q, u[None], sharding)[0])
            ok = jnp.linalg.norm(alt) > jnp.sqrt(eps) * jnp.linalg.norm(u)
            return jnp.where(ok, alt / jnp.where(ok, jnp.linalg.norm(alt), 1), 0), ~ok

        v, gone = jax.lax.cond(norm > thresh, lambda: (v / norm, jnp.zeros((), bool)), replace)
        coupling = coupling.at[i].set(jnp.where(jnp.arange(b) >= i, _gram(rows, v, sharding), 0))
        return rows.at[i].set(v), dead.at[i].set(gone), coupling

    init = (r, jnp.zeros(b, bool), jnp.zeros((b, b), r.dtype))
    rows, dead, coupling = jax.lax.fori_loop(0, b, body, init)
    return _lay(sharding, rows), dead, coupling


def _rotate(q: Array, w: Array, go: Array, sharding: Any = None) -> Array:
    """``q`` replaced by ``w @ q`` (w: (rows, cap), the rows after them zero) where ``go``.

    Unsharded, in place, by slices of columns (each column of the result
    needs only that column of q): XLA keeps one (cap, n) buffer. Sharded
    (slicing x's axis would gather it), one product: a second (cap, n)
    buffer while it runs."""
    cap, n = q.shape
    if sharding is not None:
        pad = _lay(sharding, jnp.zeros((cap - w.shape[0], n), q.dtype))
        return jax.lax.cond(go, lambda: _lay(sharding, jnp.concatenate([w @ q, pad])), lambda: q)

    def fn(start: Array, c: int, fresh: Array, q: Array) -> Array:
        cols = jax.lax.dynamic_slice_in_dim(q, start, c, 1)
        new = jnp.concatenate([w @ cols, jnp.zeros((cap - w.shape[0], c), q.dtype)])
        return jax.lax.dynamic_update_slice_in_dim(q, jnp.where(fresh, new, cols), start, 1)

    return _sweep(n, cap, fn, q, go)


def _eig_init(x: Array, key: Array, cfg: _EigCfg) -> _EigState:
    dt = _dtype(x)
    seed = _seed(key)
    # the start block from the integer hash, not jax.random.normal (whose threefry
    # intermediates are several (b, n) integer arrays at once)
    start = _noise(seed, jnp.asarray(-1, jnp.int32), (cfg.b, cfg.n), dt, cfg.sharding)
    q = _lay(cfg.sharding, jnp.zeros((cfg.cap, cfg.n), dt))
    block, dead, _ = _new_block(q, start, lambda i: start[i], jnp.zeros((), dt), cfg.sharding)
    q = _lay(cfg.sharding, q.at[: cfg.b].set(block))
    live = jnp.zeros(cfg.cap, bool).at[: cfg.b].set(~dead)
    z = jnp.zeros(cfg.k, dt)
    return _EigState(
        q,
        jnp.zeros((cfg.cap, cfg.cap), dt),
        jnp.zeros((), jnp.int32),
        live,
        z,
        jnp.zeros((cfg.cap, cfg.k), dt),
        jnp.full(cfg.k, jnp.inf, dt),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), dt),
        jnp.zeros((), bool),
        jnp.zeros((), bool),
        seed,
    )


def _eig_block(st: _EigState, cfg: _EigCfg) -> Array:
    return jax.lax.dynamic_slice_in_dim(st.q, st.s, cfg.b, 0)


def _eig_step(st: _EigState, w: Array, tol: Any, cfg: _EigCfg) -> _EigState:
    """One block step: w = A @ (the block at row s); Rayleigh-Ritz; restart when full."""
    b, cap, k = cfg.b, cfg.cap, cfg.k
    dt = st.q.dtype
    eps = jnp.finfo(dt).eps
    s, q = st.s, st.q
    raw = _gram_q(q, w, cfg.sharding)  # (cap, b): rows past the block are zero
    diag = jax.lax.dynamic_slice_in_dim(raw, s, b, 0)
    h = jax.lax.dynamic_update_slice_in_dim(raw, (diag + diag.T) / 2, s, 0)
    t = jax.lax.dynamic_update_slice_in_dim(st.t, h, s, 1)
    t = jax.lax.dynamic_update_slice_in_dim(t, h.T, s, 0)
    scale = jnp.maximum(st.scale, jnp.max(jnp.linalg.norm(w, axis=1)))
    new, dead, coupling = _new_block(
        q,
        _project_out(q, w, cfg.sharding, raw),
        lambda i: _noise(st.seed, st.matvecs, (1, cfg.n), dt, cfg.sharding, i)[0],
        100 * eps * scale,
        cfg.sharding,
    )
    s1 = s + b
    theta, u, valid = _ritz(t, (jnp.arange(cap) < s1) & st.live)
    low = k // 2 if cfg.which == "BE" else 0
    sel = _select(theta, valid, cfg.which, k, low)
    vals, coef = theta[sel], u[:, sel]
    last = jax.lax.dynamic_slice_in_dim(u, s, b, 0)[:, sel]  # (b, k)
    res = jnp.linalg.norm(coupling @ last, axis=0)
    # Converged when every wanted Ritz value changed by at most tol relative to itself in the
    # last step, and its error bound is within that too: an eigenvalue lies within
    # min(res, res**2 / gap) of theta (gap: to the nearest other Ritz value). Either alone
    # stops early: a slow change in a tight cluster, or a small basis's Ritz values
    # leaving eigenvalues in between unseen (which overstates the gap).
    others = valid[None, :] & (jnp.arange(cap)[None, :] != sel[:, None])
    gap = jnp.min(jnp.where(others, jnp.abs(theta[None, :] - vals[:, None]), jnp.inf), axis=1)
    err = jnp.minimum(res, res**2 / jnp.maximum(gap, jnp.finfo(dt).tiny))
    bound = jnp.asarray(tol, dt) * jnp.abs(vals) + 10 * eps * scale
    change = jnp.abs(vals - st.vals)
    settled = (st.matvecs > b) & jnp.all(change <= bound) & jnp.all(err <= bound)
    exhausted = jnp.all(dead)
    matvecs = st.matvecs + b
    converged = settled | exhausted
    done = converged | (matvecs + b > cfg.budget)
    _progress(cfg.progress, "eigenvalues", matvecs, jnp.sort(vals)[::-1])

    # q is updated in place (XLA keeps one (cap, n) buffer): at a restart the kept Ritz
    # vectors are rotated into the first rows and the rest zeroed, then the new block is
    # written after the last filled row (not at all once done: coef refers to these rows).
    restart = ~done & (s1 + b > cap)
    kept = _select(theta, valid, cfg.which, cfg.keep, cfg.keep // 2 if low else 0)
    ok = valid[kept]
    q = _rotate(q, jnp.where(ok[:, None], u[:, kept].T, 0), restart, cfg.sharding)
    s_next = jnp.where(restart, cfg.keep, s1)
    q = jax.lax.dynamic_update_slice_in_dim(
        q, jnp.where(done, jax.lax.dynamic_slice_in_dim(q, s_next, b, 0), new), s_next, 0
    )
    fresh = (
        jnp.zeros((cap, cap), dt)
        .at[: cfg.keep, : cfg.keep]
        .set(jnp.diag(jnp.where(ok, theta[kept], 0)))
    )
    t = jnp.where(restart, fresh, t)
    live = jnp.where(restart, jnp.zeros(cap, bool).at[: cfg.keep].set(ok), st.live)
    live = jnp.where(done, live, jax.lax.dynamic_update_slice_in_dim(live, ~dead, s_next, 0))
    s_next = jnp.where(done, s1, s_next)
    return _EigState(
        _lay(cfg.sharding, q),
        t,
        s_next,
        live,
        vals,
        coef,
        res,
        matvecs,
        scale,
        done,
        converged,
        st.seed,
    )


def _eig_finish(st: _EigState, cfg: _EigCfg) -> tuple[Array, Array, EigenInfo]:
    order = jnp.argsort(-st.vals)
    vecs = _minus(jnp.zeros((cfg.k, cfg.n), st.q.dtype), -st.coef[:, order].T, st.q, cfg.sharding)
    vecs = vecs / jnp.maximum(
        jnp.linalg.norm(vecs, axis=1, keepdims=True), jnp.finfo(vecs.dtype).tiny
    )
    _progress(cfg.progress, "eigenvalues", st.matvecs, st.vals[order], final=True)
    return (
        st.vals[order],
        _lay(cfg.sharding, vecs),
        EigenInfo(st.matvecs, st.converged, st.res[order]),
    )


def _eig_impl(
    product: Callable[[Array], Array], x: Array, key: Array, tol: Any, cfg: _EigCfg
) -> Any:
    st = _eig_init(x, key, cfg)
    st = jax.lax.while_loop(
        lambda st: ~st.done, lambda st: _eig_step(st, product(_eig_block(st, cfg)), tol, cfg), st
    )
    return _eig_finish(st, cfg)


@partial(jax.jit, static_argnames=("op", "cfg", "data"))
def _eig_compiled(
    op: Any, x: Array, key: Array, tol: Any, arrays: Any, *, cfg: _EigCfg, data: _Data
) -> Any:
    return _eig_impl(
        _product_fn("eigenvalues", op, x, data, arrays, cfg.sharding), x, key, tol, cfg
    )


_eig_init_jit = jax.jit(_eig_init, static_argnames=("cfg",))
_eig_step_jit = jax.jit(_eig_step, static_argnames=("cfg",))
_eig_block_jit = jax.jit(_eig_block, static_argnames=("cfg",))
_eig_finish_jit = jax.jit(_eig_finish, static_argnames=("cfg",))


def _eig_stepper(
    product: Callable[[Array], Array], x: Array, key: Array, tol: Any, cfg: _EigCfg
) -> Any:
    st = _eig_init_jit(x, key, cfg=cfg)
    while not bool(st.done):
        st = _eig_step_jit(st, product(_eig_block_jit(st, cfg=cfg)), tol, cfg=cfg)
    return _eig_finish_jit(st, cfg=cfg)


def eigenvalues(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    k: int = 1,
    which: str = "LA",
    iters: int = 100,
    tol: float = 1e-3,
    data: Any = None,
    info: bool = False,
    progress: bool = False,
    basis: int | None = None,
) -> Any:
    """``k`` extreme eigenvalues of the Hessian (or Gauss-Newton matrix) of ``f`` at ``x``.

    Thick-restarted block Lanczos from a random start drawn from ``key``
    (the same key gives the same result): ``min(k, 16)`` vectors are
    multiplied at once (one ``jax.vmap``-ed product), every new vector is
    orthogonalised against the whole kept basis, and the Rayleigh-Ritz values
    of the basis approximate the eigenvalues. When the basis is full it
    restarts from its best Ritz vectors, so memory stays bounded. It stops
    when every wanted Ritz value ``theta`` changed by at most ``tol``
    relative to itself in the last step and its error bound is within that
    too (an eigenvalue lies within ``min(res, res**2 / gap)`` of ``theta``:
    ``res`` the residual ``|A v - theta v|``, ``gap`` the distance to the
    nearest other Ritz value), or when the basis spans the whole space, or
    after ``iters * k`` products. ``info=True`` says which, with the residuals.

    An eigenvalue repeated up to ``min(k, 16)`` times comes back repeated (a
    single-vector Krylov method cannot see multiplicity). No mode returns
    spurious eigenvalues: every vector is kept orthogonal to the basis.

    Memory: beyond what ``f``'s gradient (times the block) needs, ``basis``
    vectors of ``x.size`` and about three blocks more while a step runs (one
    compiled program: the basis is updated in place, and on one device the
    products with it go by slices of columns; a sharded ``x`` adds a second
    basis while a restart runs). The default basis is ``max(30, 5 * k)``
    vectors, fewer where they would exceed 256 MiB, but never fewer than
    ``k + 1 + 2 * block`` (``k + 1`` Ritz vectors kept at a restart: fewer
    converge slowly) nor ``k + 2 * block``; capped by what the space needs.
    For example 1M float32 parameters, ``k=10``: 50 vectors (193 MiB), XLA's
    temporaries 322 MiB; 124M parameters, ``k=1``: 4 vectors (1.9 GiB).
    ``basis=iters * k + k`` keeps every vector (full reorthogonalisation,
    no restart); each step's Rayleigh-Ritz then costs ``basis ** 3``, so
    keep that for small runs.

    Args:
      f: scalar function of the flat vector (``f(x, batch)`` with ``data``),
        or a :func:`ggn` operator.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key for the start vectors.
      k: how many eigenvalues, ``1 <= k <= x.size``.
      which: ``"LA"`` the algebraically largest, ``"SA"`` the smallest
        (negative curvature), ``"LM"`` the largest in magnitude, ``"BE"``
        both ends (``k // 2`` from the bottom, the rest from the top).
      iters: at most ``iters * k`` products.
      tol: a Ritz value has converged when its last change and its error
        bound are at most ``tol`` times its value.
      data: as in :func:`hvp`.
      info: also return an :class:`EigenInfo`.
      progress: report progress on stderr (also under ``jax.jit``).
      basis: vectors kept (``>= k + 2 * block``); default ``max(30, 5 * k)``,
        fewer above 256 MiB, at least ``k + 1 + 2 * block``.

    Returns:
      ``(vals, vecs)`` or ``(vals, vecs, info)``: ``vals`` of shape ``(k,)``,
      descending, unit eigenvectors ``vecs`` of shape ``(k, x.size)`` (row
      ``i`` for ``vals[i]``, laid out like ``x``), in float32 or ``x``'s wider
      dtype.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``k`` is not in
        ``1..x.size``, ``iters`` or ``basis`` are out of range, ``which`` is
        unknown, ``tol`` is negative, or ``data`` is empty or malformed.
      TypeError: ``x`` is not real floating point, ``key`` is not a key,
        ``tol`` is not a number, or ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> h = jnp.diag(jnp.array([-3.0, 1, 2, 5, 5, 5, 7]))
      >>> f = lambda x: 0.5 * x @ h @ x
      >>> vals, vecs = curvature.eigenvalues(f, jnp.zeros(7), key=jax.random.key(0), k=3)
      >>> [round(float(v), 3) for v in vals]
      [7.0, 5.0, 5.0]
      >>> vals, _, info = curvature.eigenvalues(f, jnp.zeros(7), key=jax.random.key(0),
      ...                                       which="SA", info=True)
      >>> round(float(vals[0]), 3), bool(info.converged)
      (-3.0, True)
    """
    _check_f("eigenvalues", f)
    _check_x("eigenvalues", x)
    _check_key("eigenvalues", key)
    n = x.shape[0]
    k = _check_int("eigenvalues", "k", k, 1)
    if k > n:
        raise ValueError(f"eigenvalues: k={k} exceeds the {n} parameters (x.size); use k <= {n}")
    if which not in _WHICH:
        raise ValueError(f"eigenvalues: which must be one of {_WHICH}, got {which!r}")
    iters = _check_int("eigenvalues", "iters", iters, 1)
    tol = _check_tol("eigenvalues", tol)
    info = _check_bool("eigenvalues", "info", info)
    progress = _check_bool("eigenvalues", "progress", progress)
    b = min(k, 16)
    if basis is None:
        # at least k + 1 Ritz vectors kept at a restart (fewer converge slowly: measured in
        # benchmarks/CURVATURE.md), even where that exceeds _BASIS_BYTES
        low = k + 1 + 2 * b
        cap = max(low, min(max(30, 5 * k), _BASIS_BYTES // (n * _dtype(x).itemsize)))
    else:
        cap = _check_int("eigenvalues", "basis", basis, k + 2 * b)
    cap = min(cap, n + b)  # the whole space and one (empty) block more
    keep = max(k, (cap - b) // 2, min(k + 1, cap - 2 * b))  # k + 1 where the basis allows
    prepared = _prepare("eigenvalues", data)
    cfg = _EigCfg(n, k, b, cap, keep, which, iters * k, _layout_of(x), progress)
    vals, vecs, out_info = _run(
        "eigenvalues",
        f,
        x,
        prepared,
        _eig_compiled,
        _eig_impl,
        _eig_stepper,
        (key, jnp.asarray(tol, _dtype(x))),
        cfg,
    )
    return (vals, vecs, out_info) if info else (vals, vecs)


# ---------------------------------------------------------------- trace and diagonal: Hutchinson


class _HutchCfg(NamedTuple):
    n: int
    samples: int
    block: int
    diag: bool  # diagonal (z * Hz) or trace (z . Hz)
    sharding: Any
    progress: bool


class _Moments(NamedTuple):
    n: Array
    mean: Array
    m2: Array  # sum of squared deviations from the mean


def _probes(key: Array, i: Any, size: int, x: Array, cfg: _HutchCfg) -> Array:
    """Probes ``i * block .. + size`` as Rademacher rows: 32 signs from each 32-bit word.

    Word ``j`` of probe ``p`` is a hash of (key, p, j): probe ``p`` is the same
    whatever the block size, and an integer hash compiles in a fraction of the
    time of ``jax.random`` in a loop body (Hutchinson needs independent fair
    signs, not a cryptographic stream)."""
    first = jnp.asarray(i, jnp.uint32) * jnp.uint32(cfg.block)
    return _lay(cfg.sharding, _signs(_seed(key), first, size, cfg.n, _dtype(x)))


def _combine(m: _Moments, z: Array, hz: Array, cfg: _HutchCfg) -> _Moments:
    """Chan et al.'s update of the running mean and squared deviations by one block."""
    vals = z * hz if cfg.diag else hz  # trace: hz holds the forms z @ H @ z
    nb = vals.shape[0]
    mb = jnp.mean(vals, axis=0)
    m2b = jnp.sum((vals - mb[None]) ** 2, axis=0)
    count = m.n + nb
    delta = mb - m.mean
    mean = m.mean + delta * (nb / count)
    m2 = m.m2 + m2b + delta**2 * (m.n * nb / count)
    _progress(cfg.progress, "diagonal" if cfg.diag else "trace", count, jnp.sum(mean))
    return _Moments(count, mean, m2)


def _hutch_init(x: Array, cfg: _HutchCfg) -> _Moments:
    dt = _dtype(x)
    shape = (cfg.n,) if cfg.diag else ()
    zero = _lay(cfg.sharding, jnp.zeros(shape, dt)) if cfg.diag else jnp.zeros(shape, dt)
    return _Moments(jnp.zeros((), dt), zero, zero)


def _hutch_finish(m: _Moments, cfg: _HutchCfg) -> tuple[Array, EstimateInfo]:
    stderr = jnp.sqrt(m.m2 / (m.n - 1) / m.n) if cfg.samples > 1 else jnp.full_like(m.mean, jnp.nan)
    name = "diagonal" if cfg.diag else "trace"
    _progress(cfg.progress, name, m.n, jnp.sum(m.mean), final=True)
    return m.mean, EstimateInfo(jnp.asarray(cfg.samples), jnp.asarray(True), stderr)


def _hutch_impl(product: Callable[[Array], Array], x: Array, key: Array, cfg: _HutchCfg) -> Any:
    full, rest = divmod(cfg.samples, cfg.block)

    def body(i: Array, m: _Moments) -> _Moments:
        z = _probes(key, i, cfg.block, x, cfg)
        return _combine(m, z, product(z), cfg)

    m = jax.lax.fori_loop(0, full, body, _hutch_init(x, cfg))
    if rest:
        z = _probes(key, full, rest, x, cfg)
        m = _combine(m, z, product(z), cfg)
    return _hutch_finish(m, cfg)


@partial(jax.jit, static_argnames=("op", "cfg", "data"))
def _hutch_compiled(
    op: Any, x: Array, key: Array, arrays: Any, *, cfg: _HutchCfg, data: _Data
) -> Any:
    name = "diagonal" if cfg.diag else "trace"
    product = _product_fn(name, op, x, data, arrays, cfg.sharding, not cfg.diag)
    return _hutch_impl(product, x, key, cfg)


_probes_jit = jax.jit(_probes, static_argnames=("size", "cfg"))
_combine_jit = jax.jit(_combine, static_argnames=("cfg",))
_hutch_init_jit = jax.jit(_hutch_init, static_argnames=("cfg",))
_hutch_finish_jit = jax.jit(_hutch_finish, static_argnames=("cfg",))


def _hutch_stepper(product: Callable[[Array], Array], x: Array, key: Array, cfg: _HutchCfg) -> Any:
    full, rest = divmod(cfg.samples, cfg.block)
    m = _hutch_init_jit(x, cfg=cfg)
    for i, size in [(i, cfg.block) for i in range(full)] + ([(full, rest)] if rest else []):
        z = _probes_jit(key, i, size, x, cfg=cfg)
        m = _combine_jit(m, z, product(z), cfg=cfg)
    return _hutch_finish_jit(m, cfg=cfg)


def _hutchinson(
    name: str,
    f: Any,
    x: Array,
    key: Array,
    samples: Any,
    data: Any,
    info: Any,
    progress: Any,
    block: Any,
) -> Any:
    _check_f(name, f)
    _check_x(name, x)
    _check_key(name, key)
    samples = _check_int(name, "samples", samples, 1)
    block = _PROBE_BLOCK if block is None else _check_int(name, "block", block, 1)
    info = _check_bool(name, "info", info)
    progress = _check_bool(name, "progress", progress)
    prepared = _prepare(name, data)
    cfg = _HutchCfg(
        x.shape[0], samples, min(block, samples), name == "diagonal", _layout_of(x), progress
    )
    est, out_info = _run(
        name,
        f,
        x,
        prepared,
        _hutch_compiled,
        _hutch_impl,
        _hutch_stepper,
        (key,),
        cfg,
        form=not cfg.diag,
    )
    return (est, out_info) if info else est


def trace(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    samples: int = 100,
    data: Any = None,
    info: bool = False,
    progress: bool = False,
    block: int | None = None,
) -> Any:
    """An unbiased estimate of the trace of the Hessian (or Gauss-Newton matrix) of ``f`` at ``x``.

    Hutchinson's estimator with Rademacher vectors: the mean of
    ``z @ H @ z`` over ``samples`` random sign vectors ``z`` drawn from
    ``key``. Each ``z @ H @ z`` is a second directional derivative, taken
    forward over forward (no backward pass: about half the work of a
    Hessian-vector product), ``block`` of them at once (one ``jax.vmap``:
    matrix-matrix work, default 5, chosen by measurement; memory grows with
    it). Probe ``p`` depends only on ``key`` and ``p``: :func:`diagonal` with
    the same key uses the same probes, and ``block`` does not change the
    estimate beyond rounding; ``info.matvecs`` counts one product per probe.
    Its variance per sample is ``2 * (sum(H**2) - sum(diag(H)**2))``; ``info=True`` gives the
    standard error estimated from the samples. Exact for a diagonal Hessian.

    Args:
      f: scalar function of the flat vector (``f(x, batch)`` with ``data``),
        or a :func:`ggn` operator.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key (the same key gives the same probes).
      samples: the number of products, ``>= 1``.
      data: as in :func:`hvp`.
      info: also return an :class:`EstimateInfo` (``stderr`` a scalar).
      progress: report progress on stderr (also under ``jax.jit``).
      block: probes per vectorised product (default 5).

    Returns:
      A scalar (float32 or ``x``'s wider dtype), or ``(trace, info)``.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``samples < 1``, or
        ``data`` is empty or malformed.
      TypeError: ``x`` is not real floating point, ``key`` is not a key, or
        ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: jnp.sum(jnp.arange(1.0, 5.0) * x ** 2)   # H = diag(2, 4, 6, 8)
      >>> t, info = curvature.trace(f, jnp.zeros(4), key=jax.random.key(0), samples=10, info=True)
      >>> t, info.stderr
      (Array(20., dtype=float32), Array(0., dtype=float32))
    """
    return _hutchinson("trace", f, x, key, samples, data, info, progress, block)


def diagonal(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    samples: int = 100,
    data: Any = None,
    info: bool = False,
    progress: bool = False,
    block: int | None = None,
) -> Any:
    """An unbiased estimate of the diagonal of the Hessian (or Gauss-Newton matrix), like ``x``.

    The mean of ``z * (H @ z)`` over ``samples`` Rademacher vectors ``z``
    (Bekas et al.): entry ``i`` is ``H_ii`` plus ``sum_{j != i} H_ij z_i z_j``,
    which has mean zero. ``re(d)`` gives it per layer and
    ``jax.tree.map(jnp.sum, re(d))`` the trace of each layer's block.
    Products and blocks as in :func:`trace`.

    Args:
      f: scalar function of the flat vector (``f(x, batch)`` with ``data``),
        or a :func:`ggn` operator.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key.
      samples: the number of products, ``>= 1``.
      data: as in :func:`hvp`.
      info: also return an :class:`EstimateInfo` (``stderr`` like ``x``).
      progress: report progress on stderr (also under ``jax.jit``).
      block: probes per vectorised product (default 5).

    Returns:
      A vector like ``x`` (float32 or ``x``'s wider dtype), or ``(diag, info)``.

    Raises:
      ValueError, TypeError: as :func:`trace`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: jnp.sum(jnp.arange(1.0, 4.0) * x ** 2) + x[0] * x[1]
      >>> d = curvature.diagonal(f, jnp.zeros(3), key=jax.random.key(0), samples=1000)
      >>> d.round()  # entries 0 and 1 are off by about 1/sqrt(1000) (the x[0] * x[1] term)
      Array([2., 4., 6.], dtype=float32)
    """
    return _hutchinson("diagonal", f, x, key, samples, data, info, progress, block)


# ---------------------------------------------------------------- density: Lanczos quadrature


class _DensCfg(NamedTuple):
    n: int
    m: int  # Lanczos steps per run
    runs: int
    r: int  # vectors kept for reorthogonalisation
    points: int
    sigma: float | None
    sharding: Any
    progress: bool


class _LanState(NamedTuple):
    """One Lanczos run per row: ``runs`` runs advance together (one block product)."""

    j: Array
    q: Array  # (runs, n)
    q_prev: Array
    beta_prev: Array  # (runs,)
    alphas: Array  # (runs, m)
    betas: Array
    basis: Array  # (runs, r, n): the last r vectors
    scale: Array  # (runs,)
    seed: Array  # for the restart vectors


def _unit(v: Array) -> Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _dens_init(x: Array, key: Array, cfg: _DensCfg) -> _LanState:
    dt = _dtype(x)
    seed = _seed(key)  # Rademacher start vectors, as Hutchinson's probes
    q = _lay(cfg.sharding, _unit(_signs(seed ^ jnp.uint32(1), jnp.uint32(0), cfg.runs, cfg.n, dt)))
    zr, zm = jnp.zeros(cfg.runs, dt), jnp.zeros((cfg.runs, cfg.m), dt)
    basis = _lay(cfg.sharding, jnp.zeros((cfg.runs, cfg.r, cfg.n), dt))
    return _LanState(jnp.zeros((), jnp.int32), q, jnp.zeros_like(q), zr, zm, zm, basis, zr, seed)


def _dens_step(st: _LanState, w: Array, cfg: _DensCfg) -> _LanState:
    """One Lanczos step of every run (rows); a breakdown (an invariant subspace)
    goes on from a fresh random vector, uncoupled (a zero beta)."""
    eps = float(jnp.finfo(st.q.dtype).eps)
    j, q = st.j, st.q
    basis = st.basis

    explicit = cfg.sharding is not None and any(
        t == AxisType.Explicit for t in cfg.sharding.mesh.axis_types
    )
    replicated: dict[str, Any] = (
        {"out_sharding": NamedSharding(cfg.sharding.mesh, PartitionSpec())} if explicit else {}
    )

    def project(v: Array) -> Array:  # classical Gram-Schmidt against each run's basis, twice
        for _ in range(2):
            v = v - jnp.einsum(
                "rk,rkn->rn", jnp.einsum("rkn,rn->rk", basis, v, **replicated), basis
            )
        return v

    if cfg.r:
        basis = jax.lax.dynamic_update_index_in_dim(basis, q, j % cfg.r, 1)
    alpha = jnp.sum(q * w, axis=1)
    w = w - alpha[:, None] * q - st.beta_prev[:, None] * st.q_prev
    w = project(w) if cfg.r else w
    beta = jnp.linalg.norm(w, axis=1)
    scale = jnp.maximum(st.scale, jnp.abs(alpha) + beta + st.beta_prev)
    broke = beta <= 100 * eps * scale

    def fresh() -> Array:
        u = _noise(st.seed, j, q.shape, q.dtype, cfg.sharding)
        u = u - jnp.sum(u * q, axis=1, keepdims=True) * q
        return _lay(cfg.sharding, _unit(project(u) if cfg.r else u))

    u = jax.lax.cond(jnp.any(broke), fresh, lambda: _lay(cfg.sharding, jnp.zeros_like(q)))
    q_next = jnp.where(broke[:, None], u, w / jnp.where(broke, 1, beta)[:, None])
    beta = jnp.where(broke, 0, beta)
    alphas, betas = st.alphas.at[:, j].set(alpha), st.betas.at[:, j].set(beta)
    _progress(cfg.progress, "density", (j + 1) * cfg.runs, alpha)
    return _LanState(
        j + 1, _lay(cfg.sharding, q_next), q, beta, alphas, betas, basis, scale, st.seed
    )


def _dens_finish(st: _LanState, cfg: _DensCfg) -> tuple[Array, Array]:
    m, dt = cfg.m, st.alphas.dtype

    def ritz(alphas: Array, betas: Array) -> tuple[Array, Array]:
        e = betas[:-1]
        vals, vecs = jnp.linalg.eigh(jnp.diag(alphas) + jnp.diag(e, 1) + jnp.diag(e, -1))
        return vals, vecs[0] ** 2

    thetas, weights = jax.vmap(ritz)(st.alphas, st.betas)
    lo, hi = jnp.min(thetas), jnp.max(thetas)
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = jnp.where(hi > lo, hi - lo, jnp.where(mag > 0, mag, 1.0))  # a zero Hessian: width 0.01
    width = jnp.asarray(0.01 * scale if cfg.sigma is None else cfg.sigma, dt)
    grid = jnp.linspace(lo - 5 * width, hi + 5 * width, cfg.points, dtype=dt)
    z = (grid[:, None, None] - thetas[None, :, :]) / width
    dens = jnp.sum(weights[None, :, :] * jnp.exp(-0.5 * z * z), axis=(1, 2))
    _progress(cfg.progress, "density", jnp.asarray(m * cfg.runs), jnp.stack([lo, hi]), final=True)
    return grid, dens / jnp.trapezoid(dens, grid)


def _dens_impl(product: Callable[[Array], Array], x: Array, key: Array, cfg: _DensCfg) -> Any:
    st = jax.lax.fori_loop(
        0, cfg.m, lambda _, st: _dens_step(st, product(st.q), cfg), _dens_init(x, key, cfg)
    )
    return _dens_finish(st, cfg)


@partial(jax.jit, static_argnames=("op", "cfg", "data"))
def _dens_compiled(
    op: Any, x: Array, key: Array, arrays: Any, *, cfg: _DensCfg, data: _Data
) -> Any:
    return _dens_impl(_product_fn("density", op, x, data, arrays, cfg.sharding), x, key, cfg)


_dens_init_jit = jax.jit(_dens_init, static_argnames=("cfg",))
_dens_step_jit = jax.jit(_dens_step, static_argnames=("cfg",))
_dens_finish_jit = jax.jit(_dens_finish, static_argnames=("cfg",))


def _dens_stepper(product: Callable[[Array], Array], x: Array, key: Array, cfg: _DensCfg) -> Any:
    st = _dens_init_jit(x, key, cfg=cfg)
    for _ in range(cfg.m):
        st = _dens_step_jit(st, product(st.q), cfg=cfg)
    return _dens_finish_jit(st, cfg=cfg)


def density(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    iters: int = 100,
    runs: int = 1,
    points: int = 1000,
    sigma: float | None = None,
    data: Any = None,
    progress: bool = False,
    reorth: bool | int | None = None,
) -> tuple[Array, Array]:
    """The spectral density of the Hessian (or Gauss-Newton matrix), by stochastic Lanczos quadrature.

    ``runs`` independent Lanczos runs of ``iters`` steps (capped at
    ``x.size``) from random unit vectors drawn from ``key``, advanced
    together (one vectorised product of ``runs`` vectors per step). Each
    run's Ritz values ``theta`` with weights ``tau`` (the squared first
    components of T's eigenvectors, summing to 1) approximate the spectral
    measure; each Ritz value becomes a Gaussian of width ``sigma``, averaged
    over the runs. ``sigma`` defaults to 1% of the span of the Ritz values
    (or of their magnitude when they coincide, or 0.01 for a zero Hessian).
    ``grid`` spans the Ritz values with a margin of ``5 * sigma`` on each
    side; ``dens`` is non-negative and ``jnp.trapezoid(dens, grid) == 1``.

    Memory: a few vectors per run plus the last ``reorth`` Lanczos vectors
    kept to reorthogonalise against (default: 30, fewer where they would
    exceed 256 MiB; ``True``: all, ``False``: none; the plain recurrence then
    produces copies of converged Ritz values, which split their weight and
    leave the density as it was).

    Args:
      f: scalar function of the flat vector (``f(x, batch)`` with ``data``),
        or a :func:`ggn` operator.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key (the same key gives the same density).
      iters: Lanczos steps (products) per run, ``>= 1``.
      runs: independent runs, ``>= 1``.
      points: grid points, ``>= 2``.
      sigma: the Gaussians' width (a positive number); ``None`` for 1% of the span.
      data: as in :func:`hvp`.
      progress: report progress on stderr (also under ``jax.jit``).
      reorth: ``True`` (all Lanczos vectors kept), ``False`` (none), an
        integer (the last so many) or ``None`` (30, fewer above 256 MiB).

    Returns:
      ``(grid, dens)``, both of shape ``(points,)``.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``iters``, ``runs``,
        ``points`` or ``reorth`` are out of range, ``sigma`` is not
        positive, or ``data`` is empty or malformed.
      TypeError: ``x`` is not real floating point, ``key`` is not a key,
        ``sigma`` is not a number, or ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 1.0, 3.0]) * x ** 2)  # eigenvalues 1, 1, 3
      >>> grid, dens = curvature.density(f, jnp.zeros(3), key=jax.random.key(0), points=401)
      >>> grid[0] < 1 and grid[-1] > 3
      Array(True, dtype=bool)
      >>> jnp.trapezoid(dens, grid)
      Array(1., dtype=float32)
    """
    _check_f("density", f)
    _check_x("density", x)
    _check_key("density", key)
    n = x.shape[0]
    iters = _check_int("density", "iters", iters, 1)
    runs = _check_int("density", "runs", runs, 1)
    points = _check_int("density", "points", points, 2)
    progress = _check_bool("density", "progress", progress)
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise TypeError(
                f"density: sigma must be a positive number or None, got {sigma!r} "
                f"({type(sigma).__name__})"
            )
        if not (float(sigma) > 0 and np.isfinite(float(sigma))):
            raise ValueError(f"density: sigma must be a positive number or None, got {sigma!r}")
        sigma = float(sigma)
    m = min(n, iters)
    if reorth is None:
        r = min(m, 30, _BASIS_BYTES // (runs * n * _dtype(x).itemsize))
    elif reorth is True or reorth is False:
        r = m if reorth else 0
    else:
        r = min(_check_int("density", "reorth", reorth, 0), m)
    prepared = _prepare("density", data)
    cfg = _DensCfg(n, m, runs, r, points, sigma, _layout_of(x), progress)
    return _run("density", f, x, prepared, _dens_compiled, _dens_impl, _dens_stepper, (key,), cfg)
