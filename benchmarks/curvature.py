"""Benchmarks of jaxflat.curvature (standalone; see benchmarks/README.md).

Sections, each measured in a fresh child process (so peak RSS is its own):

  hvp       Hessian-vector and Gauss-Newton-vector product time over gradient
            time (jitted, steady) and memory, on an NNX CNN with BatchNorm and
            a GPT-2-small-sized NNX transformer (124M parameters, tied embedding).
  lanczos   top eigenvalue to 1e-3 relative: products and time, Lanczos against
            power iteration (PyHessian's algorithm), 784-256-256-10 tanh MLP.
  pyhessian the same MLP and weights through PyHessian (only if torch and
            pyhessian import, in this Python or in $PYHESSIAN_PYTHON; never a
            dependency): top eigenvalue + a 100-probe trace, first and second
            call, and a fresh process each, side by side.
  jit       the second eager call of eigenvalues / trace / density against the
            same call wrapped in jax.jit (MLP).
  blocks    trace with 100 probes, several probes per product (block=) against
            one at a time (MLP).
  memory    a 1M-parameter MLP, eigenvalues(k=10) with the defaults (bounded
            basis) and with every vector kept (full reorthogonalisation):
            peak RSS, products, values.
  gpt2      GPT-2-sized: top eigenvalue and a 30-step density with the
            defaults; peak RSS, time per product.

Usage:
  python benchmarks/curvature.py            # everything; ~15+ minutes on 2 cores
  python benchmarks/curvature.py --quick    # tiny sizes, a smoke run
  python benchmarks/curvature.py --sections hvp,lanczos
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

# ---------------------------------------------------------------- helpers (children)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Any, *args: Any, reps: int = 5) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_mib(fn: Any, *args: Any) -> dict[str, float]:
    """XLA's memory analysis of a jitted function: temporaries and total, MiB."""
    mem = fn.lower(*args).compile().memory_analysis()
    if mem is None:  # pragma: no cover - backend without analysis
        return {"temp": float("nan"), "total": float("nan")}
    mib = 1 / 2**20
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    return {"temp": mem.temp_size_in_bytes * mib, "total": total * mib}


class Counter:
    """Counts evaluations of a loss inside jitted loops (one per Hessian-vector product)."""

    def __init__(self) -> None:
        self.n = 0

    def tick(self) -> None:
        self.n += 1

    def wrap(self, f: Any) -> Any:
        import jax

        def counted(*args: Any) -> Any:
            jax.debug.callback(self.tick)
            return f(*args)

        return counted


# ---------------------------------------------------------------- models


