#!/usr/bin/env python
"""Benchmarks for jaxflat against the usual ways of flattening a JAX pytree.

Contenders (all in one process, their repetitions interleaved, medians reported):

* ``jaxflat``: ``flat, re = jaxflat.destructure(tree)`` and ``re(flat)``.
* ``ravel``: ``jax.flatten_util.ravel_pytree`` called eagerly, and its ``unravel``.
* ``jit``: the best hand-written jitted code, ``jax.jit`` of
  ``jnp.concatenate([x.ravel() ...])`` and of a ``lax.split`` + reshape.
* ``numpy``: a floor: ``np.concatenate`` of the leaves' numpy views, and
  ``np.split`` into views + a copy of each piece for the rebuild.
* ``torch``: ``parameters_to_vector`` / ``vector_to_parameters``, only when
  ``import torch`` works.

Sections: (1) hot flatten/rebuild, (2) cold first call of a new structure in a
fresh subprocess, (3) eager ``jax.grad`` through ``re``, (4) compile time of
``jax.jit(loss . re)``, (5) Hessian and Hessian-vector products, (6) peak RSS
growth at 1e8 parameters (``--full``), (7) loadmodel and save/load against Orbax.

Run ``python benchmarks/bench.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxflat

HERE = Path(__file__).resolve().parent
SECTIONS = ("hot", "cold", "grad", "compile", "hessian", "memory", "checkpoint")
MARK = "BENCH_CHILD_JSON "
# Above this many leaves the eager ravel gradient and the jitted ravel compiles
# are skipped (each costs minutes there and only repeats what 1000 leaves show).
SLOW_LEAVES = 1000

# --------------------------------------------------------------------------- modes


@dataclass
class Mode:
    name: str
    leaves: list[int]  # MLP leaf counts of the hot section
    params: list[float]  # MLP sizes of the hot section
    reps: int  # interleaved repetitions per hot measurement
    target_s: float  # each hot sample loops the call for about this long
    extra_params: float  # the one size of the mixed, NNX, cold, grad and compile workloads
    mixed_leaves: int
    nnx_leaves: list[int]  # NNX models of the hot section
    nnx_other: list[int]  # NNX models of the grad and compile sections
    cold_leaves: list[int]
    cold_who: tuple[str, ...]
    cold_nnx: bool
    grad_leaves: list[int]
    compile_leaves: list[int]
    compile_reps: int
    compile_warm: bool  # an uncounted first round of compiles
    compile_large_leaves: int  # from this many leaves on: one compile per contender
    hessian_leaves: int
    hessian_full: bool  # eager Hessians (slow first call) and the ravel column
    checkpoint_leaves: int
    memory: bool
    cold_timeout_s: float
    ravel_max_leaves: int  # ravel's rebuild (hot and cold) above this leaf count: skipped


ALL_WHO = ("jaxflat", "ravel", "jit")
MODES = {
    "quick": Mode(
        "quick",
        leaves=[10, 100],
        params=[1e4],
        reps=5,
        target_s=0.002,
        extra_params=1e4,
        mixed_leaves=10,
        nnx_leaves=[10],
        nnx_other=[10],
        cold_leaves=[100],
        cold_who=("jaxflat", "ravel"),
        cold_nnx=False,
        grad_leaves=[10],
        compile_leaves=[10],
        compile_reps=1,
        compile_warm=False,
        compile_large_leaves=1000,
        hessian_leaves=10,
        hessian_full=False,
        checkpoint_leaves=10,
        memory=False,
        cold_timeout_s=60,
        ravel_max_leaves=100,
    ),
    "default": Mode(
        "default",
        leaves=[10, 100, 1000],
        params=[1e4, 1e6],
        reps=15,
        target_s=0.005,
        extra_params=1e6,
        mixed_leaves=100,
        nnx_leaves=[100, 1000],
        nnx_other=[100],
        cold_leaves=[10, 100, 1000],
        cold_who=ALL_WHO,
        cold_nnx=True,
        grad_leaves=[10, 100, 1000],
        compile_leaves=[10, 100, 1000],
        compile_reps=3,
        compile_warm=True,
        compile_large_leaves=1000,
        hessian_leaves=100,
        hessian_full=True,
        checkpoint_leaves=100,
        memory=False,
        cold_timeout_s=120,
        ravel_max_leaves=1000,
    ),
    "full": Mode(
        "full",
        leaves=[10, 100, 1000, 10000],
        params=[1e4, 1e6, 1e8],
        reps=21,
        target_s=0.01,
        extra_params=1e6,
        mixed_leaves=100,
        nnx_leaves=[100, 1000],
        nnx_other=[100, 1000],
        cold_leaves=[10, 100, 1000, 10000],
        cold_who=ALL_WHO,
        cold_nnx=True,
        grad_leaves=[10, 100, 1000, 10000],
        compile_leaves=[10, 100, 1000, 10000],
        compile_reps=3,
        compile_warm=True,
        compile_large_leaves=1000,
        hessian_leaves=100,
        hessian_full=True,
        checkpoint_leaves=100,
        memory=True,
        cold_timeout_s=240,
        ravel_max_leaves=10000,
    ),
}

# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """``mlp``: a dict of layers {w: (k, k), b: (k,)} (``leaves`` leaves, ~``params``
    parameters, all float32); ``mixed``: the same with every other layer bfloat16;
    ``nnx``: an ``nnx.Sequential`` of ``leaves // 2`` ``nnx.Linear(k, k)`` layers."""

    kind: str
    leaves: int
    params: float

    @property
    def layers(self) -> int:
        return max(1, self.leaves // 2)

    @property
    def k(self) -> int:
        per_layer = self.params / self.layers  # k * k + k
        return max(1, round((-1 + math.sqrt(1 + 4 * per_layer)) / 2))

    @property
    def nparams(self) -> int:
        return self.layers * (self.k * self.k + self.k)

    @property
    def name(self) -> str:
        return f"{self.kind} {2 * self.layers}x{fmt_count(self.nparams)}"

    def spec(self) -> str:
        return f"{self.kind}:{self.leaves}:{self.params:g}"

    @staticmethod
    def parse(s: str) -> Workload:
        kind, leaves, params = s.split(":")
        return Workload(kind, int(leaves), float(params))

    def build(self, seed: int = 0) -> Any:
        k, rng = self.k, np.random.default_rng(seed)
        scale = 1.0 / math.sqrt(k)
        if self.kind == "nnx":
            from flax import nnx

            rngs = nnx.Rngs(seed)
            return nnx.Sequential(*[nnx.Linear(k, k, rngs=rngs) for _ in range(self.layers)])
        tree = {}
        for i in range(self.layers):
            dt = jnp.bfloat16 if self.kind == "mixed" and i % 2 else jnp.float32
            w = rng.standard_normal((k, k), dtype=np.float32) * np.float32(scale)
            b = rng.standard_normal((k,), dtype=np.float32) * np.float32(0.1)
            tree[f"layer{i:05d}"] = {"w": jnp.asarray(w, dt), "b": jnp.asarray(b, dt)}
        return jax.block_until_ready(tree)


def fmt_count(n: float) -> str:
    """9900 -> 9.9e3, 1e6 -> 1e6, 1050000 -> 1.05e6, 420 -> 420."""
    if n < 1000:
        return str(int(n))
    e = int(math.floor(math.log10(n)))
    return f"{n / 10**e:.3g}e{e}"


# --------------------------------------------------------------------------- contenders


def sq_loss(tree: Any) -> jax.Array:
    """sum(leaf ** 2) over every leaf, in float32."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


class Plan:
    """What the hand-written baselines precompute once per structure (as ``re`` does)."""

    def __init__(self, tree: Any) -> None:
        leaves, self.treedef = jax.tree.flatten(tree)
        self.shapes = [tuple(x.shape) for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.cumsum(self.sizes)[:-1].tolist()
        self.dtype = jnp.result_type(*self.dtypes)

    # jitted baselines --------------------------------------------------------
    def jit_concat(self) -> Callable[[Any], jax.Array]:
        dtype = self.dtype

        def concat(tree: Any) -> jax.Array:
            return jnp.concatenate([x.ravel().astype(dtype) for x in jax.tree.leaves(tree)])

        return jax.jit(concat)

    def jit_split(self) -> Callable[[jax.Array], Any]:
        def split(v: jax.Array) -> Any:
            pieces = jax.lax.split(v, self.sizes)
            return self.treedef.unflatten(
                [p.reshape(s).astype(d) for p, s, d in zip(pieces, self.shapes, self.dtypes)]
            )

        return jax.jit(split)

    # numpy floor -------------------------------------------------------------
    def np_concat(self, tree: Any) -> np.ndarray:
        views = [np.asarray(x).reshape(-1) for x in jax.tree.leaves(tree)]
        return np.concatenate(views, dtype=self.dtype)

    def np_split(self, v: Any) -> Any:
        pieces = np.split(np.asarray(v), self.offsets)
        return self.treedef.unflatten(
            [p.reshape(s).astype(d, copy=True) for p, s, d in zip(pieces, self.shapes, self.dtypes)]
        )


def _torch() -> Any:
    try:
        import torch
        from torch.nn.utils import parameters_to_vector, vector_to_parameters
    except Exception:  # any failure (missing, broken install) means "no torch"
        return None
    return torch, parameters_to_vector, vector_to_parameters


def flatten_fns(tree: Any, plan: Plan, with_torch: bool = True) -> dict[str, Any]:
    """name -> zero-argument callable returning the flat vector (blocked)."""
    jc = plan.jit_concat()
    fns: dict[str, Any] = {
        "jaxflat": lambda: jax.block_until_ready(jaxflat.destructure(tree)[0]),
        "ravel": lambda: jax.block_until_ready(ravel_pytree(tree)[0]),
        "jit": lambda: jax.block_until_ready(jc(tree)),
        "numpy": lambda: plan.np_concat(tree),
    }
    tp = _torch() if with_torch else None
    if tp is not None and all(d == np.float32 for d in plan.dtypes):
        torch, p2v, _ = tp
        tparams = [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(tree)]
        fns["torch"] = lambda: p2v(tparams)
    return fns


def rebuild_fns(
    tree: Any, plan: Plan, with_ravel: bool = True, with_torch: bool = True
) -> dict[str, Any]:
    """name -> zero-argument callable rebuilding the tree from a flat vector (blocked)."""
    flat, re = jaxflat.destructure(tree)
    rflat, unravel = ravel_pytree(tree)
    js = plan.jit_split()
    nflat = np.array(flat)
    fns: dict[str, Any] = {
        "jaxflat": lambda: jax.block_until_ready(re(flat)),
        "ravel": (lambda: jax.block_until_ready(unravel(rflat))) if with_ravel else None,
        "jit": lambda: jax.block_until_ready(js(flat)),
        "numpy": lambda: plan.np_split(nflat),
    }
    tp = _torch() if with_torch else None
    if tp is not None and all(d == np.float32 for d in plan.dtypes):
        torch, p2v, v2p = tp
        tparams = [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(tree)]
        tvec = p2v(tparams).clone()
        fns["torch"] = lambda: v2p(tvec, tparams)
    return fns


# --------------------------------------------------------------------------- timing


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(
    fns: dict[str, Any], reps: int, target_s: float, warmup: int = 2
) -> dict[str, dict[str, Any] | None]:
    """Median seconds per call of each callable, repetitions interleaved.

    Every callable is warmed up (the first call compiles), then timed once to
    pick an inner loop count so one sample lasts about ``target_s``. Then
    ``reps`` rounds: each round times one sample of every callable, the
    starting contender rotating from round to round, so drifts in machine
    speed hit all contenders alike. ``None`` entries are skipped.
    """
    live = {n: f for n, f in fns.items() if f is not None}
    inner = {}
    for name, fn in live.items():
        for _ in range(warmup):
            fn()
        _settle()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, min(1000, int(target_s / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in live}
    names = list(live)
    enabled = gc.isenabled()
    try:
        for r in range(reps):
            gc.collect()
            gc.disable()
            shift = r % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                fn, k = live[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) / k)
            if enabled:
                gc.enable()
    finally:
        if enabled:
            gc.enable()
    out: dict[str, dict[str, Any] | None] = {n: None for n in fns}
    for name, s in samples.items():
        out[name] = {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "inner": inner[name],
            "samples_s": s,
        }
    return out


def _settle() -> None:
    """Wait for work jaxflat started in the background (it compiles a flatten
    program after the first calls of a structure), so that the steady state is
    timed and no compile competes with the samples. A no-op if there is none."""
    engine = getattr(jaxflat, "_engine", None)
    pool = getattr(engine, "_POOL", None)
    if pool is not None and hasattr(pool, "submit"):
        with contextlib.suppress(Exception):
            pool.submit(lambda: None).result(timeout=600)  # FIFO: behind all pending work


def med(res: dict[str, Any], name: str) -> float | None:
    r = res.get(name)
    return None if r is None else r["median_s"]


def fmt_ms(s: float | None, missing: str = "n/a") -> str:
    if s is None:
        return missing
    if isinstance(s, str):
        return s
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3g}"


def ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, float | int) or not isinstance(b, float | int) or b == 0:
        return None
    return a / b


def fmt_x(r: float | None) -> str:
    return "n/a" if r is None else (f"{r:.2f}x" if r < 10 else f"{r:.0f}x")


# --------------------------------------------------------------------------- report


class Report:
    def __init__(self, md_path: Path | None) -> None:
        self.lines: list[str] = []
        self.md_path = md_path
        self.data: dict[str, Any] = {"sections": {}}

    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        if self.md_path is not None:  # keep the file current, so a crash keeps the tables
            self.md_path.write_text("\n".join(self.lines) + "\n")

    def head(self, headers: list[str]) -> None:
        """Start a table; rows follow with ``row`` as they are measured."""
        self.out("| " + " | ".join(headers) + " |")
        self.out("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")

    def row(self, cells: list[str]) -> None:
        self.out("| " + " | ".join(cells) + " |")

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.head(headers)
        for row in rows:
            self.row(row)
        self.out()


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "jaxflat", "torch"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=HERE,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit and dirty:
            commit += " (src/ modified)"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": versions,
        "jaxflat_commit": commit,
    }


def _loadavg() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


# --------------------------------------------------------------------------- children


def _rss_kib() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0])
    if not out:  # not Linux: psutil, else getrusage (peak only)
        try:
            import psutil

            out["VmRSS"] = psutil.Process().memory_info().rss // 1024
        except ImportError:
            pass
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak // 1024 if sys.platform == "darwin" else peak
    return out


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_backend() -> None:
    """Start the backend and compiler with an unrelated program, so that the cold
    timings count what a new structure costs, not JAX's own start-up."""
    jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)))
    jax.block_until_ready(jnp.ones(8) + 1)


