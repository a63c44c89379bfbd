"""What the benchmark sections share: workloads, baselines, timing, child
processes, memory readings, the report. jaxflat's public API only."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

HERE = Path(__file__).resolve().parent
MARK = "BENCH_CHILD_JSON "
Fns = dict[str, Callable[[], Any] | None]


def build(spec: str, seed: int = 0) -> Any:
    """``mlp:N:P``: a dict of N/2 layers ``{w: (k, k), b: (k,)}``, about P float32
    parameters; ``nnx:N:P``: an ``nnx.Sequential`` of N/2 ``nnx.Linear(k, k)``."""
    kind, leaves, params = spec.split(":")
    layers = max(1, int(leaves) // 2)
    k = max(1, round((-1 + math.sqrt(1 + 4 * float(params) / layers)) / 2))
    if kind == "nnx":
        from flax import nnx

        rngs = nnx.Rngs(seed)
        return nnx.Sequential(*[nnx.Linear(k, k, rngs=rngs) for _ in range(layers)])
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    return {f"layer{i:05d}": {"w": normal(k, k), "b": normal(k)} for i in range(layers)}


def describe(tree: Any) -> tuple[int, int]:
    """(leaf count, parameter count)."""
    leaves = jax.tree.leaves(tree)
    return len(leaves), sum(int(np.size(x)) for x in leaves)


def sq_loss(tree: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


class Floor:
    """The baselines for one tree: ``jit``, the best jitted concat / split (compiled
    here, before any timing: the floor); ``ravel``, eager ``ravel_pytree`` and its
    unravel; ``copy``, a numpy copy of as many bytes as the flat vector."""

    def __init__(self, tree: Any, jit: bool = True) -> None:
        leaves, treedef = jax.tree.flatten(tree)
        shapes, dtypes = [x.shape for x in leaves], [x.dtype for x in leaves]
        sizes = [math.prod(s) for s in shapes]
        dtype = jnp.result_type(*dtypes)
        self.tree = tree
        self.vector = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
        self.buffer = np.ones(self.vector.nbytes, np.uint8)  # touched: resident

        def concat(t: Any) -> jax.Array:
            return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(t)])

        def split(v: jax.Array) -> Any:
            pieces = zip(jax.lax.split(v, sizes), shapes, dtypes, strict=True)
            return treedef.unflatten([p.reshape(s).astype(d) for p, s, d in pieces])

        self.jit_concat = self.jit_split = None
        if jit:
            self.jit_concat, self.jit_split = jax.jit(concat), jax.jit(split)
            jax.block_until_ready((self.jit_concat(tree), self.jit_split(self.vector)))

    def flatten(self) -> Fns:
        jc, tree = self.jit_concat, self.tree
        return {
            "ravel": lambda: ravel_pytree(tree)[0],
            "jit": None if jc is None else (lambda: jc(tree)),
            "copy": self.buffer.copy,
        }

    def rebuild(self, ravel: bool = True) -> Fns:
        js, v = self.jit_split, self.vector
        unravel = ravel_pytree(self.tree)[1] if ravel else None
        return {
            "ravel": None if unravel is None else (lambda: unravel(v)),
            "jit": None if js is None else (lambda: js(v)),
            "copy": self.buffer.copy,
        }


# --------------------------------------------------------------------------- timing


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call, its result blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def medians(fns: Fns, reps: int, warmup: int = 2, sample_s: float = 0.002) -> dict[str, Any]:
    """Median seconds per call of each callable (``None``: skipped) after ``warmup``
    calls. Rounds are interleaved, the starting callable rotating, so that drifts
    in machine speed hit all alike; a sample loops a fast call for ~``sample_s``."""
    live = {k: f for k, f in fns.items() if f is not None}
    inner = {}
    for k, f in live.items():
        for _ in range(warmup):
            jax.block_until_ready(f())
        inner[k] = max(1, min(1000, int(sample_s / max(timed(f), 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in live}
    names = list(live)
    for r in range(reps):
        gc.collect()
        gc.disable()
        try:
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(inner[k]):
                    jax.block_until_ready(live[k]())
                samples[k].append((time.perf_counter() - t0) / inner[k])
        finally:
            gc.enable()
    return {k: statistics.median(samples[k]) if k in samples else None for k in fns}


def warm_backend() -> None:
    """Start the backend and XLA with an unrelated tiny program, so that a cold
    timing counts what a new structure costs, not JAX's own start-up."""
    jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)))