def cnn_problem(quick: bool) -> tuple[Any, Any, str, Any]:
    import jax
    import optax
    from flax import nnx

    import jaxflat
    from jaxflat import curvature

    class CNN(nnx.Module):
        def __init__(self, width: int, rngs: nnx.Rngs) -> None:
            self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(width, rngs=rngs)
            self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
            self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
            self.head = nnx.Linear(8 * 8 * 2 * width, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
            x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
            return self.head(x.reshape(x.shape[0], -1))

    width, batch = (8, 8) if quick else (32, 128)
    model = CNN(width, nnx.Rngs(0))  # BatchNorm in training mode: batch statistics
    flat, re = jaxflat.destructure(model)
    kx, ky = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (batch, 32, 32, 3))
    ys = jax.random.randint(ky, (batch,), 0, 10)

    def f(v: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(re(v)(xs), ys).mean()

    op = curvature.ggn(
        lambda v: re(v)(xs),
        lambda out: optax.softmax_cross_entropy_with_integer_labels(out, ys).mean(),
    )
    return flat, f, f"CNN+BN, {flat.size:,} params, batch {batch} of 32x32x3", op


def gpt2_config(quick: bool) -> dict[str, int]:
    if quick:
        return dict(vocab=1000, ctx=64, d=64, heads=4, layers=2, batch=2, seq=16)
    return dict(vocab=50257, ctx=1024, d=768, heads=12, layers=12, batch=2, seq=32)


def gpt2_model(quick: bool) -> tuple[Any, dict[str, int], Any]:
    """A GPT-2-small-shaped NNX transformer (tied embedding) and random tokens
    (batch, seq + 1); also used by ``sections/compile.py``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    c = gpt2_config(quick)

    class Block(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

    class GPT(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.wte = nnx.Embed(c["vocab"], c["d"], rngs=rngs)
            self.wpe = nnx.Embed(c["ctx"], c["d"], rngs=rngs)
            self.blocks = nnx.List([Block(c["d"], c["heads"], rngs) for _ in range(c["layers"])])
            self.ln_f = nnx.LayerNorm(c["d"], rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
            mask = nnx.make_causal_mask(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.wte.attend(self.ln_f(x))  # tied: logits from the embedding

    model = GPT(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (c["batch"], c["seq"] + 1), 0, c["vocab"])
    return model, c, tokens


def gpt2_problem(quick: bool) -> tuple[Any, Any, str, Any]:
    """The GPT-2-sized model's next-token loss on random tokens, over its flat vector."""
    import jax
    import optax

    import jaxflat

    model, c, tokens = gpt2_model(quick)
    flat, re = jaxflat.destructure(model)
    del model

    def f(v: jax.Array) -> jax.Array:
        logits = re(v)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def xent(logits: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    from jaxflat import curvature

    op = curvature.ggn(lambda v: re(v)(tokens[:, :-1]), xent)
    label = f"GPT-2-sized, {flat.size:,} params, batch {c['batch']} x {c['seq']} tokens"
    return flat, f, label, op


def mlp_problem(
    quick: bool, widths: tuple[int, ...] | None = None
) -> tuple[Any, Any, Any, Any, str]:
    """784-256-256-10 tanh MLP, 512 random samples, cross-entropy (returns weights, data too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jaxflat

    widths = widths or ((784, 32, 32, 10) if quick else (784, 256, 256, 10))
    n = 64 if quick else 512
    rngs = nnx.Rngs(0)
    layers: list[Any] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nnx.Linear(a, b, rngs=rngs), jax.nn.tanh]
    model = nnx.Sequential(*layers[:-1])
    flat, re = jaxflat.destructure(model)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n, widths[0])).astype(np.float32)
    ys = rng.integers(0, widths[-1], n)
    weights = [
        (np.asarray(layer.kernel[...]), np.asarray(layer.bias[...]))
        for layer in model.layers
        if isinstance(layer, nnx.Linear)
    ]

    def f(v: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(re(v)(jnp.asarray(xs)), ys).mean()

    label = f"{'-'.join(map(str, widths))} tanh MLP, {flat.size:,} params, {n} samples"
    return flat, f, weights, (xs, ys), label


# ---------------------------------------------------------------- children


def child_hvp(model: str, quick: bool) -> dict[str, Any]:
    import jax

    from jaxflat import curvature

    flat, f, label, op = (cnn_problem if model == "cnn" else gpt2_problem)(quick)
    v = jax.random.normal(jax.random.key(2), flat.shape)
    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda x, v: curvature.hvp(f, x, v))
    gvp = jax.jit(lambda x, v: curvature.hvp(op, x, v))
    reps = 3 if model == "gpt2" else 10
    out: dict[str, Any] = {"label": label, "params": int(flat.size)}
    out["grad_mem"], out["hvp_mem"] = compiled_mib(grad, flat), compiled_mib(hvp, flat, v)
    out["ggn_mem"] = compiled_mib(gvp, flat, v)
    out["grad_s"] = timed(grad, flat, reps=reps)
    out["hvp_s"] = timed(hvp, flat, v, reps=reps)
    out["ggn_s"] = timed(gvp, flat, v, reps=reps)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def power_iteration(
    hvp: Any, x: Any, key: Any, *, max_iter: int, tol: float | None
) -> tuple[list[float], float]:
    """PyHessian's loop: v <- Hv/|Hv|, lambda = v.Hv, stop on relative change < tol.

    Returns the eigenvalue estimates and the seconds the loop took (after the compile)."""
    import jax
    import jax.numpy as jnp

    v = jax.random.normal(key, x.shape)
    v = v / jnp.linalg.norm(v)
    step = jax.jit(lambda x, v: (lambda hv: (jnp.vdot(v, hv), hv / jnp.linalg.norm(hv)))(hvp(x, v)))
    for _ in range(2):  # compile (and a first run) before the clock starts
        jax.block_until_ready(step(x, v))
    start = time.perf_counter()
    values: list[float] = []
    for _ in range(max_iter):
        lam, v = step(x, v)
        values.append(float(lam))
        if tol is not None and len(values) > 1:
            if abs(values[-1] - values[-2]) / (abs(values[-2]) + 1e-6) < tol:
                break
    return values, time.perf_counter() - start


def child_lanczos(quick: bool) -> dict[str, Any]:
    import jax

    from jaxflat import curvature

    flat, f, _, _, label = mlp_problem(quick)
    key = jax.random.key(0)
    out: dict[str, Any] = {"label": label, "params": int(flat.size)}

    # The converged value: a long Lanczos run with a tight tolerance.
    ref, _ = curvature.eigenvalues(f, flat, key=key, iters=300, tol=1e-7)
    out["converged"] = lam_star = float(ref[0])

    def lanczos(iters: int, tol: float) -> tuple[float, int, float, float]:
        counter = Counter()
        fn = jax.jit(
            lambda x, k: curvature.eigenvalues(counter.wrap(f), x, key=k, iters=iters, tol=tol)[0][
                0
            ]
        )
        start = time.perf_counter()
        compiled = fn.lower(flat, key).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        value = float(compiled(flat, key))
        jax.effects_barrier()
        return value, counter.n, time.perf_counter() - start, compile_s

    value, hvps, run_s, compile_s = lanczos(100, 1e-3)
    out["lanczos_default"] = dict(value=value, hvps=hvps, run_s=run_s, compile_s=compile_s)
    # the fewest Lanczos steps whose top Ritz value is within 1e-3 of the converged value
    lo, hi = 1, hvps
    while abs(lanczos(hi, 0.0)[0] - lam_star) > 1e-3 * abs(lam_star):
        lo, hi = hi, 2 * hi
    while lo < hi:
        mid = (lo + hi) // 2
        if abs(lanczos(mid, 0.0)[0] - lam_star) <= 1e-3 * abs(lam_star):
            hi = mid
        else:
            lo = mid + 1
    value, _, run_s, _ = lanczos(hi, 0.0)
    out["lanczos_to_1e-3"] = dict(value=value, hvps=hi, run_s=run_s)

    def hvp(x: Any, v: Any) -> Any:
        return curvature.hvp(f, x, v)

    values, elapsed = power_iteration(hvp, flat, key, max_iter=100, tol=1e-3)
    out["power_default"] = dict(value=values[-1], hvps=len(values), run_s=elapsed)
    values, elapsed = power_iteration(hvp, flat, key, max_iter=2000 if not quick else 500, tol=None)
    hit = next(
        (i for i, lam in enumerate(values) if abs(lam - lam_star) <= 1e-3 * abs(lam_star)), None
    )
    out["power_to_1e-3"] = dict(
        value=values[hit] if hit is not None else values[-1],
        hvps=hit + 1 if hit is not None else None,
        run_s=elapsed * (hit + 1) / len(values) if hit is not None else None,
        tried=len(values),
    )
    out["hvp_s"] = timed(jax.jit(hvp), flat, flat, reps=10)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def npz_problem(weights_path: str) -> tuple[Any, Any]:
    """The MLP as a dict of the weights PyHessian loads (same file), and its loss: no NNX."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxflat

    blob = np.load(weights_path)
    layers = sum(1 for name in blob.files if name.startswith("w"))
    params = {f"l{i}": {"w": blob[f"w{i}"], "b": blob[f"b{i}"]} for i in range(layers)}
    flat, re = jaxflat.destructure(jax.tree.map(jnp.asarray, params))
    xs, ys = jnp.asarray(blob["xs"]), jnp.asarray(blob["ys"])

    def f(v: jax.Array) -> jax.Array:
        p, h = re(v), xs
        for i in range(layers):
            h = h @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
            h = jnp.tanh(h) if i < layers - 1 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), ys[:, None], axis=1))

    return flat, f


