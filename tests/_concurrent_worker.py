"""Helper process for tests/test_concurrent_save.py.

``python tests/_concurrent_worker.py write DIR PATH ID N``: save
:func:`make_tree` ``ID*100 + k`` to ``PATH`` with ``overwrite=True`` for
``k`` in ``0..N-1``, printing ``saved TAG`` or ``failed TAG TYPE: MESSAGE``
after each save.

``python tests/_concurrent_worker.py read DIR PATH``: load ``PATH`` in a
loop until the file ``DIR/stop`` appears, printing ``ok TAG`` for a
self-consistent checkpoint, ``torn ...`` for a mixed one and
``error TYPE: MESSAGE`` for a failed load.

Both create ``DIR/ready-ROLE-ID`` once their imports are done and then
wait for ``DIR/go``, so that all of them start together.
"""

import os
import sys
import time
import traceback


def make_tree(tag):
    """A tree whose every part says ``tag``: its structure (1 to 3 layers,
    the bias length), its arrays and its strings."""
    import jax.numpy as jnp
    import numpy as np

    n = 1 + (tag // 2) % 3  # pairs of saves share a structure: mixes show in the values
    return {
        "tag": tag,
        "name": f"save-{tag}",
        "layers": [
            {
                "w": jnp.full((32, 32), tag, jnp.float32),
                "b": np.full(8 + (tag // 2) % 5, tag, np.float64),
            }
            for _ in range(n)
        ],
        "count": jnp.full((4,), tag, jnp.int32),
    }


def check(got):
    """Return the tag if ``got`` is exactly one save's tree, else raise."""
    import jax
    import numpy as np

    tag = got["tag"]
    want = make_tree(tag)
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise AssertionError(f"torn: tag {tag} with the structure {jax.tree.structure(got)}")
    if got["name"] != f"save-{tag}":
        raise AssertionError(f"torn: tag {tag} with name {got['name']!r}")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if hasattr(b, "shape"):
            values = np.unique(np.asarray(a)).tolist()
            if a.shape != b.shape or values != [tag]:
                raise AssertionError(f"torn: tag {tag} with an array {a.shape} of {values[:4]}")
    return tag


def _wait_for(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} within {timeout} s")
        time.sleep(0.01)


def main(role, folder, path, *args):
    import jax  # noqa: F401

    import jaxflat

    worker_id = args[0] if args else "0"
    open(os.path.join(folder, f"ready-{role}-{worker_id}"), "w").close()
    _wait_for(os.path.join(folder, "go"), 60)
    if role == "write":
        ident, n = int(args[0]), int(args[1])
        for k in range(n):
            tag = ident * 100 + k
            try:
                jaxflat.save(path, make_tree(tag), overwrite=True)
                print(f"saved {tag}", flush=True)
            except Exception as e:
                msg = str(e).replace("\n", " ")[:300]
                print(f"failed {tag} {type(e).__name__}: {msg}", flush=True)
    else:
        stop = os.path.join(folder, "stop")
        while not os.path.exists(stop):
            try:
                got = jaxflat.load(path)
            except Exception as e:
                msg = str(e).replace("\n", " ")[:300]
                print(f"error {type(e).__name__}: {msg}", flush=True)
                continue
            try:
                print(f"ok {check(got)}", flush=True)
            except AssertionError as e:
                print(str(e).replace("\n", " "), flush=True)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
