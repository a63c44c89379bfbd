"""jaxflat.curvature against dense jax.hessian + numpy.linalg.eigh on small models.

The module needs only flat vectors, so these tests build them with
``ravel_pytree`` (an oracle independent of jaxflat's core).
"""

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


def mlp_problem(seed=0, n_samples=24):
    """A 4-6-3 tanh MLP (51 parameters), cross-entropy on random data, at a random point."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(keys[0], (4, 6)) / 2, "b1": jnp.zeros(6),
        "w2": jax.random.normal(keys[1], (6, 3)) / 2, "b2": jnp.full(3, 0.1),
    }
    flat, unravel = ravel_pytree(params)
    xs = jax.random.normal(keys[2], (n_samples, 4))
    ys = jax.random.randint(keys[3], (n_samples,), 0, 3)

    def loss(v, batch):
        p, (inputs, labels) = unravel(v), batch
        logits = jnp.tanh(inputs @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return flat, loss, (xs, ys)


@pytest.fixture(scope="module")
def problem():
    flat, loss, batch = mlp_problem()
    f = lambda v: loss(v, batch)  # noqa: E731
    h = np.asarray(jax.jit(jax.hessian(f))(flat), np.float64)
    h = (h + h.T) / 2
    return flat, f, loss, batch, h, np.linalg.eigh(h)[0]


def diag_quadratic(c):
    c = jnp.asarray(c, jnp.float32)
    return lambda x: 0.5 * jnp.sum(c * x * x)


# ---------------------------------------------------------------- hvp


def test_hvp_equals_jvp_of_grad(problem, mode):
    flat, f, *_ = problem
    v = jax.random.normal(jax.random.key(1), flat.shape)
    want = jax.jvp(jax.grad(f), (flat,), (v,))[1]
    got = mode(lambda x, v: curvature.hvp(f, x, v))(flat, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, problem[4] @ np.asarray(v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [(8, 8, 8), (5, 7, 12)], ids=["stacked", "unrolled"])
def test_hvp_with_data_is_the_mean_of_the_batches_hessians(problem, sizes):
    flat, _, loss, (xs, ys), *_ = problem
    cuts = np.cumsum(sizes)[:-1]
    batches = list(zip(np.split(np.asarray(xs), cuts), np.split(np.asarray(ys), cuts), strict=True))
    v = jax.random.normal(jax.random.key(2), flat.shape)
    hess = jax.jit(jax.hessian(loss))
    want = np.mean([hess(flat, b) for b in batches], axis=0) @ v
    got = jax.jit(lambda x, v: curvature.hvp(loss, x, v, data=batches))(flat, v)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_data_accepts_a_generator_and_non_array_leaves(problem):
    flat, f, loss, (xs, ys), h, _ = problem
    batches = ({"x": xs[i : i + 8], "y": ys[i : i + 8], "tag": "train"} for i in (0, 8, 16))
    g = lambda x, b: loss(x, (b["x"], b["y"])) if b["tag"] == "train" else 0.0  # noqa: E731
    v = jnp.ones_like(flat)
    np.testing.assert_allclose(curvature.hvp(g, flat, v, data=batches), h @ np.ones(51), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_match_dense_eigh(problem, k):
    flat, f, *_, h, evals = problem
    vals, vecs = curvature.eigenvalues(f, flat, key=KEY, k=k, tol=1e-6)
    assert vals.shape == (k,) and vecs.shape == (k, flat.size)
    want = evals[::-1][:k]
    np.testing.assert_allclose(vals, want, rtol=1e-4, atol=1e-5 * want[0])
    assert np.all(np.diff(vals) <= 0)  # descending
    vecs = np.asarray(vecs, np.float64)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, rtol=1e-5)
    residuals = np.linalg.norm(vecs @ h - vals[:, None] * vecs, axis=1)
    assert np.all(residuals <= 1e-3 * want[0]), residuals


def test_default_tol_stops_early_and_close(problem):
    flat, f, *_, evals = problem
    vals, _ = curvature.eigenvalues(f, flat, key=KEY)  # tol=1e-3
    np.testing.assert_allclose(vals[0], evals[-1], rtol=1e-2)


@pytest.mark.parametrize("reorth", [False, 6])
def test_eigenvalues_with_limited_reorthogonalisation(problem, reorth):
    flat, f, *_, h, evals = problem
    vals, vecs = curvature.eigenvalues(f, flat, key=KEY, iters=40, tol=1e-6, reorth=reorth)
    np.testing.assert_allclose(vals[0], evals[-1], rtol=1e-4)
    v = np.asarray(vecs[0], np.float64)  # from the second pass, which regenerates the basis
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.linalg.norm(h @ v - vals[0] * v) <= 1e-2 * evals[-1]


def test_algebraically_largest_not_largest_magnitude():
    f = diag_quadratic([-5.0, 1.0, 2.0, -0.5])
    vals, vecs = curvature.eigenvalues(f, jnp.zeros(4), key=KEY, k=2)
    np.testing.assert_allclose(vals, [2.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(jnp.abs(vecs), np.eye(4)[[2, 1]], atol=1e-5)


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
    gram = np.asarray(vecs @ vecs.T)
    np.testing.assert_allclose(gram, np.eye(3), atol=1e-4)  # orthonormal despite the restarts


def test_k_equal_to_size_gives_the_whole_spectrum(problem):
    f = diag_quadratic(np.linspace(-1, 2, 7))
    vals, _ = curvature.eigenvalues(f, jnp.zeros(7), key=KEY, k=7)
    np.testing.assert_allclose(vals, np.linspace(2, -1, 7), atol=1e-5)


# ---------------------------------------------------------------- trace


def test_trace_within_its_statistical_error(problem):
    flat, f, *_, h, _ = problem
    samples = 200
    t = curvature.trace(f, flat, key=KEY, samples=samples)
    # Rademacher: Var(z'Hz) = 2 (sum H_ij^2 - sum H_ii^2)
    se = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / samples)
    assert abs(float(t) - np.trace(h)) <= 4 * se, (float(t), np.trace(h), se)
    assert se < 0.2 * abs(np.trace(h))  # the check above is not vacuous


def test_trace_is_exact_for_a_diagonal_hessian():
    t = curvature.trace(diag_quadratic([1.0, -2.0, 5.0]), jnp.zeros(3), key=KEY, samples=3)
    np.testing.assert_allclose(t, 4.0, rtol=1e-6)


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


def test_density_sigma_and_limited_reorth(problem):
    flat, f, *_ = problem
    grid, dens = curvature.density(f, flat, key=KEY, iters=30, sigma=0.01, reorth=False, points=300)
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-5)
    assert np.all(np.asarray(dens) >= 0)
    np.testing.assert_allclose(grid[1] - grid[0], (grid[-1] - grid[0]) / 299, rtol=1e-4)


# ---------------------------------------------------------------- data=, keys, jit


def test_data_batches_give_the_mean_hessian_spectrum(problem):
    flat, f, loss, (xs, ys), h, evals = problem
    batches = [(xs[i : i + 8], ys[i : i + 8]) for i in (0, 8, 16)]  # equal sizes: mean = full
    vals, _ = curvature.eigenvalues(loss, flat, key=KEY, k=2, tol=1e-6, data=batches)
    np.testing.assert_allclose(vals, evals[::-1][:2], rtol=1e-4)
    t_full = curvature.trace(f, flat, key=KEY, samples=20)
    t_data = curvature.trace(loss, flat, key=KEY, samples=20, data=batches)
    np.testing.assert_allclose(t_data, t_full, rtol=1e-4)


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
    np.testing.assert_allclose(t[0], curvature.trace(f, flat, key=KEY, samples=10), rtol=1e-5)  # eager

    dens = jax.jit(lambda x, key: curvature.density(f, x, key=key, iters=10))
    (g1, d1), (_, d2) = dens(flat, KEY), dens(flat, KEY)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_allclose(jnp.trapezoid(d1, g1), 1.0, rtol=1e-5)


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
    np.testing.assert_allclose(signs * vecs, want_vecs, atol=1e-3)  # vectors: sqrt(eigenvalue error)
    np.testing.assert_allclose(got["trace"], want["trace"], rtol=1e-5)
    (grid, dens), (want_grid, want_dens) = got["density"], want["density"]
    np.testing.assert_allclose(grid, want_grid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dens, want_dens, rtol=1e-3, atol=1e-3 * float(want_dens.max()))
    for out in (got["hvp"], got["eig"][1]):  # laid out like x: no device holds it all
        assert len(out.sharding.device_set) == 8
        assert {s.data.shape[-1] for s in out.addressable_shards} == {7}


# ---------------------------------------------------------------- errors


def test_the_submodule_is_reachable_from_the_package():
    assert jaxflat.curvature is curvature
    assert "curvature" not in jaxflat.__all__


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda f: curvature.eigenvalues(f, jnp.zeros(4), key=KEY, k=5), ValueError,
         r"k=5 exceeds the 4 parameters"),
        (lambda f: curvature.eigenvalues(f, jnp.zeros(4), key=KEY, k=0), ValueError,
         r"k must be an integer >= 1, got 0"),
        (lambda f: curvature.eigenvalues(f, jnp.zeros(4), key=KEY, iters=0), ValueError,
         r"iters must be an integer >= 1"),
        (lambda f: curvature.eigenvalues(f, jnp.zeros(4), key=KEY, tol=-1.0), ValueError,
         r"tol must be >= 0"),
        (lambda f: curvature.eigenvalues(f, jnp.zeros(4), key=KEY, reorth=-2), ValueError,
         r"reorth must be an integer >= 0, got -2"),
        (lambda f: curvature.eigenvalues(f, jnp.zeros((2, 2)), key=KEY), ValueError,
         r"x must be a flat \(1-D\) vector, got shape \(2, 2\)"),
        (lambda f: curvature.trace(f, jnp.zeros(0), key=KEY), ValueError, r"x is empty"),
        (lambda f: curvature.trace(f, jnp.zeros(4, jnp.int32), key=KEY), TypeError,
         r"real floating-point vector, got dtype int32"),
        (lambda f: curvature.trace(f, jnp.zeros(4), key=KEY, samples=0), ValueError,
         r"samples must be an integer >= 1"),
        (lambda f: curvature.hvp(f, jnp.zeros(4), jnp.zeros(3)), ValueError,
         r"v must be shaped like x \(4,\), got \(3,\)"),
        (lambda f: curvature.hvp(f, jnp.zeros(4), jnp.zeros(4), data=[]), ValueError,
         r"data= is empty"),
        (lambda f: curvature.density(f, jnp.zeros(4), key=KEY, points=1), ValueError,
         r"points must be an integer >= 2"),
        (lambda f: curvature.density(f, jnp.zeros(4), key=KEY, runs=0), ValueError,
         r"runs must be an integer >= 1"),
        (lambda f: curvature.density(f, jnp.zeros(4), key=KEY, sigma=-0.1), ValueError,
         r"sigma must be a positive number or None, got -0.1"),
        (lambda f: curvature.trace(lambda x: x**2, jnp.zeros(4), key=KEY), TypeError,
         r"Gradient only defined for scalar-output functions"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(diag_quadratic([1.0, 2.0, 3.0, 4.0]))
