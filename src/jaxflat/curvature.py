"""Matrix-free curvature of a loss over a flat vector: Hessian-vector products,
top eigenvalues (Lanczos), the trace (Hutchinson) and the spectral density
(stochastic Lanczos quadrature).

Everything here needs only a flat vector ``x`` and a scalar function ``f`` of
it, typically ``f = lambda v: loss(re(v), batch)`` with
``flat, re = jaxflat.destructure(model)``. With ``data=`` (an iterable of
batches) ``f`` is called as ``f(x, batch)`` and the Hessian is the mean of
the batches' Hessians.

Every loop (Lanczos, Hutchinson) runs inside ``jax.lax``: a call compiles
its loop once, whatever the number of steps. A call under ``jax.jit`` with
``f`` fixed compiles once for all calls (e.g. to track the sharpness while
training). On a sharded ``x`` every vector is laid out like ``x`` (a basis
of Lanczos vectors is sharded along its second axis like ``x``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = ("density", "eigenvalues", "hvp", "trace")

Array = jax.Array
_Layout = Callable[[Array], Array]


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


def _check_int(name: str, arg: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}: {arg} must be an integer >= {low}, got {value!r}")
    return int(value)


def _reorth_size(name: str, reorth: bool | int, steps: int) -> int:
    """How many Lanczos vectors are kept: all (True), none (False), or the last ``reorth``."""
    if reorth is True:
        return steps
    if reorth is False:
        return 0
    return min(_check_int(name, "reorth", reorth, 0), steps)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


class _Data(NamedTuple):
    """The batches, split into arrays (jit arguments) and a plan to rebuild them."""

    arrays: Any  # stacked leaves (scan) or a list of per-batch leaf lists (unrolled)
    rebuild: Callable[[Any], Any] | None  # scan: leaves -> batch
    unrolled: list[Callable[[Any], Any]] | None  # per batch: leaves -> batch


def _prepare(name: str, data: Iterable[Any] | None) -> _Data | None:
    if data is None:
        return None
    batches = list(data)
    if not batches:
        raise ValueError(f"{name}: data= is empty; pass at least one batch (or data=None)")
    flat = [jax.tree_util.tree_flatten(b) for b in batches]
    leaves0, def0 = flat[0][0], cast(Any, flat[0][1])
    same = all(
        d == def0
        and all(_is_array(a) for a in leaves)
        and [(a.shape, a.dtype) for a in leaves]
        == [(a.shape, a.dtype) for a in leaves0]
        for leaves, d in flat
    )
    if same:  # one lax.scan over the stacked batches: one compile for any number of batches
        stacked = [jnp.stack(col) for col in zip(*(leaves for leaves, _ in flat), strict=True)]
        return _Data(stacked, lambda ls: jax.tree_util.tree_unflatten(def0, ls), None)

    def splitter(leaves: list[Any], treedef: Any) -> Callable[[Any], Any]:
        def rebuild(arrays: Any) -> Any:
            it = iter(arrays)
            return jax.tree_util.tree_unflatten(
                treedef, [next(it) if _is_array(a) else a for a in leaves]
            )

        return rebuild

    arrays = [[a for a in leaves if _is_array(a)] for leaves, _ in flat]
    return _Data(arrays, None, [splitter(leaves, d) for leaves, d in flat])


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


def _layouter(sharding: NamedSharding | None) -> Callable[[Array, int], Array]:
    """``lay(v, lead)`` puts ``v`` (``lead`` unsharded axes, then x's axis) in x's layout."""

    def lay(v: Array, lead: int = 0) -> Array:
        if sharding is None:
            return v
        spec = PartitionSpec(*([None] * lead), *sharding.spec)
        target = NamedSharding(sharding.mesh, spec)
        names = [a for p in sharding.spec if p is not None for a in (p if isinstance(p, tuple) else (p,))]
        types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True))
        if names and all(types[a] == AxisType.Explicit for a in names):
            return jax.sharding.reshard(v, target)
        return jax.lax.with_sharding_constraint(v, target)

    return lay


# ---------------------------------------------------------------- Hessian-vector products


def _matvec(f: Callable[..., Any], data: _Data | None, arrays: Any) -> Callable[[Array, Array], Array]:
    """``mv(x, v)``: H(x) v, the mean over the batches with ``data``."""
    if data is None:
        return lambda x, v: jax.jvp(jax.grad(f), (x,), (v,))[1]

    def one(x: Array, v: Array, batch: Any) -> Array:
        return jax.jvp(jax.grad(lambda y: f(y, batch)), (x,), (v,))[1]

    if data.rebuild is not None:
        rebuild = data.rebuild
        count = arrays[0].shape[0] if arrays else 1

        def scanned(x: Array, v: Array) -> Array:
            def body(acc: Array, leaves: Any) -> tuple[Array, None]:
                return acc + one(x, v, rebuild(leaves)), None

            total, _ = jax.lax.scan(body, jnp.zeros_like(v), arrays)
            return total / count

        return scanned
    unrolled = data.unrolled
    assert unrolled is not None

    def summed(x: Array, v: Array) -> Array:
        total = jnp.zeros_like(v)
        for rebuild_i, leaves in zip(unrolled, arrays, strict=True):
            total = total + one(x, v, rebuild_i(leaves))
        return total / len(unrolled)

    return summed


def hvp(
    f: Callable[..., Any], x: Array, v: Array, *, data: Iterable[Any] | None = None
) -> Array:
    """The Hessian-vector product ``H(x) @ v``, exact to rounding.

    Forward-over-reverse: ``jax.jvp(jax.grad(f), (x,), (v,))[1]``, which costs
    about two to three gradients and no more memory than one. It works under
    ``jax.jit``, ``jax.vmap`` and on sharded vectors (the result is laid out
    like the gradient, i.e. like ``x``).

    Args:
      f: scalar function of the flat vector; ``f(x, batch)`` with ``data``.
      x: the point, a 1-D floating-point vector (e.g. ``destructure``'s flat).
      v: the direction, shaped like ``x``.
      data: optional iterable of batches; the Hessian is then the mean over
        the batches of the Hessians of ``lambda x: f(x, batch)``. Batches of
        one structure and shape are stacked and run with one ``lax.scan``;
        others are unrolled.

    Returns:
      ``H(x) @ v``, shaped like ``x``.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``v`` is not shaped like
        ``x``, or ``data`` is empty.
      TypeError: ``x`` is not real floating point, or ``f`` is not scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: jnp.sum(x ** 3)          # H = diag(6 x)
      >>> curvature.hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
      Array([ 6., 12.], dtype=float32)
      >>> batches = [jnp.array(1.0), jnp.array(3.0)]  # mean Hessian = diag(2 * 2)
      >>> curvature.hvp(lambda x, c: c * jnp.sum(x ** 2), jnp.ones(2), jnp.ones(2), data=batches)
      Array([4., 4.], dtype=float32)
    """
    _check_x("hvp", x)
    if getattr(v, "shape", None) != x.shape:
        raise ValueError(f"hvp: v must be shaped like x {x.shape}, got {getattr(v, 'shape', None)}")
    prepared = _prepare("hvp", data)
    v = jnp.asarray(v, x.dtype)
    return _matvec(f, prepared, prepared.arrays if prepared else None)(x, v)


# ---------------------------------------------------------------- Lanczos


def _dots(basis: Array, w: Array) -> Array:
    """``basis @ w`` written so that a sharded contraction is unambiguous."""
    return jnp.sum(basis * w[None, :], axis=1)


def _top_ritz(alphas: Array, betas: Array, steps: Array, k: int) -> Array:
    """The k largest eigenvalues of the leading ``steps`` x ``steps`` block of T, descending."""
    m = alphas.shape[0]
    d, e = _padded(alphas, betas, jnp.arange(m) < steps)
    if m <= 256:  # a dense eigvalsh compiles fast and runs in well under a millisecond
        top = jnp.linalg.eigvalsh(jnp.diag(d) + jnp.diag(e, 1) + jnp.diag(e, -1))[m - k :]
    else:  # bisection for the top k only: O(k m) per step rather than O(m^3)
        top = jax.scipy.linalg.eigh_tridiagonal(
            d, e, eigvals_only=True, select="i", select_range=(m - k, m - 1)
        )
    return jnp.flip(jnp.asarray(top))


def _padded(alphas: Array, betas: Array, active: Array) -> tuple[Array, Array]:
    """T's diagonal and off-diagonal, with the inactive block pushed below the spectrum."""
    off = jnp.where(active[1:], betas[:-1], 0.0)
    b = jnp.abs(jnp.concatenate([jnp.zeros(1, off.dtype), off, jnp.zeros(1, off.dtype)]))
    radius = b[:-1] + b[1:]  # Gershgorin: every eigenvalue of T lies in [lo, hi]
    lo = jnp.min(jnp.where(active, alphas - radius, jnp.inf))
    hi = jnp.max(jnp.where(active, alphas + radius, -jnp.inf))
    pad = lo - (hi - lo) - jnp.maximum(jnp.abs(lo), jnp.abs(hi)) - jnp.finfo(alphas.dtype).tiny
    return jnp.where(active, alphas, pad), off


class _Lanczos(NamedTuple):
    alphas: Array  # (m,) T's diagonal
    betas: Array  # (m,) betas[j] couples q_j and q_{j+1}; 0 where the run restarted
    steps: Array  # steps taken (<= m)
    basis: Array | None  # (r, n): the last r Lanczos vectors (all of them if r == m)
    ritz: Array | None  # (k, n): sum_j coeffs[j] q_j, when coeffs were given


def _lanczos(
    mv: Callable[[Array], Array],
    q0: Array,
    key: Array,
    *,
    m: int,
    r: int,
    lay: Callable[[Array, int], Array],
    limit: Array | int,
    k: int = 0,
    tol: float = 0.0,
    coeffs: Array | None = None,
) -> _Lanczos:
    """Up to ``limit`` (<= m) Lanczos steps from the unit vector ``q0``.

    ``r`` vectors are kept for reorthogonalisation (classical Gram-Schmidt,
    twice). With ``k`` > 0 the run stops once each of the k largest Ritz
    values changed by at most ``tol`` (relative) in one step, and the change
    still to come, extrapolated from the last two, is below that too. With
    ``coeffs`` (m, k) it also accumulates ``coeffs.T @ Q`` (Ritz vectors
    without storing Q). A breakdown (an invariant subspace) restarts from a
    random vector orthogonal to the kept ones, with a zero coupling in T.
    """
    n, dt = q0.shape[0], q0.dtype
    eps = float(jnp.finfo(dt).eps)
    basis = lay(jnp.zeros((r, n), dt), 1) if r else None
    ritz = lay(jnp.zeros((coeffs.shape[1], n), dt), 1) if coeffs is not None else None
    top0 = jnp.full((2, max(k, 1)), jnp.inf, dt)  # the k largest Ritz values, their last change
    state0 = (0, q0, jnp.zeros_like(q0), jnp.zeros((), dt), jnp.zeros(m, dt), jnp.zeros(m, dt),
              basis, ritz, top0, False, jnp.zeros((), dt))

    def cond(state: Any) -> Any:
        j, done = state[0], state[9]
        return (j < limit) & jnp.logical_not(done)

    def orthogonalise(w: Array, basis: Array | None) -> Array:
        if basis is not None:
            for _ in range(2):
                w = w - lay(_dots(basis, w) @ basis, 0)
        return w

    def body(state: Any) -> Any:
        j, q, q_prev, beta_prev, alphas, betas, basis, ritz, top, _, scale = state
        if basis is not None:
            basis = jax.lax.dynamic_update_index_in_dim(basis, q, j % r, 0)
        if ritz is not None and coeffs is not None:
            ritz = ritz + coeffs[j][:, None] * q[None, :]
        w = lay(mv(q), 0)
        alpha = jnp.sum(q * w)
        w = orthogonalise(w - alpha * q - beta_prev * q_prev, basis)
        beta = jnp.sqrt(jnp.sum(w * w))
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta + beta_prev)
        broke = beta <= 100 * eps * scale

        def restart() -> Array:
            u = lay(jax.random.normal(jax.random.fold_in(key, j), (n,), dt), 0)
            u = u - jnp.sum(u * q) * q
            u = orthogonalise(u, basis)
            return u / jnp.sqrt(jnp.sum(u * u))

        q_next = jax.lax.cond(broke, restart, lambda: w / jnp.where(broke, 1, beta))
        beta = jnp.where(broke, 0, beta)
        alphas, betas = alphas.at[j].set(alpha), betas.at[j].set(beta)
        done = False
        if k:
            new = _top_ritz(alphas, betas, j + 1, k)
            change = jnp.abs(new - top[0])
            # geometric convergence at the rate of the last two changes: what is still to come
            rate = jnp.where(top[1] > 0, change / top[1], 0.0)
            ahead = jnp.where(rate < 1, change * rate / (1 - rate), jnp.inf)
            bound = tol * jnp.abs(new) + eps * scale
            done = (j + 1 > k + 1) & jnp.all(change <= bound) & jnp.all(ahead <= bound)
            top = jnp.stack([new, change])
        return (j + 1, q_next, q, beta, alphas, betas, basis, ritz, top, done, scale)

    out = jax.lax.while_loop(cond, body, state0)
    return _Lanczos(out[4], out[5], jnp.asarray(out[0]), out[6], out[7])


def _eigh_t(alphas: Array, betas: Array, steps: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of T; inactive ones come first."""
    m = alphas.shape[0]
    d, e = _padded(alphas, betas, jnp.arange(m) < steps)
    t = jnp.diag(d) + jnp.diag(e, 1) + jnp.diag(e, -1)
    return jnp.linalg.eigh(t)


def _start(key: Array, x: Array, dt: Any, lay: Callable[[Array, int], Array]) -> Array:
    q = lay(jax.random.normal(key, x.shape, dt), 0)
    return q / jnp.sqrt(jnp.sum(q * q))


def _working_dtype(x: Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


def _operator(
    f: Callable[..., Any], x: Array, data: _Data | None, arrays: Any
) -> Callable[[Array], Array]:
    mv = _matvec(f, data, arrays)
    dt = _working_dtype(x)
    return lambda v: mv(x, v.astype(x.dtype)).astype(dt)


def eigenvalues(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-3,
    data: Iterable[Any] | None = None,
    reorth: bool | int = True,
) -> tuple[Array, Array]:
    """The ``k`` algebraically largest eigenvalues of the Hessian of ``f`` at ``x``.

    Lanczos from a random start drawn from ``key`` (the same key gives the
    same result), with the whole loop in ``jax.lax.while_loop`` (one
    compile). It stops when each of the ``k`` largest Ritz values changed by
    at most ``tol`` relative to itself in the last step, and so would the
    change still to come if convergence went on at the rate of the last two
    steps (plus a rounding floor of ``eps`` times the spectrum's scale), or
    after ``iters * k`` Hessian-vector products (capped at ``x.size``).
    Ritz values grow monotonically towards the eigenvalues, so the result
    is typically within ``tol`` of the converged value. An invariant subspace
    (e.g. a Hessian of low rank) restarts the run from a fresh random
    vector orthogonal to the kept ones. These are the algebraically largest
    eigenvalues: a negative eigenvalue of large magnitude is not among them
    (power iteration, e.g. PyHessian's, finds the largest in magnitude).

    Memory: beyond what ``f``'s gradient needs, a few vectors of ``x.size``
    plus the Lanczos vectors kept for reorthogonalisation: with
    ``reorth=True`` (the default, full reorthogonalisation) one per step,
    up to ``iters * k`` vectors. For very large models, ``reorth=r`` keeps
    only the last ``r`` and ``reorth=False`` none (the plain three-term
    recurrence). Without all of them the eigenvectors come from a second
    pass that regenerates the vectors (twice the Hessian-vector products),
    and, as rounding erodes orthogonality, a converged eigenvalue can
    reappear as a spurious copy among the ``k`` (the top one stays right).

    Args:
      f: scalar function of the flat vector; ``f(x, batch)`` with ``data``.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key for the start vector.
      k: how many eigenvalues, ``1 <= k <= x.size``.
      iters: at most ``iters * k`` Lanczos steps (Hessian-vector products).
      tol: relative change per step below which a Ritz value has converged.
      data: optional iterable of batches; the Hessian is the mean over them.
      reorth: ``True`` (all Lanczos vectors kept), ``False`` (none) or an
        integer (the last so many).

    Returns:
      ``(vals, vecs)``: ``vals`` of shape ``(k,)``, descending, and unit
      eigenvectors ``vecs`` of shape ``(k, x.size)`` (row ``i`` for
      ``vals[i]``, laid out like ``x``), in float32 or ``x``'s wider dtype.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``k`` is not in
        ``1..x.size``, ``iters``/``reorth`` are not non-negative integers,
        ``tol`` is negative, or ``data`` is empty.
      TypeError: ``x`` is not real floating point, or ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> h = jnp.diag(jnp.arange(1.0, 11.0))          # eigenvalues 1 .. 10
      >>> f = lambda x: 0.5 * x @ h @ x
      >>> vals, vecs = curvature.eigenvalues(f, jnp.zeros(10), key=jax.random.key(0), k=2)
      >>> vals.round(3)
      Array([10.,  9.], dtype=float32)
      >>> vecs.shape
      (2, 10)
    """
    _check_x("eigenvalues", x)
    n = x.shape[0]
    k = _check_int("eigenvalues", "k", k, 1)
    if k > n:
        raise ValueError(f"eigenvalues: k={k} exceeds the {n} parameters (x.size); use k <= {n}")
    iters = _check_int("eigenvalues", "iters", iters, 1)
    if not tol >= 0:
        raise ValueError(f"eigenvalues: tol must be >= 0, got {tol!r}")
    m = min(n, k * iters)
    r = _reorth_size("eigenvalues", reorth, m)
    prepared = _prepare("eigenvalues", data)
    lay = _layouter(_layout_of(x))

    def run(x: Array, key: Array, arrays: Any) -> tuple[Array, Array]:
        mv = _operator(f, x, prepared, arrays)
        dt = _working_dtype(x)
        start, restarts = jax.random.split(key)
        q0 = _start(start, x, dt, lay)
        out = _lanczos(mv, q0, restarts, m=m, r=r, lay=lay, limit=m, k=k, tol=tol)
        vals, vecs = _eigh_t(out.alphas, out.betas, out.steps)
        coeffs = jnp.flip(vecs[:, m - k :], axis=1)  # (m, k), column i for the i-th largest
        if r == m:
            assert out.basis is not None
            ritz = lay(coeffs.T @ out.basis, 1)
        else:  # regenerate the Lanczos vectors, accumulating the Ritz vectors
            again = _lanczos(mv, q0, restarts, m=m, r=r, lay=lay, limit=out.steps, coeffs=coeffs)
            assert again.ritz is not None
            ritz = again.ritz
        ritz = ritz / jnp.sqrt(jnp.sum(ritz * ritz, axis=1, keepdims=True))
        return jnp.flip(vals[m - k :]), ritz

    return jax.jit(run)(x, key, prepared.arrays if prepared else None)


# ---------------------------------------------------------------- trace


def trace(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    samples: int = 100,
    data: Iterable[Any] | None = None,
) -> Array:
    """An unbiased estimate of the trace of the Hessian of ``f`` at ``x``.

    Hutchinson's estimator with Rademacher vectors: the mean of
    ``z @ H @ z`` over ``samples`` random sign vectors ``z`` drawn from
    ``key`` (``samples`` Hessian-vector products in one ``lax.fori_loop``;
    memory: a few vectors). Its variance per sample is
    ``2 * (sum(H**2) - sum(diag(H)**2))``, so the standard error is that
    over ``samples``, square-rooted; it is exact for a diagonal Hessian.

    Args:
      f: scalar function of the flat vector; ``f(x, batch)`` with ``data``.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key (the same key gives the same estimate).
      samples: the number of Hessian-vector products, ``>= 1``.
      data: optional iterable of batches; the Hessian is the mean over them.

    Returns:
      A scalar, float32 or ``x``'s wider dtype.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``samples < 1``, or
        ``data`` is empty.
      TypeError: ``x`` is not real floating point, or ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: jnp.sum(jnp.arange(1.0, 5.0) * x ** 2)   # H = diag(2, 4, 6, 8)
      >>> curvature.trace(f, jnp.zeros(4), key=jax.random.key(0), samples=10)
      Array(20., dtype=float32)
    """
    _check_x("trace", x)
    samples = _check_int("trace", "samples", samples, 1)
    prepared = _prepare("trace", data)
    lay = _layouter(_layout_of(x))

    def run(x: Array, key: Array, arrays: Any) -> Array:
        mv = _operator(f, x, prepared, arrays)
        dt = _working_dtype(x)

        def body(i: Array, total: Array) -> Array:
            z = lay(jax.random.rademacher(jax.random.fold_in(key, i), x.shape, dt), 0)
            return total + jnp.sum(z * mv(z))

        return jax.lax.fori_loop(0, samples, body, jnp.zeros((), dt)) / samples

    return jax.jit(run)(x, key, prepared.arrays if prepared else None)


# ---------------------------------------------------------------- density


def density(
    f: Callable[..., Any],
    x: Array,
    *,
    key: Array,
    iters: int = 100,
    runs: int = 1,
    points: int = 1000,
    sigma: float | None = None,
    data: Iterable[Any] | None = None,
    reorth: bool | int = True,
) -> tuple[Array, Array]:
    """The spectral density of the Hessian of ``f`` at ``x``, by stochastic Lanczos quadrature.

    ``runs`` independent Lanczos runs of ``iters`` steps (capped at
    ``x.size``) from random unit vectors drawn from ``key``. Each run's
    Ritz values ``theta`` with weights ``tau`` (the squared first components
    of T's eigenvectors, summing to 1) approximate the spectral measure; each
    Ritz value becomes a Gaussian of width ``sigma``, averaged over the runs.
    ``sigma`` defaults to 1% of the span of the Ritz values (or of their
    magnitude when they coincide). ``grid`` spans the Ritz values with a
    margin of ``5 * sigma`` on each side; ``dens`` is non-negative and
    normalised so that ``jnp.trapezoid(dens, grid) == 1``.

    Memory: a few vectors plus the kept Lanczos vectors, as in
    :func:`eigenvalues` (``reorth=True`` keeps one per step; ``reorth=False``
    none, which suits very large models: quadrature needs no Ritz vectors).

    Args:
      f: scalar function of the flat vector; ``f(x, batch)`` with ``data``.
      x: the point, a 1-D floating-point vector; may be sharded.
      key: a ``jax.random`` key (the same key gives the same density).
      iters: Lanczos steps (Hessian-vector products) per run, ``>= 1``.
      runs: independent runs, ``>= 1``.
      points: grid points, ``>= 2``.
      sigma: the Gaussians' width; ``None`` for 1% of the span.
      data: optional iterable of batches; the Hessian is the mean over them.
      reorth: ``True`` (all Lanczos vectors kept), ``False`` (none) or an
        integer (the last so many).

    Returns:
      ``(grid, dens)``, both of shape ``(points,)``.

    Raises:
      ValueError: ``x`` is not a non-empty vector, ``iters``, ``runs``,
        ``points`` or ``reorth`` are out of range, ``sigma`` is not
        positive, or ``data`` is empty.
      TypeError: ``x`` is not real floating point, or ``f`` is not scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxflat import curvature
      >>> f = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 1.0, 3.0]) * x ** 2)  # eigenvalues 1, 1, 3
      >>> grid, dens = curvature.density(f, jnp.zeros(3), key=jax.random.key(0), points=401)
      >>> grid[0] < 1 and grid[-1] > 3
      Array(True, dtype=bool)
      >>> jnp.trapezoid(dens, grid)
      Array(1., dtype=float32)
      >>> mass_near_1 = jnp.trapezoid(jnp.where(grid < 2, dens, 0), grid)  # close to 2/3
    """
    _check_x("density", x)
    n = x.shape[0]
    iters = _check_int("density", "iters", iters, 1)
    runs = _check_int("density", "runs", runs, 1)
    points = _check_int("density", "points", points, 2)
    if sigma is not None and not (isinstance(sigma, int | float) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"density: sigma must be a positive number or None, got {sigma!r}")
    m = min(n, iters)
    r = _reorth_size("density", reorth, m)
    prepared = _prepare("density", data)
    lay = _layouter(_layout_of(x))

    def run(x: Array, key: Array, arrays: Any) -> tuple[Array, Array]:
        mv = _operator(f, x, prepared, arrays)
        dt = _working_dtype(x)

        def one(i: Array, acc: tuple[Array, Array]) -> tuple[Array, Array]:
            start, restarts = jax.random.split(jax.random.fold_in(key, i))
            out = _lanczos(mv, _start(start, x, dt, lay), restarts, m=m, r=r, lay=lay, limit=m)
            vals, vecs = _eigh_t(out.alphas, out.betas, out.steps)
            thetas, weights = acc
            return thetas.at[i].set(vals), weights.at[i].set(vecs[0] ** 2)

        init = (jnp.zeros((runs, m), dt), jnp.zeros((runs, m), dt))
        thetas, weights = jax.lax.fori_loop(0, runs, one, init)
        lo, hi = jnp.min(thetas), jnp.max(thetas)
        scale = jnp.where(hi > lo, hi - lo, jnp.maximum(jnp.abs(hi), jnp.finfo(dt).tiny))
        width = jnp.asarray(0.01 * scale if sigma is None else sigma, dt)
        grid = jnp.linspace(lo - 5 * width, hi + 5 * width, points, dtype=dt)
        z = (grid[:, None, None] - thetas[None, :, :]) / width
        dens = jnp.sum(weights[None, :, :] * jnp.exp(-0.5 * z * z), axis=(1, 2))
        return grid, dens / jnp.trapezoid(dens, grid)

    return jax.jit(run)(x, key, prepared.arrays if prepared else None)
