"""save / load: state on disk through orbax-checkpoint, hashed, atomically.

A jaxflat checkpoint is a folder (see ``_store``) holding ``jaxflat.json``,
the description of the state (``_codec``: its structure, Python values, and
each array's key path, shape, dtype and 64-bit hash, under a SHA-256 of the
whole), and ``arrays-<hex>/``, an ordinary Orbax item of the state's arrays
keyed by their key paths (``{"layers": {"0": {"kernel": ...}}}``), which
plain Orbax restores too. ``load`` also reads plain Orbax checkpoints
(``_orbax``).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import _codec as codec
from . import _orbax as orbax
from . import _store as store
from ._errors import LoadError, raise_all
from ._state import loadmodel, match, state

META = store.META
_THREADS = min(8, os.cpu_count() or 1)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _token() -> str:
    """A name for this save's version, the same on every process."""
    token = uuid.uuid4().bytes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        arr = multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8))
        token = np.asarray(arr, np.uint8).tobytes()
    return token.hex()


def _no_space(e: BaseException) -> bool:
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x)
        if "No space left" in text or "os_error_code='28'" in text or "Disk quota" in text:
            return True
        if "RESOURCE_EXHAUSTED" in text and "memory" not in text.lower():
            return True
        x = x.__cause__ or x.__context__
    return False


def _nest(entries: list[dict[str, Any]], values: dict[int, Any]) -> dict[str, Any]:
    """``{i: value}`` as the Orbax item tree, each at its entry's key."""
    tree: dict[str, Any] = {}
    for i, v in values.items():
        *parents, last = entries[i]["key"] or ["%root"]
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return tree


def _at(tree: Any, key: list[str]) -> Any:
    for k in key or ["%root"]:
        tree = tree[k]
    return tree


def save(path: str | os.PathLike[str], tree: Any, /, *, overwrite: bool = False) -> None:
    """Write ``state(tree)`` to the folder ``path`` with orbax-checkpoint.

    Atomic: a crash at any moment leaves the old checkpoint or the new one,
    never a torn one, and a failed save (a full disk, an error, Ctrl-C)
    removes what it wrote. Saves to one path from several processes or
    threads take turns; a concurrent :func:`load` reads one whole
    checkpoint. Every file is fsynced before the new checkpoint replaces the
    old. Integer dict keys, tuples, None, strings and Python numbers come
    back from :func:`load` as they went in (a ``str`` or ``int`` subclass
    key as plain ``str`` or ``int``); PRNG keys come back bit-exactly;
    zero-size arrays too. A 64-bit hash of every array's bytes and a SHA-256 of
    the description are stored, and :func:`load` checks them.

    The arrays are an ordinary Orbax item, ``path/arrays-<hex>`` (the
    folder ``jaxflat.json`` names under ``"version"``), keyed by the state's
    key paths: plain Orbax restores it without jaxflat.

    Args:
      path: the checkpoint folder.
      tree: a model or any pytree; its :func:`state` is what is stored.
      overwrite: replace an existing jaxflat checkpoint (or an empty folder)
        at ``path``. Nothing else is replaced: a file, a link or any other
        folder at ``path`` is left untouched and raises ``FileExistsError``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false, or
        ``path`` is not a jaxflat checkpoint (nothing is written).
      TypeError: the state holds something that cannot be stored (an object
        or structured numpy array, an unsupported dict key), named by key path.
      OSError: with ``errno.ENOSPC``: no space left on the device (the partial
        checkpoint is removed; the old one, if any, is kept).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxflat
      >>> d = tempfile.mkdtemp()
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.ones(3), "step": 7, "act": (None, "relu"), "layers": {0: 1.5}})
      >>> jaxflat.load(f"{d}/ckpt")
      {'act': (None, 'relu'), 'layers': {0: 1.5}, 'step': 7, 'w': Array([1., 1., 1.], dtype=float32)}
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.zeros(2)}, overwrite=True)
      >>> jaxflat.load(f"{d}/ckpt")
      {'w': Array([0., 0.], dtype=float32)}
      >>> jaxflat.save(d, {"w": jnp.zeros(2)}, overwrite=True)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      FileExistsError: save: ... is a folder but not a jaxflat checkpoint (it holds ckpt); ...
    """
    path = Path(path).absolute()
    store.check_target(path, overwrite)  # every process sees the same folder: all raise alike
    arrays: list[Any] = []
    entries: list[dict[str, Any]] = []
    structure = codec.encode(state(tree), (), arrays, entries)
    with ThreadPoolExecutor(_THREADS) as pool:
        for e, h in zip(entries, pool.map(codec.digest, arrays), strict=True):
            e["hash"] = h
    items = _nest(entries, {i: a for i, a in enumerate(arrays) if a.size})
    leader = jax.process_index() == 0
    created = not os.path.lexists(path)
    with store.writer_lock(path) if leader else contextlib.nullcontext():
        if leader:
            store.check_target(path, overwrite)  # again, now that no other save runs
            store.clean(path)
        token = _token()
        version = f"arrays-{token}"
        try:
            _sync("jaxflat.save.start")
            if items:
                import orbax.checkpoint as ocp

                with orbax.SAVE_LOCK, ocp.PyTreeCheckpointer() as ckptr:
                    ckptr.save(path / version, args=ocp.args.PyTreeSave(items))
            elif leader:
                (path / version).mkdir()  # nothing for Orbax to write
            _sync("jaxflat.save.arrays")
            store.fsync_tree(path / version)
            _sync("jaxflat.save.fsynced")
            if leader:
                meta = {
                    "format": codec.FORMAT,
                    "version": version,
                    "tree": structure,
                    "arrays": entries,
                }
                store.commit(path, version, codec.dumps(meta), token)
                if created:
                    store.fsync(path.parent)  # the new folder's own entry
                store.clean(path)
        except BaseException as e:
            if leader:
                store.discard(path, version, created)
            if isinstance(e, Exception) and _no_space(e):
                raise OSError(
                    errno.ENOSPC,
                    f"save: no space left on device while writing {path}; the partial "
                    f"checkpoint was removed and the old one, if any, kept ({orbax.first_line(e)})",
                ) from e
            raise
    _sync("jaxflat.save.done")