def _emit(obj: dict[str, Any]) -> None:
    print(MARK + json.dumps(obj), flush=True)


def cold_child(args: argparse.Namespace) -> None:
    """Time the first flatten and the first rebuild of a new structure."""
    wl = Workload.parse(args.workload)
    tree = wl.build()
    plan = Plan(tree)
    _warm_backend()
    out: dict[str, Any] = {"who": args.who, "workload": wl.spec()}
    if args.who == "jaxflat":
        t0 = time.perf_counter()
        flat, re = jaxflat.destructure(tree)
        jax.block_until_ready(flat)
        rebuild = re
    elif args.who == "ravel":
        t0 = time.perf_counter()
        flat, rebuild = ravel_pytree(tree)
        jax.block_until_ready(flat)
    elif args.who == "jit":
        jc, js = plan.jit_concat(), plan.jit_split()
        t0 = time.perf_counter()
        flat = jax.block_until_ready(jc(tree))
        rebuild = js
    else:
        raise SystemExit(f"unknown contender {args.who}")
    out["flatten_s"] = time.perf_counter() - t0
    _emit(out)
    if not args.no_rebuild:
        t0 = time.perf_counter()
        jax.block_until_ready(rebuild(flat))
        out["rebuild_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(rebuild(flat))
        out["rebuild_second_s"] = time.perf_counter() - t0
        _emit(out)


def mem_child(args: argparse.Namespace) -> None:
    """Peak RSS growth of one first call (flatten or rebuild) on a big tree."""
    wl = Workload.parse(args.workload)
    tree = wl.build()
    plan = Plan(tree)
    _warm_backend()
    flat = re = None
    if args.op == "rebuild":  # one destructure: the flat vector and jaxflat's re
        flat, re = jaxflat.destructure(tree)
        jax.block_until_ready(flat)
    who, op = args.who, args.op
    if who == "jaxflat":
        fn = (lambda: jaxflat.destructure(tree)[0]) if op == "flatten" else re
    elif who == "ravel":
        fn = (lambda: ravel_pytree(tree)[0]) if op == "flatten" else ravel_pytree(tree)[1]
    elif who == "jit":  # compiled beforehand: the table is about the run, not XLA
        if op == "flatten":
            concat = plan.jit_concat().lower(tree).compile()
            fn = functools.partial(concat, tree)
        else:
            fn = plan.jit_split().lower(flat).compile()
    elif who == "numpy":
        fn = (lambda: plan.np_concat(tree)) if op == "flatten" else plan.np_split
        if op == "rebuild":
            flat = np.asarray(flat)
    else:
        raise SystemExit(f"unknown contender {who}")
    _settle()
    gc.collect()
    before = _rss_kib()
    exact = _reset_peak()
    t0 = time.perf_counter()
    result = fn() if op == "flatten" else fn(flat)
    jax.block_until_ready(result)
    dt = time.perf_counter() - t0
    gc.collect()  # garbage in reference cycles is not "retained"
    after = _rss_kib()
    out_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(result))
    _emit(
        {
            "who": who,
            "op": op,
            "workload": wl.spec(),
            "seconds": dt,
            "rss_before_mib": before.get("VmRSS", 0) / 1024,
            "peak_growth_mib": (after.get("VmHWM", 0) - before.get("VmRSS", 0)) / 1024,
            "retained_mib": (after.get("VmRSS", 0) - before.get("VmRSS", 0)) / 1024,
            "output_mib": out_bytes / 2**20,
            "peak_exact": exact,
        }
    )


