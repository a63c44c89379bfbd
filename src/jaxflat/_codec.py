"""A checkpoint's description: the state's structure as JSON, and hashes.

``encode`` turns a state into JSON-able nodes (container types, dict keys with
their types, Python scalars, strings, None) plus a list of array entries
(key path, Orbax key, shape, dtype, kind, hash); ``decode`` rebuilds the tree
from them without recursion, validating every node. ``dumps`` / ``loads``
write and read the whole description with a SHA-256 of its own text; ``digest``
is the hash of an array's bytes. Nothing here touches the file system.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from ._errors import where

FORMAT = "jaxflat-checkpoint/2"
KINDS = ("jax", "numpy", "key")
HASH_BLOCK = 64 * 2**20  # bytes per host copy when hashing a sharded array


class Corrupt(ValueError):
    """Malformed description; the caller turns it into a LoadError naming the file."""


# ---------------------------------------------------------------- hashing
# An array's hash is a multilinear hash mod 2**64 of its bytes in C order:
# the bytes, read as little-endian 64-bit words w_i (the last zero-padded)
# in segments of SEGMENT words, give sum_j c_j * sum_i k_i * w_ji with fixed
# odd keys k_i (splitmix64) and odd segment weights c_j, xor the byte
# length. numpy's uint64 dot runs it at about 3x zlib's CRC-32 (measured on
# 400 MB: 0.083 s against 0.264 s), the only way found to keep the check
# under 10% of a load. Every single-bit (indeed single-word) change alters
# it, because k_i and c_j are odd; so do moved words, segments and a
# changed length, except with chance ~2**-64 for random damage. It is no
# defence against deliberate tampering (see README).

_MASK = 2**64 - 1
SEGMENT = 1 << 16  # 64-bit words (512 KiB) per segment: fits a core's L2 cache


def _splitmix64(n: int) -> Any:
    """The first ``n`` outputs of splitmix64 (seed 0), made odd: fixed
    keys that no numpy version can change."""
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) | np.uint64(1)


_KEYS = _splitmix64(SEGMENT)


class Hasher:
    """The hash of a byte stream fed in pieces of any size (``update``),
    equal to that of the whole (``digest``)."""

    def __init__(self) -> None:
        self.value = self.segments = self.length = 0
        self.pending = np.empty(0, np.uint8)

    def _segment(self, words: Any) -> None:
        dot = int(np.dot(words, _KEYS[: words.size]))
        weight = (2 * self.segments + 1) * 0xD6E8FEB86659FD93
        self.value = (self.value + weight * dot) & _MASK
        self.segments += 1

    def update(self, data: Any) -> None:
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.length += data.size
        full = 8 * SEGMENT
        if self.pending.size:  # complete the segment begun by the last piece
            take = full - self.pending.size
            self.pending, data = np.concatenate([self.pending, data[:take]]), data[take:]
            if self.pending.size < full:
                return
            self._segment(self.pending.view("<u8"))
        n = data.size // full * full
        for a in range(0, n, full):
            self._segment(data[a : a + full].view("<u8"))
        self.pending = data[n:].copy()

    def digest(self) -> int:
        if self.pending.size:
            last = np.zeros(-(-self.pending.size // 8) * 8, np.uint8)
            last[: self.pending.size] = self.pending
            self._segment(last.view("<u8"))
            self.pending = np.empty(0, np.uint8)
        return (self.value ^ (self.length * 0x9E3779B97F4A7C15)) & _MASK


def digest(x: Any) -> int | None:
    """The hash of an array's bytes in C order (numpy releases the GIL in
    its dot, so arrays are hashed in parallel threads).

    A jax array is read shard by shard (never gathered, and no host copy is
    left cached on it): shards split along the first axis are hashed in
    order as they are; others are assembled a block of at most HASH_BLOCK
    bytes of rows at a time. An array spread over several processes is not
    hashed (None).

    Example:
      >>> import numpy as np
      >>> a = np.arange(6.0).reshape(2, 3)
      >>> digest(a) == digest(a.copy()) != digest(a.T.copy())
      True
    """
    h = Hasher()
    if isinstance(x, np.ndarray):
        h.update(x)
        return h.digest()
    if not x.is_fully_addressable:
        return None
    pieces: dict[tuple[tuple[int, int], ...], Any] = {}
    for shard in x.addressable_shards:  # replicas once
        index = tuple(sl.indices(n)[:2] for sl, n in zip(shard.index, x.shape, strict=True))
        pieces.setdefault(index, shard)
    if x.ndim == 0:
        h.update(np.asarray(next(iter(pieces.values())).data))
        return h.digest()
    for rows in sorted({k[0] for k in pieces}):
        group = [(k, np.asarray(s.data)) for k, s in pieces.items() if k[0] == rows]
        if len(group) == 1:  # whole rows: already in C order
            h.update(group[0][1])
            continue
        step = max(1, HASH_BLOCK // max(1, x.dtype.itemsize * math.prod(x.shape[1:])))
        for a in range(0, rows[1] - rows[0], step):
            block = np.empty((min(step, rows[1] - rows[0] - a), *x.shape[1:]), x.dtype)
            for k, host in group:
                block[(slice(None), *(slice(*r) for r in k[1:]))] = host[a : a + step]
            h.update(block)
    return h.digest()


def dumps(meta: dict[str, Any]) -> str:
    """The description as canonical JSON, with the SHA-256 of that text inside."""
    body = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({**meta, "sha256": digest}, sort_keys=True, separators=(",", ":"))


def loads(text: str, verify: bool = True) -> dict[str, Any]:
    """Parse and validate a description; with ``verify``, check its SHA-256."""
    try:
        meta = json.loads(text)
    except RecursionError:
        raise Corrupt("nested too deeply to be a jaxflat checkpoint") from None
    except ValueError as e:
        raise Corrupt(f"not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise Corrupt(f"format {got!r:.60}, expected {FORMAT!r}")
    digest = meta.pop("sha256", None)
    if verify:
        body = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        if digest != hashlib.sha256(body.encode()).hexdigest():
            raise Corrupt("its SHA-256 does not match its text (the file was changed or damaged)")
    entries = meta.get("arrays")
    if not isinstance(entries, list):
        raise Corrupt("no list of arrays")
    meta["arrays"] = [_check_entry(e, i) for i, e in enumerate(entries)]
    if "tree" not in meta:
        raise Corrupt("no tree")
    decode(meta["tree"], [e["abstract"] for e in entries])
    return meta


# ---------------------------------------------------------------- encoding


def storable(dtype: np.dtype[Any]) -> bool:
    """Numbers and bools (bfloat16, float8, int4 included); not object,
    structured, string, void or datetime arrays, which Orbax cannot store."""
    return dtype.fields is None and (
        dtype == np.bool_ or bool(jax.dtypes.issubdtype(dtype, np.number))
    )


def _plain_key(k: Any, path: tuple[Any, ...]) -> str | int:
    """A dict key as the plain str or int it equals (np.str_, IntEnum, str Enum)."""
    if isinstance(k, str):
        return str.__str__(k)
    if isinstance(k, int) and not isinstance(k, bool):
        return int(k)
    raise TypeError(f"save: {where(path)}: dict key {k!r} is not a str or int")


def orbax_name(k: str | int) -> str:
    """A key as an Orbax tree key: itself, with '%', '.' and '/' escaped
    (Orbax joins a leaf's keys with '.'), and '' as '%'. One-to-one on str;
    an int and its str cannot share a dict (jax cannot sort such keys)."""
    name = re.sub(r"[%./]", lambda m: f"%{ord(m[0]):02X}", str(k))
    return name or "%"


def encode(
    x: Any,
    path: tuple[Any, ...],
    arrays: list[Any],
    entries: list[dict[str, Any]],
    okey: tuple[str, ...] = (),
) -> Any:
    if isinstance(x, dict):
        keys = [_plain_key(k, (*path, jtu.DictKey(k))) for k in x]
        names = [orbax_name(k) for k in keys]
        return {
            "t": "dict",
            "k": [[type(k).__name__, k] for k in keys],
            "v": [
                encode(v, (*path, jtu.DictKey(k)), arrays, entries, (*okey, n))
                for k, n, v in zip(keys, names, x.values(), strict=True)
            ],
        }
    if isinstance(x, list | tuple):
        return {
            "t": type(x).__name__,
            "v": [
                encode(c, (*path, jtu.SequenceKey(i)), arrays, entries, (*okey, str(i)))
                for i, c in enumerate(x)
            ],
        }
    if isinstance(x, jax.Array | np.ndarray):
        entry: dict[str, Any] = {"path": where(path), "key": list(okey), "shape": list(x.shape)}
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            entry.update(kind="key", impl=str(jax.random.key_impl(x)), dtype="key")
            x = jax.random.key_data(x)
        elif not storable(x.dtype):
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
        return {"t": "int", "v": int(x)}
    if isinstance(x, float):
        return {"t": "float", "v": float(x) if math.isfinite(x) else repr(x)}
    if isinstance(x, complex):
        return {"t": "complex", "v": [repr(x.real), repr(x.imag)]}
    if isinstance(x, str):
        return {"t": "str", "v": str.__str__(x)}
    raise TypeError(f"save: {where(path)}: cannot store a {type(x).__name__}")


# ---------------------------------------------------------------- decoding (iterative, validating)


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
            raise Corrupt(f"{t} node without a list of values at {self.where()}")
        self.nodes: list[Any] = nodes
        self.keys: list[Any] = []
        if t == "dict":
            pairs = node.get("k")
            if not isinstance(pairs, list):
                raise Corrupt(f"dict node without a list of keys at {self.where()}")
            if len(pairs) != len(nodes):
                raise Corrupt(
                    f"dict node with {len(pairs)} keys and {len(nodes)} values at {self.where()}"
                )
            for pair in pairs:
                ok = isinstance(pair, list) and len(pair) == 2
                if ok and pair[0] == "str" and isinstance(pair[1], str):
                    self.keys.append(pair[1])
                elif ok and pair[0] == "int" and _isint(pair[1]):
                    self.keys.append(pair[1])
                else:
                    raise Corrupt(f"bad dict key {pair!r:.60} at {self.where()}")
            if len(set(self.keys)) != len(self.keys):
                raise Corrupt(f"dict node with repeated keys at {self.where()}")

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
        raise Corrupt(f"a node without a type at {at()}")
    return t


def _leaf(node: dict[str, Any], t: str, arrays: list[Any], at: Callable[[], str]) -> Any:
    v: Any = node.get("v")
    if t == "array":
        i: Any = node.get("i")
        if not _isint(i) or not 0 <= i < len(arrays):
            raise Corrupt(f"array index {i!r:.40} out of range ({len(arrays)} arrays) at {at()}")
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
        raise Corrupt(f"bad {t} value {v!r:.40} at {at()}")
    raise Corrupt(f"unknown node type {t!r:.40} at {at()}")


def decode(root: Any, arrays: list[Any]) -> Any:
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
        raise Corrupt(f"{what} {x!r:.60} is not a list of non-negative ints")
    return tuple(x)


def _dtype(x: Any, what: str) -> np.dtype[Any]:
    try:
        dtype = jnp.dtype(x) if isinstance(x, str) else None
    except TypeError:
        dtype = None
    if dtype is None or not storable(dtype):
        raise Corrupt(f"{what} {x!r:.40} is not a numeric dtype")
    return dtype


def _check_entry(e: Any, i: int) -> dict[str, Any]:
    if not isinstance(e, dict):
        raise Corrupt(f"array entry {i} is not an object")
    name = f"array entry {i} ({e.get('path')!r:.60})"
    kind = e.get("kind")
    if kind not in KINDS or not isinstance(e.get("path"), str):
        raise Corrupt(f"{name}: kind {kind!r:.20} (expected one of {KINDS}) or path missing")
    key = e.get("key")
    if not isinstance(key, list) or not all(isinstance(k, str) and k for k in key):
        raise Corrupt(f"{name}: Orbax key {key!r:.60} is not a list of names")
    if not (e.get("hash") is None or _isint(e.get("hash"))):
        raise Corrupt(f"{name}: hash {e.get('hash')!r:.20} is not an int")
    shape = _shape(e.get("shape"), f"{name}: shape")
    stored_shape = _shape(e.get("stored_shape"), f"{name}: stored_shape")
    stored_dtype = _dtype(e.get("stored_dtype"), f"{name}: stored_dtype")
    if kind == "key":
        impl = e.get("impl")
        if not isinstance(impl, str):
            raise Corrupt(f"{name}: a PRNG key without its implementation (impl {impl!r:.40})")
        try:
            dtype = jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype
        except (TypeError, ValueError, KeyError):
            raise Corrupt(f"{name}: unknown PRNG implementation {impl!r:.40}") from None
        if stored_shape[: len(shape)] != shape:
            raise Corrupt(f"{name}: stored shape {stored_shape} does not start with {shape}")
    else:
        dtype = _dtype(e.get("dtype"), f"{name}: dtype")
        if stored_shape != shape or stored_dtype != dtype:
            raise Corrupt(f"{name}: stored as {stored_shape} {stored_dtype}, not {shape} {dtype}")
    e["abstract"] = jax.ShapeDtypeStruct(shape, dtype)
    e["stored"] = jax.ShapeDtypeStruct(stored_shape, stored_dtype)
    return e
