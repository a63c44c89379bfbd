"""Command line: ``python -m jaxflat demo`` and ``python -m jaxflat inspect PATH``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import numpy as np


def demo() -> None:
    """The seed page's walk-through, in JAX, on a small Flax NNX model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxflat

    def show(title: str) -> None:
        print(f"\n## {title}")

    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    show("A model: nnx.Sequential(nnx.Linear(2, 1), jax.nn.tanh, nnx.Linear(1, 1))")
    model = nnx.Sequential(
        nnx.Linear(2, 1, rngs=nnx.Rngs(0)), jax.nn.tanh, nnx.Linear(1, 1, rngs=nnx.Rngs(1))
    )
    print(jaxflat.summary(model))

    show("flat, re = jaxflat.destructure(model)")
    flat, re = jaxflat.destructure(model)
    print("flat =", np.asarray(flat), flat.dtype)
    print("re   =", re)
    for e in re.layout:
        print(f"  flat[{e.start}:{e.stop}] <- {e.path} {e.shape} {e.dtype}")

    show("re(jnp.zeros(5)): the same structure, new parameters")
    zero = re(jnp.zeros(5))
    print("all zero:", all(bool((x == 0).all()) for x in jax.tree.leaves(nnx.state(zero, nnx.Param))))

    show("Gradients: nested and flat, the same numbers")
    x = jax.random.uniform(jax.random.key(42), (16, 2))

    def nested_loss(m: Any) -> jax.Array:
        return jnp.sum(m(x) ** 2)

    def loss(v: jax.Array) -> jax.Array:
        return jnp.sum(re(v)(x) ** 2)

    nested = nnx.grad(nested_loss)(model)
    print("nested:", jax.tree.map(lambda g: np.asarray(g).round(4).tolist(), jaxflat.state(nested)))
    print("destructure(nested)[0]:", np.asarray(jaxflat.destructure(nested)[0]))
    print("jax.grad(loss)(flat):  ", np.asarray(jax.grad(loss)(flat)))

    show("jax.hessian(loss)(flat): 5x5, with off-diagonal terms")
    hess = np.asarray(jax.hessian(loss)(flat))
    labels = [f"{e.path}[{i}]" for e in re.layout for i in range(e.stop - e.start)]
    width = max(map(len, labels))
    for label, row in zip(labels, hess):
        print(f"  {label:<{width}} " + " ".join(f"{v:9.4f}" for v in row))
    print("symmetric:", bool(np.allclose(hess, hess.T, atol=1e-5)))

    show("modules and an L2 regulariser (the page's 784-64-10 model)")
    r = nnx.Rngs(0)
    m2 = nnx.Sequential(
        nnx.Sequential(nnx.Linear(784, 64, rngs=r), nnx.BatchNorm(64, rngs=r)),
        nnx.Linear(64, 10, rngs=r),
    )
    print(jaxflat.summary(m2))
    print([type(m).__name__ for m in jaxflat.modules(m2)])

    def l2(m: Any) -> jax.Array:
        return sum(  # type: ignore[return-value]
            jnp.sum(layer.kernel[...] ** 2)
            for layer in jaxflat.modules(m)
            if isinstance(layer, nnx.Linear)
        )

    print("L2(m2) =", float(l2(m2)), l2(m2).dtype)

    show("state -> save -> load -> loadmodel")
    with tempfile.TemporaryDirectory() as d:
        jaxflat.save(f"{d}/ckpt", model)
        restored = jaxflat.load(f"{d}/ckpt")
        fresh = nnx.Sequential(
            nnx.Linear(2, 1, rngs=nnx.Rngs(7)), jax.nn.tanh, nnx.Linear(1, 1, rngs=nnx.Rngs(8))
        )
        back = jaxflat.loadmodel(fresh, restored)
        same = bool(jnp.array_equal(jaxflat.destructure(back)[0], flat))
        print(f"saved to {d}/ckpt, loaded into a fresh model: same parameters: {same}")


def inspect(path: str) -> None:
    """Print a checkpoint's tree from its metadata alone (no array data)."""
    from ._checkpoint import read_meta

    meta = read_meta(path)
    entries = meta["arrays"]
    total_bytes = 0
    total_elems = 0
    width = max((len(e["path"]) for e in entries), default=10)
    print(f"{path}: {len(entries)} arrays")
    for e in entries:
        n = int(np.prod(e["shape"], dtype=np.int64))
        itemsize = np.dtype(e["stored_dtype"]).itemsize
        nbytes = int(np.prod(e["stored_shape"], dtype=np.int64)) * itemsize
        total_bytes += nbytes
        total_elems += n
        print(f"  {e['path']:<{width}}  {str(tuple(e['shape'])):<16} {e['dtype']:<10} {n:>14_}")
    from ._summary import _human

    print(f"# Total: {total_elems:_} elements, {_human(total_bytes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxflat", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="the flat-and-nested walk-through on a small NNX model")
    p = sub.add_parser("inspect", help="a checkpoint's tree, from metadata only")
    p.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo()
    else:
        try:
            inspect(args.path)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
