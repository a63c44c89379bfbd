"""jaxflat.curvature against dense jax.hessian / Gauss-Newton matrices and numpy.linalg.eigh.

The module needs only flat vectors, so these tests build them with
``ravel_pytree`` (an oracle independent of jaxflat's core). Each test keeps
to a few configurations: every new static configuration is a compile.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxflat
from jaxflat import curvature

KEY = jax.random.key(0)


def mlp_parts(seed=0, n_samples=24):
    """A 4-6-3 tanh MLP (51 parameters) as model and loss, random data, a random point."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(keys[0], (4, 6)) / 2,
        "b1": jnp.zeros(6),
        "w2": jax.random.normal(keys[1], (6, 3)) / 2,
        "b2": jnp.full(3, 0.1),
    }
    flat, unravel = ravel_pytree(params)
    xs = jax.random.normal(keys[2], (n_samples, 4))
    ys = jax.random.randint(keys[3], (n_samples,), 0, 3)

    def model(v, batch):
        p = unravel(v)
        return jnp.tanh(batch[0] @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]

    def xent(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return flat, unravel, model, xent, (xs, ys)


def mlp_problem(seed=0, n_samples=24):
    flat, _, model, xent, batch = mlp_parts(seed, n_samples)
    return flat, lambda v, b: xent(model(v, b), b), batch


@pytest.fixture(scope="module")
def problem():
    flat, loss, batch = mlp_problem()
    f = lambda v: loss(v, batch)  # noqa: E731
    h = np.asarray(jax.jit(jax.hessian(f))(flat), np.float64)
    h = (h + h.T) / 2
    return flat, f, loss, batch, h, np.linalg.eigh(h)[0]


@pytest.fixture(scope="module")
def gauss_newton():
    """The same MLP as a GGN operator, and its dense J^T H_loss J over all 24 examples."""
    flat, unravel, model, xent, batch = mlp_parts()
    jac = jax.jacobian(lambda v: model(v, batch).ravel())(flat)  # (72, 51)
    out = model(flat, batch)
    h_out = jax.hessian(lambda o: xent(o.reshape(out.shape), batch))(out.ravel())  # (72, 72)
    g = np.asarray(jac.T @ h_out @ jac, np.float64)
    return flat, unravel, model, xent, batch, (g + g.T) / 2


def diag_quadratic(c):
    c = jnp.asarray(c, jnp.float32)
    return lambda x: 0.5 * jnp.sum(c * x * x)


def quadratic(h):
    h = jnp.asarray(h)
    return lambda x: 0.5 * x @ h @ x


def rotated(eigs, seed=0):
    """A dense symmetric matrix with the given eigenvalues, in a random basis."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return (q * np.asarray(eigs)) @ q.T


def split(batch, sizes):
    cuts = np.cumsum(sizes)[:-1]
    xs, ys = batch
    return list(zip(np.split(np.asarray(xs), cuts), np.split(np.asarray(ys), cuts), strict=True))


# ---------------------------------------------------------------- hvp, ggn, data=


def test_hvp_equals_jvp_of_grad(problem, mode):
    flat, f, *_ = problem
    v = jax.random.normal(jax.random.key(1), flat.shape)
    want = jax.jvp(jax.grad(f), (flat,), (v,))[1]
    got = mode(lambda x, v: curvature.hvp(f, x, v))(flat, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, problem[4] @ np.asarray(v), rtol=1e-4, atol=1e-5)


def test_ggn_product_is_jt_h_j(gauss_newton, mode):
    flat, _, model, xent, batch, g = gauss_newton
    op = curvature.ggn(lambda v: model(v, batch), lambda out: xent(out, batch))
    v = jax.random.normal(jax.random.key(1), flat.shape)
    got = mode(lambda x, v: curvature.hvp(op, x, v))(flat, v)
    np.testing.assert_allclose(got, g @ np.asarray(v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(op(flat), xent(model(flat, batch), batch))  # calling it: the loss


def test_short_last_batch_equals_the_full_batch(problem, gauss_newton):
    flat, f, loss, batch, h, _ = problem
    batches = split(batch, [10, 10, 4])  # the last batch counts for 4 examples, not 8
    v = jax.random.normal(jax.random.key(2), flat.shape)
    np.testing.assert_allclose(
        curvature.hvp(loss, flat, v, data=batches), h @ np.asarray(v), rtol=1e-4, atol=1e-5
    )
    # same key, same probes: the streamed operator is the full-batch one
    np.testing.assert_allclose(
        curvature.trace(loss, flat, key=KEY, samples=20, data=batches),
        curvature.trace(f, flat, key=KEY, samples=20),
        rtol=1e-4,
    )
    *_, model, xent, _, g = gauss_newton
    op = curvature.ggn(model, xent)  # model(x, batch), xent(out, batch)
    np.testing.assert_allclose(
        curvature.hvp(op, flat, v, data=batches), g @ np.asarray(v), rtol=1e-4, atol=1e-5
    )


def test_stacked_data_is_scanned_and_is_the_mean(problem, mode):
    flat, _, loss, (xs, ys), h, _ = problem
    stacked = (xs.reshape(3, 8, 4), ys.reshape(3, 8))  # a tuple is always stacked
    v = jnp.ones_like(flat)
    got = mode(lambda x, v: curvature.hvp(loss, x, v, data=stacked))(flat, v)
    np.testing.assert_allclose(got, h @ np.ones(51), rtol=1e-4, atol=1e-5)
    as_dict = {"x": xs.reshape(3, 8, 4), "y": ys.reshape(3, 8)}
    got = curvature.hvp(lambda x, b: loss(x, (b["x"], b["y"])), flat, v, data=as_dict)
    np.testing.assert_allclose(got, h @ np.ones(51), rtol=1e-4, atol=1e-5)


class Loader:
    """A re-iterable data loader that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_streamed_data_is_read_once_per_product_with_constant_leaves(problem):
    flat, f, loss, batch, h, _ = problem
    loader = Loader([{"x": b[0], "y": b[1], "tag": "train"} for b in split(batch, [8, 8, 8])])
    g = lambda x, b: loss(x, (b["x"], b["y"])) if b["tag"] == "train" else 0.0  # noqa: E731
    _, inf = curvature.trace(g, flat, key=KEY, samples=25, block=10, data=loader, info=True)
    assert loader.passes == 3 and int(inf.matvecs) == 25  # blocks of 10, 10 and 5 probes
    loader.passes = 0
    _, _, inf = curvature.eigenvalues(g, flat, key=KEY, k=2, data=loader, info=True)
    assert loader.passes == int(inf.matvecs) // 2  # one pass per block of 2 products


# ---------------------------------------------------------------- compiling once


def test_two_eager_calls_compile_once(problem, gauss_newton):
    flat, _, loss, batch, *_ = problem
    traces = []

    def f(v):
        traces.append(1)
        return loss(v, batch)

    calls = {
        "hvp": lambda x, key: curvature.hvp(f, x, x),
        "eigenvalues": lambda x, key: curvature.eigenvalues(f, x, key=key, k=2),
        "trace": lambda x, key: curvature.trace(f, x, key=key, samples=20),
        "diagonal": lambda x, key: curvature.diagonal(f, x, key=key, samples=20),
        "density": lambda x, key: curvature.density(f, x, key=key, iters=10),
    }
    for name, call in calls.items():
        traces.clear()
        jax.block_until_ready(call(flat, KEY))
        first = len(traces)
        jax.block_until_ready(call(flat * 1.5, jax.random.key(7)))  # new values, same shapes
        assert first >= 1 and len(traces) == first, name
    *_, model, xent, _, _ = gauss_newton
    before = curvature._hvp_compiled._cache_size()
    stacked = (batch[0].reshape(3, 8, 4), batch[1].reshape(3, 8))
    for scale in (1.0, 2.0):  # a GGN made anew per call is equal to the last: no compile
        curvature.hvp(curvature.ggn(model, xent), flat * scale, flat, data=stacked)
    assert curvature._hvp_compiled._cache_size() == before + 1


# ---------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigenvalues_match_dense_eigh(problem, which):
    flat, f, *_, h, evals = problem
    vals, vecs, inf = curvature.eigenvalues(f, flat, key=KEY, k=3, which=which, tol=1e-6, info=True)
    assert vals.shape == (3,) and vecs.shape == (3, flat.size)
    want = {
        "LA": evals[::-1][:3],
        "SA": evals[:3][::-1],
        "LM": evals[np.argsort(-np.abs(evals))][:3],
        "BE": np.r_[evals[::-1][:2], evals[:1]],
    }[which]
    want = np.sort(want)[::-1]
    scale = np.abs(evals).max()
    np.testing.assert_allclose(vals, want, atol=1e-4 * scale)
    assert np.all(np.diff(vals) <= 0)  # descending
    vecs = np.asarray(vecs, np.float64)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, rtol=1e-5)
    residuals = np.linalg.norm(vecs @ h - vals[:, None] * vecs, axis=1)
    assert bool(inf.converged) and np.all(residuals <= 1e-2 * scale), residuals
    np.testing.assert_allclose(
        inf.residuals, residuals, atol=2e-3 * scale
    )  # the estimate is honest


