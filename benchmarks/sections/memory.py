"""A big tree with few leaves (1e8 parameters): time against a copy, peak RSS."""

from __future__ import annotations

import gc
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
    before, exact = h.rss_mib()["VmRSS"], h.reset_peak()
    out: list = []  # keeps the result alive while the peak is read
    first = h.timed(lambda: out.append(fn()) or out[0])
    peak = h.rss_mib()["VmHWM"]
    vector_mib = sum(a.nbytes for a in jax.tree.leaves(out)) / 2**20
    del out[:]
    floor = h.Floor(tree)
    fns = floor.flatten() if op == "flatten" else floor.rebuild()
    res = h.medians({"jaxflat": fn, **fns}, reps, warmup=1)
    h.emit(
        {
            "first": first,
            "growth_mib": peak - before,
            "vector_mib": vector_mib,
            **res,
            "peak_exact": exact,
        }
    )


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.section(
        f"Big tree: `{cfg.memory}` (few leaves), time and peak memory",
        "A fresh process per op builds the tree (for rebuild: destructures it), resets "
        "the kernel's peak-RSS counter (`/proc/self/clear_refs`), times jaxflat's first "
        "call (`first`) and reads the peak (`VmHWM`; `ru_maxrss` elsewhere, marked *): "
        "`growth/vector` is the peak's growth over the output's size (a copy: 1.0). "
        "Then medians of interleaved samples: `steady` is jaxflat's.",
    )
    rows, table = [], []
    for op in ("flatten", "rebuild"):
        h.log(f"memory {op} {cfg.memory}")
        arg = {"op": op, "spec": cfg.memory, "reps": max(3, cfg.reps // 3)}
        r = {"op": op, **h.spawn("sections.memory:child", arg, cfg.timeout)}
        rows.append(r)
        if "jaxflat" not in r:
            table.append([op, r["status"], *[""] * 10])
            continue
        table.append(
            [op, *(h.ms(r[k]) for k in ("first", "jaxflat", "ravel", "jit", "copy"))]
            + h.ratios(r["jaxflat"], r)
            + [f"{r['growth_mib']:.0f}", f"{r['vector_mib']:.0f}"]
            + [h.x(r["growth_mib"], r["vector_mib"]) + ("" if r["peak_exact"] else " *")]
        )
    rep.table(
        ["op", "first", "steady", "ravel", "jit", "copy", *h.RATIO_HEADERS]
        + ["peak growth MiB", "vector MiB", "growth/vector"],
        table,
    )
    rep.data["sections"]["memory"] = rows