def child_jaxflat_mlp(quick: bool, weights_path: str | None = None) -> dict[str, Any]:
    """A fresh process: build the MLP (NNX, or a dict of the weights PyHessian loads), top
    eigenvalue (defaults) and trace (100 probes), twice."""
    start = time.perf_counter()
    import jax

    from jaxflat import curvature

    flat, f = npz_problem(weights_path) if weights_path else mlp_problem(quick)[:2]
    out: dict[str, Any] = {}
    for call, seed in (("first", 0), ("second", 1)):  # the second: same f, another key
        key = jax.random.key(seed)
        t0 = time.perf_counter()
        vals, _ = curvature.eigenvalues(f, flat, key=key)
        top = float(vals[0])
        t1 = time.perf_counter()
        tr = float(curvature.trace(f, flat, key=key, samples=100))
        t2 = time.perf_counter()
        out[call] = dict(top=top, trace=tr, eig_s=t1 - t0, trace_s=t2 - t1)
        if call == "first":
            out["process_s"] = t2 - start
    return out


def child_pyhessian(quick: bool, weights_path: str) -> dict[str, Any]:
    """A fresh process: the same MLP and weights through PyHessian (GPL: run, never copied)."""
    start = time.perf_counter()
    import numpy as np
    import torch
    from pyhessian import hessian

    torch.manual_seed(0)
    blob = np.load(weights_path)
    n_layers = sum(1 for k in blob.files if k.startswith("w"))
    layers: list[Any] = []
    for i in range(n_layers):
        w, b = blob[f"w{i}"], blob[f"b{i}"]
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    xs, ys = torch.from_numpy(blob["xs"]), torch.from_numpy(blob["ys"]).long()
    comp = hessian(model, torch.nn.CrossEntropyLoss(), data=(xs, ys), cuda=False)
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for call in ("first", "second"):
        t0 = time.perf_counter()
        top, _ = comp.eigenvalues(top_n=1)  # maxIter=100, tol=1e-3
        t1 = time.perf_counter()
        tr = comp.trace(maxIter=100, tol=0)  # exactly 100 probes
        t2 = time.perf_counter()
        out[call] = dict(
            top=float(top[0]),
            trace=float(np.mean(tr)),
            trace_samples=len(tr),
            eig_s=t1 - t0,
            trace_s=t2 - t1,
        )
        if call == "first":
            out["process_s"] = t2 - start
    return out