def test_repeated_eigenvalues_come_back_repeated():
    h = rotated([5.0, 5.0, 5.0, 2.0, 1.0, 0.5, -0.3, -1.0, 0.1, 0.2, 3.0, -2.0])
    for tol in (1e-3, 0.0):
        vals, vecs = curvature.eigenvalues(
            quadratic(h.astype(np.float32)), jnp.zeros(12), key=KEY, k=3, tol=tol
        )
        np.testing.assert_allclose(vals, [5.0, 5.0, 5.0], rtol=1e-4)
        np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-4)  # three directions


@pytest.mark.parametrize("basis", [None, 9], ids=["default", "smallest"])
def test_no_spurious_eigenvalues_on_an_indefinite_matrix(basis):
    h = rotated([5.0, 4.0, 2.0, 1.0, -0.5, -2.0, -3.0, 0.7], seed=3).astype(np.float32)
    vals, _, inf = curvature.eigenvalues(
        quadratic(h), jnp.zeros(8), key=KEY, k=3, basis=basis, info=True
    )
    np.testing.assert_allclose(vals, [5.0, 4.0, 2.0], atol=1e-4)
    assert bool(inf.converged)


def test_info_says_when_iters_are_too_few(problem):
    flat, f, *_, evals = problem
    vals, _, inf = curvature.eigenvalues(f, flat, key=KEY, k=3, iters=2, info=True)
    assert not bool(inf.converged) and int(inf.matvecs) == 6
    off = np.abs(np.asarray(vals) - evals[::-1][:3])
    assert np.max(off) > 1e-2 * evals[-1]  # really off: 2 block steps
    assert np.max(np.asarray(inf.residuals)) > 1e-2 * evals[-1]  # and info says so


