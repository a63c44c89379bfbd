"""jaxflat.loadmodel: a new tree shaped like ``dst`` holding ``src``'s values."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import Net

import jaxflat
from jaxflat import LoadError

ones = nnx.initializers.ones


def esc(s):
    return re.escape(s)


def values(tree):
    """Every leaf of ``tree`` as numpy (keys as their data), in order."""
    out = []
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x) if isinstance(x, jax.Array | np.ndarray) else x)
    return out


def assert_same_values(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(values(a), values(b), strict=True):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def two_layer(seed=0, **kw):
    return nnx.Sequential(
        nnx.Linear(1, 2, rngs=nnx.Rngs(seed), **kw),
        jnp.tanh,
        nnx.Linear(2, 1, rngs=nnx.Rngs(seed + 1), **kw),
    )


# ------------------------------------------------------------ the page's example


def test_loadmodel_page_example():
    dst = nnx.Sequential(
        nnx.Linear(5, 2, kernel_init=ones, bias_init=ones, rngs=nnx.Rngs(0)),
        jnp.tanh,
        nnx.Linear(2, 1, bias_init=ones, rngs=nnx.Rngs(1)),
    )
    assert np.allclose(dst.layers[0].kernel[...], np.ones((5, 2)))
    src = nnx.Sequential(
        nnx.Linear(5, 2, rngs=nnx.Rngs(2)),
        nnx.relu,
        nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(3)),
    )
    out = jaxflat.loadmodel(dst, src)
    assert not np.allclose(out.layers[0].kernel[...], np.ones((5, 2)))
    np.testing.assert_array_equal(out.layers[0].kernel[...], src.layers[0].kernel[...])
    assert not np.any(out.layers[2].bias[...])
    assert out.layers[1] is jnp.tanh  # non-array leaves come from dst


def test_loadmodel_state_copies_into_other_model():
    m1, m2 = two_layer(0), two_layer(10)
    assert not np.array_equal(jaxflat.destructure(m1)[0], jaxflat.destructure(m2)[0])
    m2 = jaxflat.loadmodel(m2, jaxflat.state(m1))
    np.testing.assert_array_equal(jaxflat.destructure(m2)[0], jaxflat.destructure(m1)[0])


def test_loadmodel_own_state_is_identity():
    dst = Net()
    out = jaxflat.loadmodel(dst, jaxflat.state(dst))
    assert type(out) is Net
    assert_same_values(nnx.state(out), nnx.state(dst))


def test_loadmodel_returns_new_tree_and_leaves_dst_alone():
    dst, src = two_layer(0), two_layer(10)
    before = values(nnx.state(dst))
    out = jaxflat.loadmodel(dst, jaxflat.state(src))
    assert out is not dst
    for x, y in zip(before, values(nnx.state(dst)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_loadmodel_keeps_non_array_leaves_of_dst():
    dst = {"act": jnp.tanh, "n": 3, "flag": True, "name": "a", "w": jnp.zeros(2)}
    src = {"act": (), "n": 5, "flag": False, "name": "b", "w": jnp.ones(2)}
    out = jaxflat.loadmodel(dst, src)
    assert out["act"] is jnp.tanh and out["n"] == 3 and out["flag"] is True and out["name"] == "a"
    np.testing.assert_array_equal(out["w"], np.ones(2))


def test_loadmodel_eager_and_jit(mode):
    dst = {"w": jnp.zeros(3), "b": [jnp.zeros(2)]}
    src = {"w": jnp.arange(3.0), "b": [jnp.ones(2)]}
    out = mode(jaxflat.loadmodel)(dst, src)
    np.testing.assert_array_equal(out["w"], np.arange(3.0))
    np.testing.assert_array_equal(out["b"][0], np.ones(2))


# ------------------------------------------------------------ other libraries


def test_loadmodel_equinox():
    m1 = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0))
    m2 = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(1))
    out = jaxflat.loadmodel(m2, jaxflat.state(m1))
    assert type(out) is eqx.nn.MLP
    assert_same_values(out, m1)


def test_loadmodel_linen_variables():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))

    v1 = M().init(jax.random.key(0), jnp.ones((1, 2)))
    v2 = M().init(jax.random.key(1), jnp.ones((1, 2)))
    out = jaxflat.loadmodel(v2, jaxflat.state(v1))
    assert_same_values(out, v1)


def test_loadmodel_from_orbax_restored_dict_with_string_keys(tmp_path):
    m1, m2 = two_layer(0), two_layer(10)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", jaxflat.state(m1))
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "ckpt")
    assert set(restored["layers"]) == {"0", "2"}  # int keys came back as text
    out = jaxflat.loadmodel(m2, restored)
    np.testing.assert_array_equal(jaxflat.destructure(out)[0], jaxflat.destructure(m1)[0])


def test_loadmodel_string_keys_into_int_keys():
    dst = {0: jnp.zeros(2), 1: {2: jnp.zeros(1)}}
    out = jaxflat.loadmodel(dst, {"0": jnp.ones(2), "1": {"2": jnp.ones(1)}})
    assert set(out) == {0, 1} and set(out[1]) == {2}
    np.testing.assert_array_equal(out[1][2], np.ones(1))


# ------------------------------------------------------------ dtype and device


def test_loadmodel_takes_dst_dtype_float64_numpy_into_float32():
    out = jaxflat.loadmodel(
        {"w": jnp.zeros(3, jnp.float32)}, {"w": np.arange(3, dtype=np.float64) / 3}
    )
    assert isinstance(out["w"], jax.Array) and out["w"].dtype == jnp.float32
    np.testing.assert_allclose(out["w"], np.arange(3) / 3, rtol=1e-6)


def test_loadmodel_takes_dst_dtype_bfloat16():
    dst = nnx.Linear(2, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    src = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
    out = jaxflat.loadmodel(dst, jaxflat.state(src))
    assert out.kernel[...].dtype == jnp.bfloat16 and out.bias[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.kernel[...], src.kernel[...].astype(jnp.bfloat16))


def test_loadmodel_keeps_dst_device():
    dev = jax.devices()[3]
    dst = jax.device_put(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), dev)
    out = jaxflat.loadmodel(dst, {"kernel": np.ones((2, 3)), "bias": jnp.ones(3)})
    assert out.kernel[...].devices() == {dev} and out.bias[...].devices() == {dev}


def test_loadmodel_keeps_dst_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    dst = {"w": jax.device_put(jnp.zeros((4, 8)), sharding)}
    out = jaxflat.loadmodel(dst, {"w": np.ones((4, 8), np.float32)})
    assert out["w"].sharding == sharding
    np.testing.assert_array_equal(out["w"], np.ones((4, 8)))


# ------------------------------------------------------------ inactive parameters


def test_loadmodel_none_into_array_zeros_it():
    dst = nnx.Linear(2, 1, bias_init=ones, rngs=nnx.Rngs(0))
    src = jaxflat.state(nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(1)))
    assert src["bias"] is None
    out = jaxflat.loadmodel(dst, src)
    np.testing.assert_array_equal(out.bias[...], np.zeros(1))
    assert out.bias[...].dtype == jnp.float32


def test_loadmodel_false_into_array_zeros_it():
    out = jaxflat.loadmodel({"b": jnp.ones(2, jnp.bfloat16)}, {"b": False})
    assert out["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["b"], np.zeros(2))


def test_loadmodel_true_into_array_is_an_error():
    with pytest.raises(LoadError, match=esc("['b']") + ".*True"):
        jaxflat.loadmodel({"b": jnp.ones(2)}, {"b": True})


def test_loadmodel_zero_array_into_inactive_is_fine():
    dst = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    src = jaxflat.state(nnx.Linear(2, 1, rngs=nnx.Rngs(1)))  # bias all zero
    out = jaxflat.loadmodel(dst, src)
    assert out.bias is None
    np.testing.assert_array_equal(out.kernel[...], src["kernel"])


def test_loadmodel_zero_array_into_false_is_fine():
    out = jaxflat.loadmodel({"b": False, "w": jnp.ones(1)}, {"b": jnp.zeros(3), "w": jnp.ones(1)})
    assert out["b"] is False


def test_loadmodel_nonzero_array_into_inactive_is_an_error():
    dst = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    src = jaxflat.state(nnx.Linear(2, 1, bias_init=ones, rngs=nnx.Rngs(1)))
    with pytest.raises(LoadError, match=esc(".bias") + ".*inactive"):
        jaxflat.loadmodel(dst, src)


def test_loadmodel_nonzero_array_into_false_is_an_error():
    with pytest.raises(LoadError, match=esc("['b']") + ".*inactive"):
        jaxflat.loadmodel({"b": False}, {"b": jnp.ones(3)})


# ------------------------------------------------------------ tied nodes


def tied():
    lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    return nnx.Sequential(lin, lin)


def tied_state(k0, k1):
    return {
        "layers": {0: {"kernel": k0, "bias": jnp.zeros(2)}, 1: {"kernel": k1, "bias": jnp.zeros(2)}}
    }


def test_loadmodel_tied_node_with_different_values_is_an_error():
    with pytest.raises(
        LoadError, match=esc(".layers[1].kernel") + ".*shared.*" + esc(".layers[0].kernel")
    ):
        jaxflat.loadmodel(tied(), tied_state(jnp.ones((2, 2)), 2 * jnp.ones((2, 2))))


def test_loadmodel_tied_node_with_equal_values_is_fine():
    out = jaxflat.loadmodel(tied(), tied_state(jnp.ones((2, 2)), jnp.ones((2, 2))))
    assert out.layers[0] is out.layers[1]
    np.testing.assert_array_equal(out.layers[0].kernel[...], np.ones((2, 2)))


def test_loadmodel_tied_node_from_its_own_state():
    dst = tied()
    out = jaxflat.loadmodel(dst, jaxflat.state(dst))
    assert out.layers[0] is out.layers[1]


# ------------------------------------------------------------ LoadError rules


def test_load_error_is_a_value_error():
    assert issubclass(LoadError, ValueError)
    with pytest.raises(ValueError):
        jaxflat.loadmodel({"w": jnp.ones(2)}, {"w": jnp.ones(3)})


def test_loadmodel_missing_name():
    dst = {"layer": {"w": jnp.ones(2), "b": jnp.ones(2)}}
    with pytest.raises(LoadError, match=esc("['layer']") + r"(\['b'\]|: 'b').*missing"):
        jaxflat.loadmodel(dst, {"layer": {"w": jnp.ones(2)}})


def test_loadmodel_missing_name_in_nnx_model():
    dst = two_layer()
    src = jaxflat.state(two_layer())
    del src["layers"][2]["bias"]
    with pytest.raises(LoadError, match=esc(".layers[2]") + r"(\.bias|: 'bias').*missing"):
        jaxflat.loadmodel(dst, src)


def test_loadmodel_unexpected_name():
    dst = {"layer": {"w": jnp.ones(2)}}
    with pytest.raises(LoadError, match=esc("['layer']") + r"(\['extra'\]|: 'extra')"):
        jaxflat.loadmodel(dst, {"layer": {"w": jnp.ones(2), "extra": jnp.ones(1)}})


def test_loadmodel_shape_mismatch():
    with pytest.raises(LoadError, match=esc("['w']: cannot load shape (3,) into (2,)")):
        jaxflat.loadmodel({"w": jnp.ones(2)}, {"w": jnp.ones(3)})


def test_loadmodel_shape_mismatch_in_nnx_model():
    dst = two_layer()
    src = jaxflat.state(
        nnx.Sequential(nnx.Linear(1, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(0)))
    )
    with pytest.raises(
        LoadError, match=esc(".layers[0].kernel") + ".*" + esc("(1, 3) into (1, 2)")
    ):
        jaxflat.loadmodel(dst, src)


def test_loadmodel_array_into_non_array():
    with pytest.raises(LoadError, match=esc("['n']") + ".*cannot load"):
        jaxflat.loadmodel({"n": 3, "w": jnp.ones(1)}, {"n": jnp.ones(2), "w": jnp.ones(1)})


def test_loadmodel_array_into_module():
    dst = {"lin": nnx.Linear(2, 2, rngs=nnx.Rngs(0))}
    with pytest.raises(LoadError, match=esc("['lin']") + ".*cannot load"):
        jaxflat.loadmodel(dst, {"lin": jnp.ones((2, 2))})


@pytest.mark.parametrize("bad", [3, 1.5, "text", {"x": jnp.ones(2)}])
def test_loadmodel_non_array_into_array(bad):
    with pytest.raises(LoadError, match=esc("['w']") + ".*cannot load"):
        jaxflat.loadmodel({"w": jnp.ones(2)}, {"w": bad})


def test_loadmodel_key_into_float_array():
    with pytest.raises(LoadError, match=esc("['w']")):
        jaxflat.loadmodel({"w": jnp.zeros(2)}, {"w": jax.random.split(jax.random.key(0), 2)})


def test_loadmodel_float_array_into_key():
    with pytest.raises(LoadError, match=esc("['k']")):
        jaxflat.loadmodel({"k": jax.random.key(0)}, {"k": jnp.ones(())})


def test_loadmodel_lists_all_mismatches_at_once():
    dst = {"a": {"w": jnp.ones(2)}, "b": jnp.ones(3), "c": 1}
    src = {"a": {"w": jnp.ones(3)}, "c": jnp.ones(2), "d": 1}
    with pytest.raises(LoadError, match="4 mismatches") as info:
        jaxflat.loadmodel(dst, src)
    msg = str(info.value)
    for part in ["['a']['w']", "'b'", "['c']", "'d'"]:
        assert part in msg, part


def test_loadmodel_message_is_bounded():
    dst = {f"w{i}": jnp.ones(2) for i in range(1000)}
    src = {f"w{i}": jnp.ones(3) for i in range(1000)}
    with pytest.raises(LoadError, match="1000 mismatches") as info:
        jaxflat.loadmodel(dst, src)
    assert len(str(info.value)) < 3000
    assert "more" in str(info.value)


def test_loadmodel_failed_load_leaves_dst_unchanged():
    dst = Net()
    before = values(nnx.state(dst))
    src = jaxflat.state(Net(seed=5))
    src["lin"]["bias"] = jnp.ones(7)  # one bad leaf among good ones
    with pytest.raises(LoadError, match=esc("['lin']['bias']") + "|" + esc(".lin.bias")):
        jaxflat.loadmodel(dst, src)
    after = values(nnx.state(dst))
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
