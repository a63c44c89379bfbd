"""destructure / Restructure: one short test per clause of DESIGN.md's section
"destructure / Restructure", then invariants over the corpus in helpers.py
(each eager and under jax.jit) and a Hypothesis round trip.
"""

import dataclasses
import re as regex

import chex
import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    ALL_FLOAT,
    CORPUS,
    TiedParam,
    apply,
    assert_leaf_equal,
    assert_tree_equal,
    bn_dropout_model,
    canonical,
    expected_dtype,
    expected_flat,
    expected_params,
    make,
    nonparam_arrays,
    probe_vector,
    seed_model,
    tied_linear_model,
)
from hypothesis import given, settings
from jax import tree_util as jtu
from jax.flatten_util import ravel_pytree

import jaxflat
from jaxflat import destructure

X = jax.random.normal(jax.random.key(42), (16, 2))  # a batch for the seed model


def model_loss(m):
    return jnp.sum(m(X) ** 2)


def leaf_loss(tree):
    """A nonlinear scalar of every float leaf (jax.tree_util's view)."""
    return sum(
        jnp.sum((i + 1) * (1 + jnp.sin(x.astype(jnp.float32))) * x.astype(jnp.float32))
        for i, x in enumerate(jtu.tree_leaves(tree))
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def blocks_to_matrix(h, sizes):
    """A nested Hessian (list of lists of blocks) as one square matrix."""
    return np.block(
        [
            [np.asarray(h[i][j]).reshape(si, sj) for j, sj in enumerate(sizes)]
            for i, si in enumerate(sizes)
        ]
    )


# ================================================================ order


def test_order_is_tree_leaves_order():
    tree = {
        "b": jnp.array([1.0, 2.0]),
        "a": jnp.array([3.0]),
        "c": (jnp.array([4.0]), jnp.array([5.0, 6.0])),
    }
    flat, _ = destructure(tree)
    expected = np.concatenate([np.ravel(x) for x in jtu.tree_leaves(tree)])
    np.testing.assert_array_equal(flat, expected)


def test_order_ravels_each_leaf_in_c_order():
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    tree = (fortran, jnp.arange(6.0, 12.0).reshape(3, 2))
    flat, _ = destructure(tree)
    np.testing.assert_array_equal(flat, np.arange(12.0))


def test_order_of_nnx_parameters_follows_tree_leaves():
    m = bn_dropout_model()
    flat, re = destructure(m)
    layout = [e.path for e in re.layout]
    all_paths = [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(m)[0]]
    assert layout == [p for p in all_paths if p in set(layout)]
    np.testing.assert_array_equal(flat, expected_flat(m))


def test_flat_is_a_1d_jax_array():
    flat, _ = destructure({"w": np.ones((2, 3), np.float32)})
    assert isinstance(flat, jax.Array)
    assert flat.shape == (6,)


# ================================================================ dtype


def test_dtype_float32_with_bfloat16_is_float32():
    flat, _ = destructure({"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)})
    assert flat.dtype == jnp.float32


def test_dtype_bfloat16_alone_stays_bfloat16():
    flat, _ = destructure([jnp.ones(2, jnp.bfloat16), jnp.ones(3, jnp.bfloat16)])
    assert flat.dtype == jnp.bfloat16


def test_dtype_is_jnp_result_type_of_parameters():
    dtypes = [jnp.float16, jnp.bfloat16]
    flat, _ = destructure([jnp.ones(1, d) for d in dtypes])
    assert flat.dtype == jnp.result_type(*dtypes)


def test_dtype_complex_parameter_makes_flat_complex():
    flat, _ = destructure({"r": jnp.ones(2, jnp.bfloat16), "c": jnp.array([1j], jnp.complex64)})
    assert flat.dtype == jnp.complex64
    np.testing.assert_array_equal(flat, [1j, 1, 1])


def test_dtype_float8_parameters():
    f8 = jnp.arange(4, dtype=jnp.float32).astype(jnp.float8_e4m3fn)
    flat, re = destructure({"a": f8})
    assert flat.dtype == jnp.float8_e4m3fn
    assert_leaf_equal(f8, re(flat)["a"])


def test_dtype_float8_with_float32_takes_the_widest_float():
    # jnp.result_type refuses implicit float8 promotion; destructure does not:
    # the flat vector takes the widest other float and re casts back (issue 10.11).
    f8 = jnp.arange(3, dtype=jnp.float32).astype(jnp.float8_e4m3fn)
    with pytest.raises(jax.dtypes.TypePromotionError):
        jnp.result_type(f8.dtype, jnp.float32)
    tree = {"a": f8, "b": jnp.ones(1), "c": jnp.ones(2, jnp.bfloat16)}
    flat, re = destructure(tree)
    assert flat.dtype == jnp.float32
    np.testing.assert_array_equal(flat, [0, 1, 2, 1, 1, 1])
    out = re(flat)
    assert out["a"].dtype == jnp.float8_e4m3fn and out["c"].dtype == jnp.bfloat16
    assert_leaf_equal(f8, out["a"])
    g = jax.grad(lambda v: re(v)["a"].astype(jnp.float32).sum())(flat)
    assert g.dtype == jnp.float32


@pytest.mark.parametrize(
    "tree",
    [{}, None, (), {"n": jnp.arange(3)}, {"s": "x", "eps": 1e-5}, [jax.random.key(0)]],
    ids=["empty_dict", "none", "empty_tuple", "int_array", "scalars", "key"],
)
def test_dtype_no_parameters_is_empty_float32(tree):
    flat, re = destructure(tree)
    assert flat.shape == (0,)
    assert flat.dtype == jnp.float32
    assert re.length == 0
    assert_tree_equal(tree, re(jnp.zeros(0)))


# ================================================================ projection back


def test_projection_complex_into_real_keeps_real_part(mode):
    tree = {"r": jnp.ones(2, jnp.float32), "h": jnp.ones(1, jnp.bfloat16), "c": jnp.array([1j])}
    flat, re = destructure(tree)
    v = jnp.array([5 + 7j, 1 - 2j, 3 + 4j, -6 + 1j], flat.dtype)  # order: c, h, r
    out = mode(lambda v: re(v))(v)
    assert out["r"].dtype == jnp.float32 and out["h"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["c"], [5 + 7j])
    np.testing.assert_array_equal(out["h"].astype(jnp.float32), [1.0])
    np.testing.assert_array_equal(out["r"], [3.0, -6.0])


def test_projection_rounds_into_low_precision(mode):
    tree = {"h": jnp.zeros(2, jnp.bfloat16), "w": jnp.zeros(2, jnp.float32)}
    flat, re = destructure(tree)
    v = jnp.array([1 + 2**-10, 3.0, 1 + 2**-10, 3.0], jnp.float32)
    out = mode(lambda v: re(v))(v)
    assert out["h"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["h"], v[:2].astype(jnp.bfloat16))
    np.testing.assert_array_equal(out["w"], v[2:])


def test_projection_float64_into_float32_rounds():
    with jax.enable_x64(True):
        tree = {"a": jnp.zeros(2, jnp.float64), "b": jnp.zeros(2, jnp.float32)}
        flat, re = destructure(tree)
        assert flat.dtype == jnp.float64
        v = jnp.array([1 + 1e-12, 2.0, 1 + 1e-12, 2.0], jnp.float64)
        out = re(v)
        assert out["a"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
        np.testing.assert_array_equal(out["a"], v[:2])
        np.testing.assert_array_equal(out["b"], np.asarray(v[2:]).astype(np.float32))


def test_projection_numpy_float64_without_x64_is_float32():
    # x64 is off by default: a numpy float64 leaf is what jnp.asarray makes of
    # it (float32), as in ravel_pytree; no warning (pytest turns them into errors).
    tree = {"a": np.array([0.25, 0.5, 1.5]), "b": jnp.ones(2)}
    flat, re = destructure(tree)
    assert flat.dtype == jnp.float32 == ravel_pytree(tree)[0].dtype
    out = re(flat)
    assert out["a"].dtype == canonical(np.float64)
    np.testing.assert_array_equal(out["a"], tree["a"])


# ================================================================ non-parameters


def test_nonparameter_leaves_come_back_as_they_were():
    tree = make("m13_mixed_leaves")
    flat, re = destructure(tree)
    out = re(probe_vector(re.length, flat.dtype))
    for k in ("f", "s", "n", "flag", "eps", "key", "raw_key", "steps", "mask"):
        assert out[k] is tree[k], k
    assert out["none"] is None
    assert not np.array_equal(out["w"], tree["w"])


def test_nontrainable_arrays_come_back_as_they_were():
    m = bn_dropout_model()
    flat, re = destructure(m)
    out = re(jnp.zeros_like(flat))
    before, after = nonparam_arrays(m), nonparam_arrays(out)
    assert len(before) == 4  # BatchNorm mean and var, the Dropout key and count
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_rebuild_does_not_mutate_the_template():
    m = seed_model()
    flat, re = destructure(m)
    before = [np.asarray(x) for x in jtu.tree_leaves(m)]
    out = re(jnp.zeros_like(flat))
    assert out is not m and out.layers[0] is not m.layers[0]
    for a, b in zip(before, jtu.tree_leaves(m), strict=True):
        np.testing.assert_array_equal(a, b)


# ================================================================ errors


def test_wrong_length_raises_expected_and_given_shape():
    _, re = destructure(seed_model())
    with pytest.raises(ValueError, match=r"expected a vector of shape \(5,\), got \(4,\)"):
        re(jnp.zeros(4))


def test_wrong_length_raises_under_jit():
    _, re = destructure(seed_model())
    with pytest.raises(ValueError, match=r"expected a vector of shape \(5,\), got \(6,\)"):
        jax.jit(lambda v: re(v))(jnp.zeros(6))


def test_2d_vector_points_to_vmap():
    _, re = destructure(seed_model())
    with pytest.raises(ValueError, match=r"shape \(5,\), got \(3, 5\).*jax\.vmap"):
        re(jnp.zeros((3, 5)))


def test_scalar_vector_raises():
    _, re = destructure({"w": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"expected a vector of shape \(1,\), got \(\)"):
        re(jnp.float32(1.0))


# ================================================================ repr, len, layout


def test_repr_is_root_type_and_length():
    _, re = destructure(seed_model())
    assert repr(re) == "Restructure(Sequential, ..., 5)"


def test_len_and_length_count_elements():
    flat, re = destructure(
        {"w": jnp.ones((3, 4)), "b": jnp.ones(2, jnp.bfloat16), "n": jnp.arange(7)}
    )
    assert len(re) == re.length == flat.size == 14


def test_layout_entries_have_path_start_stop_shape_dtype():
    m = seed_model()
    flat, re = destructure(m)
    leaves = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(m)[0]}
    assert [e.path for e in re.layout] == list(leaves)
    for e in re.layout:
        assert isinstance(e.path, str) and isinstance(e.start, int) and isinstance(e.stop, int)
        assert e.shape == leaves[e.path].shape and e.dtype == leaves[e.path].dtype
        np.testing.assert_array_equal(flat[e.start : e.stop].reshape(e.shape), leaves[e.path])


def test_layout_names_every_row_of_a_hessian():
    m = seed_model()
    flat, re = destructure(m)
    h = jax.jit(jax.hessian(lambda v: model_loss(re(v))))(flat)
    names = [e.path for e in re.layout for _ in range(e.stop - e.start)]
    assert len(names) == h.shape[0] == h.shape[1] == re.length
    assert names[0] == ".layers[0].bias.value" and names[-1] == ".layers[2].kernel.value"


# ================================================================ Restructure is a pytree


def test_restructure_leaves_are_the_nonparameter_arrays():
    m = bn_dropout_model()
    _, re = destructure(m)
    leaves = jtu.tree_leaves(re)
    expected = nonparam_arrays(m)
    assert len(leaves) == len(expected) == 4
    assert_same_arrays(leaves, expected)


def test_restructure_children_are_used_on_rebuild():
    m = bn_dropout_model()
    flat, re = destructure(m)
    re2 = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, re)
    out = re2(flat)
    np.testing.assert_array_equal(out.layers[1].mean[...], m.layers[1].mean[...] + 1)
    np.testing.assert_array_equal(out.layers[1].var[...], m.layers[1].var[...] + 1)


def test_restructure_as_jit_argument_and_result():
    tree = make("m13_mixed_leaves")

    @jax.jit
    def roundtrip(re, v):
        return destructure(re(v))

    flat, re = destructure(tree)
    v = probe_vector(re.length, flat.dtype)
    flat2, re2 = roundtrip(re, v)
    np.testing.assert_array_equal(flat2, v)
    assert isinstance(re2, jaxflat.Restructure) and repr(re2) == repr(re)
    assert_tree_equal(re(v), re2(v))


def test_new_batchnorm_statistics_do_not_retrace():
    m = bn_dropout_model()
    x = jax.random.normal(jax.random.key(1), (8, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(re, v):
        out = re(v)
        out.eval()  # use the running statistics
        return out(x)

    flat1, re1 = destructure(m)
    y1 = forward(re1, flat1)
    m(x)  # train mode: updates the BatchNorm statistics and the Dropout count
    flat2, re2 = destructure(m)
    assert not np.array_equal(jtu.tree_leaves(re1)[0], jtu.tree_leaves(re2)[0])  # new mean
    y2 = forward(re2, flat2)
    assert not np.allclose(y1, y2)  # the new statistics were used


# ================================================================ transformations


def test_re_itself_can_be_jitted():
    # jax.jit(re): the natural spelling; jax.jit needs a weak reference to re.
    m = seed_model()
    flat, re = destructure(m)
    assert_tree_equal(re(flat), jax.jit(re)(flat))


def test_re_under_jit_matches_eager():
    m = seed_model()
    flat, re = destructure(m)
    f = lambda v: model_loss(re(v))  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(flat), f(flat), rtol=1e-6)


def test_re_under_eager_grad():
    tree = {"w": jnp.asarray(np.arange(6.0, dtype=np.float32).reshape(2, 3)), "n": 3}
    flat, re = destructure(tree)
    g = jax.grad(lambda v: jnp.sum(re(v)["w"] ** 2) * re(v)["n"])(flat)
    np.testing.assert_array_equal(g, 6 * np.arange(6.0))


# The nested gradient in each library's own idiom (jax.grad needs all-float
# trees; NNX and Equinox filter), jitted to keep the suite fast.
@pytest.mark.parametrize(
    "name, grad, jit",
    [
        ("m07_nnx_seed", jax.grad, jax.jit),
        ("m11_linen_params", jax.grad, jax.jit),
        ("m15_float_mix", jax.grad, jax.jit),
        ("m08_nnx_batchnorm_dropout", nnx.grad, nnx.jit),
        ("m09_eqx_mlp", eqx.filter_grad, eqx.filter_jit),
    ],
)
def test_grad_through_re_equals_destructured_nested_grad(name, grad, jit):
    tree = make(name)
    flat, re = destructure(tree)
    flat_grad = jax.jit(jax.grad(lambda v: leaf_loss(re(v))))(flat)
    nested_flat = destructure(jit(grad(leaf_loss))(tree))[0]
    assert flat_grad.dtype == nested_flat.dtype == flat.dtype
    # Under jit XLA may skip a bfloat16 rounding of the cotangent: bf16 tolerance.
    rtol = 1e-2 if name == "m15_float_mix" else 1e-6
    np.testing.assert_allclose(flat_grad, nested_flat, rtol=rtol)
    assert np.any(np.asarray(flat_grad) != 0)


def test_re_under_hessian_matches_nested_hessian():
    tree = make("m02_dict")
    flat, re = destructure(tree)
    h = jax.jit(jax.hessian(lambda v: leaf_loss(re(v))))(flat)
    leaves, treedef = jtu.tree_flatten(tree)
    nested = jax.jit(jax.hessian(lambda ls: leaf_loss(treedef.unflatten(ls))))(leaves)
    np.testing.assert_allclose(
        h, blocks_to_matrix(nested, [x.size for x in leaves]), rtol=1e-5, atol=1e-6
    )


def test_re_under_jvp_is_linear():
    tree = make("m04_list")
    flat, re = destructure(tree)
    t = probe_vector(re.length, flat.dtype)
    primal, tangent = jax.jvp(re, (flat,), (t,))
    assert_tree_equal(tree, primal)
    assert_tree_equal(re(t), tangent)


def test_loss_jvp_equals_grad_dot_tangent():
    flat, re = destructure(seed_model())
    loss = lambda v: model_loss(re(v))  # noqa: E731
    t = probe_vector(5, flat.dtype)
    _, dl = jax.jit(lambda v, t: jax.jvp(loss, (v,), (t,)))(flat, t)
    np.testing.assert_allclose(dl, np.dot(jax.jit(jax.grad(loss))(flat), t), rtol=1e-5)


def test_re_under_vmap_gives_a_batch_of_models():
    flat, re = destructure(seed_model())
    vs = jnp.stack([flat, 2 * flat, probe_vector(5, flat.dtype)])
    batch = jax.vmap(re)(vs)
    assert isinstance(batch, nnx.Sequential)
    assert batch.layers[0].kernel.shape == (3, 2, 1)
    for i in range(3):
        one = re(vs[i])
        for b, o in zip(jtu.tree_leaves(batch), jtu.tree_leaves(one), strict=True):
            np.testing.assert_array_equal(b[i], o)
    ys = jax.vmap(lambda v: re(v)(X))(vs)
    np.testing.assert_allclose(ys[1], re(vs[1])(X), rtol=1e-6)


def test_nested_transformations():
    flat, re = destructure(seed_model())
    loss = lambda v: model_loss(re(v))  # noqa: E731
    vs = jnp.stack([flat, -flat, 0.5 * flat])
    grads = jax.jit(jax.vmap(jax.grad(loss)))(vs)
    hessians = jax.jit(jax.vmap(jax.jacrev(jax.jacfwd(loss))))(vs)
    grad, hessian = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    for i in range(3):
        np.testing.assert_allclose(grads[i], grad(vs[i]), rtol=1e-5)
        np.testing.assert_allclose(hessians[i], hessian(vs[i]), rtol=1e-4, atol=1e-5)


def test_destructure_is_differentiable():
    tree = {"w": jnp.arange(1.0, 5.0).reshape(2, 2), "h": jnp.array([1.5, -2.0], jnp.bfloat16)}
    weights = jnp.arange(1.0, 7.0)

    def f(t):
        flat, _ = destructure(t)
        return jnp.sum(weights * flat**2)

    g = jax.grad(f)(tree)
    assert g["h"].dtype == jnp.bfloat16 and g["w"].dtype == jnp.float32
    np.testing.assert_allclose(g["h"].astype(jnp.float32), 2 * weights[:2] * jnp.array([1.5, -2.0]))
    np.testing.assert_allclose(g["w"], (2 * weights[2:] * jnp.arange(1.0, 5.0)).reshape(2, 2))


def test_destructure_is_differentiable_on_nnx_models():
    m = bn_dropout_model()
    flat, _ = destructure(m)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(destructure(m)[0] ** 3)))(m)
    np.testing.assert_allclose(destructure(g)[0], 3 * flat**2, rtol=1e-6)


def test_destructure_is_jittable():
    m = bn_dropout_model()
    flat, re = destructure(m)
    flat_j, re_j = jax.jit(destructure)(m)
    np.testing.assert_array_equal(flat_j, flat)
    assert repr(re_j) == repr(re) and re_j.layout == re.layout
    assert_tree_equal(re(flat), re_j(flat))


# ================================================================ ties


def test_tie_shared_module_counted_once():
    m = tied_linear_model()
    flat, re = destructure(m)
    assert flat.shape == (6,)
    assert all(e.path.startswith(".layers[0].") for e in re.layout)


def test_tie_shared_module_rebuilt_shared():
    m = tied_linear_model()
    flat, re = destructure(m)
    out = re(probe_vector(6, flat.dtype))
    assert out.layers[0] is out.layers[2]
    assert out.layers[0] is not m.layers[0]
    np.testing.assert_array_equal(out.layers[2].bias[...], probe_vector(6, flat.dtype)[:2])


def test_tie_shared_param_counted_once_and_rebuilt_shared():
    m = TiedParam(3)
    flat, re = destructure(m)
    np.testing.assert_array_equal(flat, [1.0, 2.0, 3.0])
    out = re(jnp.array([4.0, 5.0, 6.0]))
    assert out.a is out.b
    np.testing.assert_array_equal(out.b[...], [4.0, 5.0, 6.0])


def test_tie_gradient_is_summed_over_uses():
    m = TiedParam(3)
    flat, re = destructure(m)

    def loss(v):
        t = re(v)
        return jnp.sum(t.a[...] ** 2) + jnp.sum(3.0 * t.b[...])

    np.testing.assert_allclose(jax.grad(loss)(flat), 2 * flat + 3.0)


def test_tie_gradient_matches_nnx_grad():
    m = tied_linear_model()
    flat, re = destructure(m)
    flat_grad = jax.jit(jax.grad(lambda v: model_loss(re(v))))(flat)
    nested = nnx.jit(nnx.grad(model_loss))(m)
    np.testing.assert_allclose(flat_grad, destructure(nested)[0], rtol=1e-5)


def test_tie_under_jit():
    m = tied_linear_model()
    flat, re = destructure(m)
    loss = lambda v: model_loss(re(v))  # noqa: E731
    np.testing.assert_allclose(jax.jit(loss)(flat), loss(flat), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(flat), jax.grad(loss)(flat), rtol=1e-5)


def test_equal_immutable_arrays_are_not_tied():
    a = jnp.ones(3)
    flat, re = destructure({"a": a, "b": a})
    assert flat.shape == (6,)
    out = re(jnp.arange(6.0))
    np.testing.assert_array_equal(out["a"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(out["b"], [3.0, 4.0, 5.0])
    g = jax.grad(lambda v: jnp.sum(re(v)["a"]) + 2 * jnp.sum(re(v)["b"]))(flat)
    np.testing.assert_array_equal(g, [1, 1, 1, 2, 2, 2])


# ================================================================ devices


def test_parameters_on_two_devices_raise_naming_both():
    d0, d1 = jax.devices()[:2]
    tree = {"a": jax.device_put(jnp.ones(2), d0), "b": jax.device_put(jnp.ones(2), d1)}
    with pytest.raises(ValueError, match=r"\['a'\]") as info:
        destructure(tree)
    msg = str(info.value)
    for part in ("['a']", "['b']", str(d0), str(d1)):
        assert part in msg, part


def test_parameters_on_one_device_give_flat_on_that_device():
    d = jax.devices()[1]
    tree = {"a": jax.device_put(jnp.ones(2), d), "b": jax.device_put(jnp.ones((2, 2)), d)}
    flat, re = destructure(tree)
    assert flat.devices() == {d}
    assert all(x.devices() == {d} for x in jtu.tree_leaves(re(flat)))


def test_nonparameter_on_another_device_is_not_an_error():
    d0, d2 = jax.devices()[0], jax.devices()[2]
    steps = jax.device_put(jnp.arange(3), d2)
    flat, re = destructure({"w": jax.device_put(jnp.ones(2), d0), "steps": steps})
    assert flat.devices() == {d0}
    assert re(flat)["steps"] is steps


# ================================================================ repeated calls

# Eager destructure of a structure seen before may take a cached compiled
# path; every rule above must hold there too.


def _make_hot(tree):
    for _ in range(3):
        destructure(tree)
    pool = getattr(getattr(jaxflat, "_engine", None), "_POOL", None)
    if pool is not None:  # wait for a background compile, if there is one
        pool.submit(lambda: None).result()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: {"w": jnp.full(3, 5.0), "n": jnp.arange(2)},  # new values
        lambda d: {"w": jnp.ones(3, jnp.bfloat16), "n": jnp.arange(2)},  # new dtype
        lambda d: {"w": jnp.ones(4), "n": jnp.arange(2)},  # new shape
        lambda d: {"w": jnp.ones(3), "n": 3},  # an array leaf became a number
        lambda d: {"w": jnp.ones(3), "n": jnp.ones(2)},  # a non-parameter became one
        lambda d: {"w": np.full(3, 2.0, np.float32), "n": jnp.arange(2)},  # numpy
        lambda d: {"w": jax.device_put(jnp.ones(3), d[1]), "n": jnp.arange(2)},  # device
    ],
    ids=["values", "dtype", "shape", "kind", "numeric", "numpy", "device"],
)
def test_rules_hold_when_the_structure_is_hot(change):
    _make_hot({"w": jnp.ones(3), "n": jnp.arange(2)})
    tree = change(jax.devices())
    flat, re = destructure(tree)
    np.testing.assert_array_equal(np.asarray(flat), expected_flat(tree))
    assert flat.dtype == expected_flat(tree).dtype
    assert [e.path for e in re.layout] == [p for p, _ in expected_params(tree)]
    params = [x for _, x in expected_params(tree) if isinstance(x, jax.Array)]
    if params:
        assert flat.devices() == params[0].devices()
    assert_tree_equal(tree, re(flat))


def test_two_devices_raise_when_the_structure_is_hot():
    d0, d1 = jax.devices()[:2]
    _make_hot({"a": jax.device_put(jnp.ones(2), d0), "b": jax.device_put(jnp.ones(2), d0)})
    tree = {"a": jax.device_put(jnp.ones(2), d0), "b": jax.device_put(jnp.ones(2), d1)}
    with pytest.raises(ValueError, match=r"\['a'\] on .* and \['b'\] on "):
        destructure(tree)


# ================================================================ filter, trainable


def test_filter_selects_parameters():
    m = seed_model()
    flat, re = destructure(m, filter=lambda path, x: "kernel" in jtu.keystr(path))
    assert [e.path for e in re.layout] == [".layers[0].kernel.value", ".layers[2].kernel.value"]
    assert flat.shape == (3,)
    out = re(jnp.array([7.0, 8.0, 9.0]))
    np.testing.assert_array_equal(out.layers[0].kernel[...], [[7.0], [8.0]])
    np.testing.assert_array_equal(out.layers[2].bias[...], m.layers[2].bias[...])


def test_filter_receives_key_path_and_leaf():
    tree = {"a": jnp.ones(2), "b": [jnp.zeros(3), jnp.arange(2)]}
    by_path = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(tree)[0]}
    calls = []

    def keep(path, x):
        calls.append((path, x))
        return jtu.keystr(path) != "['a']"

    flat, re = destructure(tree, filter=keep)
    assert {jtu.keystr(p) for p, _ in calls} >= {"['a']", "['b'][0]"}
    for path, x in calls:
        assert isinstance(path, tuple) and by_path[jtu.keystr(path)] is x
    assert [e.path for e in re.layout] == ["['b'][0]"]
    assert re(flat)["a"] is tree["a"]
    assert any(
        np.array_equal(x, tree["a"]) for x in jtu.tree_leaves(re)
    )  # filtered out: a child of re


def test_register_trainable_is_respected():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Scale:
        w: jax.Array
        frozen: dict

    jaxflat.register_trainable(Scale, ["w"])
    tree = Scale(w=jnp.ones(2), frozen={"x": jnp.ones(3), "y": [jnp.ones(4)]})
    flat, re = destructure(tree)
    assert [e.path for e in re.layout] == [".w"]
    out = re(jnp.array([3.0, 4.0]))
    assert out.frozen["x"] is tree.frozen["x"] and out.frozen["y"][0] is tree.frozen["y"][0]


def test_batchnorm_statistics_not_in_flat():
    m = bn_dropout_model()
    flat, re = destructure(m)
    paths = [e.path for e in re.layout]
    assert not any(".mean" in p or ".var" in p for p in paths)
    assert ".layers[1].scale.value" in paths and ".layers[1].bias.value" in paths
    assert re.length == sum(x.size for _, x in expected_params(m))


# ================================================================ corpus invariants

names = pytest.mark.parametrize("name", list(CORPUS))


def _destructure_and_rebuild(tree):
    flat, re = destructure(tree)
    return flat, re, re(flat)


@names
def test_corpus_flat_matches_oracle(name, mode):
    tree = make(name)
    flat, re, _ = apply(mode, _destructure_and_rebuild, tree)
    expected = expected_flat(tree)
    assert isinstance(flat, jax.Array) and flat.ndim == 1
    assert flat.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(flat), expected)
    assert len(re) == re.length == flat.size
    assert repr(re) == f"Restructure({type(tree).__name__}, ..., {flat.size})"


