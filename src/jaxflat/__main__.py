"""jaxflat on the command line.

  demo          the flat-and-nested walk-through on a small Flax NNX model
  inspect PATH  a checkpoint's key paths, shapes, dtypes, element counts and
                bytes, from its metadata alone (no array data is read); PATH
                is a jaxflat checkpoint or a plain Orbax one (an item folder,
                a CheckpointManager step folder, or a CheckpointManager
                folder, whose latest step is shown)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
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
    for label, row in zip(labels, hess, strict=True):
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


Row = tuple[str, tuple[int, ...], str, int, int]  # path, shape, dtype, elements, bytes


def _table(title: str, rows: list[Row]) -> None:
    """Print one checkpoint's (path, shape, dtype, elements, bytes) rows and a total."""
    from ._summary import _human

    print(f"{title}: {len(rows)} arrays")
    width = max((len(r[0]) for r in rows), default=10)
    for name, shape, dtype, n, nbytes in rows:
        print(f"  {name:<{width}}  {str(shape):<16} {dtype:<10} {n:>14_}  {_human(nbytes):>10}")
    total_elems = sum(r[3] for r in rows)
    total_bytes = sum(r[4] for r in rows)
    print(f"# Total: {total_elems:_} elements, {_human(total_bytes)}")


def _jaxflat_rows(path: str) -> list[Row]:
    from ._checkpoint import read_meta

    rows: list[Row] = []
    for e in read_meta(path)["arrays"]:
        shape, stored = tuple(e["shape"]), e["stored"]
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = int(np.prod(stored.shape, dtype=np.int64)) * np.dtype(stored.dtype).itemsize
        rows.append((e["path"], shape, str(e["dtype"]), n, nbytes))
    return rows


def _orbax_items(path: Path) -> tuple[str, list[Path]] | None:
    """The Orbax item folders at ``path`` (an item, a step of a
    CheckpointManager, or a CheckpointManager's folder: its latest step)."""

    def items(folder: Path) -> list[Path]:
        if (folder / "_METADATA").is_file():
            return [folder]
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "_METADATA").is_file())
        return subs

    if not path.is_dir():
        return None
    found = items(path)
    if found:
        return str(path), found
    steps = sorted(
        (int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and items(p)
    )
    if steps:
        step, folder = steps[-1]
        return f"{folder} (latest of {len(steps)} steps)", items(folder)
    return None


def _orbax_rows(item: Path) -> list[Row]:
    """Rows from Orbax's own metadata (``_METADATA``, ``_sharding``): no array data."""
    import jax
    import orbax.checkpoint as ocp

    from ._errors import LoadError

    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(item)
    except Exception as e:  # Orbax raises many kinds; say which folder, in one line
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise LoadError(f"inspect: {item}: cannot read its Orbax metadata: {first}") from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if tree is None:  # Orbax answers None when its files are missing or damaged
        raise LoadError(f"inspect: {item}: no readable Orbax metadata (missing or damaged files)")

    def isleaf(x: object) -> bool:
        return hasattr(x, "shape") and hasattr(x, "dtype")

    rows: list[Row] = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=isleaf)[0]:
        name = jax.tree_util.keystr(kp)
        if not isleaf(leaf):
            rows.append((name, (), type(leaf).__name__, 0, 0))
            continue
        shape = tuple(int(n) for n in leaf.shape)
        dtype = np.dtype(leaf.dtype)
        n = int(np.prod(shape, dtype=np.int64))
        rows.append((name, shape, str(dtype), n, n * dtype.itemsize))
    return rows


def inspect(path: str) -> None:
    """Print a checkpoint's tree from its metadata alone (no array data).

    Reads jaxflat checkpoints (``jaxflat.json``) and plain Orbax ones
    (``_METADATA``): an item folder, a ``CheckpointManager`` step folder (one
    table per item) or a ``CheckpointManager`` folder (its latest step).
    """
    from ._checkpoint import META

    p = Path(path)
    if not (p / META).exists():
        found = _orbax_items(p.absolute())
        if found is not None:
            where, items = found
            for item in items:
                title = where if item == Path(where) else f"{where}: item {item.name!r}"
                _table(f"{title} (Orbax)", _orbax_rows(item))
            return
    _table(path, _jaxflat_rows(path))


def _prog() -> str:
    """``jaxflat`` when run as the console script, else ``python -m jaxflat``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    stem = name.removesuffix(".exe").removesuffix("-script.py")
    return "jaxflat" if stem == "jaxflat" else "python -m jaxflat"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxflat {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{demo,inspect}")
    sub.add_parser("demo", help="the flat-and-nested walk-through on a small NNX model")
    p = sub.add_parser("inspect", help="a checkpoint's tree, from metadata only")
    p.add_argument("path", help="a jaxflat checkpoint, or an Orbax item, step or manager folder")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo()
    else:
        try:
            inspect(args.path)
        except (OSError, ValueError) as e:  # LoadError is a ValueError
            text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"error: {text or type(e).__name__}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
