"""jaxflat on the command line.

demo          the flat-and-nested walk-through on a small Flax NNX model
inspect PATH  a checkpoint's key paths, shapes, dtypes, element counts and
              bytes, and its non-array values, from its metadata alone (no
              array data is read); PATH is a jaxflat checkpoint or a plain
              Orbax one (an item folder, a CheckpointManager step folder,
              or a CheckpointManager folder: its latest step, or --step N;
              --item NAME picks an item, then keys inside it)
verify PATH   check every array of a jaxflat checkpoint against the hash
              saved with it: exit 0 if all match, 1 with one line per
              damaged array
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
    print(
        "all zero:", all(bool((x == 0).all()) for x in jax.tree.leaves(nnx.state(zero, nnx.Param)))
    )

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


def _table(title: str, rows: list[Row], values: list[tuple[str, Any]]) -> None:
    """Print one checkpoint's array rows, a total, and its non-array values."""
    from ._summary import _human

    print(f"{title}: {len(rows)} arrays" + (f", {len(values)} other values" if values else ""))
    width = max((len(r[0]) for r in rows), default=10)
    for name, shape, dtype, n, nbytes in rows:
        print(f"  {name:<{width}}  {str(shape):<16} {dtype:<10} {n:>14_}  {_human(nbytes):>10}")
    total_elems = sum(r[3] for r in rows)
    total_bytes = sum(r[4] for r in rows)
    print(f"# Total: {total_elems:_} elements, {_human(total_bytes)}")
    for name, value in values:
        text = repr(value)
        print(f"  {name} = {text if len(text) <= 200 else text[:197] + '...'}")


def _split(tree: Any, isarray: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(arrays, other values) of a tree, each with its key path."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or isarray(x))[
        0
    ]
    named = [(jax.tree_util.keystr(kp) or "<root>", x) for kp, x in leaves]
    return [r for r in named if isarray(r[1])], [r for r in named if not isarray(r[1])]


def _jaxflat_table(path: Path, item: str | None) -> None:
    from . import _codec, _orbax
    from ._checkpoint import read_meta

    meta = read_meta(path)
    entries = {id(e["abstract"]): e for e in meta["arrays"]}
    tree = _codec.decode(meta["tree"], [e["abstract"] for e in meta["arrays"]])
    tree = _orbax.select(tree, [k for k in (item or "").split("/") if k], str(path))
    arrays, values = _split(tree, lambda x: id(x) in entries)
    rows: list[Row] = []
    for name, x in arrays:
        e = entries[id(x)]
        n = int(np.prod(e["shape"], dtype=np.int64))
        nbytes = (
            int(np.prod(e["stored"].shape, dtype=np.int64)) * np.dtype(e["stored"].dtype).itemsize
        )
        rows.append((name, tuple(e["shape"]), str(e["dtype"]), n, nbytes))
    _table(str(path), rows, values)


def _orbax_table(path: Path, step: int | None, item: str | None) -> None:
    """Rows from Orbax's own metadata (``_METADATA``): no array data read."""
    import jax

    from . import _orbax

    folder, keys, title = _orbax.resolve(path, step, item)
    tree, is_json = _orbax.metadata(folder)
    tree = _orbax.select(tree, keys, title)
    arrays, values = _split(tree, _orbax.is_array)
    if values and not is_json:  # the non-array values (ints, strings): read them, and no array
        cut = jax.tree.map(lambda x: None if _orbax.is_array(x) else x, tree, is_leaf=_orbax.isleaf)
        for k in reversed(keys):
            cut = {k: cut}
        got = _orbax.select(_orbax.restore(folder, cut), keys, title)
        saved = {
            jax.tree_util.keystr(kp) or "<root>": v
            for kp, v in jax.tree_util.tree_flatten_with_path(got)[0]
        }
        values = [(name, saved.get(name)) for name, _ in values]
    rows: list[Row] = []
    for name, leaf in arrays:
        shape = tuple(int(n) for n in leaf.shape)
        dtype = np.dtype(leaf.dtype)
        n = int(np.prod(shape, dtype=np.int64))
        rows.append((name, shape, str(dtype), n, n * dtype.itemsize))
    _table(f"{title} (Orbax)", rows, values)


def inspect(path: str, step: int | None = None, item: str | None = None) -> None:
    """Print a checkpoint's tree from its metadata alone (no array data).

    Reads jaxflat checkpoints (``jaxflat.json``) and plain Orbax ones
    (``_METADATA``): an item folder, a ``CheckpointManager`` step folder or a
    ``CheckpointManager`` folder (its latest step, or ``step``); ``item``
    picks an item of a step with several, then keys inside it.
    """
    from . import _store

    p = Path(path).absolute()
    if _store.is_checkpoint(p) or (p / _store.LOCK).exists():
        if step is not None:
            raise ValueError(f"{p} is a jaxflat checkpoint, which has no steps: drop --step")
        _jaxflat_table(p, item)
    elif not p.is_dir():
        raise FileNotFoundError(
            f"no checkpoint at {p} ({'nothing' if not p.exists() else 'a file'} there)"
        )
    else:
        _orbax_table(p, step, item)


def verify(path: str) -> list[str]:
    """The damaged arrays of a jaxflat checkpoint, one line each (none: intact)."""
    import jaxflat

    from . import _store
    from ._errors import LoadError

    if not _store.is_checkpoint(Path(path).absolute()):
        raise FileNotFoundError(
            f"no jaxflat checkpoint at {path} (plain Orbax checkpoints carry no hashes)"
        )
    try:
        jaxflat.load(path, verify=True)
    except LoadError as e:
        lines = str(e).splitlines()
        return [line.strip() for line in lines[1:]] or lines
    return []


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
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{demo,inspect,verify}")
    sub.add_parser(
        "demo",
        help="the flat-and-nested walk-through on a small NNX model",
        description="Run jaxflat's walk-through on a small Flax NNX model: destructure, "
        "rebuild, gradients flat and nested, a Hessian, modules, save and load. "
        "No arguments, no network.",
    )
    p = sub.add_parser(
        "inspect",
        help="a checkpoint's tree, from metadata only",
        description="A checkpoint's arrays (key path, shape, dtype, elements, "
        "bytes) and non-array values, without reading array data.",
    )
    p.add_argument("path", help="a jaxflat checkpoint, or an Orbax item, step or manager folder")
    p.add_argument("--step", type=int, default=None, help="a step of a CheckpointManager folder")
    p.add_argument("--item", default=None, help="an item of a step, then /-separated keys inside")
    v = sub.add_parser(
        "verify",
        help="check a jaxflat checkpoint's arrays against their hashes",
        description="Read every array of a jaxflat checkpoint and check it "
        "against the hash saved with it; exit 1 with one line per damaged array.",
    )
    v.add_argument("path", help="a jaxflat checkpoint")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo()
        return 0
    try:
        if args.cmd == "inspect":
            inspect(args.path, args.step, args.item)
            return 0
        damaged = verify(args.path)
    except (OSError, ValueError) as e:  # LoadError is a ValueError
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        text = text.removeprefix("load: ")
        print(f"error: {text or type(e).__name__}", file=sys.stderr)
        return 1
    for line in damaged:
        print(f"damaged: {line}")
    if not damaged:
        print(f"{args.path}: every array matches its hash")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
