"""Hot: the first calls of one structure, one by one, then its steady state."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import harness as h

import jaxflat

SHOWN = (1, 2, 3, 5, 10)


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    shown = [c for c in SHOWN if c <= cfg.calls]
    settle = f" and a {cfg.settle:g} s wait" if cfg.settle else ""
    rep.section(
        "Hot flatten and rebuild",
        "`call k`: the k-th call of a new structure in this process, timed alone "
        "(`destructure(tree)` for flatten, `re(flat)` for rebuild); `settled`: median of "
        f"{cfg.reps} interleaved samples after {cfg.settled} calls{settle} and 2 more (a "
        "structure buys its compiled programs once its host path has cost their compile).",
    )
    rows: dict[str, list[Any]] = {"flatten": [], "rebuild": []}
    for spec in cfg.hot:
        h.log(f"hot {spec}")
        tree = h.build(spec)
        leaves, params = h.describe(tree)
        t0 = time.perf_counter()
        flat, re = jaxflat.destructure(tree)  # flatten call 1
        calls = {"flatten": [time.perf_counter() - t0 + h.timed(lambda v=flat: v)]}
        jf = {
            "flatten": lambda t=tree: jaxflat.destructure(t)[0],
            "rebuild": lambda r=re, v=flat: r(v),
        }
        calls["flatten"] += [h.timed(jf["flatten"]) for _ in range(cfg.calls - 1)]
        calls["rebuild"] = [h.timed(jf["rebuild"]) for _ in range(cfg.calls)]
        for _ in range(cfg.settled - cfg.calls):
            h.timed(jf["flatten"]), h.timed(jf["rebuild"])
        time.sleep(cfg.settle)
        small = leaves <= cfg.baseline_max_leaves
        floor = h.Floor(tree, jit=small)  # built after: it would warm caches jaxflat uses
        for op, fns in (("flatten", floor.flatten()), ("rebuild", floor.rebuild(small))):
            res = h.medians({"jaxflat": jf[op], **fns}, cfg.reps)
            rows[op].append({"workload": spec, "leaves": leaves, "params": params})
            rows[op][-1].update(calls=calls[op], **res)
        del tree, floor, flat, re, jf
    for op in ("flatten", "rebuild"):
        rep.out(f"### {op.capitalize()}\n")
        rep.table(
            ["workload", "leaves", *(f"call {c}" for c in shown), "settled"]
            + ["ravel", "jit", "copy", *h.RATIO_HEADERS],
            [
                [r["workload"], str(r["leaves"]), *(h.ms(r["calls"][c - 1]) for c in shown)]
                + [h.ms(r[k]) for k in ("jaxflat", "ravel", "jit", "copy")]
                + h.ratios(r["jaxflat"], r)
                for r in rows[op]
            ],
        )
    rep.data["sections"]["hot"] = rows
