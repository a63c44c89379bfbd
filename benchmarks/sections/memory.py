"""A big tree with few leaves (1e8 parameters): time against a copy, peak RSS."""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import harness as h
import jax


def child(op: str, spec: str, reps: int) -> None:
    import jaxflat

    tree = h.build(spec)
    h.warm_backend()
    flat, re = jaxflat.destructure(tree) if op == "rebuild" else (None, None)
    fn = (lambda: jaxflat.destructure(tree)[0]) if op == "flatten" else (lambda: re(flat))
    gc.collect()
    before = h.rss_mib()["VmRSS"]
    exact = h.reset_peak()
    t0 = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    peak = h.rss_mib()["VmHWM"]
    out_mib = sum(x.nbytes for x in jax.tree.leaves(result)) / 2**20
    del result
    floor = h.Floor(tree)
    fns = floor.flatten() if op == "flatten" else floor.rebuild()
    res = h.medians({"jaxflat": fn, **fns}, reps, warmup=1)
    h.emit(
        {
            "first": first,
            "growth_mib": peak - before,
            "vector_mib": out_mib,
            "peak_exact": exact,
            **res,
        }
    )


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.out(f"## Big tree: `{cfg.memory}` (few leaves), time and peak memory")
    rep.out()
    rep.out(
        "One fresh process per op: build the tree (for rebuild: destructure it), reset "
        "the kernel's peak-RSS counter (`/proc/self/clear_refs`), time jaxflat's first "
        "call and read the peak (`VmHWM`; `ru_maxrss` elsewhere). `growth/vector` is the "
        "peak growth over the output's size (1.0 is a copy's). Then ms, medians of "
        "interleaved samples: jaxflat's steady call, ravel_pytree / unravel, the jitted "
        "concat / split (compiled beforehand) and a numpy copy of the vector's bytes."
    )
    rep.out()
    rows, table = [], []
    for op in ("flatten", "rebuild"):
        h.log(f"memory {op} {cfg.memory}")
        arg = {"op": op, "spec": cfg.memory, "reps": max(3, cfg.reps // 3)}
        r = h.spawn("sections.memory:child", arg, cfg.timeout)
        rows.append({"op": op, **r})
        if "jaxflat" not in r:
            table.append([op, r["status"]] + [""] * 10)
            continue
        table.append(
            [op, h.ms(r["first"])]
            + [h.ms(r[k]) for k in ("jaxflat", "ravel", "jit", "copy")]
            + h.ratios(r["jaxflat"], r)
            + [f"{r['growth_mib']:.0f}", f"{r['vector_mib']:.0f}"]
            + [h.x(r["growth_mib"], r["vector_mib"]) + ("" if r["peak_exact"] else " (*)")]
        )
    rep.table(
        ["op", "first", "steady", "ravel", "jit", "copy", *h.RATIO_HEADERS]
        + ["peak growth MiB", "vector MiB", "growth/vector"],
        table,
    )
    rep.data["sections"]["memory"] = rows
