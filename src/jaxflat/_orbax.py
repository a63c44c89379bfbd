"""Plain Orbax checkpoints: find the item a path, ``step=`` and ``item=`` name,
read its metadata tree, restore (part of) it into targets."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ._errors import LoadError, raise_all
from ._state import loadmodel, match

SAVE_LOCK = threading.RLock()  # Orbax saves from several threads at once fail; take turns


def first_line(e: BaseException) -> str:
    """An exception's first line, for one-line messages (Orbax's run long)."""
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def _is_item(folder: Path) -> bool:
    return (folder / "_METADATA").is_file() or (folder / "metadata").is_file()


def _items(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_item(p))
    except OSError:
        return []


def steps(root: Path) -> list[int]:
    """The finished steps of a CheckpointManager folder."""
    try:
        subs = list(root.iterdir())
    except OSError:
        return []
    return sorted(int(p.name) for p in subs if p.name.isdigit() and p.is_dir() and _items(p))


def resolve(path: Path, step: int | None, item: str | None) -> tuple[Path, list[str], str]:
    """The Orbax item folder, the keys inside it, and a title for messages."""
    keys = [k for k in (item or "").split("/") if k]
    if _is_item(path):
        if step is not None:
            raise ValueError(
                f"{path} is one Orbax item, not a CheckpointManager folder: drop step={step}"
            )
        return path, keys, str(path)
    names, title = _items(path), str(path)
    if not names:
        found = steps(path)
        if not found:
            if path.is_dir() and not any(path.iterdir()):
                raise FileNotFoundError(f"{path} is an empty folder: no checkpoint steps in it")
            raise FileNotFoundError(
                f"{path} is not a checkpoint: it holds no jaxflat.json (a jaxflat checkpoint), "
                "no _METADATA (an Orbax item), no item folders (an Orbax step) and no "
                "numbered step folders (a CheckpointManager)"
            )
        if step is None:
            step = found[-1]
            title = f"{path / str(step)} (latest of {len(found)} steps)"
        elif step not in found:
            raise FileNotFoundError(
                f"{path} has no step {step}; its steps: {', '.join(map(str, found))}"
            )
        else:
            title = str(path / str(step))
        path = path / str(step)
        names = _items(path)
    elif step is not None:
        raise ValueError(
            f"{path} is one step of a CheckpointManager, not its folder: drop step={step}"
        )
    if len(names) == 1 and (not keys or keys[0] != names[0]):
        return path / names[0], keys, title
    if not keys or keys[0] not in names:
        what = f"no item {keys[0]!r}" if keys else "several items"
        raise ValueError(f"{title} holds {what}; pass item= one of: {', '.join(names)}")
    return path / keys[0], keys[1:], f"{title}: item {keys[0]!r}"


def select(tree: Any, keys: list[str], title: str) -> Any:
    """The subtree at ``keys`` (``/``-separated in ``item=``)."""
    for i, k in enumerate(keys):
        here = "/".join(keys[:i]) or "the top"
        if isinstance(tree, dict):
            match = next((c for c in tree if str(c) == k), None)
            if match is not None:
                tree = tree[match]
                continue
            have = ", ".join(map(str, list(tree)[:20]))
        elif isinstance(tree, list | tuple) and k.isdigit() and int(k) < len(tree):
            tree = tree[int(k)]
            continue
        else:
            have = f"{len(tree)} positions" if isinstance(tree, list | tuple) else "nothing"
        raise LoadError(f"{title}: no key {k!r} at {here}; there: {have}")
    return tree


def isleaf(x: Any) -> bool:
    from orbax.checkpoint import metadata as om

    return isinstance(x, om.ArrayMetadata | om.ScalarMetadata | om.StringMetadata)


def metadata(folder: Path) -> tuple[Any, bool]:
    """``(tree, is_json)``: a PyTree item's metadata tree, or a JSON item's value."""
    import orbax.checkpoint as ocp

    try:
        if not (folder / "_METADATA").is_file():
            return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(folder), True
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(folder)
    except Exception as e:  # Orbax raises many kinds; say which folder, in one line
        raise LoadError(f"{folder}: cannot read its Orbax metadata: {first_line(e)}") from e
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:  # Orbax answers None when its files are missing or damaged
        raise LoadError(f"{folder}: no readable Orbax metadata (missing or damaged files)")
    return tree, False


def is_array(x: Any) -> bool:
    from orbax.checkpoint import metadata as om

    return isinstance(x, om.ArrayMetadata) and not isinstance(x, om.ScalarMetadata)


def abstract(x: Any) -> Any:
    """An array's metadata as a ``jax.ShapeDtypeStruct``; a Python scalar's
    or a string's as itself (a non-array leaf, as in a jaxflat checkpoint)."""
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) if is_array(x) else x


def restore(folder: Path, target: Any) -> Any:
    """Restore the leaves of ``target`` (a partial tree): a ShapeDtypeStruct
    leaf with a sharding becomes a jax.Array laid out so, without one a numpy
    array; any other leaf is read as saved."""
    import orbax.checkpoint as ocp

    def args(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return ocp.RestoreArgs()
        if x.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)

    restore_args = jax.tree.map(args, target, is_leaf=isleaf)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(
            folder,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )


def load(path: Path, like: Any, step: int | None, item: str | None) -> Any:
    """Restore (part of) a plain Orbax checkpoint, into ``like`` if given."""
    folder, keys, title = resolve(path, step, item)
    tree, is_json = metadata(folder)
    if is_json:
        value = select(tree, keys, title)
        return value if like is None else loadmodel(like, value)
    meta = select(tree, keys, title)
    leaves, treedef = jax.tree.flatten(meta, is_leaf=isleaf)
    flat = [abstract(x) for x in leaves]
    isarray = [is_array(x) for x in leaves]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = [
        f.update(sharding=dev) if a else x for f, x, a in zip(flat, leaves, isarray, strict=True)
    ]
    if like is not None:
        m = match(like, jax.tree.unflatten(treedef, flat))
        raise_all(f"load: {title} does not fit `like`", m.problems)
        index = {id(x): i for i, x in enumerate(flat)}
        for leaf, (s, _) in m.assigned.items():
            i, d = index.get(id(s)), m.w.leaves[leaf]
            if i is None or not isarray[i]:
                continue
            sharding = None if isinstance(d, np.ndarray) else getattr(d, "sharding", None) or dev
            targets[i] = jax.ShapeDtypeStruct(flat[i].shape, d.dtype, sharding=sharding)
    wrapped: Any = jax.tree.unflatten(treedef, targets)
    for k in reversed(keys):
        wrapped = {k: wrapped}
    try:
        got = select(restore(folder, wrapped), keys, title)
    except Exception as e:
        raise LoadError(f"load: {title}: cannot restore it: {first_line(e)}") from e
    return got if like is None else loadmodel(like, got)