def test_restarted_basis_equals_full_reorthogonalisation():
    eigs = np.r_[10.0, 9.99, 9.9, np.linspace(-3, 9, 37)]  # a cluster at the top: many restarts
    with jax.enable_x64(True):
        f = quadratic(rotated(eigs, seed=5))
        x = jnp.zeros(40, jnp.float64)
        small, _, inf = curvature.eigenvalues(
            f, x, key=KEY, k=3, tol=1e-12, basis=9, iters=200, info=True
        )
        full, _ = curvature.eigenvalues(f, x, key=KEY, k=3, tol=1e-12, basis=200)
        assert (
            small.dtype == jnp.float64 and bool(inf.converged) and int(inf.matvecs) > 9
        )  # restarted
    np.testing.assert_allclose(full, eigs[:3], rtol=1e-10)
    np.testing.assert_allclose(small, eigs[:3], rtol=1e-8)


def test_default_basis_shrinks_to_the_byte_budget(monkeypatch):
    monkeypatch.setattr(curvature, "_BASIS_BYTES", 4 * 100 * 4)  # four float32 vectors of 100
    f = diag_quadratic(np.r_[np.linspace(0.0, 5.0, 99), 10.0])
    vals, _, inf = curvature.eigenvalues(f, jnp.zeros(100), key=KEY, tol=1e-7, info=True)
    np.testing.assert_allclose(vals, [10.0], rtol=1e-5)
    assert bool(inf.converged)
    grid, dens = curvature.density(f, jnp.zeros(100), key=KEY, iters=20)  # reorth 4 vectors
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)


def test_default_basis_keeps_k_plus_one_ritz_vectors(monkeypatch):
    monkeypatch.setattr(curvature, "_BASIS_BYTES", 0)  # no vector fits: the floor
    seen = []
    run = curvature._run
    monkeypatch.setattr(curvature, "_run", lambda *args: seen.append(args[-1]) or run(*args))
    f = diag_quadratic(np.r_[np.linspace(0.0, 5.0, 99), 10.0])
    vals, _, inf = curvature.eigenvalues(f, jnp.zeros(100), key=KEY, tol=1e-6, info=True)
    assert (seen[0].cap, seen[0].keep) == (4, 2)  # k + 1 + 2b vectors; k + 1 kept
    np.testing.assert_allclose(vals, [10.0], rtol=1e-5)
    assert bool(inf.converged)