def child_jit(quick: bool) -> dict[str, Any]:
    """Second eager call against the same call wrapped in jax.jit (medians of 5)."""
    import jax

    from jaxflat import curvature

    flat, f, _, _, _ = mlp_problem(quick)
    key = jax.random.key(0)
    calls = {
        "eigenvalues": lambda x, k: curvature.eigenvalues(f, x, key=k),
        "trace": lambda x, k: curvature.trace(f, x, key=k, samples=100),
        "density": lambda x, k: curvature.density(f, x, key=k, iters=50),
    }
    out: dict[str, Any] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call(flat, key))
        first = time.perf_counter() - start
        jitted = jax.jit(call)
        out[name] = dict(
            first_s=first, eager_s=timed(call, flat, key), jit_s=timed(jitted, flat, key)
        )
    return out


def child_blocks(quick: bool) -> dict[str, Any]:
    import jax

    from jaxflat import curvature

    flat, f, _, _, _ = mlp_problem(quick)
    key = jax.random.key(0)
    out: dict[str, Any] = {}
    for block in (1, 5, 10, 20, 25, 50, 100):
        fn = jax.jit(
            lambda x, k, block=block: curvature.trace(f, x, key=k, samples=100, block=block)
        )
        out[str(block)] = dict(s=timed(fn, flat, key, reps=3), trace=float(fn(flat, key)))
    return out


