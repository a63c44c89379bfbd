"""save / load: state on disk through orbax-checkpoint, atomically.

A checkpoint is a folder holding ``arrays/`` (an Orbax checkpoint of the
state's arrays, keyed ``a0, a1, ...``; zero-size arrays are not stored
there) and ``jaxflat.json`` (the state's structure: container types, dict
keys with their types, Python scalars, strings, None, and each array's path,
shape, dtype and kind). Nothing is pickled.

Writers. A save takes a per-path lock (``flock`` on ``.NAME.jaxflat-lock``
beside the checkpoint; the file is removed when the save ends and only a
killed save leaves it, empty and harmless, for the next save to reuse),
writes the new checkpoint into a folder of its own
(``.NAME.jaxflat-new-<uuid>``), writes ``jaxflat.json`` last, and swaps
the finished folder with the old one in one atomic ``renameat2``
(``RENAME_EXCHANGE``; where that is missing, two renames, and a reader in
the gap reads ``.NAME.jaxflat-old``). The old folder is deleted once no
reader holds it. Leftovers of killed saves are removed by the next save.

Readers. ``load`` opens the checkpoint folder once and reads everything
(``jaxflat.json`` and ``arrays/``) through that open folder
(``/proc/self/fd/N``), holding a shared ``flock`` on it, so a concurrent
save can neither mix two checkpoints nor delete the folder mid-read. Where
``/proc`` or ``flock`` are missing, it checks that the folder was not
replaced while it read, and reads again if it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import math
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from ._errors import LoadError, where
from ._state import loadmodel, match, state

FORMAT = "jaxflat-checkpoint/1"
META = "jaxflat.json"
ARRAYS = "arrays"
KINDS = ("jax", "numpy", "key")
READ_RETRIES = 50  # a load that keeps meeting a swapped folder gives up after this many reads
REMOVE_WAIT_S = 60.0  # a save waits this long for readers of the folder it replaced

R = TypeVar("R")


# ---------------------------------------------------------------- encoding


def _storable(dtype: np.dtype[Any]) -> bool:
    """Numbers and bools (bfloat16, float8, int4 included); not object,
    structured, string, void or datetime arrays, which Orbax cannot store."""
    return dtype.fields is None and (
        dtype == np.bool_ or bool(jax.dtypes.issubdtype(dtype, np.number))
    )


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
        elif not _storable(x.dtype):
            what = f"structured ({x.dtype})" if x.dtype.fields is not None else x.dtype.name
            raise TypeError(
                f"save: {where(path)}: cannot store a numpy array of dtype {what}; "
                "only numeric and bool arrays can be saved (convert it, or leave it out of the tree)"
            )
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


# ---------------------------------------------------------------- decoding (iterative, validating)


class _Corrupt(ValueError):
    """Malformed metadata; turned into a LoadError naming the file."""


_NONFINITE = ("nan", "inf", "-inf")
_CONTAINERS = ("dict", "list", "tuple")


def _isint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Frame:
    """One container being decoded; ``parent``/``key`` give its key path on error."""

    __slots__ = ("node", "t", "keys", "nodes", "values", "parent", "key")

    def __init__(self, node: dict[str, Any], t: str, parent: _Frame | None, key: Any) -> None:
        self.node, self.t, self.parent, self.key = node, t, parent, key
        self.values: list[Any] = []
        nodes = node.get("v")
        if not isinstance(nodes, list):
            raise _Corrupt(f"{t} node without a list of values at {self.where()}")
        self.nodes: list[Any] = nodes
        self.keys: list[Any] = []
        if t == "dict":
            pairs = node.get("k")
            if not isinstance(pairs, list):
                raise _Corrupt(f"dict node without a list of keys at {self.where()}")
            if len(pairs) != len(nodes):
                raise _Corrupt(
                    f"dict node with {len(pairs)} keys and {len(nodes)} values at {self.where()}"
                )
            for pair in pairs:
                ok = isinstance(pair, list) and len(pair) == 2
                if ok and pair[0] == "str" and isinstance(pair[1], str):
                    self.keys.append(pair[1])
                elif ok and pair[0] == "int" and _isint(pair[1]):
                    self.keys.append(pair[1])
                else:
                    raise _Corrupt(f"bad dict key {pair!r:.60} at {self.where()}")
            if len(set(self.keys)) != len(self.keys):
                raise _Corrupt(f"dict node with repeated keys at {self.where()}")

    def child_key(self, i: int) -> Any:
        return jtu.DictKey(self.keys[i]) if self.t == "dict" else jtu.SequenceKey(i)

    def where(self, extra: Any = None) -> str:
        path: list[Any] = [] if extra is None else [extra]
        f: _Frame | None = self
        while f is not None and f.key is not None:
            path.append(f.key)
            f = f.parent
        return where(tuple(reversed(path)))

    def build(self) -> Any:
        if self.t == "dict":
            return dict(zip(self.keys, self.values, strict=True))
        return self.values if self.t == "list" else tuple(self.values)


def _node_type(node: Any, at: Callable[[], str]) -> str:
    t = node.get("t") if isinstance(node, dict) else None
    if not isinstance(t, str):
        raise _Corrupt(f"a node without a type at {at()}")
    return t


def _leaf(node: dict[str, Any], t: str, arrays: list[Any], at: Callable[[], str]) -> Any:
    v: Any = node.get("v")
    if t == "array":
        i: Any = node.get("i")
        if not _isint(i) or not 0 <= i < len(arrays):
            raise _Corrupt(f"array index {i!r:.40} out of range ({len(arrays)} arrays) at {at()}")
        return arrays[i]
    if t == "none":
        return None
    if t == "bool" and isinstance(v, bool):
        return v
    if t == "int" and _isint(v):
        return v
    if t == "str" and isinstance(v, str):
        return v
    if t == "float" and (isinstance(v, float) or _isint(v) or v in _NONFINITE):
        return float(v)
    if t == "complex" and isinstance(v, list) and len(v) == 2:
        try:
            return complex(float(v[0]), float(v[1]))
        except (TypeError, ValueError):
            pass
    if t in ("bool", "int", "str", "float", "complex"):
        raise _Corrupt(f"bad {t} value {v!r:.40} at {at()}")
    raise _Corrupt(f"unknown node type {t!r:.40} at {at()}")


def _decode(root: Any, arrays: list[Any]) -> Any:
    """Rebuild the tree from its JSON form, without recursion (any depth),
    checking every node: its type, values, keys and array index."""
    t = _node_type(root, lambda: "<root>")
    if t not in _CONTAINERS:
        return _leaf(root, t, arrays, lambda: "<root>")
    stack = [_Frame(root, t, None, None)]
    while True:
        f = stack[-1]
        i = len(f.values)
        if i < len(f.nodes):
            child, key = f.nodes[i], f.child_key(i)
            ct = _node_type(child, lambda: f.where(key))  # noqa: B023 - called at once
            if ct in _CONTAINERS:
                stack.append(_Frame(child, ct, f, key))
            else:
                f.values.append(_leaf(child, ct, arrays, lambda: f.where(key)))  # noqa: B023
            continue
        value = f.build()
        stack.pop()
        if not stack:
            return value
        stack[-1].values.append(value)


def _shape(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, list) or not all(_isint(n) and n >= 0 for n in x):
        raise _Corrupt(f"{what} {x!r:.60} is not a list of non-negative ints")
    return tuple(x)


def _dtype(x: Any, what: str) -> np.dtype[Any]:
    try:
        dtype = jnp.dtype(x) if isinstance(x, str) else None
    except TypeError:
        dtype = None
    if dtype is None or not _storable(dtype):
        raise _Corrupt(f"{what} {x!r:.40} is not a numeric dtype")
    return dtype


def _check_entry(e: Any, i: int) -> dict[str, Any]:
    if not isinstance(e, dict):
        raise _Corrupt(f"array entry {i} is not an object")
    name = f"array entry {i} ({e.get('path')!r:.60})"
    kind = e.get("kind")
    if kind not in KINDS or not isinstance(e.get("path"), str):
        raise _Corrupt(f"{name}: kind {kind!r:.20} (expected one of {KINDS}) or path missing")
    shape = _shape(e.get("shape"), f"{name}: shape")
    stored_shape = _shape(e.get("stored_shape"), f"{name}: stored_shape")
    stored_dtype = _dtype(e.get("stored_dtype"), f"{name}: stored_dtype")
    if kind == "key":
        impl = e.get("impl")
        try:
            dtype = jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype
        except (TypeError, ValueError, KeyError):
            raise _Corrupt(f"{name}: unknown PRNG implementation {impl!r:.40}") from None
        if stored_shape[: len(shape)] != shape:
            raise _Corrupt(f"{name}: stored shape {stored_shape} does not start with {shape}")
    else:
        dtype = _dtype(e.get("dtype"), f"{name}: dtype")
        if stored_shape != shape or stored_dtype != dtype:
            raise _Corrupt(f"{name}: stored as {stored_shape} {stored_dtype}, not {shape} {dtype}")
    e["abstract"] = jax.ShapeDtypeStruct(shape, dtype)
    e["stored"] = jax.ShapeDtypeStruct(stored_shape, stored_dtype)
    return e


def _parse_meta(text: str, file: Path) -> dict[str, Any]:
    """The validated metadata, or a LoadError naming ``file``."""
    try:
        try:
            meta = json.loads(text)
        except RecursionError:
            raise _Corrupt("nested too deeply to be a jaxflat checkpoint") from None
        except ValueError as e:
            raise _Corrupt(f"not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise _Corrupt(f"format {got!r:.60}, expected {FORMAT!r}")
        entries = meta.get("arrays")
        if not isinstance(entries, list):
            raise _Corrupt("no list of arrays")
        meta["arrays"] = [_check_entry(e, i) for i, e in enumerate(entries)]
        if "tree" not in meta:
            raise _Corrupt("no tree")
        _decode(meta["tree"], [e["abstract"] for e in entries])
    except _Corrupt as e:
        raise LoadError(f"load: {file}: corrupt {META}: {e}") from None
    return meta  # type: ignore[no-any-return]


# ---------------------------------------------------------------- files and locks


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_PROC_FD = os.path.isdir("/proc/self/fd")


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.jaxflat-lock")


def _new_path(path: Path, token: str) -> Path:
    return path.with_name(f".{path.name}.jaxflat-new-{token}")


def _old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.jaxflat-old")


def _flock(fd: int, op: int) -> bool | None:
    """True: locked; False: busy (with LOCK_NB); None: the file system has no flock."""
    try:
        fcntl.flock(fd, op)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


@contextlib.contextmanager
def _path_lock(path: Path) -> Iterator[None]:
    """Exclusive per-path writer lock. The lock file is removed by its holder
    before release; a waiter that then gets a lock on a removed file retries."""
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(lock)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder that no longer is the checkpoint, once no reader holds
    it (waiting at most REMOVE_WAIT_S; readers of a folder deleted after that
    read again)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError:  # a file, a link: not ours to wait for
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder)
        return
    try:
        deadline = time.monotonic() + REMOVE_WAIT_S
        while _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is False and time.monotonic() < deadline:
            time.sleep(0.005)
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def _complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ARRAYS).is_dir()


def _clean(path: Path) -> None:
    """Under the writer lock: undo what killed saves left beside ``path``."""
    old = _old_path(path)
    if not os.path.lexists(path) and _complete(old):
        os.rename(old, path)  # killed between its two renames: the old checkpoint back
    elif os.path.lexists(old):
        _remove(old)
    prefix = f".{path.name}.jaxflat-new"
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path.parent):
            if name.startswith(prefix):
                _remove(path.parent / name)


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a jaxflat checkpoint; touch nothing."""
    exists = os.path.lexists(path)
    if not exists and not _complete(_old_path(path)):
        return
    if not overwrite:
        raise FileExistsError(f"save: {path} exists; pass overwrite=True to replace it")
    if not exists:
        return  # a killed save's old checkpoint, restored under the lock
    hint = "overwrite=True replaces only a jaxflat checkpoint; it was left untouched"
    if path.is_symlink():
        raise FileExistsError(f"save: {path} is a symbolic link, not a jaxflat checkpoint; {hint}")
    if not path.is_dir():
        raise FileExistsError(f"save: {path} is a file, not a jaxflat checkpoint; {hint}")
    names = set(os.listdir(path))
    others = sorted(names - {META, ARRAYS})
    if names and (META not in names or others):  # an empty folder holds nothing to lose
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        why = f"it holds {shown}" if others else f"no {META} inside"
        raise FileExistsError(
            f"save: {path} is a folder but not a jaxflat checkpoint ({why}); {hint}"
        )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _token() -> str:
    """A name for this save's folder, the same on every process."""
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


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _write_arrays(folder: Path, items: dict[str, Any]) -> None:
    ckptr = _checkpointer()
    try:
        ckptr.save(folder, items)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def _swap(new: Path, path: Path) -> Path | None:
    """Put ``new`` at ``path`` atomically; returns where the old one now is."""
    if not os.path.lexists(path):
        if not _renameat2(new, path, _RENAME_NOREPLACE):
            os.rename(new, path)
        return None
    if _renameat2(new, path, _RENAME_EXCHANGE):
        return new
    old = _old_path(path)  # no renameat2: two renames; readers in the gap read `old`
    os.rename(path, old)
    os.rename(new, path)
    return old