def test_a_small_basis_still_stops_within_tol():
    """With the fewest vectors (a restart every step) the Ritz values leave eigenvalues unseen,
    which overstates the gap: the change rule and the error bound together still hold tol."""
    c = np.r_[113.6, 108.0, 100.0, 95.0, 90.0, np.random.default_rng(0).uniform(-60, 60, 3000)]
    f = diag_quadratic(c)
    for seed in range(3):
        vals, _, inf = curvature.eigenvalues(
            f, jnp.zeros(c.size), key=jax.random.key(seed), basis=4, info=True
        )
        assert bool(inf.converged) and abs(float(vals[0]) - 113.6) <= 1e-3 * 113.6


def test_converged_means_every_eigenvalue_within_tol(problem):
    flat, f, *_, h, evals = problem
    scale = np.abs(evals).max()
    for tol in (1e-2, 1e-4):  # tol is traced: one compile
        vals, vecs, inf = curvature.eigenvalues(f, flat, key=KEY, k=2, tol=tol, info=True)
        vals, vecs = np.asarray(vals, np.float64), np.asarray(vecs, np.float64)
        assert bool(inf.converged)
        res = np.asarray(inf.residuals, np.float64)
        # each one's gap to the other Ritz values is at most this: the rule's bound is larger
        gap = np.abs(vals[0] - vals[1])
        assert np.all(np.minimum(res, res**2 / gap) <= tol * np.abs(vals) + 1e-5 * scale)
        residuals = np.linalg.norm(vecs @ h - vals[:, None] * vecs, axis=1)
        nearest = np.min(np.abs(evals[None, :] - vals[:, None]), axis=1)
        assert np.all(nearest <= residuals + 1e-5 * scale)  # an eigenvalue that close
        assert np.all(nearest <= 2 * tol * np.abs(vals) + 1e-5 * scale)


def test_compiled_eigenvalues_keep_one_basis_in_memory():
    """XLA's temporaries hold the basis once, a few blocks and slices of columns (a restart
    rotates the basis in place; before, 2.6 copies of the basis)."""
    n, k = 200_000, 2
    f = diag_quadratic(np.linspace(0.0, 1.0, n))
    fn = jax.jit(lambda x: curvature.eigenvalues(f, x, key=KEY, k=k))
    mem = fn.lower(jnp.zeros(n)).compile().memory_analysis()
    if mem is None:  # pragma: no cover - a backend without the analysis
        pytest.skip("no memory analysis on this backend")
    basis, block = 30, 2  # the default basis for k=2 (30 vectors of 800 kB)
    assert mem.temp_size_in_bytes <= 1.5 * (basis + 3 * block) * n * 4


@pytest.mark.parametrize(
    "f, want",
    [
        (lambda x: jnp.sum(jnp.arange(1.0, 7.0) * x) ** 2, [2 * 91.0, 0.0, 0.0]),  # rank 1
        (lambda x: 1.5 * jnp.sum(x * x), [3.0, 3.0, 3.0]),  # a multiple of I
    ],
    ids=["rank-1", "identity"],
)
def test_invariant_subspace_restarts(f, want):
    vals, vecs = curvature.eigenvalues(f, jnp.zeros(6), key=KEY, k=3)
    np.testing.assert_allclose(vals, want, atol=1e-4 * want[0])
    np.testing.assert_allclose(
        vecs @ vecs.T, np.eye(3), atol=1e-4
    )  # orthonormal despite the restarts


def test_k_equal_to_size_gives_the_whole_spectrum():
    f = diag_quadratic(np.linspace(-1, 2, 7))
    vals, _ = curvature.eigenvalues(f, jnp.zeros(7), key=KEY, k=7)
    np.testing.assert_allclose(vals, np.linspace(2, -1, 7), atol=1e-5)


# ---------------------------------------------------------------- trace, diagonal


