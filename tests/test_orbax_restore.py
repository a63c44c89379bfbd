"""load() of plain Orbax checkpoints: item, step and manager folders, step=, item=, shardings."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxflat
from jaxflat import LoadError


def model(seed=0, width=3):
    return nnx.Sequential(
        nnx.Linear(2, width, rngs=nnx.Rngs(seed)), nnx.Linear(width, 1, rngs=nnx.Rngs(seed))
    )


def params(m):
    return jaxflat.destructure(m)[0]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """The Flax/Orbax docs' recipe: CheckpointManager + StandardSave(nnx.state(model)), 3 steps."""
    root = tmp_path_factory.mktemp("orbax") / "ck"
    models = [model(seed) for seed in range(3)]
    with ocp.CheckpointManager(root) as mngr:
        for step, m in enumerate(models):
            mngr.save(step, args=ocp.args.StandardSave(nnx.state(m)))
        mngr.wait_until_finished()
    return root, models


@pytest.mark.parametrize("where", ["root", "step", "item"])
def test_nnx_state_from_a_manager_loads_into_a_model(manager, where):
    root, models = manager
    path = {"root": root, "step": root / "2", "item": root / "2" / "default"}[where]
    out = jaxflat.load(path, like=model(seed=9))
    assert isinstance(out, nnx.Sequential)
    np.testing.assert_array_equal(params(out), params(models[2]))


def test_loadmodel_takes_orbax_restored_nnx_state(manager):
    root, models = manager
    restored = ocp.StandardCheckpointer().restore(root / "1" / "default")
    out = jaxflat.loadmodel(model(seed=9), restored)
    np.testing.assert_array_equal(params(out), params(models[1]))


def test_step_picks_a_step_and_a_missing_step_lists_them(manager):
    root, models = manager
    np.testing.assert_array_equal(
        params(jaxflat.load(root, like=model(9), step=0)), params(models[0])
    )
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{root} has no step 7; its steps: 0, 1, 2")
    ):
        jaxflat.load(root, step=7)


def test_a_root_without_steps_says_so(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileNotFoundError, match="empty folder: no checkpoint steps"):
        jaxflat.load(tmp_path / "ck")


def test_a_folder_of_neither_kind_says_what_was_looked_for(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(
        FileNotFoundError, match="no jaxflat.json .* no _METADATA .* numbered step folders"
    ):
        jaxflat.load(tmp_path / "x")


def test_without_like_the_state_comes_back(manager):
    root, models = manager
    got = jaxflat.load(root)
    np.testing.assert_array_equal(
        got["layers"]["0"]["kernel"]["value"], models[2].layers[0].kernel[...]
    )


def test_mismatches_are_listed_at_once(manager):
    root, _ = manager
    with pytest.raises(LoadError, match=r"(?s)2 mismatches.*layers\[0\].bias.*layers\[0\].kernel"):
        jaxflat.load(
            root,
            like=nnx.Sequential(
                nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(0))
            ),
        )


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax") / "comp"
    state = {
        "params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
        "opt": {"count": jnp.array(5)},
    }
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(
            10,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"lr": 0.1, "name": "run", "layers": [2, 3]}),
            ),
        )
        mngr.wait_until_finished()
    return root, state


def test_composite_json_item_comes_back_as_saved(composite):
    root, _ = composite
    assert jaxflat.load(root, item="meta") == {"lr": 0.1, "name": "run", "layers": [2, 3]}
    assert jaxflat.load(root, item="meta/name") == "run"


def test_composite_without_item_lists_the_items(composite):
    root, _ = composite
    with pytest.raises(ValueError, match="several items; pass item= one of: meta, state"):
        jaxflat.load(root)
    with pytest.raises(ValueError, match="no item 'nope'; pass item= one of: meta, state"):
        jaxflat.load(root, item="nope")


def test_item_keys_inside_an_item(composite):
    root, state = composite
    like = {"w": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros(3)}
    out = jaxflat.load(root, item="state/params", like=like)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], state["params"]["w"].astype(jnp.bfloat16))
    with pytest.raises(
        LoadError, match="item 'state': no key 'nope' at the top; there: opt, params"
    ):
        jaxflat.load(root, item="state/nope")