def save(path: str | os.PathLike[str], tree: Any, /, *, overwrite: bool = False) -> None:
    """Write ``state(tree)`` to the folder ``path`` with orbax-checkpoint.

    Atomic: the checkpoint is written beside ``path`` in a folder of its own
    and swapped into place in one rename, so a crash at any moment leaves the
    old checkpoint or the new one, never a torn one, and a failed save (a
    full disk, an error, Ctrl-C) removes what it wrote. Saves to one path
    from several processes or threads take turns (a lock file
    ``.NAME.jaxflat-lock`` beside ``path`` exists while one runs); a
    concurrent :func:`load` reads one whole checkpoint. Integer dict keys,
    tuples, None, strings and Python numbers come back from :func:`load` as
    they went in; PRNG keys come back bit-exactly; zero-size arrays too.

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
    _check_target(path, overwrite)  # every process sees the same folder: all raise alike
    arrays: list[Any] = []
    entries: list[dict[str, Any]] = []
    structure = _encode(state(tree), (), arrays, entries)
    meta = {"format": FORMAT, "tree": structure, "arrays": entries}
    items = {f"a{i}": a for i, a in enumerate(arrays) if a.size}
    leader = jax.process_index() == 0
    if leader:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _path_lock(path) if leader else contextlib.nullcontext():
        if leader:
            _check_target(path, overwrite)  # again, now that no other save runs
            _clean(path)
        new = _new_path(path, _token())
        try:
            if leader:
                new.mkdir()
            _sync("jaxflat.save.start")
            if items:
                _write_arrays(new / ARRAYS, items)
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
                old = _swap(new, path)
                _fsync_dir(path.parent)
                if old is not None:
                    _remove(old)
        except BaseException as e:
            if leader:
                old = _old_path(path)
                with contextlib.suppress(OSError):
                    if not os.path.lexists(path) and _complete(old):
                        os.rename(old, path)  # failed between the two renames
                _remove(new)
            if isinstance(e, Exception) and _no_space(e):
                first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                raise OSError(
                    errno.ENOSPC,
                    f"save: no space left on device while writing {path}; the partial "
                    f"checkpoint was removed and the old one, if any, kept ({first})",
                ) from e
            raise
    _sync("jaxflat.save.done")


# ---------------------------------------------------------------- reading


def _open(path: Path) -> tuple[int, Path]:
    """Open the checkpoint folder (or, in a save's two-rename gap, the old one)."""
    for folder in (path, _old_path(path)):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise FileNotFoundError(f"load: {path} is not a checkpoint folder") from None
        try:
            os.stat(META, dir_fd=fd)
            if not stat.S_ISDIR(os.stat(ARRAYS, dir_fd=fd).st_mode):
                raise NotADirectoryError
        except (FileNotFoundError, NotADirectoryError):
            os.close(fd)
            if folder == path:
                raise FileNotFoundError(
                    f"load: {path} is not a jaxflat checkpoint (no {META} and {ARRAYS}/ inside)"
                ) from None
            continue
        return fd, folder
    raise FileNotFoundError(f"load: no checkpoint at {path}")


def _same(fd: int, folder: Path) -> bool:
    """Is ``folder`` still the open folder ``fd``?"""
    try:
        a, b = os.fstat(fd), os.stat(folder)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(path: Path, fn: Callable[[Path], R]) -> R:
    """Call ``fn(base)`` with ``base`` a path to one whole checkpoint folder,
    read again if a concurrent save replaced it meanwhile."""
    for attempt in range(READ_RETRIES):
        if attempt:
            time.sleep(min(0.002 * attempt, 0.05))
        try:
            fd, folder = _open(path)
        except FileNotFoundError:
            if attempt + 1 < READ_RETRIES and os.path.exists(_lock_path(path)):
                continue  # a save without renameat2 may be between its two renames
            raise
        try:
            locked = _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if locked is False or not _same(fd, folder):
                continue  # being deleted, or replaced since it was opened
            pinned = _PROC_FD and jax.process_count() == 1
            base = Path(f"/proc/self/fd/{fd}") if pinned else folder
            try:
                result = fn(base)
            except Exception:
                if not _same(fd, folder):
                    continue
                raise
            if pinned or _same(fd, folder):
                return result
        finally:
            os.close(fd)
    raise LoadError(
        f"load: {path}: the checkpoint was replaced by other saves while it was read, "
        f"{READ_RETRIES} times; try again"
    )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's structure, from its JSON alone (no array data),
    validated: every array entry parsed, every reference in range."""
    p = Path(path).absolute()

    def meta_of(base: Path) -> dict[str, Any]:
        meta = _parse_meta((base / META).read_text(errors="replace"), p / META)
        meta["folder"] = str(p)
        return meta

    return _read(p, meta_of)


def _zeros(target: jax.ShapeDtypeStruct) -> Any:
    """A zero-size array (never stored by Orbax) for ``target``."""
    x = np.zeros(target.shape, target.dtype)
    sharding = target.sharding
    if sharding is None:
        return x
    return jax.make_array_from_callback(target.shape, sharding, lambda idx: x[idx])


def load(path: str | os.PathLike[str], /, like: Any = None) -> Any:
    """Read a checkpoint written by :func:`save`.

    A save running at the same time never mixes into what is read: the
    result is the whole checkpoint from before it or from after it.

    Args:
      path: the checkpoint folder.
      like: optional model (or its ``jax.eval_shape`` / ``nnx.eval_shape``
        form) that decides shapes, dtypes and shardings; the result is then
        ``loadmodel(like, restored)``: a model, not a state.

    Returns:
      The state as saved, or a model shaped like ``like``.

    Raises:
      FileNotFoundError: no checkpoint (or an unfinished one) at ``path``.
      LoadError: a corrupt checkpoint (malformed ``jaxflat.json``: the
        message names the file and the bad entry), or one that does not fit
        ``like`` (every mismatching key path is listed, before any data is
        read).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxflat
      >>> d = tempfile.mkdtemp()
      >>> jaxflat.save(f"{d}/ckpt", {"w": jnp.ones(2, jnp.float32), "e": jnp.zeros((0, 3))})
      >>> jaxflat.load(f"{d}/ckpt", like={"w": jnp.zeros(2, jnp.bfloat16), "e": jnp.zeros((0, 3))})
      {'e': Array([], shape=(0, 3), dtype=float32), 'w': Array([1, 1], dtype=bfloat16)}
    """
    p = Path(path).absolute()
    tree = _read(p, lambda base: _load_from(base, p, like))
    return tree if like is None else loadmodel(like, tree)


def _load_from(base: Path, path: Path, like: Any) -> Any:
    meta = _parse_meta((base / META).read_text(errors="replace"), path / META)
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
    items = {f"a{i}": t for i, t in enumerate(targets) if math.prod(t.shape)}
    try:
        restored = _checkpointer().restore(base / ARRAYS, items) if items else {}
    except Exception as e:  # Orbax / tensorstore: truncated or missing files
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise LoadError(f"load: {path}: corrupt or incomplete checkpoint: {msg}") from e
    arrays = [restored[f"a{i}"] if f"a{i}" in items else _zeros(t) for i, t in enumerate(targets)]
    for i, entry in enumerate(entries):
        if entry["kind"] == "key":
            arrays[i] = jax.random.wrap_key_data(arrays[i], impl=entry["impl"])
    return _decode(meta["tree"], arrays)