def test_trace_within_its_statistical_error(problem):
    flat, f, *_, h, _ = problem
    samples = 200
    t, inf = curvature.trace(f, flat, key=KEY, samples=samples, info=True)
    # Rademacher: Var(z'Hz) = 2 (sum H_ij^2 - sum H_ii^2)
    se = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / samples)
    assert abs(float(t) - np.trace(h)) <= 4 * se, (float(t), np.trace(h), se)
    assert se < 0.2 * abs(np.trace(h))  # the check above is not vacuous
    assert 0.7 * se < float(inf.stderr) < 1.4 * se and int(inf.matvecs) == samples


def test_trace_is_exact_for_a_diagonal_hessian_in_any_blocks():
    f = diag_quadratic([1.0, -2.0, 5.0])
    t, inf = curvature.trace(f, jnp.zeros(3), key=KEY, samples=7, block=3, info=True)  # 3 + 3 + 1
    np.testing.assert_allclose(t, 4.0, rtol=1e-6)
    assert int(inf.matvecs) == 7 and float(inf.stderr) == 0.0


def test_trace_forms_equal_the_diagonal_products_on_the_same_probes(problem, gauss_newton):
    """trace's forward-over-forward z @ H @ z against diagonal's z * (H @ z): the same probes
    in any blocks, also for the Gauss-Newton matrix with streamed and stacked data."""
    flat, f, *_ = problem
    t = curvature.trace(f, flat, key=KEY, samples=12, block=5)
    d = curvature.diagonal(f, flat, key=KEY, samples=12, block=4)
    np.testing.assert_allclose(t, jnp.sum(d), rtol=2e-5)
    np.testing.assert_allclose(t, curvature.trace(f, flat, key=KEY, samples=12, block=1), rtol=2e-5)
    gflat, _, model, xent, batch, _ = gauss_newton
    op = curvature.ggn(model, xent)
    for data in (split(batch, [10, 10, 4]), (batch[0].reshape(2, 12, 4), batch[1].reshape(2, 12))):
        tt = curvature.trace(op, gflat, key=KEY, samples=12, data=data)
        dd = curvature.diagonal(op, gflat, key=KEY, samples=12, data=data)
        np.testing.assert_allclose(tt, jnp.sum(dd), rtol=2e-5)


def test_diagonal_matches_the_dense_diagonal(problem):
    flat, f, *_, h, _ = problem
    samples = 400
    d, inf = curvature.diagonal(f, flat, key=KEY, samples=samples, info=True)
    assert d.shape == flat.shape and inf.stderr.shape == flat.shape
    se = np.sqrt((np.sum(h**2, axis=1) - np.diag(h) ** 2) / samples)  # Var(z_i (Hz)_i)
    err = np.abs(np.asarray(d) - np.diag(h))
    assert np.all(err <= 5 * se + 1e-6) and np.mean(err <= 2 * se + 1e-6) > 0.85
    np.testing.assert_allclose(inf.stderr, se, rtol=0.35, atol=1e-6)
    exact = curvature.diagonal(diag_quadratic([1.0, -2.0, 5.0]), jnp.zeros(3), key=KEY, samples=3)
    np.testing.assert_allclose(exact, [1.0, -2.0, 5.0], rtol=1e-6)


def test_per_layer_trace_through_the_diagonal(problem):
    flat, f, *_, h, _ = problem
    unravel = mlp_parts()[1]
    d = curvature.diagonal(f, flat, key=KEY, samples=400)
    per_layer = jax.tree.map(jnp.sum, unravel(d))
    want = jax.tree.map(jnp.sum, unravel(jnp.asarray(np.diag(h), jnp.float32)))
    for name in want:
        assert abs(float(per_layer[name]) - float(want[name])) <= 0.1 * abs(np.trace(h)), name


# ---------------------------------------------------------------- density


def test_density_has_mass_one_and_covers_the_spectrum(problem):
    flat, f, *_, evals = problem
    grid, dens = curvature.density(f, flat, key=KEY, iters=60, runs=2, points=500)
    assert grid.shape == dens.shape == (500,)
    assert np.all(np.asarray(dens) >= 0)
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)
    assert grid[0] < evals[0] and grid[-1] > evals[-1]  # with a margin beyond both ends
    span = evals[-1] - evals[0]
    assert grid[0] > evals[0] - 0.2 * span and grid[-1] < evals[-1] + 0.2 * span
    mean = np.trapezoid(np.asarray(grid) * np.asarray(dens), np.asarray(grid))
    assert abs(mean - np.mean(evals)) < 0.05 * span  # first moment: tr(H) / n


