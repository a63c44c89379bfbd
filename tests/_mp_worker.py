"""One process of tests/test_multiprocess.py: jaxflat under jax.distributed.

Run as ``python tests/_mp_worker.py PORT PROCESS_ID NUM_PROCESSES OUTDIR``,
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and
``JAX_PLATFORMS=cpu`` in the environment (the test sets both). Every process:

1. joins the cluster on ``127.0.0.1:PORT`` (CPU collectives through gloo);
2. builds the MLP of :func:`make_params` from a fixed seed, each array a
   global ``jax.Array`` sharded over a mesh of all the cluster's devices
   (built with ``jax.make_array_from_callback``);
3. ``flat, re = jaxflat.destructure(params)``, one jitted gradient step
   ``v - LR * grad(loss)(v)`` with ``loss`` going through ``re(v)``, and
   ``new = re(v2)``;
4. ``jaxflat.save(OUTDIR/ckpt, new)`` and ``jaxflat.load(..., like=new)``;
5. writes ``info_<PROCESS_ID>.json`` (shardings, per-process checks) and,
   on process 0, ``result.npz`` (the gathered global values) into OUTDIR.

The model functions are plain numpy / jax so the test can import this file
and compute the same step in one process without any sharding.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

SEED = 20240517
LR = 0.1
# in -> hidden -> out; 8*16 + 16 + 16*8 + 8 = 280 parameters, a multiple of 8.
SIZES = (8, 16, 8)
BATCH = 4


def make_params(seed: int = SEED) -> dict:
    """The MLP as numpy arrays (float32), plus a few non-parameter leaves."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0.0, 0.1, (fan_out,)).astype(np.float32)
        layers.append({"w": w, "b": b})
    return {"layers": layers, "act": "tanh", "step": 3}


def make_data(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(BATCH, SIZES[0])).astype(np.float32)
    y = rng.normal(size=(BATCH, SIZES[-1])).astype(np.float32)
    return x, y


def loss_fn(params: dict, x, y):
    import jax.numpy as jnp

    h = x
    layers = params["layers"]
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"].reshape(1, -1)
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def partition_specs() -> dict:
    """How each parameter is laid out over a ("data", "model") mesh."""
    from jax.sharding import PartitionSpec as P

    return {
        "layers": [
            {"w": P("data", "model"), "b": P("model")},
            {"w": P("model", "data"), "b": P("data")},
        ]
    }


def _sharding_info(x) -> dict:
    s = x.sharding
    shards = x.addressable_shards
    return {
        "type": type(s).__name__,
        "repr": repr(s),
        "spec": repr(getattr(s, "spec", None)),
        "num_devices": len(s.device_set),
        "fully_addressable": bool(x.is_fully_addressable),
        "global_shape": list(x.shape),
        "addressable_shard_shapes": [list(sh.data.shape) for sh in shards],
        "addressable_device_ids": sorted(sh.device.id for sh in shards),
        "shard_shape": list(s.shard_shape(x.shape)),
    }