@names
def test_corpus_round_trip(name, mode):
    tree = make(name)
    _, _, out = apply(mode, _destructure_and_rebuild, tree)
    assert_tree_equal(tree, out)


@names
def test_corpus_destructure_of_rebuild_gives_the_vector(name, mode):
    tree = make(name)
    flat, re = destructure(tree)
    v = probe_vector(re.length, flat.dtype)
    flat2 = apply(mode, lambda r, v: destructure(r(v))[0], re, v)
    # Real parameters keep the real part of a complex vector.
    vn = np.asarray(v)
    expected = np.concatenate(
        [
            vn[e.start : e.stop]
            if jnp.issubdtype(e.dtype, jnp.complexfloating)
            else vn[e.start : e.stop].real
            for e in re.layout
        ]
        or [np.zeros(0)]
    ).astype(flat.dtype)
    assert flat2.dtype == flat.dtype
    np.testing.assert_array_equal(np.asarray(flat2), expected)


@names
def test_corpus_shapes_and_dtypes_kept(name, mode):
    tree = make(name)
    flat, re = destructure(tree)
    out = apply(mode, lambda r, v: r(v), re, probe_vector(re.length, flat.dtype))
    pe, te = jtu.tree_flatten(tree)
    po, to = jtu.tree_flatten(out)
    assert te == to
    for e, o in zip(pe, po, strict=True):
        if isinstance(e, (jax.Array, np.ndarray)):
            assert (o.shape, canonical(o.dtype)) == (e.shape, canonical(e.dtype))
        else:
            assert o is e


