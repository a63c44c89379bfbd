"""save / load: state on disk through orbax-checkpoint, atomically.

A checkpoint is a folder holding ``arrays/`` (an Orbax checkpoint of the
state's arrays, keyed ``a0, a1, ...``) and ``jaxflat.json`` (the state's
structure: container types, dict keys with their types, Python scalars,
strings, None, and each array's path, shape, dtype and kind). The JSON is
written last, so a folder without it is not a finished checkpoint, and the
finished folder replaces the old one in one atomic rename. Nothing is
pickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from ._errors import LoadError, where
from ._state import loadmodel, match, state

FORMAT = "jaxflat-checkpoint/1"
META = "jaxflat.json"
ARRAYS = "arrays"


# ---------------------------------------------------------------- encoding


def _encode(x: Any, path: tuple[Any, ...], arrays: list[Any], entries: list[dict[str, Any]]) -> Any:
    if isinstance(x, dict):
        keys = list(x)
        for k in keys:
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(f"save: {where(path)}: dict key {k!r} is not a str or int")
        return {
            "t": "dict",
            "k": [[type(k).__name__, k] for k in keys],
            "v": [_encode(x[k], (*path, jtu.DictKey(k)), arrays, entries) for k in keys],
        }
    if isinstance(x, list | tuple):
        return {
            "t": type(x).__name__,
            "v": [_encode(c, (*path, jtu.SequenceKey(i)), arrays, entries) for i, c in enumerate(x)],
        }
    if isinstance(x, jax.Array | np.ndarray):
        entry: dict[str, Any] = {"path": where(path), "shape": list(x.shape)}
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            entry.update(kind="key", impl=str(jax.random.key_impl(x)), dtype="key")
            x = jax.random.key_data(x)
        else:
            entry.update(kind="numpy" if isinstance(x, np.ndarray) else "jax", dtype=str(x.dtype))
        entry["stored_dtype"] = str(x.dtype)
        entry["stored_shape"] = list(x.shape)
        arrays.append(x)
        entries.append(entry)
        return {"t": "array", "i": len(arrays) - 1}
    if x is None:
        return {"t": "none"}
    if isinstance(x, bool):
        return {"t": "bool", "v": x}
    if isinstance(x, int):
        return {"t": "int", "v": x}
    if isinstance(x, float):
        return {"t": "float", "v": x if math.isfinite(x) else repr(x)}
    if isinstance(x, complex):
        return {"t": "complex", "v": [repr(x.real), repr(x.imag)]}
    if isinstance(x, str):
        return {"t": "str", "v": x}
    raise TypeError(f"save: {where(path)}: cannot store a {type(x).__name__}")


def _decode(node: dict[str, Any], arrays: list[Any]) -> Any:
    t = node["t"]
    if t == "dict":
        keys = [int(k) if kt == "int" else k for kt, k in node["k"]]
        return {k: _decode(v, arrays) for k, v in zip(keys, node["v"])}
    if t in ("list", "tuple"):
        items = [_decode(v, arrays) for v in node["v"]]
        return items if t == "list" else tuple(items)
    if t == "array":
        return arrays[node["i"]]
    if t == "none":
        return None
    if t == "float":
        return float(node["v"])
    if t == "complex":
        return complex(float(node["v"][0]), float(node["v"][1]))
    if t in ("bool", "int", "str"):
        return node["v"]
    raise LoadError(f"unknown node type {t!r}")


# ---------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.jaxflat-new"), path.with_name(f".{path.name}.jaxflat-old")


def _complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ARRAYS).is_dir()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save(path: str | os.PathLike[str], tree: Any, /, *, overwrite: bool = False) -> None:
    """Write ``state(tree)`` to the folder ``path`` with orbax-checkpoint.

    Atomic: the checkpoint is written beside ``path`` and moved into place
    in one rename, so a crash at any moment leaves the old checkpoint or the
    new one, never a torn one. Integer dict keys, tuples, None, strings and
    Python numbers come back from :func:`load` as they went in; PRNG keys
    come back bit-exactly.

    Args:
      path: the checkpoint folder.
      tree: a model or any pytree; its :func:`state` is what is stored.
      overwrite: replace an existing checkpoint at ``path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxflat
      >>> d = tempfile.mkdtemp()
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.ones(3), "step": 7, "act": (None, "relu"), "layers": {0: 1.5}})
      >>> jaxflat.load(f"{d}/ckpt")
      {'act': (None, 'relu'), 'layers': {0: 1.5}, 'step': 7, 'w': Array([1., 1., 1.], dtype=float32)}
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"save: {path} exists; pass overwrite=True to replace it")
    arrays: list[Any] = []
    entries: list[dict[str, Any]] = []
    structure = _encode(state(tree), (), arrays, entries)
    meta = {"format": FORMAT, "tree": structure, "arrays": entries}
    new, old = _siblings(path)
    leader = jax.process_index() == 0
    if leader:
        for leftover in (new, old):
            if leftover.exists() and not (leftover == old and not path.exists()):
                shutil.rmtree(leftover)
        path.parent.mkdir(parents=True, exist_ok=True)
        new.mkdir()
    _sync("jaxflat.save.start")
    if arrays:
        ckptr = _checkpointer()
        ckptr.save(new / ARRAYS, {f"a{i}": a for i, a in enumerate(arrays)})
        ckptr.wait_until_finished()
    elif leader:
        (new / ARRAYS).mkdir()  # nothing for Orbax to write
    _sync("jaxflat.save.arrays")
    if leader:
        tmp = new / (META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, new / META)
        _fsync_dir(new)
        if path.exists():
            if _exchange(new, path):
                shutil.rmtree(new)
            else:  # no renameat2: two renames; load() recovers the gap
                os.replace(path, old)
                os.replace(new, path)
                shutil.rmtree(old)
        else:
            os.replace(new, path)
        _fsync_dir(path.parent)
    _sync("jaxflat.save.done")