def main(argv: list[str]) -> int:
    port, pid, nproc, outdir = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    t0 = time.monotonic()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=60,
    )
    from jax import tree_util as jtu
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxflat

    assert jax.process_index() == pid and jax.process_count() == nproc
    devices = jax.devices()
    n = len(devices)
    assert jax.local_device_count() * nproc == n, (jax.local_device_count(), n)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, n // 2), ("data", "model"))

    def global_array(host: np.ndarray, spec) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    host_params = make_params()
    specs = partition_specs()
    params = {
        "layers": [
            {k: global_array(layer[k], spec[k]) for k in ("w", "b")}
            for layer, spec in zip(host_params["layers"], specs["layers"], strict=True)
        ],
        "act": host_params["act"],
        "step": host_params["step"],
    }
    x_host, y_host = make_data()
    replicated = NamedSharding(mesh, P())
    x = global_array(x_host, P())
    y = global_array(y_host, P())

    flat, re = jaxflat.destructure(params)

    @jax.jit
    def step(v, x, y):
        def loss(v):
            return loss_fn(re(v), x, y)

        value, g = jax.value_and_grad(loss)(v)
        return v - LR * g, value

    v2, loss0 = step(flat, x, y)
    new = re(v2)
    loss1 = jax.jit(
        lambda layers, x, y: loss_fn({"layers": layers}, x, y), out_shardings=replicated
    )(new["layers"], x, y)

    ckpt = os.path.join(outdir, "ckpt")
    jaxflat.save(ckpt, new)
    loaded = jaxflat.load(ckpt, like=new)

    # Exact equality of every leaf, checked on this process's own shards
    # (bitwise) and on the gathered global arrays (process 0 writes them).
    new_leaves, new_def = jtu.tree_flatten_with_path(new)
    loaded_leaves, loaded_def = jtu.tree_flatten_with_path(loaded)
    checks: dict = {"same_treedef": new_def == loaded_def, "leaves": []}
    gathered = {}
    for (path, a), (path_b, b) in zip(new_leaves, loaded_leaves, strict=True):
        name = jtu.keystr(path)
        entry: dict = {"path": name, "path_loaded": jtu.keystr(path_b)}
        if isinstance(a, jax.Array):
            entry["loaded_type"] = type(b).__name__
            entry["same_sharding"] = bool(
                isinstance(b, jax.Array) and b.sharding.is_equivalent_to(a.sharding, a.ndim)
            )
            entry["dtype"] = [str(a.dtype), str(getattr(b, "dtype", None))]
            entry["local_bitwise_equal"] = all(
                np.array_equal(np.asarray(sa.data), np.asarray(sb.data)) and sa.index == sb.index
                for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True)
            )
            entry["sharding_new"] = _sharding_info(a)
            gathered["new" + name] = a
            gathered["loaded" + name] = b
        else:
            entry["value"] = [repr(a), repr(b)]
        checks["leaves"].append(entry)
    orig_shardings = [p.sharding for p in jtu.tree_leaves(params) if isinstance(p, jax.Array)]
    new_shardings = [p.sharding for p in jtu.tree_leaves(new) if isinstance(p, jax.Array)]
    checks["rebuilt_keeps_shardings"] = len(orig_shardings) == len(new_shardings) and all(
        a == b for a, b in zip(orig_shardings, new_shardings, strict=True)
    )

    # The loaded model flattens back to exactly the updated vector.
    flat_loaded, _ = jaxflat.destructure(loaded)
    checks["flat_loaded_sharding_equal"] = flat_loaded.sharding == v2.sharding

    gathered.update(flat=flat, v2=v2, flat_loaded=flat_loaded, loss0=loss0, loss1=loss1)
    host = {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in gathered.items()
    }

    # Overwrite an existing checkpoint, then load it without `like`: every
    # process gets the state back on one of its own devices.
    ckpt2 = os.path.join(outdir, "ckpt2")
    jaxflat.save(ckpt2, params)
    jaxflat.save(ckpt2, new, overwrite=True)
    plain = jaxflat.load(ckpt2)
    checks["plain_load"] = {
        "act": plain["act"],
        "step": plain["step"],
        "equal": {
            f"{i}{k}": bool(
                isinstance(plain["layers"][i][k], jax.Array)
                and plain["layers"][i][k].is_fully_addressable
                and np.array_equal(
                    np.asarray(plain["layers"][i][k]), host[f"new['layers'][{i}]['{k}']"]
                )
            )
            for i in range(len(SIZES) - 1)
            for k in ("w", "b")
        },
    }

    info = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "flat": _sharding_info(flat),
        "v2": _sharding_info(v2),
        "re_length": re.length,
        "re_repr": repr(re),
        "checks": checks,
        "ckpt_listing": sorted(os.listdir(ckpt)),
        "seconds": time.monotonic() - t0,
    }
    with open(os.path.join(outdir, f"info_{pid}.json"), "w") as f:
        json.dump(info, f, indent=1)
    if pid == 0:
        np.savez(os.path.join(outdir, "result.npz"), **host)
    multihost_utils.sync_global_devices("mp_worker.done")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv)
    except BaseException:
        # Exit at once: a normal exit would run jax.distributed's shutdown
        # barrier and wait minutes for the peer, which may be stuck in a
        # collective waiting for this process. The test kills the peer.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
