"""save/load and loadmodel of a ~400 MB float32 model against plain Orbax.

Each operation runs in a fresh process, so its peak RSS is its own:
    python benchmarks/checkpoint_400mb.py [--mb 400] [--reps 3]
Prints a markdown table: median seconds, peak RSS growth over the model
itself (MiB), and the ratio to the plain-Orbax equivalent. ``load`` checks
every array's 64-bit hash (the default) or not (``verify=False``); the
"(sharded)" rows restore the model laid out over 8 simulated CPU devices
(a 2x4 mesh), from a jaxflat checkpoint and from a plain Orbax one.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OPS = {
    "jaxflat.save": "orbax save",
    "orbax save": None,
    "jaxflat.load(like)": "orbax restore(target)",
    "jaxflat.load(like, verify=False)": "orbax restore(target)",
    "jaxflat.load()": "orbax restore(target)",
    "orbax restore(target)": None,
    "jaxflat.load(like) (sharded)": "orbax restore(target) (sharded)",
    "jaxflat.load(like, verify=False) (sharded)": "orbax restore(target) (sharded)",
    "jaxflat.load(orbax ckpt, like) (sharded)": "orbax restore(target) (sharded)",
    "orbax restore(target) (sharded)": None,
    "jaxflat.loadmodel(dst, state)": "tree.map(device_put)",
    "tree.map(device_put)": None,
}


def child(op: str, mb: int, folder: str, warm: int = 0) -> None:
    import os

    if "sharded" in op:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    import jaxflat

    n = 100
    size = mb * 2**20 // 4 // n
    tree = {f"layer{i:03d}": {"w": jnp.full((size,), i, jnp.float32)} for i in range(n)}
    jax.block_until_ready(tree)
    path = Path(folder)
    if "sharded" in op:  # each leaf (4 * k, n) laid out over a 2x4 mesh
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
        tree = jax.tree.map(lambda x: jax.device_put(x.reshape(8, -1), spec), tree)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    host = jax.tree.map(np.asarray, tree)
    if op.startswith(("jaxflat.load", "orbax restore")):  # needs a checkpoint on disk
        jaxflat.save(path / "jf", tree, overwrite=True)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path / "ob", tree, force=True)
        ckptr.wait_until_finished()
    del tree
    if warm:  # every op, interleaved, `warm` times in this one process: medians
        ops = [o for o in OPS if "sharded" not in o]
        times: dict[str, list[float]] = {o: [] for o in ops}
        for _ in range(warm):
            for o in ops:
                t0 = time.perf_counter()
                run(o, path, host, abstract)
                times[o].append(time.perf_counter() - t0)
        print(json.dumps({o: statistics.median(t) for o, t in times.items()}))
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run(op, path, host, abstract)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_growth_mib": (peak - base) / 1024}))


def run(op: str, path: Path, host: Any, abstract: Any) -> None:
    import jax
    import orbax.checkpoint as ocp

    import jaxflat

    if op == "jaxflat.save":
        jaxflat.save(path / "jf", host_tree(host), overwrite=True)
    elif op == "orbax save":
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path / "ob", host_tree(host), force=True)
        ckptr.wait_until_finished()
    elif op.startswith("jaxflat.load(like)"):
        jax.block_until_ready(jaxflat.load(path / "jf", like=abstract))
    elif op.startswith("jaxflat.load(like, verify=False)"):
        jax.block_until_ready(jaxflat.load(path / "jf", like=abstract, verify=False))
    elif op.startswith("jaxflat.load(orbax ckpt, like)"):
        jax.block_until_ready(jaxflat.load(path / "ob", like=abstract))
    elif op == "jaxflat.load()":
        jax.block_until_ready(jaxflat.load(path / "jf"))
    elif op.startswith("orbax restore(target)"):
        jax.block_until_ready(ocp.StandardCheckpointer().restore(path / "ob", abstract))
    elif op == "jaxflat.loadmodel(dst, state)":
        jax.block_until_ready(jaxflat.loadmodel(abstract, host))
    elif op == "tree.map(device_put)":
        jax.block_until_ready(jax.tree.map(jax.device_put, host))


def host_tree(host):  # the saved tree: device arrays made from the host copy
    import jax

    return jax.tree.map(jax.device_put, host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", default=None)
    p.add_argument("--folder", default=None)
    p.add_argument("--warm", type=int, default=0)
    a = p.parse_args()
    if a.child:
        child(a.child, a.mb, a.folder, a.warm)
        return
    results: dict[str, list[dict[str, float]]] = {op: [] for op in OPS}
    folder = tempfile.mkdtemp(prefix="jaxflat-ckpt-bench-")
    try:
        for _ in range(a.reps):  # interleaved: each rep runs every op once
            for op in OPS:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        op,
                        "--mb",
                        str(a.mb),
                        "--folder",
                        folder,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if out.returncode:
                    sys.exit(f"{op} failed:\n{out.stderr[-3000:]}")
                results[op].append(json.loads(out.stdout.strip().splitlines()[-1]))
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "jaxflat.load()",
                "--mb",
                str(a.mb),
                "--folder",
                folder,
                "--warm",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode:
            sys.exit(f"warm run failed:\n{out.stderr[-3000:]}")
        warm = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = {
        op: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for op, rs in results.items()
    }
    print(f"## {a.mb} MB float32 model (100 leaves), medians of {a.reps} fresh processes\n")
    print("| operation | seconds | peak RSS growth (MiB) | time vs baseline | memory vs baseline |")
    print("|---|---|---|---|---|")
    for op, base in OPS.items():
        m = med[op]
        ratio = mem = ""
        if base:
            ratio = f"{m['seconds'] / med[base]['seconds']:.2f}x {base}"
            b = max(med[base]["peak_growth_mib"], 1.0)
            mem = f"{m['peak_growth_mib'] / b:.2f}x"
        print(f"| {op} | {m['seconds']:.3f} | {m['peak_growth_mib']:.0f} | {ratio} | {mem} |")
    print("\nWarm: every operation 5 times, interleaved, in one process (median seconds)\n")
    print("| operation | seconds | vs baseline |")
    print("|---|---|---|")
    for op, base in OPS.items():
        if op in warm:
            ratio = f"{warm[op] / warm[base]:.2f}x {base}" if base else ""
            print(f"| {op} | {warm[op]:.3f} | {ratio} |")
    check = warm["jaxflat.load(like)"] - warm["jaxflat.load(like, verify=False)"]
    print(
        f"\nHash check (warm): {check:.3f} s = {100 * check / warm['jaxflat.load(like)']:.1f}% "
        "of jaxflat.load(like)"
    )


if __name__ == "__main__":
    main()