def _resolve(path: Path) -> Path:
    if _complete(path):
        return path
    new, old = _siblings(path)
    if not path.exists():
        for cand in (new, old):  # a save died between its two renames
            if _complete(cand):
                return cand
        raise FileNotFoundError(f"load: no checkpoint at {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"load: {path} is not a checkpoint folder")
    raise FileNotFoundError(
        f"load: {path} is not a jaxflat checkpoint (no {META} and {ARRAYS}/ inside)"
    )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's structure, from its JSON alone (no array data),
    validated: every array entry parsed, every reference in range."""
    folder = _resolve(Path(path).absolute())
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        entries = meta["arrays"]
        for e in entries:
            e["abstract"] = _abstract(e)
            e["stored"] = jax.ShapeDtypeStruct(tuple(e["stored_shape"]), jnp.dtype(e["stored_dtype"]))
        _decode(meta["tree"], [e["abstract"] for e in entries])  # every node type and index valid
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise LoadError(f"load: {path}: corrupt {META}: {type(e).__name__}: {e}") from None
    meta["folder"] = str(folder)
    return meta  # type: ignore[no-any-return]


def _abstract(entry: dict[str, Any]) -> jax.ShapeDtypeStruct:
    if entry["kind"] == "key":
        dtype = jax.eval_shape(lambda: jax.random.key(0, impl=entry["impl"])).dtype
    else:
        dtype = jnp.dtype(entry["dtype"])
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), dtype)


def load(path: str | os.PathLike[str], /, like: Any = None) -> Any:
    """Read a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint folder.
      like: optional model (or its ``jax.eval_shape`` / ``nnx.eval_shape``
        form) that decides shapes, dtypes and shardings; the result is then
        ``loadmodel(like, restored)``: a model, not a state.

    Returns:
      The state as saved, or a model shaped like ``like``.

    Raises:
      FileNotFoundError: no checkpoint (or an unfinished one) at ``path``.
      LoadError: a corrupt checkpoint, or one that does not fit ``like``
        (every mismatching key path is listed, before any data is read).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxflat
      >>> d = tempfile.mkdtemp()
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.ones(2, jnp.float32)})
      >>> jaxflat.load(f"{d}/ckpt", like={"w": jnp.zeros(2, jnp.bfloat16)})
      {'w': Array([1, 1], dtype=bfloat16)}
    """
    meta = read_meta(path)
    folder = Path(meta["folder"])
    entries = meta["arrays"]
    abstract = [e["abstract"] for e in entries]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = [
        e["stored"] if e["kind"] == "numpy" else e["stored"].update(sharding=dev) for e in entries
    ]
    if like is not None:
        m = match(like, _decode(meta["tree"], abstract))
        if m.problems:
            from ._errors import raise_all

            raise_all(f"load: {path} does not fit `like`", m.problems)
        index = {id(a): i for i, a in enumerate(abstract)}
        for leaf, (s, _) in m.assigned.items():
            i = index.get(id(s))
            d = m.w.leaves[leaf]
            if i is None or entries[i]["kind"] == "key":
                continue
            sharding = getattr(d, "sharding", None)
            if isinstance(d, np.ndarray):
                sharding = None
            elif sharding is None:
                sharding = targets[i].sharding
            targets[i] = jax.ShapeDtypeStruct(targets[i].shape, d.dtype, sharding=sharding)
    try:
        arrays: list[Any] = []
        if targets:
            items = {f"a{i}": t for i, t in enumerate(targets)}
            restored = _checkpointer().restore(folder / ARRAYS, items)
            arrays = [restored[f"a{i}"] for i in range(len(targets))]
    except Exception as e:  # Orbax / tensorstore: truncated or missing files
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise LoadError(f"load: {path}: corrupt or incomplete checkpoint: {msg}") from e
    for i, entry in enumerate(entries):
        if entry["kind"] == "key":
            arrays[i] = jax.random.wrap_key_data(arrays[i], impl=entry["impl"])
    tree = _decode(meta["tree"], arrays)
    return tree if like is None else loadmodel(like, tree)