def test_density_puts_mass_where_the_eigenvalues_are():
    c = np.r_[np.ones(60), 3 * np.ones(20), 10 * np.ones(20)]  # masses 0.6, 0.2, 0.2
    grid, dens = curvature.density(diag_quadratic(c), jnp.zeros(100), key=KEY, iters=20, runs=8)
    grid, dens = np.asarray(grid), np.asarray(dens)

    def mass(lo, hi):
        inside = (grid >= lo) & (grid <= hi)
        return np.trapezoid(dens[inside], grid[inside])

    assert abs(mass(0, 2) - 0.6) < 0.08 and abs(mass(2, 5) - 0.2) < 0.08
    assert abs(mass(8, 12) - 0.2) < 0.08
    assert mass(4, 8) < 1e-3


def test_density_numpy_sigma_no_reorth_and_a_zero_hessian(problem):
    flat, f, *_ = problem
    grid, dens = curvature.density(
        f, flat, key=KEY, iters=30, sigma=np.float32(0.01), reorth=False, points=300
    )
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)
    assert np.all(np.asarray(dens) >= 0)
    np.testing.assert_allclose(grid[1] - grid[0], (grid[-1] - grid[0]) / 299, rtol=1e-4)
    grid, dens = curvature.density(lambda x: 0.0 * jnp.sum(x**2), jnp.zeros(5), key=KEY, points=300)
    assert np.all(np.isfinite(grid)) and np.all(np.isfinite(dens))
    assert grid[0] < 0 < grid[-1] and int(np.argmax(dens)) in (149, 150)  # all mass at 0
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- Gauss-Newton everywhere


def test_ggn_is_accepted_by_every_function(gauss_newton):
    flat, _, model, xent, batch, g = gauss_newton
    op, batches = curvature.ggn(model, xent), split(batch, [10, 10, 4])
    gvals = np.linalg.eigvalsh(g)
    vals, _ = curvature.eigenvalues(op, flat, key=KEY, k=2, tol=1e-6, data=batches)
    np.testing.assert_allclose(vals, gvals[::-1][:2], rtol=1e-4)
    low, _ = curvature.eigenvalues(op, flat, key=KEY, which="SA", data=batches)
    assert float(low[0]) >= -1e-5 * gvals[-1]  # positive semi-definite
    t, inf = curvature.trace(op, flat, key=KEY, samples=100, data=batches, info=True)
    assert abs(float(t) - np.trace(g)) <= 4 * float(inf.stderr)
    d = curvature.diagonal(op, flat, key=KEY, samples=100, data=batches)
    assert np.corrcoef(np.asarray(d), np.diag(g))[0, 1] > 0.9
    grid, dens = curvature.density(op, flat, key=KEY, iters=30, data=batches)
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)
    assert grid[0] > -0.1 * gvals[-1]  # no negative curvature to show


# ---------------------------------------------------------------- progress, jit


def test_progress_reports_and_changes_nothing(problem, capfd):
    flat, f, *_ = problem
    quiet = curvature.eigenvalues(f, flat, key=KEY, k=2)
    loud = curvature.eigenvalues(f, flat, key=KEY, k=2, progress=True)
    jitted = jax.jit(lambda x: curvature.trace(f, x, key=KEY, samples=20, progress=True))(flat)
    jax.effects_barrier()
    err = capfd.readouterr().err
    np.testing.assert_array_equal(quiet[0], loud[0])
    np.testing.assert_array_equal(quiet[1], loud[1])
    np.testing.assert_array_equal(jitted, curvature.trace(f, flat, key=KEY, samples=20))
    assert "jaxflat.curvature.eigenvalues: done" in err and "products" in err
    assert "jaxflat.curvature.trace: done, 20 products" in err


