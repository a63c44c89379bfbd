"""Benchmarks of jaxflat.curvature (standalone; see benchmarks/README.md).

Sections, each measured in a fresh child process (so peak RSS is its own):

  hvp       Hessian-vector product time over gradient time (jitted, steady)
            and memory, on an NNX CNN with BatchNorm and a GPT-2-small-sized
            NNX transformer (124M parameters, tied embedding).
  lanczos   top eigenvalue to 1e-3 relative: HVPs and time, Lanczos against
            power iteration (PyHessian's algorithm), 784-256-256-10 tanh MLP.
  pyhessian the same MLP and weights through PyHessian (only if torch and
            pyhessian import; never a dependency), fresh process against
            fresh process.
  gpt2      GPT-2-sized: top eigenvalue (30 Lanczos steps) and a 30-step
            density without reorthogonalisation; peak RSS, time per HVP.

Usage:
  python benchmarks/curvature.py            # everything; ~10+ minutes on 2 cores
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


def cnn_problem(quick: bool) -> tuple[Any, Any, str]:
    import jax
    import optax
    from flax import nnx

    import jaxflat

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

    return flat, f, f"CNN+BN, {flat.size:,} params, batch {batch} of 32x32x3"


def gpt2_config(quick: bool) -> dict[str, int]:
    if quick:
        return dict(vocab=1000, ctx=64, d=64, heads=4, layers=2, batch=2, seq=16)
    return dict(vocab=50257, ctx=1024, d=768, heads=12, layers=12, batch=2, seq=32)


def gpt2_problem(quick: bool) -> tuple[Any, Any, str]:
    """A GPT-2-small-shaped NNX transformer (tied embedding), next-token loss on random tokens."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxflat

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
    flat, re = jaxflat.destructure(model)
    del model
    tokens = jax.random.randint(jax.random.key(1), (c["batch"], c["seq"] + 1), 0, c["vocab"])

    def f(v: jax.Array) -> jax.Array:
        logits = re(v)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    label = f"GPT-2-sized, {flat.size:,} params, batch {c['batch']} x {c['seq']} tokens"
    return flat, f, label