def _parser(path: Path, verify: bool) -> Any:
    def parse(text: str) -> tuple[dict[str, Any], str]:
        try:
            meta = codec.loads(text, verify)
            version = meta.get("version")
            if not isinstance(version, str):
                raise codec.Corrupt(f"version {version!r:.60} is not a folder name")
        except codec.Corrupt as e:
            raise LoadError(f"{path / META}: corrupt {META}: {e}") from None
        return meta, version

    return parse


def read_meta(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """A jaxflat checkpoint's description, validated (no array data read)."""
    p = Path(path).absolute()
    if not store.is_checkpoint(p):
        raise FileNotFoundError(f"no jaxflat checkpoint at {p} (no {META} there)")
    return _parser(p, verify)(store.read_text(p / META))[0]  # type: ignore[no-any-return]


def _zeros(target: jax.ShapeDtypeStruct) -> Any:
    """A zero-size array (never stored by Orbax) for ``target``."""
    x = np.zeros(target.shape, target.dtype)
    if target.sharding is None:
        return x
    return jax.make_array_from_callback(target.shape, target.sharding, lambda idx: x[idx])


def _read_arrays(
    folder: Path, path: Path, entries: list[dict[str, Any]], targets: dict[int, Any], verify: bool
) -> dict[int, Any]:
    """Restore ``targets`` (entry index -> ShapeDtypeStruct) and check their
    hashes; every damaged array is named in one LoadError."""
    stored = {i: t for i, t in targets.items() if math.prod(t.shape)}
    out = {i: _zeros(t) for i, t in targets.items() if i not in stored}
    problems: list[str] = []
    try:
        restored = orbax.restore(folder, _nest(entries, stored)) if stored else {}
        out.update({i: _at(restored, entries[i]["key"]) for i in stored})
    except Exception as e:  # Orbax / tensorstore: damaged, truncated or missing files
        if not verify:
            raise LoadError(
                f"load: {path}: corrupt or incomplete checkpoint: {orbax.first_line(e)}"
            ) from e
        for i, t in stored.items():  # which arrays? one at a time
            try:
                out[i] = _at(orbax.restore(folder, _nest(entries, {i: t})), entries[i]["key"])
            except Exception as e1:
                problems.append(f"{entries[i]['path']}: unreadable ({orbax.first_line(e1)})")
        if not problems:
            raise LoadError(
                f"load: {path}: corrupt or incomplete checkpoint: {orbax.first_line(e)}"
            ) from e
    if verify:
        check = [i for i in stored if i in out and entries[i].get("hash") is not None]
        with ThreadPoolExecutor(_THREADS) as pool:
            for i, h in zip(check, pool.map(lambda i: codec.digest(out[i]), check), strict=True):
                if h is not None and h != entries[i]["hash"]:
                    problems.append(
                        f"{entries[i]['path']}: its bytes do not match the hash saved with it"
                    )
    if problems:
        n = len(problems)
        lines = "\n".join(f"  {p}" for p in problems[:20]) + (
            f"\n  ... and {n - 20} more" if n > 20 else ""
        )
        raise LoadError(f"load: {path}: {n} damaged array{'s' if n > 1 else ''}:\n{lines}")
    return out


def _targets(
    abstract: list[Any],
    entries: list[dict[str, Any]],
    used: list[int],
    like: Any,
    sel: Any,
    verify: bool,
    title: str,
) -> dict[int, Any]:
    """Restore targets: each array at its place in ``like`` with like's
    sharding (and dtype, unless it must be hashed as stored first)."""
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {
        i: entries[i]["stored"]
        if entries[i]["kind"] == "numpy"
        else entries[i]["stored"].update(sharding=dev)
        for i in used
    }
    if like is None:
        return targets
    m = match(like, sel)
    raise_all(f"load: {title} does not fit `like`", m.problems)
    index = {id(abstract[i]): i for i in used}
    for leaf, (s, _) in m.assigned.items():
        i = index.get(id(s))
        d = m.w.leaves[leaf]
        if i is None or entries[i]["kind"] == "key":
            continue
        sharding = None if isinstance(d, np.ndarray) else getattr(d, "sharding", None) or dev
        dtype = targets[i].dtype if verify and entries[i].get("hash") is not None else d.dtype
        targets[i] = jax.ShapeDtypeStruct(targets[i].shape, dtype, sharding=sharding)
    return targets


def _load_jaxflat(path: Path, like: Any, keys: list[str], verify: bool) -> Any:
    with store.reading(path, _parser(path, verify)) as (meta, folder):
        entries = meta["arrays"]
        abstract = [e["abstract"] for e in entries]
        sel = orbax.select(codec.decode(meta["tree"], abstract), keys, str(path))
        ids = {id(x) for x in jax.tree.leaves(sel)}
        used = [i for i, a in enumerate(abstract) if id(a) in ids]
        targets = _targets(abstract, entries, used, like, sel, verify, str(path))
        got = _read_arrays(folder, path, entries, targets, verify)
    arrays: list[Any] = list(abstract)
    for i, x in got.items():
        e = entries[i]
        arrays[i] = jax.random.wrap_key_data(x, impl=e["impl"]) if e["kind"] == "key" else x
    return orbax.select(codec.decode(meta["tree"], arrays), keys, str(path))


def load(
    path: str | os.PathLike[str],
    /,
    like: Any = None,
    *,
    step: int | None = None,
    item: str | None = None,
    verify: bool = True,
) -> Any:
    """Read a checkpoint written by :func:`save`, or a plain Orbax one.

    A jaxflat checkpoint is read whole from one save, even while another
    save runs. A plain Orbax checkpoint may be an item folder
    (``StandardCheckpointer``, ``PyTreeCheckpointer``), a
    ``CheckpointManager`` step folder, or a ``CheckpointManager`` folder
    (its latest step, or ``step``). Non-array values (JSON items, ints,
    strings) come back as saved.

    Args:
      path: the checkpoint folder.
      like: optional model (or its ``jax.eval_shape`` / ``nnx.eval_shape``
        form) that decides shapes, dtypes and shardings: arrays are read by
        Orbax straight into them (a sharded model shard by shard) and the
        result is ``loadmodel(like, restored)``: a model, not a state. A
        saved ``{"value": x}`` (Orbax's layout of an ``nnx.State``) loads
        into an array or ``nnx.Variable`` of ``like``.
      step: the step of a ``CheckpointManager`` folder (default: its latest).
      item: what to load: an item of a step with several items
        (``ocp.args.Composite``), then ``/``-separated keys inside the saved
        tree (``"params"``, ``"state/params"``).
      verify: check the hash of every array and the SHA-256 of the
        description that :func:`save` stored (plain Orbax checkpoints have
        none to check).

    Returns:
      The state as saved (or the part ``item`` names), or a model shaped
      like ``like``.

    Raises:
      FileNotFoundError: no checkpoint at ``path`` (the message says what
        was looked for), or no step ``step`` (the steps there are listed).
      ValueError: ``item`` names no item of a step with several (they are
        listed), or ``step`` was given for a single item.
      LoadError: a damaged checkpoint (each damaged array named by key
        path), a malformed ``jaxflat.json``, or one that does not fit
        ``like`` (every mismatching key path is listed, before any data is
        read).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxflat
      >>> d = tempfile.mkdtemp()
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.ones(2, jnp.float32), "e": jnp.zeros((0, 3))})
      >>> jaxflat.load(f"{d}/ckpt", like={"w": jnp.zeros(2, jnp.bfloat16), "e": jnp.zeros((0, 3))})
      {'e': Array([], shape=(0, 3), dtype=float32), 'w': Array([1, 1], dtype=bfloat16)}
      >>> jaxflat.load(f"{d}/ckpt", item="w")
      Array([1., 1.], dtype=float32)
    """
    p = Path(path).absolute()
    if store.is_checkpoint(p) or os.path.lexists(p / store.LOCK) or not p.is_dir():
        if step is not None:
            raise ValueError(
                f"load: {p} is a jaxflat checkpoint, which has no steps: drop step={step}"
            )
        try:
            tree = _load_jaxflat(p, like, [k for k in (item or "").split("/") if k], verify)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"load: {e}") from None
        return tree if like is None else loadmodel(like, tree)
    return orbax.load(p, like, step, item)