@names
def test_corpus_layout_names_each_parameter(name):
    tree = make(name)
    flat, re = destructure(tree)
    expected = expected_params(tree)
    assert [e.path for e in re.layout] == [p for p, _ in expected]
    stop, flat_np = 0, np.asarray(flat)
    for e, (_, x) in zip(re.layout, expected, strict=True):
        assert e.start == stop and e.stop - e.start == x.size
        assert (e.shape, e.dtype) == (x.shape, x.dtype)
        np.testing.assert_array_equal(
            flat_np[e.start : e.stop].reshape(e.shape), np.asarray(x).astype(flat.dtype)
        )
        stop = e.stop
    assert stop == re.length


@names
def test_corpus_restructure_leaves_are_the_nonparameter_arrays(name):
    tree = make(name)
    _, re = destructure(tree)
    leaves, expected = jtu.tree_leaves(re), nonparam_arrays(tree)
    assert len(leaves) == len(expected)
    assert_same_arrays(leaves, expected)


def assert_same_arrays(leaves, expected):
    """re's children are the template's non-parameter arrays, committed
    exactly when they were (same values, dtypes and devices; numpy stays numpy)."""
    for a, b in zip(leaves, expected, strict=True):
        assert type(a) is type(b) or isinstance(a, jax.Array) and isinstance(b, jax.Array)
        if isinstance(b, jax.Array):
            assert a.committed == b.committed and a.sharding == b.sharding and a.dtype == b.dtype
            if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_and_re_are_committed_exactly_when_the_tree_was():
    steps = jnp.arange(3)  # uncommitted, as jnp creates it
    flat, re = destructure({"w": jnp.ones(2), "steps": steps})
    (child,) = jtu.tree_leaves(re)
    assert not child.committed and not flat.committed
    assert not re(flat)["w"].committed
    assert re(flat)["steps"] is steps
    d = jax.devices()[1]
    tree = {"w": jax.device_put(jnp.ones(2), d), "steps": jax.device_put(steps, d)}
    flat, re = destructure(tree)
    (child,) = jtu.tree_leaves(re)
    assert child.committed and flat.committed and flat.devices() == {d}
    assert re(flat)["w"].committed and re(flat)["w"].devices() == {d}


