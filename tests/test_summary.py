"""summary: one line per module, thousands separated, a total line."""

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

import jaxflat


def seed_model():
    r = nnx.Rngs(0)
    m1 = nnx.Sequential(nnx.Linear(784, 64, rngs=r), nnx.BatchNorm(64, rngs=r))
    return nnx.Sequential(m1, nnx.Linear(64, 10, rngs=r))


def test_summary_of_the_seed_model():
    text = jaxflat.summary(seed_model())
    lines = text.splitlines()
    assert (
        lines[0].startswith("Sequential")
        and "51_018 parameters, plus 128 non-trainable" in lines[0]
    )
    assert any("Linear" in line and "# 50_240 parameters" in line for line in lines)
    assert any(
        "BatchNorm" in line and "128 parameters, plus 128 non-trainable" in line for line in lines
    )
    assert any("Linear" in line and "# 650 parameters" in line for line in lines)
    assert lines[-1] == (
        "# Total: 6 trainable arrays, 51_018 parameters, plus 2 non-trainable, "
        "128 parameters, summary size 199.789 KiB."
    )


def test_summary_counts_match_destructure():
    m = seed_model()
    assert f"{jaxflat.destructure(m)[1].length:_} parameters" in jaxflat.summary(m).splitlines()[-1]


def test_summary_of_other_trees():
    mlp = eqx.nn.MLP(2, 1, 8, 2, key=jax.random.key(0))
    assert "105 parameters" in jaxflat.summary(mlp)
    text = jaxflat.summary({"w": jnp.ones((1000,)), "n": jnp.arange(3), "f": jnp.tanh})
    assert text.splitlines()[-1].startswith(
        "# Total: 1 trainable arrays, 1_000 parameters, plus 1 non-trainable, 3 parameters"
    )
    assert "bytes" in text or "KiB" in text


def test_summary_of_abstract_model():
    abstract = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    assert "16 parameters" in jaxflat.summary(abstract)