def child_memory(quick: bool, mode: str) -> dict[str, Any]:
    """eigenvalues(k=10) on a ~1M-parameter MLP: defaults, or every vector kept."""
    import jax

    from jaxflat import curvature

    widths = (784, 64, 10) if quick else (784, 1024, 200, 10)
    flat, f, _, _, label = mlp_problem(quick, widths)
    key = jax.random.key(0)
    rss0 = peak_rss_mib()
    start = time.perf_counter()
    if mode == "default":
        vals, _, info = curvature.eigenvalues(f, flat, key=key, k=10, info=True)
    else:  # every vector kept: no restart, full reorthogonalisation (30 block steps at most)
        vals, _, info = curvature.eigenvalues(
            f, flat, key=key, k=10, iters=30, basis=310, info=True
        )
    jax.block_until_ready(vals)
    return dict(
        label=label,
        params=int(flat.size),
        vals=[float(v) for v in vals],
        matvecs=int(info.matvecs),
        converged=bool(info.converged),
        s=time.perf_counter() - start,
        rss_before_mib=rss0,
        peak_rss_mib=peak_rss_mib(),
    )


def child_gpt2(quick: bool) -> dict[str, Any]:
    import jax

    from jaxflat import curvature

    flat, f, label, _ = gpt2_problem(quick)
    key = jax.random.key(0)
    out: dict[str, Any] = {
        "label": label,
        "params": int(flat.size),
        "rss_after_build_mib": peak_rss_mib(),
    }
    for name, call in (
        ("eigenvalues", lambda g, x: curvature.eigenvalues(g, x, key=key, iters=30)[0]),
        ("density", lambda g, x: curvature.density(g, x, key=key, iters=30)),
    ):
        counter = Counter()
        fn = jax.jit(lambda x, call=call, counter=counter: call(counter.wrap(f), x))
        start = time.perf_counter()
        compiled = fn.lower(flat).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(flat))
        jax.effects_barrier()
        run_s = time.perf_counter() - start
        out[name] = dict(
            compile_s=compile_s,
            run_s=run_s,
            hvps=counter.n,
            per_hvp_s=run_s / max(counter.n, 1),
            peak_rss_mib=peak_rss_mib(),
        )
        if name == "eigenvalues":
            out[name]["top"] = float(result[0])
        else:
            grid, dens = result
            out[name]["support"] = [float(grid[0]), float(grid[-1])]
    return out


# ---------------------------------------------------------------- parent