@names
def test_corpus_restructure_is_a_jit_argument(name):
    tree = make(name)
    flat, re = destructure(tree)
    v = probe_vector(re.length, flat.dtype)
    got = jax.jit(lambda r, v: destructure(r(v))[0])(re, v)
    np.testing.assert_array_equal(got, destructure(re(v))[0])


@pytest.mark.parametrize("name", ALL_FLOAT)
def test_corpus_agrees_with_ravel_pytree(name, mode):
    tree = make(name)
    flat, re = apply(mode, destructure, tree)
    rflat, unravel = ravel_pytree(tree)
    assert flat.dtype == rflat.dtype
    np.testing.assert_array_equal(flat, rflat)
    v = probe_vector(flat.size, flat.dtype)
    assert_tree_equal(unravel(v), apply(mode, lambda r, v: r(v), re, v))


# ================================================================ hypothesis

_DTYPES = [np.float32, jnp.bfloat16, np.int32]


def _array(spec):
    shape, dtype, seed = spec
    values = np.random.default_rng(seed).integers(-8, 8, size=shape)
    return jnp.asarray(values.astype(dtype))  # numpy casts: no compile per shape


_arrays = st.tuples(
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from(_DTYPES),
    st.integers(0, 2**16),
).map(_array)
_trees = st.recursive(
    _arrays,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text("abc", min_size=1, max_size=2), kids, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=30, deadline=None, database=None)