def test_under_jit_one_compile_and_same_key_same_result(problem):
    flat, f, *_, evals = problem
    traces = []

    @jax.jit
    def top(x, key):
        traces.append(1)
        vals, vecs = curvature.eigenvalues(f, x, key=key, k=2, tol=1e-6)
        return vals, vecs

    runs = [top(flat, jax.random.key(seed)) for seed in (0, 1, 0)]
    assert len(traces) == 1
    np.testing.assert_allclose(runs[1][0], evals[::-1][:2], rtol=1e-4)
    np.testing.assert_array_equal(runs[0][0], runs[2][0])
    np.testing.assert_array_equal(runs[0][1], runs[2][1])
    assert not np.array_equal(runs[0][1], runs[1][1])  # another start vector

    tr = jax.jit(lambda x, key: curvature.trace(f, x, key=key, samples=10))
    t = [tr(flat, k) for k in (KEY, KEY, jax.random.key(9))]
    assert t[0] == t[1] and t[0] != t[2]
    np.testing.assert_allclose(
        t[0], curvature.trace(f, flat, key=KEY, samples=10), rtol=1e-5
    )  # eager

    dens = jax.jit(lambda x, key: curvature.density(f, x, key=key, iters=10))
    (g1, d1), (_, d2) = dens(flat, KEY), dens(flat, KEY)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_allclose(jnp.trapezoid(d1, g1), 1.0, rtol=1e-5)


def test_streamed_list_under_jit_is_traced_into_the_program(problem):
    flat, f, loss, batch, h, evals = problem
    batches = split(batch, [10, 10, 4])
    vals = jax.jit(
        lambda x: curvature.eigenvalues(loss, x, key=KEY, k=1, tol=1e-6, data=batches)[0]
    )(flat)
    np.testing.assert_allclose(vals, evals[-1:], rtol=1e-4)


# ---------------------------------------------------------------- sharded


A = jnp.linspace(-1.0, 1.0, 56)
C = jnp.linspace(0.5, 2.0, 56)


def sharding_friendly(v):
    """Elementwise terms and reductions only (56 = 8 * 7): a diagonal plus a rank-one Hessian."""
    return jnp.sum(C * jnp.log(jnp.cosh(v))) + 0.5 * jnp.sum(A * v) ** 2 + jnp.sum(jnp.tanh(v) ** 3)


def curvature_of(x, u):
    f = sharding_friendly
    return {
        "hvp": jax.jit(lambda x, u: curvature.hvp(f, x, u))(x, u),
        "eig": curvature.eigenvalues(f, x, key=KEY, k=2, tol=1e-6),
        "diag": curvature.diagonal(f, x, key=KEY, samples=10),
        "trace": curvature.trace(f, x, key=KEY, samples=10),
        "density": curvature.density(f, x, key=KEY, iters=20),
    }


