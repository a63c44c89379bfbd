"""Churn: thousands of distinct small structures (issue 9, bug 4). RSS growth,
and how long the process takes to exit after its last call."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any

import harness as h
import jax
import numpy as np


def structure(i: int) -> dict[str, Any]:
    """The i-th structure: a dict of 1-37 small float32 arrays, keys unique to i."""
    return {
        f"s{i}_{j}": jax.numpy.asarray(np.full(1 + (i + 3 * j) % 13, j, np.float32))
        for j in range(1 + i % 37)
    }


def child(who: str, n: int, repeat: int = 3) -> None:
    """Destructure and rebuild each structure ``repeat`` times; progress every 250."""
    if who == "jaxflat":
        import jaxflat

        def step(t: Any) -> Any:
            flat, re = jaxflat.destructure(t)
            return re(flat)
    else:
        from jax.flatten_util import ravel_pytree

        def step(t: Any) -> Any:
            flat, unravel = ravel_pytree(t)
            return unravel(flat)

    h.warm_backend()
    before = h.rss_mib()["VmRSS"]
    loop_s = copy_s = 0.0
    for i in range(n):
        tree = structure(i)
        buf = np.ones(sum(x.nbytes for x in tree.values()), np.uint8)
        t0 = time.perf_counter()
        for _ in range(2 * repeat):  # the floor: a copy per flatten and per rebuild
            buf.copy()
        t1 = time.perf_counter()
        for _ in range(repeat):
            jax.block_until_ready(step(tree))
        loop_s += time.perf_counter() - t1
        copy_s += t1 - t0
        if (i + 1) % 250 == 0 or i + 1 == n:
            growth = h.rss_mib()["VmRSS"] - before
            out = {"done": i + 1, "calls": 2 * repeat * (i + 1), "loop_s": loop_s}
            h.emit({**out, "copy_s": copy_s, "growth_mib": growth, "last_call": time.time()})


def measure(who: str, n: int, loop_timeout: float, exit_timeout: float) -> dict[str, Any]:
    """Run the child; wait up to ``loop_timeout`` s for its last call and then up to
    ``exit_timeout`` s for it to exit (timed from the parent, killed after)."""
    cmd = [sys.executable, str(h.HERE / "bench.py"), "--child", "sections.churn:child"]
    cmd += ["--arg", json.dumps({"who": who, "n": n})]
    last: dict[str, Any] = {}
    finished = threading.Event()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)

        def read() -> None:
            for line in proc.stdout or ():
                if line.startswith(h.MARK):
                    last.update(json.loads(line[len(h.MARK) :]))
                    if last["done"] == n:
                        finished.set()
            finished.set()  # EOF: the child has exited

        threading.Thread(target=read, daemon=True).start()
        finished.wait(loop_timeout)
        exit_s: Any
        if last.get("done") == n:
            try:
                proc.wait(timeout=exit_timeout)
                exit_s = time.time() - last["last_call"]
            except subprocess.TimeoutExpired:
                exit_s = f"did not exit in {exit_timeout:.0f} s"
        else:
            exit_s = "crashed" if proc.poll() else f"loop killed at {loop_timeout:.0f} s"
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if exit_s == "crashed":
            err.seek(0)
            h.log(f"churn {who} failed (rc {proc.returncode}):\n{err.read()[-2000:]}")
    return {"who": who, "exit_s": exit_s, **last}


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    sizes, exit_timeout = {"jaxflat": cfg.churn, "ravel": min(cfg.churn, cfg.churn_ravel)}, 300.0
    rep.out(f"## Churn: {cfg.churn} distinct structures")
    rep.out()
    rep.out(
        "One fresh process per contender: distinct dicts of 1-37 small float32 arrays, "
        "each flattened and rebuilt 3 times (`destructure` + `re(flat)`; `ravel_pytree` + "
        f"unravel, on the first {sizes['ravel']} structures only: it compiles eager ops for "
        "each). `loop ms`: the calls' time (building the trees not counted); `copy ms`: a "
        "numpy copy of each tree's bytes per call (the floor); RSS growth over the loop; "
        "`exit s`: from the child's last call until the parent saw it exit (killed after "
        f"{exit_timeout:.0f} s; a loop not done in {cfg.timeout:.0f} s is killed too, its "
        "progress shown). Ratios are per call. No jitted floor: it compiles per structure."
    )
    rep.out()
    rows = []
    for who, n in sizes.items():
        h.log(f"churn {who} x {n}")
        rows.append({"n": n, **measure(who, n, cfg.timeout, exit_timeout)})
    per_call = {r["who"]: r["loop_s"] / r["calls"] if r.get("calls") else None for r in rows}
    table = [
        [r["who"], f"{r.get('done', 0)}/{r['n']}", str(r.get("calls", 0)), h.ms(r.get("loop_s"))]
        + [h.ms(per_call[r["who"]]), h.ms(r.get("copy_s"))]
        + [f"{r['growth_mib']:.0f}" if "growth_mib" in r else "n/a"]
        + [f"{r['exit_s']:.2f}" if isinstance(r["exit_s"], float) else str(r["exit_s"])]
        + [h.x(per_call["jaxflat"], per_call["ravel"]) if r["who"] == "jaxflat" else ""]
        + [h.x(r.get("loop_s"), r.get("copy_s"))]
        for r in rows
    ]
    rep.table(
        ["contender", "structures", "calls", "loop ms", "ms/call", "copy ms", "RSS growth MiB"]
        + ["exit s", "jf/ravel", "loop/copy"],
        table,
    )
    rep.data["sections"]["churn"] = rows
