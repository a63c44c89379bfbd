"""Hot flatten and rebuild: the first calls of one structure, one by one, then
the steady state, against ravel_pytree, the jitted floor and a copy."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import harness as h
import jax

import jaxflat

SHOWN = (1, 2, 3, 5, 10)


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    shown = [c for c in SHOWN if c <= cfg.calls]
    rep.out("## Hot flatten and rebuild")
    rep.out()
    rep.out(
        f"ms. `call k`: the k-th call of a new structure in this process, timed alone "
        f"(`destructure(tree)` for flatten, `re(flat)` for rebuild). `steady`: median of "
        f"{cfg.reps} interleaved samples after those {cfg.calls} calls"
        + (f" and a {cfg.settle:g} s wait" if cfg.settle else "")
        + " (plus 2 warm-up calls). `jit`: `jax.jit` of a concatenate of ravels / of a "
        "`lax.split` + reshape, compiled beforehand (the floor); `ravel`: eager "
        "`ravel_pytree` / its unravel; `copy`: numpy copy of the flat vector's bytes."
    )
    rep.out()
    rows: dict[str, list[Any]] = {"flatten": [], "rebuild": []}
    for spec in cfg.hot:
        h.log(f"hot {spec}")
        tree = h.build(spec)
        leaves, params = h.describe(tree)
        t0 = time.perf_counter()
        flat, re = jaxflat.destructure(tree)  # flatten call 1
        jax.block_until_ready(flat)
        fl = [time.perf_counter() - t0]
        fl += h.series(lambda t=tree: jaxflat.destructure(t)[0], cfg.calls - 1)
        rb = h.series(lambda r=re, v=flat: r(v), cfg.calls)
        if cfg.settle:
            time.sleep(cfg.settle)
        floor = h.Floor(tree, jit=leaves <= cfg.baseline_max_leaves)  # after: no warm caches
        for op, calls, fns in (
            ("flatten", fl, floor.flatten()),
            ("rebuild", rb, floor.rebuild(ravel=leaves <= cfg.baseline_max_leaves)),
        ):
            if op == "flatten":
                fns["jaxflat"] = lambda t=tree: jaxflat.destructure(t)[0]
            else:
                fns["jaxflat"] = lambda r=re, v=flat: r(v)
            res = h.medians(fns, cfg.reps)
            rows[op].append(
                {"workload": spec, "leaves": leaves, "params": params, "calls": calls, **res}
            )
        del tree, floor, flat, re
    for op in ("flatten", "rebuild"):
        rep.out(f"### {op.capitalize()}")
        rep.out()
        rep.table(
            ["workload", "leaves", *(f"call {c}" for c in shown), "steady"]
            + ["ravel", "jit", "copy", *h.RATIO_HEADERS],
            [
                [r["workload"], str(r["leaves"]), *(h.ms(r["calls"][c - 1]) for c in shown)]
                + [h.ms(r[k]) for k in ("jaxflat", "ravel", "jit", "copy")]
                + h.ratios(r["jaxflat"], r)
                for r in rows[op]
            ],
        )
    rep.data["sections"]["hot"] = rows
    jax.clear_caches()
