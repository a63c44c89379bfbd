"""Churn (issue 9, bug 4): many distinct small structures in one process; RSS
growth, and how long the process takes to exit after its last call."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any

import harness as h
import jax
import numpy as np


def child(who: str, n: int, repeat: int = 3) -> None:
    """Destructure and rebuild each of n structures ``repeat`` times; progress every 250."""
    if who == "jaxflat":
        from jaxflat import destructure as flatten
    else:
        from jax.flatten_util import ravel_pytree as flatten
    h.warm_backend()
    before, loop_s, copy_s = h.rss_mib()["VmRSS"], 0.0, 0.0
    for i in range(n):  # the i-th structure: a dict of 1-37 small arrays, keys unique to i
        tree = {
            f"s{i}_{j}": jax.numpy.full(1 + (i + 3 * j) % 13, j, "float32")
            for j in range(1 + i % 37)
        }
        buf = np.ones(sum(a.nbytes for a in tree.values()), np.uint8)
        t0 = time.perf_counter()
        for _ in range(2 * repeat):  # the floor: a copy per flatten and per rebuild
            buf.copy()
        t1 = time.perf_counter()
        for _ in range(repeat):
            flat, re = flatten(tree)
            jax.block_until_ready(re(flat))
        loop_s, copy_s = loop_s + time.perf_counter() - t1, copy_s + t1 - t0
        if (i + 1) % 250 == 0 or i + 1 == n:
            h.emit(
                {
                    "done": i + 1,
                    "calls": 2 * repeat * (i + 1),
                    "loop_s": loop_s,
                    "copy_s": copy_s,
                    "growth_mib": h.rss_mib()["VmRSS"] - before,
                    "last_call": time.time(),
                }
            )


def measure(who: str, n: int, loop_timeout: float, exit_timeout: float) -> dict[str, Any]:
    """Run the child (a normal exit); wait up to ``loop_timeout`` s for its last call,
    then up to ``exit_timeout`` s for it to exit, timed from here; kill it after."""
    last: dict[str, Any] = {}
    finished = threading.Event()
    with tempfile.TemporaryFile("w+") as err:
        cmd = h.child_cmd("sections.churn:child", {"who": who, "n": n})
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
        exit_s: Any = "crashed" if proc.poll() else f"loop killed at {loop_timeout:.0f} s"
        if last.get("done") == n:
            try:
                proc.wait(timeout=exit_timeout)
                exit_s = time.time() - last["last_call"]
            except subprocess.TimeoutExpired:
                exit_s = f"did not exit in {exit_timeout:.0f} s"
        if proc.poll() is None:
            proc.kill()
        if proc.wait() not in (0, -9):
            err.seek(0)
            h.log(f"churn {who} failed (rc {proc.returncode}):\n{err.read()[-2000:]}")
    return {"who": who, "n": n, "exit_s": exit_s, **last}


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    sizes, exit_timeout = {"jaxflat": cfg.churn, "ravel": min(cfg.churn, cfg.churn_ravel)}, 300
    rep.section(
        f"Churn: {cfg.churn} distinct structures",
        "A fresh process per contender: distinct dicts of 1-37 small float32 arrays, each "
        "flattened and rebuilt 3 times (`destructure` + `re(flat)`; `ravel_pytree` + unravel, "
        f"on the first {sizes['ravel']} only: it compiles eager ops for each). `loop ms`: "
        "the calls (not building the trees); `copy ms`: a numpy copy of each tree's bytes "
        "per call (the floor); RSS growth over the loop; `exit s`: from the last call until "
        f"the parent saw the process exit (killed after {exit_timeout} s; a loop not done "
        f"in {cfg.timeout:.0f} s is killed too, its progress shown). No jitted floor: it "
        "compiles once per structure.",
    )
    rows = []
    for who, n in sizes.items():
        h.log(f"churn {who} x {n}")
        rows.append(measure(who, n, cfg.timeout, exit_timeout))
    per_call = {r["who"]: r["loop_s"] / r["calls"] if r.get("calls") else None for r in rows}
    table = [
        [r["who"], f"{r.get('done', 0)}/{r['n']}", str(r.get("calls", 0)), h.ms(r.get("loop_s"))]
        + [h.ms(per_call[r["who"]]), h.ms(r.get("copy_s")), f"{r.get('growth_mib', 0):.0f}"]
        + [f"{r['exit_s']:.2f}" if isinstance(r["exit_s"], float) else r["exit_s"]]
        + [h.x(per_call["jaxflat"], per_call["ravel"]) if r["who"] == "jaxflat" else ""]
        + [h.x(r.get("loop_s"), r.get("copy_s"))]
        for r in rows
    ]
    rep.table(
        ["contender", "structures", "calls", "loop ms", "ms/call", "copy ms"]
        + ["RSS growth MiB", "exit s", "jf/ravel", "loop/copy"],
        table,
    )
    rep.data["sections"]["churn"] = rows
