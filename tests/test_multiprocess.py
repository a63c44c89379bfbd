"""Multi-process: destructure, a jitted gradient step, save and load under jax.distributed.

Two worker processes (tests/_mp_worker.py), 4 CPU devices each, join one
jax.distributed cluster on 127.0.0.1 (gloo CPU collectives) and work on an
MLP sharded over a mesh of all 8 devices. The test compares what they
computed with the same step done here, in one process, with plain JAX and
no sharding.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util as jtu

WORKER = Path(__file__).with_name("_mp_worker.py")
NPROC = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 90.0  # hard bound on the workers; a normal run takes ~20 s

_spec = importlib.util.spec_from_file_location("_mp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path, limit=6000):
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if "[Gloo]" not in ln]
    return "\n".join(lines)[-limit:]


def _run_workers(outdir):
    """Start the workers, wait for all of them (at most TIMEOUT_S), and kill
    every one still running if one fails or time runs out: a worker whose
    peer died waits in a barrier for minutes, and SIGTERM is caught by JAX's
    preemption notifier, so only SIGKILL ends it promptly."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    port = _free_port()
    logs = [outdir / f"worker_{i}.log" for i in range(NPROC)]
    procs = []
    failure = None
    try:
        for i in range(NPROC):
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(port), str(i), str(NPROC), str(outdir)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=WORKER.parent.parent,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                failure = "a worker failed"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S:.0f} s"
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.communicate(timeout=30)  # reap; kill() above makes this immediate
    assert all(p.poll() is not None for p in procs), "a worker is still running"
    codes = [p.returncode for p in procs]
    if failure or any(codes):
        report = "\n".join(
            f"---- worker {i} (exit {c}) ----\n{_log_tail(log)}"
            for i, (c, log) in enumerate(zip(codes, logs, strict=True))
        )
        pytest.fail(f"{failure or 'a worker failed'}; exit codes {codes}\n{report}")


def _reference():
    """The same step in this process: plain JAX, one device, no jaxflat."""
    host = worker.make_params()
    x, y = (jnp.asarray(a) for a in worker.make_data())
    params = {"layers": jtu.tree_map(jnp.asarray, host["layers"])}
    loss, grads = jax.value_and_grad(worker.loss_fn)(params, x, y)
    # jaxflat's order: tree_leaves order (dict keys sorted: b before w), C order.
    flat = np.concatenate([np.ravel(a) for a in jtu.tree_leaves(params)])
    g = np.concatenate([np.ravel(a) for a in jtu.tree_leaves(grads)])
    v2 = flat - np.float32(worker.LR) * g
    new = {
        "layers": [
            {k: np.asarray(p[k] - worker.LR * gp[k]) for k in ("w", "b")}
            for p, gp in zip(params["layers"], grads["layers"], strict=True)
        ]
    }
    loss1 = worker.loss_fn(jtu.tree_map(jnp.asarray, new), x, y)
    return {
        "flat": flat,
        "v2": v2,
        "loss0": np.asarray(loss),
        "loss1": np.asarray(loss1),
        "new": new,
    }


@pytest.mark.slow
def test_two_processes_sharded_step_save_load(tmp_path):
    t0 = time.monotonic()
    _run_workers(tmp_path)
    elapsed = time.monotonic() - t0
    infos = [json.loads((tmp_path / f"info_{i}.json").read_text()) for i in range(NPROC)]
    inside = ", ".join(f"{info['seconds']:.1f}" for info in infos)
    print(f"\ntest_multiprocess: workers done in {elapsed:.1f} s (inside each: {inside} s)")
    result = dict(np.load(tmp_path / "result.npz"))
    ref = _reference()
    n = NPROC * LOCAL_DEVICES
    length = ref["flat"].size
    assert length % n == 0  # so that flat can be split evenly over every device

    # Every process saw the whole cluster.
    for i, info in enumerate(infos):
        assert info["process_index"] == i
        assert info["process_count"] == NPROC
        assert info["device_count"] == n
        assert info["local_device_count"] == LOCAL_DEVICES
        assert info["re_length"] == length

    # flat (and the updated vector) is sharded over all 8 devices, a slice on
    # each, no device holding the whole vector.
    for key in ("flat", "v2"):
        devices = set()
        for info in infos:
            s = info[key]
            assert s["type"] == "NamedSharding", s
            assert s["num_devices"] == n, s
            assert not s["fully_addressable"], s
            assert s["global_shape"] == [length], s
            assert s["shard_shape"] == [length // n], s
            assert s["addressable_shard_shapes"] == [[length // n]] * LOCAL_DEVICES, s
            devices.update(s["addressable_device_ids"])
        assert len(devices) == n, (key, devices)

    # The sharded multi-process step equals the single-process one.
    np.testing.assert_array_equal(result["flat"], ref["flat"])
    np.testing.assert_allclose(result["loss0"], ref["loss0"], rtol=1e-6)
    np.testing.assert_allclose(result["v2"], ref["v2"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["loss1"], ref["loss1"], rtol=1e-5)
    assert result["loss1"] < result["loss0"]
    for i, layer in enumerate(ref["new"]["layers"]):
        for k in ("w", "b"):
            np.testing.assert_allclose(
                result[f"new['layers'][{i}]['{k}']"], layer[k], rtol=1e-5, atol=1e-6
            )

    # The loaded model equals the saved one exactly, with the same layout.
    for info in infos:
        checks = info["checks"]
        assert checks["same_treedef"]
        assert checks["rebuilt_keeps_shardings"]
        assert checks["flat_loaded_sharding_equal"]
        listing = sorted(info["ckpt_listing"])  # the lock, one version folder, the pointer
        assert (
            len(listing) == 3 and listing[0] == ".jaxflat.lock" and listing[1].startswith("arrays-")
        )
        assert listing[2] == "jaxflat.json"
        for leaf in checks["leaves"]:
            assert leaf["path"] == leaf["path_loaded"]
            if "value" in leaf:
                assert leaf["value"][0] == leaf["value"][1], leaf
                continue
            assert leaf["loaded_type"] == "ArrayImpl", leaf
            assert leaf["same_sharding"], leaf
            assert leaf["dtype"] == ["float32", "float32"], leaf
            assert leaf["local_bitwise_equal"], leaf
            assert leaf["sharding_new"]["num_devices"] == n, leaf
        plain = checks["plain_load"]
        assert (plain["act"], plain["step"]) == ("tanh", 3)
        assert all(plain["equal"].values()), plain
    array_leaves = [leaf["path"] for leaf in infos[0]["checks"]["leaves"] if "value" not in leaf]
    assert len(array_leaves) == 4
    for path in array_leaves:
        np.testing.assert_array_equal(result["loaded" + path], result["new" + path])
    np.testing.assert_array_equal(result["flat_loaded"], result["v2"])
    print(f"test_multiprocess: total {time.monotonic() - t0:.1f} s")