def rss_mib() -> dict[str, float]:
    """Current RSS (``VmRSS``) and peak (``VmHWM``; ``ru_maxrss`` off Linux), MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.setdefault("VmHWM", peak / 2**20 if sys.platform == "darwin" else peak / 1024)
    return out


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- children


def emit(obj: dict[str, Any]) -> None:
    """A child's result: the parent keeps the last line so marked."""
    print(MARK + json.dumps(obj), flush=True)


def child_cmd(target: str, arg: dict[str, Any]) -> list[str]:
    """``bench.py --child module:function`` (``function(**arg)`` in a fresh process;
    it inherits the environment, so ``--jaxflat-src`` and ``JAX_PLATFORMS``)."""
    return [sys.executable, str(HERE / "bench.py"), "--child", target, "--arg", json.dumps(arg)]


def spawn(target: str, arg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a child that leaves with ``os._exit`` (nothing the library left running
    delays the next one); its last result, ``status``: ok, error or killed."""
    cmd = [*child_cmd(target, arg), "--hard-exit"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = "ok"
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        status = f"killed at {timeout:.0f} s"
    found = [json.loads(s[len(MARK) :]) for s in stdout.splitlines() if s.startswith(MARK)]
    if status == "ok" and proc.returncode != 0:
        status = "error"
        log(f"child {target} {arg} failed (rc {proc.returncode}):\n{stderr[-2000:]}")
    return {**(found[-1] if found else {}), "status": status}


# --------------------------------------------------------------------------- report


def ms(s: Any) -> str:
    if not isinstance(s, float | int):
        return "n/a" if s is None else str(s)
    v = s * 1e3
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def x(a: Any, b: Any) -> str:
    """The ratio a / b as ``1.23x``; ``n/a`` if either is missing."""
    if not isinstance(a, float | int) or not isinstance(b, float | int) or not b:
        return "n/a"
    r = a / b
    return f"{r:.2g}x" if r < 0.1 else f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


RATIO_HEADERS = ["jf/ravel", "jf/jit", "jf/copy"]


def ratios(jf: Any, res: dict[str, Any]) -> list[str]:
    """jaxflat's time over ravel's, the jitted floor's and the copy's."""
    return [x(jf, res.get("ravel")), x(jf, res.get("jit")), x(jf, res.get("copy"))]


class Report:
    """Markdown to stdout (and ``--markdown PATH``, kept current), data for JSON."""

    def __init__(self, md_path: Path | None) -> None:
        self.lines: list[str] = []
        self.md_path = md_path
        self.data: dict[str, Any] = {"sections": {}}

    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        if self.md_path is not None:
            self.md_path.write_text("\n".join(self.lines) + "\n")

    def section(self, title: str, text: str) -> None:
        self.out(f"## {title}\n\n{text}\n")

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.out("| " + " | ".join(headers) + " |")
        self.out("|---" + "|---:" * (len(headers) - 1) + "|")
        for row in rows:
            self.out("| " + " | ".join(row) + " |")
        self.out()


def machine_info() -> dict[str, Any]:
    import importlib.metadata
    import platform

    import jaxflat

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (
                s.split(":", 1)[1].strip()
                for s in open("/proc/cpuinfo")
                if s.startswith("model name")
            ),
            cpu,
        )
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    src = Path(jaxflat.__file__).resolve().parent
    git = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a, "--", "."], cwd=src, capture_output=True, text=True
    ).stdout.strip()
    commit = git("log", "-1", "--format=%h %s") or "?"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "os": platform.platform(),
        "backend": f"{jax.default_backend()} ({', '.join(str(d) for d in jax.devices())})",
        "versions": versions,
        "jaxflat": f"{src} @ {commit}" + (" (modified)" if git("status", "--porcelain") else ""),
    }


def loadavg() -> tuple[float, ...] | None:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None
