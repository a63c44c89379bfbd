"""Helper process for tests/test_crash.py: saves a checkpoint in a loop until killed.

Run as ``python tests/_crash_writer.py PATH``. It imports jaxflat once and
prints ``ready``; then, for each ``spawn`` line on stdin, it forks a writer
(answering ``pid PID``) that saves :func:`make_state` 1, 2, 1, 2, ... to
``PATH`` with ``overwrite=True`` and prints ``saved V`` after each save
returns, until it is killed. ``reap PID`` waits for that writer and answers
``reaped PID STATUS``. Forking from a process that has imported but never
initialised JAX (no XLA backend, no thread pools yet) makes each restart
cheap, so the test can kill and restart a writer dozens of times in seconds.
"""

import os
import sys
import traceback

SHAPE = (256, 1024)  # 1 MiB of float32 per array; 3 arrays and one int array


def make_state(v):
    """One of the two distinguishable states: every leaf says ``v``."""
    import jax.numpy as jnp

    return {
        "tag": v,
        "layers": [
            {"w": jnp.full(SHAPE, v, jnp.float32), "b": jnp.full(SHAPE[1:], v, jnp.float32)}
            for _ in range(3)
        ],
        "count": jnp.full((64,), v, jnp.int32),
        "name": f"state-{v}",
    }


def _write_forever(path, v):
    import jaxflat

    while True:
        jaxflat.save(path, make_state(v), overwrite=True)
        os.write(1, f"saved {v}\n".encode())
        v = 3 - v


def main(path):
    import orbax.checkpoint  # noqa: F401

    import jaxflat  # noqa: F401  (the slow imports, once, before any fork)

    print("ready", flush=True)
    spawned = 0
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "spawn":
            pid = os.fork()
            if pid == 0:
                try:
                    _write_forever(path, 1 + spawned % 2)
                except BaseException:
                    traceback.print_exc()
                    os.write(1, b"error\n")
                finally:
                    os._exit(1)
            spawned += 1
            print(f"pid {pid}", flush=True)
        elif cmd == "reap":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            print(f"reaped {pid} {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