def run_child(argv: list[str], timeout: float) -> dict[str, Any] | str:
    """Run ``bench.py`` with ``argv`` in a fresh process; its last JSON line, or
    "timeout" / "error" (with the tail of stderr logged)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        timed_out = True
    found = [json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)]
    last: dict[str, Any] | str = found[-1] if found else ("timeout" if timed_out else "error")
    if timed_out and isinstance(last, dict):
        last = {**last, "timeout": True}
    if not timed_out and proc.returncode != 0:
        log(f"child {' '.join(argv)} failed (rc {proc.returncode}):\n{stderr[-2000:]}")
        if not found:
            return "error"
    return last


# --------------------------------------------------------------------------- sections


def hot_workloads(mode: Mode) -> list[Workload]:
    wls = [Workload("mlp", n, p) for p in mode.params for n in mode.leaves]
    wls.append(Workload("mixed", mode.mixed_leaves, mode.extra_params))
    wls += [Workload("nnx", n, mode.extra_params) for n in mode.nnx_leaves]
    return wls


def section_hot(rep: Report, mode: Mode) -> None:
    rep.out("## 1. Hot flatten and rebuild")
    rep.out()
    rep.out(
        f"Milliseconds per call, median of {mode.reps} interleaved samples (each sample "
        "loops the call for a few ms), after warm-up: an unchanged structure, compiled "
        "code reused. Ratios: `ravel/jf` is how many times faster jaxflat is than eager "
        "`ravel_pytree` (higher is better); `jf/jit` and `jf/np` are jaxflat's time over "
        "the best jitted code and over the numpy floor (lower is better; 1.0 is parity)."
    )
    rep.out()
    has_torch = _torch() is not None
    rows: dict[str, list[dict[str, Any]]] = {"flatten": [], "rebuild": []}
    for wl in hot_workloads(mode):
        log(f"hot {wl.name}")
        tree = wl.build()
        plan = Plan(tree)
        with_ravel = wl.leaves <= mode.ravel_max_leaves
        res_f = measure(flatten_fns(tree, plan), mode.reps, mode.target_s)
        res_r = measure(rebuild_fns(tree, plan, with_ravel=with_ravel), mode.reps, mode.target_s)
        for op, res in (("flatten", res_f), ("rebuild", res_r)):
            rows[op].append(
                {
                    "workload": wl.spec(),
                    "name": wl.name,
                    "leaves": 2 * wl.layers,
                    "params": wl.nparams,
                    "results": res,
                }
            )
        del tree, plan, res_f, res_r
        gc.collect()
    names = ["jaxflat", "ravel", "jit", "numpy"] + (["torch"] if has_torch else [])
    for op, title in (
        ("flatten", "1a. Flatten (tree -> flat vector)"),
        ("rebuild", "1b. Rebuild (flat vector -> tree)"),
    ):
        rep.out(f"### {title}")
        rep.out()
        table = []
        for r in rows[op]:
            res = r["results"]
            jf = med(res, "jaxflat")
            table.append(
                [r["name"], str(r["leaves"]), fmt_count(r["params"])]
                + [fmt_ms(med(res, n), "skipped") for n in names]
                + [
                    fmt_x(ratio(med(res, "ravel"), jf)),
                    fmt_x(ratio(jf, med(res, "jit"))),
                    fmt_x(ratio(jf, med(res, "numpy"))),
                ]
            )
        rep.table(
            ["workload", "leaves", "params"]
            + [f"{n} ms" for n in names]
            + ["ravel/jf", "jf/jit", "jf/np"],
            table,
        )
    if not has_torch:
        rep.out("torch is not installed: its column is left out.")
        rep.out()
    rep.data["sections"]["hot"] = rows


def cold_workloads(mode: Mode) -> list[Workload]:
    wls = [Workload("mlp", n, mode.extra_params) for n in mode.cold_leaves]
    if mode.cold_nnx:
        wls.append(Workload("nnx", 100, mode.extra_params))
    return wls


def section_cold(rep: Report, mode: Mode) -> None:
    rep.out("## 2. Cold first call of a new structure (fresh process)")
    rep.out()
    rep.out(
        "Each cell is a fresh `python bench.py --cold-child` process: it builds the tree, "
        "starts the backend with an unrelated jitted op, then times the first flatten and "
        "the first rebuild (trace + compile + run). ms. `ravel` compiles one eager op per "
        f"distinct slice; its rebuild runs with a {mode.cold_timeout_s:.0f} s timeout and is "
        f"skipped above {mode.ravel_max_leaves} leaves in this mode."
    )
    rep.out()

    def get(e: dict[str, Any], who: str, key: str) -> Any:
        r = e.get(who, "not run")
        return r if isinstance(r, str) else r.get(key)

    def cell(v: Any) -> str:
        return v if isinstance(v, str) else fmt_ms(v)

    rep.head(
        [
            "workload",
            "leaves",
            "params",
            "jaxflat flatten ms",
            "ravel flatten ms",
            "jit flatten ms",
            "jaxflat rebuild ms",
            "ravel rebuild ms",
            "jit rebuild ms",
            "ravel/jf flatten",
            "ravel/jf rebuild",
        ]
    )
    rows = []
    for wl in cold_workloads(mode):
        entry: dict[str, Any] = {
            "workload": wl.spec(),
            "name": wl.name,
            "leaves": 2 * wl.layers,
            "params": wl.nparams,
        }
        for who in mode.cold_who:
            argv = ["--cold-child", "--who", who, "--workload", wl.spec()]
            skip_rebuild = who == "ravel" and wl.leaves > mode.ravel_max_leaves
            if skip_rebuild:
                argv.append("--no-rebuild")
            log(f"cold {who} {wl.name}")
            res = run_child(argv, mode.cold_timeout_s)
            if isinstance(res, dict) and skip_rebuild:
                res["rebuild_s"] = "skipped"
            elif isinstance(res, dict) and res.get("timeout") and "rebuild_s" not in res:
                res["rebuild_s"] = "timeout"
            entry[who] = res
        rows.append(entry)
        e = entry
        rep.row(
            [e["name"], str(e["leaves"]), fmt_count(e["params"])]
            + [cell(get(e, w, "flatten_s")) for w in ("jaxflat", "ravel", "jit")]
            + [cell(get(e, w, "rebuild_s")) for w in ("jaxflat", "ravel", "jit")]
            + [
                fmt_x(ratio(get(e, "ravel", "flatten_s"), get(e, "jaxflat", "flatten_s"))),
                fmt_x(ratio(get(e, "ravel", "rebuild_s"), get(e, "jaxflat", "rebuild_s"))),
            ]
        )
    rep.out()
    rep.data["sections"]["cold"] = rows


def section_grad(rep: Report, mode: Mode) -> None:
    rep.out("## 3. Eager `jax.grad` through `re`")
    rep.out()
    rep.out(
        "`jax.grad(lambda v: loss(re(v)))(flat)` against `jax.grad(loss)(tree)` for "
        "`loss = sum(leaf ** 2)`, both eager (no `jit`), ms, median of interleaved samples. "
        f"`ravel` is the same through `ravel_pytree`'s unravel (skipped above {SLOW_LEAVES} "
        "leaves). `re/tree` is the cost of "
        "going through the flat vector (lower is better)."
    )
    rep.out()
    wls = [Workload("mlp", n, mode.extra_params) for n in mode.grad_leaves]
    wls += [Workload("nnx", n, mode.extra_params) for n in mode.nnx_other]
    rep.head(
        [
            "workload",
            "leaves",
            "params",
            "grad via re ms",
            "grad on tree ms",
            "grad via ravel ms",
            "re/tree",
            "ravel/re",
        ]
    )
    rows = []
    for wl in wls:
        log(f"grad {wl.name}")
        tree = wl.build()
        flat, re = jaxflat.destructure(tree)
        rflat, unravel = ravel_pytree(tree)

        def via_re(v: jax.Array, re: Any = re) -> jax.Array:
            return sq_loss(re(v))

        def via_ravel(v: jax.Array, unravel: Any = unravel) -> jax.Array:
            return sq_loss(unravel(v))

        fns = {
            "via re": functools.partial(
                lambda f, v: jax.block_until_ready(jax.grad(f)(v)), via_re, flat
            ),
            "on tree": functools.partial(
                lambda t: jax.block_until_ready(jax.grad(sq_loss)(t)), tree
            ),
            "via ravel": functools.partial(
                lambda f, v: jax.block_until_ready(jax.grad(f)(v)), via_ravel, rflat
            )
            if wl.leaves <= min(mode.ravel_max_leaves, SLOW_LEAVES)
            else None,
        }
        reps = max(3, mode.reps // 2) if wl.leaves < 10 * SLOW_LEAVES else 3
        res = measure(fns, reps, mode.target_s, warmup=1)
        rows.append(
            {
                "workload": wl.spec(),
                "name": wl.name,
                "leaves": 2 * wl.layers,
                "params": wl.nparams,
                "results": res,
            }
        )
        rep.row(
            [
                wl.name,
                str(2 * wl.layers),
                fmt_count(wl.nparams),
                fmt_ms(med(res, "via re")),
                fmt_ms(med(res, "on tree")),
                fmt_ms(med(res, "via ravel"), "skipped"),
                fmt_x(ratio(med(res, "via re"), med(res, "on tree"))),
                fmt_x(ratio(med(res, "via ravel"), med(res, "via re"))),
            ]
        )
        del tree, flat, re, rflat, unravel, fns
        gc.collect()
    rep.out()
    rep.data["sections"]["grad"] = rows


def _compile_time(make: Callable[[], Any], arg: Any) -> tuple[float, float]:
    """Seconds to trace+lower and to compile ``jax.jit(make())`` for ``arg``."""
    fn = jax.jit(make())
    t0 = time.perf_counter()
    lowered = fn.lower(arg)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def _compile_makers(tree: Any, re: Any, unravel: Any) -> dict[str, tuple[Callable[[], Any], str]]:
    """Fresh function objects on every call of the maker: no jit cache hits."""

    def loss_re() -> Any:
        return lambda v: sq_loss(re(v))

    def loss_tree() -> Any:
        return lambda t: sq_loss(t)

    def loss_ravel() -> Any:
        return lambda v: sq_loss(unravel(v))

    return {
        "loss.re": (loss_re, "flat"),
        "loss": (loss_tree, "tree"),
        "loss.unravel": (loss_ravel, "flat"),
        "grad(loss.re)": (lambda: jax.grad(loss_re()), "flat"),
        "grad(loss)": (lambda: jax.grad(loss_tree()), "tree"),
        "grad(loss.unravel)": (lambda: jax.grad(loss_ravel()), "flat"),
    }


def section_compile(rep: Report, mode: Mode) -> None:
    rep.out("## 4. Compile time of `jax.jit(loss . re)` against `jax.jit(loss)`")
    rep.out()
    rep.out(
        "Milliseconds of trace + lower + compile (`jax.jit(f).lower(x).compile()`, a fresh "
        f"function object each time), median of {mode.compile_reps} interleaved repetitions "
        f"(one at {mode.compile_large_leaves} leaves and more, where each compile is long). "
        "`loss = sum(leaf ** 2)`; `loss.re` takes the flat vector, `loss` the tree, "
        f"`loss.unravel` goes through `ravel_pytree` (skipped above {SLOW_LEAVES} leaves). "
        "Ratios: jaxflat over the nested "
        "tree (lower is better)."
    )
    rep.out()
    wls = [Workload("mlp", n, mode.extra_params) for n in mode.compile_leaves]
    wls += [Workload("nnx", n, mode.extra_params) for n in mode.nnx_other]
    names = list(_compile_makers(None, None, None))
    rep.head(
        ["workload", "leaves", "params"]
        + [f"{n} ms" for n in names]
        + ["loss.re / loss", "grad: re / tree"]
    )
    rows = []
    warm = mode.compile_warm
    for wl in wls:
        log(f"compile {wl.name}")
        tree = wl.build()
        flat, re = jaxflat.destructure(tree)
        unravel = ravel_pytree(tree)[1]
        makers = _compile_makers(tree, re, unravel)
        if wl.leaves > SLOW_LEAVES:  # the ravel variants only cost time there
            makers = {n: m for n, m in makers.items() if "unravel" not in n}
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in makers}
        first = 0 if warm else 1  # round 0 warms up the compiler, not counted
        warm = False  # once per process is enough
        reps = mode.compile_reps if wl.leaves < mode.compile_large_leaves else 1
        for r in range(first, reps + 1):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                make, which = makers[name]
                t = _compile_time(make, flat if which == "flat" else tree)
                if r:
                    samples[name].append(t)
            gc.collect()
        res = {
            n: {
                "median_s": statistics.median(a + b for a, b in s),
                "lower_median_s": statistics.median(a for a, _ in s),
                "compile_median_s": statistics.median(b for _, b in s),
                "samples_s": s,
            }
            for n, s in samples.items()
        }
        rows.append(
            {
                "workload": wl.spec(),
                "name": wl.name,
                "leaves": 2 * wl.layers,
                "params": wl.nparams,
                "results": res,
            }
        )
        rep.row(
            [wl.name, str(2 * wl.layers), fmt_count(wl.nparams)]
            + [fmt_ms(med(res, n), "skipped") for n in names]
            + [
                fmt_x(ratio(med(res, "loss.re"), med(res, "loss"))),
                fmt_x(ratio(med(res, "grad(loss.re)"), med(res, "grad(loss)"))),
            ]
        )
        del tree, flat, re, unravel, makers
        gc.collect()
    rep.out()
    rep.data["sections"]["compile"] = rows


def mlp_loss(tree: Any, x: jax.Array) -> jax.Array:
    h = x
    for name in sorted(tree):
        h = jnp.tanh(h @ tree[name]["w"] + tree[name]["b"])
    return jnp.mean(jnp.square(h))


def section_hessian(rep: Report, mode: Mode) -> None:
    wl = Workload("mlp", mode.hessian_leaves, mode.hessian_leaves / 2 * 42)  # k = 6
    rep.out("## 5. Hessian and Hessian-vector product")
    rep.out()
    log(f"hessian {wl.name}")
    tree = wl.build()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, wl.k), dtype=np.float32))
    flat, re = jaxflat.destructure(tree)
    rflat, unravel = ravel_pytree(tree)
    u = jnp.asarray(np.random.default_rng(2).standard_normal(flat.shape, dtype=np.float32))
    u_tree = re(u)
    n = int(flat.shape[0])
    rep.out(
        f"A {wl.layers}-layer tanh MLP (`{wl.name}`, {n} parameters, loss = mean of the "
        f"squared output on an 8x{wl.k} batch). `flat`: `jax.hessian` over the flat vector "
        f"through `re` (a {n}x{n} matrix); `nested`: `jax.hessian(loss)(tree)` (a tree of "
        f"{2 * wl.layers}x{2 * wl.layers} blocks); `ravel`: through `ravel_pytree`'s unravel. "
        "HVP: `jax.jvp(jax.grad(f), (p,), (u,))`. ms: medians of interleaved samples, "
        "except the jit compile rows (trace + lower + compile, one each)."
    )
    rep.out()

    def f_flat(v: jax.Array) -> jax.Array:
        return mlp_loss(re(v), x)

    def f_tree(t: Any) -> jax.Array:
        return mlp_loss(t, x)

    def f_ravel(v: jax.Array) -> jax.Array:
        return mlp_loss(unravel(v), x)

    def hvp(f: Any) -> Any:
        return lambda p, t: jax.jvp(jax.grad(f), (p,), (t,))[1]

    cases = {
        "flat": (f_flat, flat, u),
        "nested": (f_tree, tree, u_tree),
        "ravel": (f_ravel, rflat, u),
    }
    if not mode.hessian_full:
        del cases["ravel"]
    reps = max(3, mode.reps // 4)
    results: dict[str, Any] = {}
    # eager
    eager_h = {
        k: functools.partial(lambda f, p: jax.block_until_ready(jax.hessian(f)(p)), f, p)
        for k, (f, p, _) in cases.items()
    }
    eager_v = {
        k: functools.partial(lambda f, p, t: jax.block_until_ready(hvp(f)(p, t)), f, p, t)
        for k, (f, p, t) in cases.items()
    }
    results["hessian eager"] = (
        measure(eager_h, reps, mode.target_s, warmup=1) if mode.hessian_full else {}
    )
    results["hvp eager"] = measure(eager_v, reps, mode.target_s, warmup=1)
    # jit: compile time (fresh functions, interleaved), then the run
    for op, make in (("hessian", lambda f: jax.hessian(f)), ("hvp", hvp)):
        # These compiles are long: one of each (the compile section warmed the compiler).
        comp: dict[str, dict[str, Any]] = {}
        compiled = {}
        for k, (f, p, t) in cases.items():
            args = (p,) if op == "hessian" else (p, t)
            t0 = time.perf_counter()
            compiled[k] = jax.jit(make(f)).lower(*args).compile()  # make: a new function
            comp[k] = {"median_s": time.perf_counter() - t0}
        results[f"{op} jit compile"] = comp
        runs = {
            k: functools.partial(
                lambda c, a: jax.block_until_ready(c(*a)),
                compiled[k],
                (p,) if op == "hessian" else (p, t),
            )
            for k, (f, p, t) in cases.items()
        }
        results[f"{op} jit run"] = measure(runs, mode.reps, mode.target_s)
    table = []
    for label in (
        "hessian eager",
        "hessian jit compile",
        "hessian jit run",
        "hvp eager",
        "hvp jit compile",
        "hvp jit run",
    ):
        res = results[label]
        table.append(
            [
                label,
                fmt_ms(med(res, "flat"), "skipped"),
                fmt_ms(med(res, "nested"), "skipped"),
                fmt_ms(med(res, "ravel"), "skipped"),
                fmt_x(ratio(med(res, "flat"), med(res, "nested"))),
            ]
        )
    rep.table(["operation", "flat (jaxflat) ms", "nested ms", "ravel ms", "flat/nested"], table)
    rep.data["sections"]["hessian"] = {"workload": wl.spec(), "n": n, "results": results}


def section_memory(rep: Report, mode: Mode, params: float) -> None:
    rep.out(f"## 6. Peak memory of flatten and rebuild at {fmt_count(params)} parameters")
    rep.out()
    rep.out(
        "One fresh process per cell: build the tree, (for a rebuild) make the flat vector, "
        "reset the kernel's peak-RSS counter, then time one first call and read the peak "
        "(`VmHWM` from /proc/self/status after writing 5 to /proc/self/clear_refs). "
        "Growth = peak RSS - RSS before the call; `peak/out` relates it to the output's "
        "own size (1.0 is the floor for a copy). The jitted contenders are compiled before "
        "the reset; the others include whatever they compile on the way."
    )
    rep.out()
    rep.head(
        [
            "workload",
            "op",
            "contender",
            "first call ms",
            "peak growth MiB",
            "retained MiB",
            "output MiB",
            "peak/out",
        ]
    )
    rows = []
    for leaves in (10, 1000):
        wl = Workload("mlp", leaves, params)
        for op in ("flatten", "rebuild"):
            for who in ("jaxflat", "numpy", "jit", "ravel"):
                if who == "ravel" and op == "rebuild" and leaves > mode.ravel_max_leaves:
                    continue
                log(f"memory {who} {op} {wl.name}")
                res = run_child(
                    ["--mem-child", "--who", who, "--op", op, "--workload", wl.spec()],
                    max(600, mode.cold_timeout_s),
                )
                rows.append(
                    {"workload": wl.spec(), "name": wl.name, "who": who, "op": op, "result": res}
                )
                if isinstance(res, str):
                    rep.row([wl.name, op, who, res, "", "", "", ""])
                    continue
                rep.row(
                    [
                        wl.name,
                        op,
                        who,
                        fmt_ms(res["seconds"]),
                        f"{res['peak_growth_mib']:.0f}",
                        f"{res['retained_mib']:.0f}",
                        f"{res['output_mib']:.0f}",
                        fmt_x(ratio(res["peak_growth_mib"], res["output_mib"])),
                    ]
                )
    rep.out()
    rep.data["sections"]["memory"] = rows


def section_checkpoint(rep: Report, mode: Mode) -> None:
    rep.out("## 7. loadmodel and save/load against plain Orbax")
    rep.out()
    have_load = hasattr(jaxflat, "loadmodel") and hasattr(jaxflat, "state")
    have_save = hasattr(jaxflat, "save") and hasattr(jaxflat, "load")
    if not (have_load or have_save):
        rep.out("Skipped: this jaxflat has no `loadmodel`/`state`/`save`/`load` yet.")
        rep.out()
        rep.data["sections"]["checkpoint"] = "skipped: not implemented"
        return
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        ocp = None
    rep.out(
        "`loadmodel(dst, src)` (src a tree of the same kind, or `state(src)`) against "
        "`jax.tree.map(jax.device_put, src)`; `jaxflat.save(path, tree, overwrite=True)` / "
        "`jaxflat.load(path, like=tree)` / `jaxflat.load(path)` against Orbax's "
        "`StandardCheckpointer` save (`force=True`, waited for) and restore (with and "
        "without an abstract target; for NNX, of `nnx.state(model)` merged back). ms, "
        "medians of interleaved repetitions; checkpoints in a temporary directory."
    )
    rep.out()
    n = mode.checkpoint_leaves
    wls = [Workload("mlp", n, mode.extra_params), Workload("nnx", n, mode.extra_params)]
    rows, table = [], []
    tmp = Path(tempfile.mkdtemp(prefix="jaxflat-bench-"))
    try:
        for wl in wls:
            log(f"checkpoint {wl.name}")
            tree, src = wl.build(0), wl.build(1)
            fns: dict[str, Any] = {}
            if have_load:
                st = jaxflat.state(src)
                fns["jaxflat.loadmodel(dst, src)"] = functools.partial(
                    lambda d, s: jax.block_until_ready(jaxflat.loadmodel(d, s)), tree, src
                )
                fns["jaxflat.loadmodel(dst, state)"] = functools.partial(
                    lambda d, s: jax.block_until_ready(jaxflat.loadmodel(d, s)), tree, st
                )
                fns["jaxflat.state(tree)"] = functools.partial(
                    lambda t: jax.block_until_ready(jaxflat.state(t)), tree
                )
                fns["jax.tree.map(device_put, src)"] = functools.partial(
                    lambda s: jax.block_until_ready(jax.tree.map(jax.device_put, s)), src
                )
            io_fns = _io_fns(tree, wl, tmp, ocp, have_save)
            fns.update(io_fns)
            res = measure(fns, max(2, mode.reps // 3), 0.0, warmup=1)
            rows.append({"workload": wl.spec(), "name": wl.name, "results": res})
            for name in fns:
                table.append([wl.name, name, fmt_ms(med(res, name), "n/a")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.table(["workload", "operation", "ms"], table)
    if not have_save:
        rep.out("`jaxflat.save`/`jaxflat.load` are not there yet: only Orbax was timed.")
        rep.out()
    rep.data["sections"]["checkpoint"] = rows


def _io_fns(tree: Any, wl: Workload, tmp: Path, ocp: Any, have_save: bool) -> dict[str, Any]:
    fns: dict[str, Any] = {}
    if have_save:
        jpath = tmp / f"jaxflat-{wl.kind}"
        jaxflat.save(jpath, tree, overwrite=True)
        fns["jaxflat.save"] = functools.partial(
            lambda p, t: jaxflat.save(p, t, overwrite=True), jpath, tree
        )
        fns["jaxflat.load(like=tree)"] = functools.partial(
            lambda p, t: jax.block_until_ready(jaxflat.load(p, like=t)), jpath, tree
        )
        fns["jaxflat.load()"] = functools.partial(
            lambda p: jax.block_until_ready(jaxflat.load(p)), jpath
        )
    if ocp is None:
        return fns
    if wl.kind == "nnx":
        from flax import nnx

        graphdef, state = nnx.split(tree)
    else:
        graphdef, state = None, tree
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    opath = (tmp / f"orbax-{wl.kind}").resolve()
    ckptr = ocp.StandardCheckpointer()

    def osave(s: Any = state) -> None:
        ckptr.save(opath, s, force=True)
        ckptr.wait_until_finished()

    def orestore_like(g: Any = graphdef) -> Any:
        restored = ckptr.restore(opath, abstract)
        if g is not None:
            from flax import nnx

            restored = nnx.merge(g, restored)
        return jax.block_until_ready(restored)

    def orestore() -> Any:
        return jax.block_until_ready(ckptr.restore(opath))

    osave()
    fns["orbax save"] = osave
    fns["orbax restore(abstract)" + (" + nnx.merge" if graphdef is not None else "")] = (
        orestore_like
    )
    fns["orbax restore()"] = orestore
    return fns


# --------------------------------------------------------------------------- targets


def _lookup(rows: list[dict[str, Any]], spec: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == spec), None)


def section_targets(rep: Report, mode: Mode) -> None:
    sec = rep.data["sections"]

    def pick(avail: list[int]) -> int:
        return 1000 if 1000 in avail else max(avail)

    rep.out("## Targets")
    rep.out()
    rep.out(
        "Checked on the MLP tree with 1000 leaves (where a mode has none: its largest), "
        "at the size nearest 1e6 parameters measured there. This machine's timings carry "
        "the noise of whatever else runs on it; see the load averages above."
    )
    rep.out()
    checks: list[tuple[str, float | None, str, float, bool]] = []

    def add(what: str, value: float | None, unit: str, limit: float, upper: bool) -> None:
        checks.append((what, value, unit, limit, upper))

    hot = sec.get("hot")
    if hot:
        leaves = pick(mode.leaves)
        for op, jname in (("flatten", "concat"), ("rebuild", "split")):
            cands = [r for r in hot[op] if r["workload"].startswith(f"mlp:{leaves}:")]
            # the size nearest 1e6 parameters, so that modes compare alike
            r = min(cands, key=lambda r: abs(math.log10(r["params"]) - 6)) if cands else None
            if r is None:
                continue
            res, tag = r["results"], f"{leaves} leaves, {fmt_count(r['params'])} params"
            add(
                f"hot {op} / best jitted {jname} ({tag})",
                ratio(med(res, "jaxflat"), med(res, "jit")),
                "x",
                1.5,
                True,
            )
            add(
                f"hot {op}: times faster than ravel eager ({tag})",
                ratio(med(res, "ravel"), med(res, "jaxflat")),
                "x",
                10.0 if op == "flatten" else 5.0,
                False,
            )
    cold = sec.get("cold")
    if cold:
        leaves = pick(mode.cold_leaves)
        r = _lookup(cold, f"mlp:{leaves}:{mode.extra_params:g}")
        if r is not None and isinstance(r.get("jaxflat"), dict):
            tag = f"{leaves} leaves"
            add(
                f"cold flatten, fresh process ({tag})",
                r["jaxflat"].get("flatten_s"),
                "s",
                0.05,
                True,
            )
            add(
                f"cold rebuild, fresh process ({tag})",
                r["jaxflat"].get("rebuild_s"),
                "s",
                0.5,
                True,
            )
    grad = sec.get("grad")
    if grad:
        leaves = pick(mode.grad_leaves)
        r = _lookup(grad, f"mlp:{leaves}:{mode.extra_params:g}")
        if r is not None:
            add(
                f"eager grad through re / on the tree ({leaves} leaves)",
                ratio(med(r["results"], "via re"), med(r["results"], "on tree")),
                "x",
                1.3,
                True,
            )
    comp = sec.get("compile")
    if comp:
        leaves = pick(mode.compile_leaves)
        r = _lookup(comp, f"mlp:{leaves}:{mode.extra_params:g}")
        if r is not None:
            res = r["results"]
            add(
                f"compile jit(loss . re) / jit(loss) ({leaves} leaves)",
                ratio(med(res, "loss.re"), med(res, "loss")),
                "x",
                1.5,
                True,
            )
            add(
                f"compile jit(grad(loss . re)) / jit(grad(loss)) ({leaves} leaves; "
                "same goal applied)",
                ratio(med(res, "grad(loss.re)"), med(res, "grad(loss)")),
                "x",
                1.5,
                True,
            )
    table = []
    out = []
    for what, value, unit, limit, upper in checks:
        if value is None or isinstance(value, str):
            verdict, shown = "n/a", str(value)
        else:
            ok = value <= limit if upper else value >= limit
            verdict = "PASS" if ok else "FAIL"
            shown = f"{value * 1e3:.1f} ms" if unit == "s" else f"{value:.2f}x"
        lim = f"{limit * 1e3:.0f} ms" if unit == "s" else f"{limit:g}x"
        table.append([what, shown, ("<= " if upper else ">= ") + lim, verdict])
        out.append(
            {"check": what, "value": value, "limit": limit, "upper": upper, "verdict": verdict}
        )
    rep.table(["target", "measured", "goal", "verdict"], table)
    rep.data["targets"] = out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jaxflat against ravel_pytree, jitted concat/split, numpy "
        "and (if installed) torch. Prints markdown tables; writes JSON."
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    g.add_argument(
        "--full",
        action="store_true",
        help="everything: 10..10000 leaves, up to 1e8 parameters, memory (long)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=HERE / "out" / "results.json",
        help="where to write the results as JSON (default: %(default)s)",
    )
    p.add_argument(
        "--markdown", type=Path, default=None, help="also write the markdown tables to this file"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; "
        "'memory' runs only with --full unless named here)",
    )
    p.add_argument(
        "--leaves", default=None, help="override the MLP leaf counts of all sections, e.g. 10,100"
    )
    p.add_argument("--params", default=None, help="override the hot sizes, e.g. 1e4,1e6")
    p.add_argument("--reps", type=int, default=None, help="override the repetitions")
    p.add_argument(
        "--memory-params",
        type=float,
        default=1e8,
        help="size of the memory section's trees (default: %(default)g)",
    )
    p.add_argument(
        "--cold-timeout",
        type=float,
        default=None,
        help="seconds before a cold child is killed (default: per mode)",
    )
    p.add_argument(
        "--ravel-max-leaves",
        type=int,
        default=None,
        help="skip ravel's rebuild (hot and cold) above this many leaves",
    )
    # internal: the subprocesses
    p.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--who", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--no-rebuild", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cold_child:
        return cold_child(args)
    if args.mem_child:
        return mem_child(args)
    mode = MODES["quick" if args.quick else "full" if args.full else "default"]
    if args.leaves:
        mode.leaves = [int(float(x)) for x in args.leaves.split(",")]
        mode.cold_leaves = mode.grad_leaves = mode.compile_leaves = mode.leaves
    if args.params:
        mode.params = [float(x) for x in args.params.split(",")]
    if args.reps:
        mode.reps = args.reps
    if args.cold_timeout:
        mode.cold_timeout_s = args.cold_timeout
    if args.ravel_max_leaves is not None:
        mode.ravel_max_leaves = args.ravel_max_leaves
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    explicit_memory = "memory" in args.sections and args.sections != ",".join(SECTIONS)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
    rep = Report(args.markdown)
    start = time.perf_counter()
    info = machine_info()
    v = info["versions"]
    rep.data.update(
        {
            "mode": mode.name,
            "machine": info,
            "config": mode.__dict__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
    )
    rep.out(f"# jaxflat benchmarks ({mode.name} mode)")
    rep.out()
    rep.out(
        f"- Machine: {info['cpu']}, {info['cores']} cores"
        + (f" ({info['cores_usable']} usable)" if info["cores_usable"] != info["cores"] else "")
        + (f", {info['memory_gib']} GiB RAM" if info["memory_gib"] else "")
        + f"; {info['os']}"
    )
    rep.out(f"- JAX backend: {info['jax_backend']} ({', '.join(info['jax_devices'])})")
    rep.out(
        "- Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + (f"; jaxflat commit {info['jaxflat_commit']}" if info["jaxflat_commit"] else "")
    )
    load = _loadavg()
    rep.data["loadavg_start"] = load
    rep.out(
        f"- Load average at start (1/5/15 min): {load}"
        + (
            " -- busier than the core count: expect noisy timings"
            if load and load[0] > (info["cores"] or 1)
            else ""
        )
    )
    rep.out(
        f"- Date: {rep.data['date']}; command: `python benchmarks/bench.py "
        f"{' '.join(sys.argv[1:])}`".rstrip()
    )
    rep.out()
    rep.out(
        "Workloads: `mlp NxP` is a dict of N/2 layers `{w: (k, k), b: (k,)}` (N leaves, "
        "P parameters, float32); `mixed` alternates float32 and bfloat16 layers; `nnx` is "
        "an `nnx.Sequential` of N/2 `nnx.Linear(k, k)`. Contenders: `jaxflat` "
        "(`destructure` / `re`), `ravel` (`jax.flatten_util.ravel_pytree` eager, and its "
        "unravel), `jit` (`jax.jit` of a concatenate of ravels / of a `lax.split` + "
        "reshape), `numpy` (np.concatenate of numpy views / np.split + copies; a floor), "
        "`torch` (`parameters_to_vector` / `vector_to_parameters`, if installed)."
    )
    rep.out()
    runners = {
        "hot": section_hot,
        "cold": section_cold,
        "grad": section_grad,
        "compile": section_compile,
        "hessian": section_hessian,
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        if name in runners:
            runners[name](rep, mode)
        elif name == "memory":
            if mode.memory or explicit_memory:
                section_memory(rep, mode, args.memory_params)
            else:
                log("memory section: --full only (or name it in --sections)")
                continue
        elif name == "checkpoint":
            section_checkpoint(rep, mode)
        rep.data.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        log(f"{name} done in {time.perf_counter() - t0:.1f} s")
        gc.collect()
    section_targets(rep, mode)
    total = time.perf_counter() - start
    rep.data["total_seconds"] = total
    rep.data["loadavg_end"] = _loadavg()
    rep.out(f"Load average at the end (1/5/15 min): {rep.data['loadavg_end']}.")
    rep.out()
    secs = ", ".join(f"{k} {s:.0f} s" for k, s in rep.data.get("section_seconds", {}).items())
    rep.out(f"Total wall time: {total:.0f} s ({secs}).")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep.data, indent=1, default=str) + "\n")
    log(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
