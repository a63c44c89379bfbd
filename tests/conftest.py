"""Test-wide setup: 8 simulated CPU devices and strict numerics.

XLA_FLAGS must be set before jax is first imported, so it is done here, at
the top of the first module pytest loads.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    """Run a function eagerly or under jax.jit: ``mode(f)(*args)``."""
    return (lambda f: f) if request.param == "eager" else jax.jit


@pytest.fixture(autouse=True)
def _undo_registrations():
    """Registrations made by a test (register_leaf, register_trainable) end with it."""
    from jaxflat._predicates import _scoped_registrations

    with _scoped_registrations():
        yield