def mlp_problem(quick: bool) -> tuple[Any, Any, Any, Any, str]:
    """784-256-256-10 tanh MLP, 512 random samples, cross-entropy (returns weights, data too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jaxflat

    widths = (784, 32, 32, 10) if quick else (784, 256, 256, 10)
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

    flat, f, label = (cnn_problem if model == "cnn" else gpt2_problem)(quick)
    v = jax.random.normal(jax.random.key(2), flat.shape)
    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda x, v: curvature.hvp(f, x, v))
    reps = 3 if model == "gpt2" else 10
    out: dict[str, Any] = {"label": label, "params": int(flat.size)}
    out["grad_mem"], out["hvp_mem"] = compiled_mib(grad, flat), compiled_mib(hvp, flat, v)
    out["grad_s"] = timed(grad, flat, reps=reps)
    out["hvp_s"] = timed(hvp, flat, v, reps=reps)
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
        fn = jax.jit(lambda x, k: curvature.eigenvalues(counter.wrap(f), x, key=k, iters=iters, tol=tol)[0][0])
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
    hit = next((i for i, lam in enumerate(values) if abs(lam - lam_star) <= 1e-3 * abs(lam_star)), None)
    out["power_to_1e-3"] = dict(
        value=values[hit] if hit is not None else values[-1],
        hvps=hit + 1 if hit is not None else None,
        run_s=elapsed * (hit + 1) / len(values) if hit is not None else None,
        tried=len(values),
    )
    out["hvp_s"] = timed(jax.jit(hvp), flat, flat, reps=10)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def child_jaxflat_mlp(quick: bool) -> dict[str, Any]:
    """A fresh process: build the MLP, top eigenvalue (defaults) and trace (100 samples)."""
    start = time.perf_counter()
    import jax

    from jaxflat import curvature

    flat, f, _, _, _ = mlp_problem(quick)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    vals, _ = curvature.eigenvalues(f, flat, key=key)
    top = float(vals[0])
    t1 = time.perf_counter()
    tr = float(curvature.trace(f, flat, key=key, samples=100))
    t2 = time.perf_counter()
    return dict(top=top, trace=tr, eig_s=t1 - t0, trace_s=t2 - t1, process_s=t2 - start)


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
    t0 = time.perf_counter()
    top, _ = comp.eigenvalues(top_n=1)  # maxIter=100, tol=1e-3
    t1 = time.perf_counter()
    tr = comp.trace()  # maxIter=100, tol=1e-3
    t2 = time.perf_counter()
    return dict(top=float(top[0]), trace=float(np.mean(tr)), trace_samples=len(tr),
                eig_s=t1 - t0, trace_s=t2 - t1, process_s=t2 - start, torch=torch.__version__)


def child_gpt2(quick: bool) -> dict[str, Any]:
    import jax

    from jaxflat import curvature

    flat, f, label = gpt2_problem(quick)
    key = jax.random.key(0)
    out: dict[str, Any] = {"label": label, "params": int(flat.size), "rss_after_build_mib": peak_rss_mib()}
    for name, call in (
        ("eigenvalues", lambda g, x: curvature.eigenvalues(g, x, key=key, iters=30, reorth=False)[0]),
        ("density", lambda g, x: curvature.density(g, x, key=key, iters=30, reorth=False)),
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
        out[name] = dict(compile_s=compile_s, run_s=run_s, hvps=counter.n,
                         per_hvp_s=run_s / max(counter.n, 1), peak_rss_mib=peak_rss_mib())
        if name == "eigenvalues":
            out[name]["top"] = float(result[0])
        else:
            grid, dens = result
            out[name]["support"] = [float(grid[0]), float(grid[-1])]
    return out


# ---------------------------------------------------------------- parent


def run_child(args: list[str], timeout: float) -> tuple[dict[str, Any] | None, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True,
                              text=True, timeout=timeout)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--sections", default="hvp,lanczos,pyhessian,gpt2")
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
            result = child_jaxflat_mlp(quick)
        elif name == "pyhessian":
            result = child_pyhessian(quick, rest[1])
        elif name == "gpt2":
            result = child_gpt2(quick)
        else:
            raise SystemExit(f"unknown child {name}")
        print(json.dumps(result))
        return

    q = ["quick"] if args.quick else ["full"]
    sections = set(args.sections.split(","))
    import jax

    load0 = os.getloadavg()
    print(f"# jaxflat.curvature benchmarks{' (--quick)' if args.quick else ''}\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}; "
          f"load average at start {load0[0]:.1f}\n")
    timeout = 600 if args.quick else 3600

    if "hvp" in sections:
        print("## HVP cost over gradient cost (jitted, steady, median)\n")
        print("| model | grad ms | HVP ms | HVP/grad | grad temp MiB | HVP temp MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for model in ("cnn", "gpt2"):
            progress(f"hvp: {model}")
            r, _, err = run_child(["hvp", model, *q], timeout)
            if r is None:
                print(f"| {model} | failed: {err} |||||")
                continue
            print(f"| {r['label']} | {r['grad_s'] * 1e3:.1f} | {r['hvp_s'] * 1e3:.1f} | "
                  f"{r['hvp_s'] / r['grad_s']:.2f} | {r['grad_mem']['temp']:.0f} | "
                  f"{r['hvp_mem']['temp']:.0f} | {r['peak_rss_mib']:.0f} |")
        print("\nTarget: HVP <= 3x a gradient. Temp: XLA's temporary buffers of the compiled "
              "program (memory_analysis); peak RSS: the child process's VmHWM.\n")

    mlp_weights = None
    if "lanczos" in sections:
        progress("lanczos")
        r, _, err = run_child(["lanczos", *q], timeout)
        print("## Top eigenvalue to 1e-3 relative: Lanczos against power iteration\n")
        if r is None:
            print(f"failed: {err}\n")
        else:
            print(f"{r['label']}; converged top eigenvalue {r['converged']:.6f} "
                  f"(Lanczos, 300 steps max, tol 1e-7); one HVP {r['hvp_s'] * 1e3:.1f} ms.\n")
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
                print(f"| {name} | {hvps} | {row['value']:.6f} | {err_rel:.1e} | {fmt(row['run_s'])} |")
            print(f"\nLanczos defaults compile once: {r['lanczos_default']['compile_s']:.1f} s (not in run s). "
                  "Power iteration runs a jitted HVP step in a Python loop.\n")

    if "pyhessian" in sections:
        print("## Side by side with PyHessian (fresh processes, same MLP and weights)\n")
        try:
            subprocess.run([sys.executable, "-c", "import torch, pyhessian"], check=True,
                           capture_output=True, timeout=120)
            have = True
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
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
                ph, ph_wall, ph_err = run_child(["pyhessian", q[0], path], timeout)
                progress("jaxflat fresh process")
                jf, jf_wall, jf_err = run_child(["jaxflat-mlp", *q], timeout)
            print(f"{label}. Top eigenvalue: defaults of each (PyHessian: power iteration, "
                  "100 iterations max, tol 1e-3; jaxflat: Lanczos, tol 1e-3). Trace: PyHessian's "
                  "Hutchinson (up to 100 samples, tol 1e-3); jaxflat's Hutchinson, 100 samples.\n")
            print("| | top eigenvalue | trace | eigenvalue s | trace s | process wall s |")
            print("|---|---|---|---|---|---|")
            for name, r, wall, err in (("PyHessian", ph, ph_wall, ph_err), ("jaxflat", jf, jf_wall, jf_err)):
                if r is None:
                    print(f"| {name} | failed: {err} |||||")
                else:
                    print(f"| {name} | {r['top']:.6f} | {r['trace']:.2f} | {r['eig_s']:.2f} | "
                          f"{r['trace_s']:.2f} | {wall:.1f} |")
            if ph is not None:
                print(f"\nPyHessian's trace used {ph['trace_samples']} samples; torch {ph['torch']}.\n")

    if "gpt2" in sections:
        progress("gpt2")
        r, _, err = run_child(["gpt2", *q], timeout)
        print("## GPT-2-sized curvature (no reorthogonalisation: `reorth=False`)\n")
        if r is None:
            print(f"failed: {err}\n")
        else:
            print(f"{r['label']}; peak RSS after building it: {r['rss_after_build_mib']:.0f} MiB.\n")
            print("| call | HVPs | result | compile s | run s | s per HVP | peak RSS MiB |")
            print("|---|---|---|---|---|---|---|")
            e, d = r["eigenvalues"], r["density"]
            print(f"| eigenvalues(iters=30, reorth=False) | {e['hvps']} | top {e['top']:.5g} | "
                  f"{e['compile_s']:.1f} | {e['run_s']:.1f} | {e['per_hvp_s']:.2f} | {e['peak_rss_mib']:.0f} |")
            print(f"| density(iters=30, reorth=False) | {d['hvps']} | support "
                  f"[{d['support'][0]:.3g}, {d['support'][1]:.3g}] | {d['compile_s']:.1f} | "
                  f"{d['run_s']:.1f} | {d['per_hvp_s']:.2f} | {d['peak_rss_mib']:.0f} |")
            print("\nTarget: within 8 GiB peak RSS. eigenvalues without kept vectors runs the "
                  "Lanczos recurrence twice (the second pass builds the eigenvector).\n")

    load1 = os.getloadavg()
    print(f"Load average at the end: {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min).")


if __name__ == "__main__":
    main()