def run_child(
    args: list[str], timeout: float, python: str | None = None
) -> tuple[dict[str, Any] | None, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [python or sys.executable, str(HERE), "--child", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, "timeout"
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return None, wall, (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, ""


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--sections", default="hvp,lanczos,pyhessian,jit,blocks,memory,gpt2")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        name, rest = args.child[0], args.child[1:]
        quick = "quick" in rest
        if name == "hvp":
            result = child_hvp(rest[0], quick)
        elif name == "lanczos":
            result = child_lanczos(quick)
        elif name == "jaxflat-mlp":
            result = child_jaxflat_mlp(quick, rest[1] if len(rest) > 1 else None)
        elif name == "pyhessian":
            result = child_pyhessian(quick, rest[1])
        elif name == "gpt2":
            result = child_gpt2(quick)
        elif name == "jit":
            result = child_jit(quick)
        elif name == "blocks":
            result = child_blocks(quick)
        elif name == "memory":
            result = child_memory(quick, rest[1])
        else:
            raise SystemExit(f"unknown child {name}")
        print(json.dumps(result))
        return

    q = ["quick"] if args.quick else ["full"]
    sections = set(args.sections.split(","))
    import jax

    load0 = os.getloadavg()
    print(f"# jaxflat.curvature benchmarks{' (--quick)' if args.quick else ''}\n")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}; "
        f"load average at start {load0[0]:.1f}\n"
    )
    timeout = 600 if args.quick else 3600

    if "hvp" in sections:
        print("## HVP cost over gradient cost (jitted, steady, median)\n")
        print(
            "| model | grad ms | HVP ms | HVP/grad | GGN-vp ms | GGN/grad | grad temp MiB | HVP temp MiB "
            "| GGN temp MiB | peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for model in ("cnn", "gpt2"):
            progress(f"hvp: {model}")
            r, _, err = run_child(["hvp", model, *q], timeout)
            if r is None:
                print(f"| {model} | failed: {err} |||||")
                continue
            print(
                f"| {r['label']} | {r['grad_s'] * 1e3:.1f} | {r['hvp_s'] * 1e3:.1f} | "
                f"{r['hvp_s'] / r['grad_s']:.2f} | {r['ggn_s'] * 1e3:.1f} | {r['ggn_s'] / r['grad_s']:.2f} | "
                f"{r['grad_mem']['temp']:.0f} | {r['hvp_mem']['temp']:.0f} | {r['ggn_mem']['temp']:.0f} | "
                f"{r['peak_rss_mib']:.0f} |"
            )
        print(
            "\nTargets: HVP <= 2.5x and GGN-vector product <= 2.0x a gradient (GPT-2-sized). Temp: "
            "XLA's temporary buffers of the compiled program (memory_analysis); peak RSS: the child "
            "process's VmHWM.\n"
        )

    mlp_weights = None
    if "lanczos" in sections:
        progress("lanczos")
        r, _, err = run_child(["lanczos", *q], timeout)
        print("## Top eigenvalue to 1e-3 relative: Lanczos against power iteration\n")
        if r is None:
            print(f"failed: {err}\n")
        else:
            print(
                f"{r['label']}; converged top eigenvalue {r['converged']:.6f} "
                f"(Lanczos, 300 steps max, tol 1e-7); one HVP {r['hvp_s'] * 1e3:.1f} ms.\n"
            )
            print("| method | HVPs | top eigenvalue | rel. error | run s |")
            print("|---|---|---|---|---|")
            rows = [
                ("jaxflat Lanczos, defaults (tol 1e-3, iters 100)", r["lanczos_default"]),
                ("jaxflat Lanczos, fewest steps within 1e-3", r["lanczos_to_1e-3"]),
                ("power iteration, PyHessian's defaults (100, tol 1e-3)", r["power_default"]),
                ("power iteration, fewest steps within 1e-3", r["power_to_1e-3"]),
            ]
            for name, row in rows:
                err_rel = abs(row["value"] - r["converged"]) / abs(r["converged"])
                hvps = row["hvps"] if row["hvps"] is not None else f"> {row.get('tried')}"
                print(
                    f"| {name} | {hvps} | {row['value']:.6f} | {err_rel:.1e} | {fmt(row['run_s'])} |"
                )
            print(
                f"\nLanczos defaults compile once: {r['lanczos_default']['compile_s']:.1f} s (not in run s). "
                "Power iteration runs a jitted HVP step in a Python loop.\n"
            )

    if "pyhessian" in sections:
        print("## Side by side with PyHessian (same MLP and weights, fresh processes)\n")
        py = os.environ.get("PYHESSIAN_PYTHON") or (
            "/work/venv-torch/bin/python"
            if Path("/work/venv-torch/bin/python").exists()
            else sys.executable
        )
        try:
            subprocess.run(
                [py, "-c", "import torch, pyhessian"], check=True, capture_output=True, timeout=120
            )
            have = True
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            have = False
        if not have:
            print("Skipped: `torch` and `pyhessian` do not both import here.\n")
        else:
            import numpy as np

            _, _, mlp_weights, (xs, ys), label = mlp_problem(args.quick)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "mlp.npz")
                blobs = {f"w{i}": w for i, (w, _) in enumerate(mlp_weights)}
                blobs |= {f"b{i}": b for i, (_, b) in enumerate(mlp_weights)}
                np.savez(path, xs=xs, ys=ys, **blobs)
                progress("pyhessian")
                ph, ph_wall, ph_err = run_child(["pyhessian", q[0], path], timeout, python=py)
                progress("jaxflat fresh process")
                jf, jf_wall, jf_err = run_child(["jaxflat-mlp", *q], timeout)
                progress("jaxflat fresh process, weights from the file")
                jn, jn_wall, jn_err = run_child(["jaxflat-mlp", q[0], path], timeout)

            def fresh(r: dict[str, Any] | None, wall: float) -> float:
                """The child's wall time to exit, less its second calls: start to first answer."""
                return wall - (r["second"]["eig_s"] + r["second"]["trace_s"]) if r else wall

            ph_wall, jf_wall, jn_wall = fresh(ph, ph_wall), fresh(jf, jf_wall), fresh(jn, jn_wall)
            print(
                f"{label}. Top eigenvalue: defaults of each (PyHessian: power iteration, "
                "100 iterations max, tol 1e-3; jaxflat: Lanczos, tol 1e-3). Trace: 100 Rademacher "
                "probes on both sides (PyHessian `trace(maxIter=100, tol=0)`). The second call uses "
                "the same `f` (jaxflat: another key). Process wall: the child process from start "
                "(interpreter, imports, model) to the end of its first calls (its wall time to exit "
                "less the second calls). `jaxflat` builds the model with NNX (its "
                "initialisers compile); `jaxflat, file` loads the weights PyHessian loads, from the "
                "same file, into a dict of arrays (no NNX, no optax).\n"
            )
            print(
                "| | call | top eigenvalue | trace | eigenvalue s | trace s | top + trace s | process wall s |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for name, r, wall, err in (
                ("PyHessian", ph, ph_wall, ph_err),
                ("jaxflat", jf, jf_wall, jf_err),
                ("jaxflat, file", jn, jn_wall, jn_err),
            ):
                if r is None:
                    print(f"| {name} | failed: {err} |||||||")
                    continue
                for call in ("first", "second"):
                    c = r[call]
                    print(
                        f"| {name} | {call} | {c['top']:.6f} | {c['trace']:.2f} | {c['eig_s']:.2f} | "
                        f"{c['trace_s']:.2f} | {c['eig_s'] + c['trace_s']:.2f} | "
                        f"{wall:.1f} |"
                        if call == "first"
                        else f"| {name} | {call} | {c['top']:.6f} | {c['trace']:.2f} | {c['eig_s']:.2f} | "
                        f"{c['trace_s']:.2f} | {c['eig_s'] + c['trace_s']:.2f} | |"
                    )
            if ph is not None and jf is not None:
                ph2 = ph["second"]["eig_s"] + ph["second"]["trace_s"]
                jf2 = jf["second"]["eig_s"] + jf["second"]["trace_s"]
                jn2 = jn["second"]["eig_s"] + jn["second"]["trace_s"] if jn else float("nan")
                print(
                    f"\nWarm (second call) jaxflat / PyHessian: {jf2 / ph2:.2f}, from the file "
                    f"{jn2 / ph2:.2f} (target <= 0.5); fresh process: {jf_wall / ph_wall:.2f}, from "
                    f"the file {jn_wall / ph_wall:.2f} (target <= 1). PyHessian's trace used "
                    f"{ph['second']['trace_samples']} samples; torch {ph['torch']}, "
                    f"{ph['threads']} threads.\n"
                )

    if "jit" in sections:
        progress("jit")
        r, _, err = run_child(["jit", *q], timeout)
        print(
            "## Second eager call against the same call under jax.jit (MLP above, medians of 5)\n"
        )
        if r is None:
            print(f"failed: {err}\n")
        else:
            print("| call | first eager s (compiles) | second eager s | jitted s | eager / jit |")
            print("|---|---|---|---|---|")
            for name, c in r.items():
                print(
                    f"| {name} | {c['first_s']:.2f} | {c['eager_s']:.3f} | {c['jit_s']:.3f} | "
                    f"{c['eager_s'] / c['jit_s']:.2f} |"
                )
            print(
                "\nTarget: eager / jit <= 1.2 (eigenvalues defaults; trace 100 probes; density "
                "iters=50).\n"
            )

    if "blocks" in sections:
        progress("blocks")
        r, _, err = run_child(["blocks", *q], timeout)
        print(
            "## trace with 100 probes: probes per product (`block=`), MLP above, jitted, median of 3\n"
        )
        if r is None:
            print(f"failed: {err}\n")
        else:
            one = r["1"]["s"]
            print("| block | s | speed-up over block=1 | trace |")
            print("|---|---|---|---|")
            for block, c in r.items():
                print(f"| {block} | {c['s']:.3f} | {one / c['s']:.2f} | {c['trace']:.2f} |")
            print("\nTarget: >= 3x over one probe at a time.\n")

    if "memory" in sections:
        print(
            "## eigenvalues(k=10) on ~1M parameters: bounded basis (defaults) against full "
            "reorthogonalisation\n"
        )
        rows = []
        for mode in ("default", "full"):
            progress(f"memory {mode}")
            r, wall, err = run_child(["memory", q[0], mode], timeout)
            rows.append((mode, r, err))
        print(
            "| run | params | products | converged | s | peak RSS MiB (after model) | top 10 eigenvalues |"
        )
        print("|---|---|---|---|---|---|---|")
        for mode, r, err in rows:
            if r is None:
                print(f"| {mode} | failed: {err} ||||||")
                continue
            name = "defaults (basis 50)" if mode == "default" else "every vector kept (basis 310)"
            print(
                f"| {name} | {r['params']:,} | {r['matvecs']} | {r['converged']} | {r['s']:.1f} | "
                f"{r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) | "
                f"{', '.join(f'{v:.5f}' for v in r['vals'])} |"
            )
        if all(r is not None for _, r, _ in rows):
            import numpy as np

            a, b = (np.asarray(r["vals"]) for _, r, _ in rows)
            print(
                f"\nLargest relative difference: {np.max(np.abs(a - b) / np.abs(b)):.1e} (target 1e-4); "
                f"target peak RSS <= 1024 MiB with the defaults.\n"
            )

    if "gpt2" in sections:
        progress("gpt2")
        r, _, err = run_child(["gpt2", *q], timeout)
        print(
            "## GPT-2-sized curvature (defaults: the basis shrinks to what 256 MiB holds, at least "
            "k + 1 + 2 blocks)\n"
        )
        if r is None:
            print(f"failed: {err}\n")
        else:
            print(
                f"{r['label']}; peak RSS after building it: {r['rss_after_build_mib']:.0f} MiB.\n"
            )
            print("| call | HVPs | result | compile s | run s | s per HVP | peak RSS MiB |")
            print("|---|---|---|---|---|---|---|")
            e, d = r["eigenvalues"], r["density"]
            print(
                f"| eigenvalues(iters=30) | {e['hvps']} | top {e['top']:.5g} | "
                f"{e['compile_s']:.1f} | {e['run_s']:.1f} | {e['per_hvp_s']:.2f} | {e['peak_rss_mib']:.0f} |"
            )
            print(
                f"| density(iters=30) | {d['hvps']} | support "
                f"[{d['support'][0]:.3g}, {d['support'][1]:.3g}] | {d['compile_s']:.1f} | "
                f"{d['run_s']:.1f} | {d['per_hvp_s']:.2f} | {d['peak_rss_mib']:.0f} |"
            )
            print(
                "\nTarget: within 8 GiB peak RSS. eigenvalues: a basis of 4 vectors (k + 1 Ritz "
                "vectors kept at a restart); density runs the plain recurrence (no vectors kept).\n"
            )

    load1 = os.getloadavg()
    print(f"Load average at the end: {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min).")


if __name__ == "__main__":
    main()