@pytest.fixture(scope="module")
def single_device():
    x, u = jnp.linspace(-2, 2, 56), jnp.cos(jnp.arange(56.0))
    return x, u, curvature_of(x, u)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_sharded_equals_single_device(single_device, kind):
    x1, u1, want = single_device
    mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(kind, kind))
    sharding = NamedSharding(mesh, P(("d", "m")))
    x, u = jax.device_put(x1, sharding), jax.device_put(u1, sharding)
    with jax.sharding.set_mesh(mesh):
        got = curvature_of(x, u)
    np.testing.assert_allclose(got["hvp"], want["hvp"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["eig"][0], want["eig"][0], rtol=1e-5)
    vecs, want_vecs = np.asarray(got["eig"][1]), np.asarray(want["eig"][1])
    signs = np.sign(np.sum(vecs * want_vecs, axis=1, keepdims=True))
    np.testing.assert_allclose(
        signs * vecs, want_vecs, atol=1e-3
    )  # vectors: sqrt(eigenvalue error)
    np.testing.assert_allclose(got["trace"], want["trace"], rtol=1e-5)
    np.testing.assert_allclose(got["diag"], want["diag"], rtol=1e-5, atol=1e-6)
    (grid, dens), (want_grid, want_dens) = got["density"], want["density"]
    np.testing.assert_allclose(grid, want_grid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dens, want_dens, rtol=1e-3, atol=1e-3 * float(want_dens.max()))
    for out in (got["hvp"], got["eig"][1], got["diag"]):  # laid out like x: no device holds it all
        assert len(out.sharding.device_set) == 8
        assert {s.data.shape[-1] for s in out.addressable_shards} == {7}


# ---------------------------------------------------------------- errors


def test_the_submodule_is_reachable_from_the_package():
    assert jaxflat.curvature is curvature
    assert "curvature" not in jaxflat.__all__


def gen():
    yield jnp.ones((2, 4))


@dataclasses.dataclass
class Unhashable:  # eq=True without frozen: __hash__ is None
    scale: float = 1.0

    def __call__(self, x):
        return self.scale * jnp.sum(x**2)


Z4 = jnp.zeros(4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, k=5),
            ValueError,
            r"k=5 exceeds the 4 parameters",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, k=0),
            ValueError,
            r"k must be an integer >= 1, got 0",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, iters=0),
            ValueError,
            r"iters must be an integer >= 1",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, tol=-1.0),
            ValueError,
            r"tol must be a number >= 0",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, tol="a"),
            TypeError,
            r"tol must be a number >= 0, got 'a' \(str\)",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, which="XX"),
            ValueError,
            r"which must be one of \('LA', 'SA', 'LM', 'BE'\), got 'XX'",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=KEY, k=2, basis=5),
            ValueError,
            r"basis must be an integer >= 6, got 5",
        ),
        (
            lambda f: curvature.eigenvalues(f, Z4, key=0),
            TypeError,
            r"key must be one jax.random key, e.g. jax.random.key\(0\), got 0",
        ),
        (
            lambda f: curvature.trace(f, Z4, key=jax.random.split(KEY, 2)),
            TypeError,
            r"key must be one jax.random key",
        ),
        (
            lambda f: curvature.eigenvalues(f, jnp.zeros((2, 2)), key=KEY),
            ValueError,
            r"x must be a flat \(1-D\) vector, got shape \(2, 2\)",
        ),
        (lambda f: curvature.trace(f, jnp.zeros(0), key=KEY), ValueError, r"x is empty"),
        (
            lambda f: curvature.trace(f, jnp.zeros(4, jnp.int32), key=KEY),
            TypeError,
            r"real floating-point vector, got dtype int32",
        ),
        (
            lambda f: curvature.trace(f, Z4, key=KEY, samples=0),
            ValueError,
            r"samples must be an integer >= 1",
        ),
        (
            lambda f: curvature.diagonal(f, Z4, key=KEY, samples=2.0),
            TypeError,
            r"samples must be an integer >= 1, got 2.0 \(float\)",
        ),
        (
            lambda f: curvature.trace(f, Z4, key=KEY, info="yes"),
            TypeError,
            r"info must be True or False",
        ),
        (
            lambda f: curvature.hvp(f, Z4, jnp.zeros(3)),
            ValueError,
            r"v must be shaped like x \(4,\), got \(3,\)",
        ),
        (lambda f: curvature.hvp(f, Z4, Z4, data=[]), ValueError, r"data= is empty"),
        (
            lambda f: curvature.hvp(lambda x, b: f(x), Z4, Z4, data=[None, None]),
            ValueError,
            r"data= batch 0 holds no array \(got None\)",
        ),
        (
            lambda f: curvature.hvp(lambda x, b: f(x), Z4, Z4, data=gen()),
            TypeError,
            r"data= is a one-shot iterator",
        ),
        (
            lambda f: curvature.hvp(
                lambda x, b: f(x), Z4, Z4, data=(jnp.ones((2, 3)), jnp.ones(3))
            ),
            ValueError,
            r"one leading axis length > 0 on every leaf, got \[2, 3\]",
        ),
        (
            lambda f: curvature.hvp(lambda x, b: f(x), Z4, Z4, data=5),
            TypeError,
            r"data= must be a list",
        ),
        (
            lambda f: curvature.density(f, Z4, key=KEY, points=1),
            ValueError,
            r"points must be an integer >= 2",
        ),
        (
            lambda f: curvature.density(f, Z4, key=KEY, runs=0),
            ValueError,
            r"runs must be an integer >= 1",
        ),
        (
            lambda f: curvature.density(f, Z4, key=KEY, sigma=-0.1),
            ValueError,
            r"sigma must be a positive number or None, got -0.1",
        ),
        (
            lambda f: curvature.density(f, Z4, key=KEY, sigma="a"),
            TypeError,
            r"sigma must be a positive number or None, got 'a' \(str\)",
        ),
        (
            lambda f: curvature.trace(lambda x: x**2, Z4, key=KEY),
            TypeError,
            r"Gradient only defined for scalar-output functions",
        ),
        (lambda f: curvature.trace(None, Z4, key=KEY), TypeError, r"trace: f must be a function"),
        (lambda f: curvature.trace(Unhashable(), Z4, key=KEY), TypeError, r"f must be hashable"),
        (lambda f: curvature.ggn(f, 3), TypeError, r"ggn: loss_fn must be callable, got int"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(diag_quadratic([1.0, 2.0, 3.0, 4.0]))