@given(_trees)
def test_hypothesis_round_trip(tree):
    flat, re = destructure(tree)
    floats = [x for x in jtu.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert flat.shape == (sum(x.size for x in floats),)
    assert flat.dtype == expected_dtype(floats)
    np.testing.assert_array_equal(
        np.asarray(flat, np.float32), expected_flat(tree).astype(np.float32)
    )
    assert_tree_equal(tree, re(flat))
    v = probe_vector(re.length, flat.dtype)
    out = re(v)
    np.testing.assert_array_equal(
        np.asarray(destructure(out)[0], np.float32), np.asarray(v, np.float32)
    )
    for x, y in zip(jtu.tree_leaves(tree), jtu.tree_leaves(out), strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            assert y is x


def test_layout_path_uses_keystr():
    tree = {"a": [jnp.ones(1), {"b": jnp.ones(2)}]}
    _, re = destructure(tree)
    assert [e.path for e in re.layout] == [
        jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(tree)[0]
    ]
    assert regex.fullmatch(r"\['a'\]\[1\]\['b'\]", re.layout[1].path)


# ------------------------------------------------------------ abstract trees (issue 17)


def test_abstract_tree_gives_a_shape_dtype_struct_and_a_working_re():
    tree = {
        "w": jnp.ones((2, 3), jnp.bfloat16),
        "b": jnp.zeros(3),
        "n": jnp.arange(2),
        "f": jnp.sin,
    }
    abstract = {k: jax.eval_shape(lambda x=x: x) if k != "f" else x for k, x in tree.items()}
    flat, re = destructure(abstract)
    real_flat, real_re = destructure(tree)
    assert isinstance(flat, jax.ShapeDtypeStruct)
    assert (flat.shape, flat.dtype) == (real_flat.shape, real_flat.dtype) == ((9,), jnp.float32)
    assert re.layout == real_re.layout
    v = jnp.arange(9.0)
    out = re(v)
    np.testing.assert_array_equal(out["w"], real_re(v)["w"])
    assert out["w"].dtype == jnp.bfloat16
    assert out["n"] == abstract["n"] and out["f"] is jnp.sin  # non-parameters as they were
    np.testing.assert_array_equal(jax.jit(lambda v, r: r(v)["b"])(v, re), real_re(v)["b"])


def test_abstract_nnx_model_plans_the_layout():
    def make():
        return nnx.Sequential(
            nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0))
        )

    flat, re = destructure(nnx.eval_shape(make))
    model = make()
    real_flat, _ = destructure(model)
    assert isinstance(flat, jax.ShapeDtypeStruct) and flat.shape == real_flat.shape == (24,)
    out = re(real_flat)
    np.testing.assert_array_equal(out.layers[0].kernel[...], model.layers[0].kernel[...])
    (mean,) = jax.tree.leaves(out.layers[1].mean)
    assert isinstance(mean, jax.ShapeDtypeStruct)  # a batch statistic: as it was


def test_linen_module_instance_points_to_its_variables():
    import flax.linen as nn

    with pytest.raises(TypeError, match=regex.escape('destructure(variables["params"])')):
        destructure(nn.Dense(3))