def test_pytree_checkpointer_ints_and_strings_come_back(tmp_path):
    tree = {"w": jnp.ones(2), "step": 3, "name": "run", "lr": 0.5}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "item", tree)
    got = jaxflat.load(tmp_path / "item")
    assert got["step"] == 3 and got["name"] == "run" and got["lr"] == 0.5
    np.testing.assert_array_equal(got["w"], np.ones(2))
    out = jaxflat.load(
        tmp_path / "item", like={"w": jnp.zeros(2), "step": 0, "name": "", "lr": 0.0}
    )
    assert (
        out["step"] == 0 and out["name"] == ""
    )  # like's non-array leaves are kept, as in loadmodel
    np.testing.assert_array_equal(out["w"], np.ones(2))


def test_a_model_sharded_over_8_devices_restores_shard_by_shard(tmp_path, monkeypatch):
    assert len(jax.devices()) == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    spec = {
        "kernel": jax.sharding.PartitionSpec("data", "model"),
        "bias": jax.sharding.PartitionSpec("model"),
    }

    def sharded(seed):
        m = nnx.Linear(16, 32, rngs=nnx.Rngs(seed))
        for name, p in spec.items():
            v = getattr(m, name)
            v.set_value(jax.device_put(v[...], jax.sharding.NamedSharding(mesh, p)))
        return m

    saved = sharded(0)
    with ocp.CheckpointManager(tmp_path / "ck") as mngr:
        mngr.save(0, args=ocp.args.StandardSave(nnx.state(saved)))
        mngr.wait_until_finished()
    from jaxflat import _orbax

    seen = []
    real = _orbax.restore

    def spy(folder, target):
        seen.extend(jax.tree.leaves(target))
        return real(folder, target)

    monkeypatch.setattr(_orbax, "restore", spy)
    like = nnx.eval_shape(lambda: nnx.Linear(16, 32, rngs=nnx.Rngs(1)))
    for name, p in spec.items():
        v = getattr(like, name)
        v.set_value(
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(mesh, p))
        )
    out = jaxflat.load(tmp_path / "ck", like=like)
    for name, p in spec.items():
        x = getattr(out, name)[...]
        assert x.sharding == jax.sharding.NamedSharding(mesh, p), name
        assert len(x.addressable_shards) == 8
        np.testing.assert_array_equal(x, getattr(saved, name)[...])
    # Orbax was asked for each array in like's sharding: it reads each device's shard.
    assert {s.sharding for s in seen} == {
        jax.sharding.NamedSharding(mesh, p) for p in spec.values()
    }


def test_a_jaxflat_checkpoint_is_a_plain_orbax_item_keyed_by_key_paths(tmp_path):
    import json

    m = model(0)
    jaxflat.save(tmp_path / "ck", {"model": m, "step": 3, "key": jax.random.key(1)})
    folder = json.loads((tmp_path / "ck" / "jaxflat.json").read_text())["version"]
    got = ocp.StandardCheckpointer().restore(tmp_path / "ck" / folder)  # no jaxflat involved
    np.testing.assert_array_equal(got["model"]["layers"]["0"]["kernel"], m.layers[0].kernel[...])
    np.testing.assert_array_equal(got["key"], jax.random.key_data(jax.random.key(1)))
    assert "step" not in got  # non-array values live in jaxflat.json


def test_item_inside_a_jaxflat_checkpoint(tmp_path):
    m = model(0)
    jaxflat.save(tmp_path / "ck", {"model": m, "step": 3})
    out = jaxflat.load(tmp_path / "ck", item="model", like=model(5))
    np.testing.assert_array_equal(params(out), params(m))
    assert jaxflat.load(tmp_path / "ck", item="step") == 3
    with pytest.raises(ValueError, match="no steps"):
        jaxflat.load(tmp_path / "ck", step=1)


def test_value_dicts_stand_for_arrays_and_variables_in_loadmodel():
    dst = {"w": jnp.zeros(2), "lin": nnx.Linear(1, 2, rngs=nnx.Rngs(0))}
    src = {
        "w": {"value": jnp.ones(2)},
        "lin": {"kernel": {"value": jnp.full((1, 2), 3.0)}, "bias": {"value": jnp.ones(2)}},
    }
    out = jaxflat.loadmodel(dst, src)
    np.testing.assert_array_equal(out["w"], np.ones(2))
    np.testing.assert_array_equal(out["lin"].kernel[...], np.full((1, 2), 3.0))
    with pytest.raises(LoadError, match=re.escape("['w']: cannot load dict")):
        jaxflat.loadmodel(
            dst, {**src, "w": {"value": jnp.ones(2), "other": 1}}
        )  # only a lone "value"
