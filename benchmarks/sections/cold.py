"""Cold: the first flatten and rebuild of a new structure in a fresh process."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import harness as h
import jax


def child(who: str, spec: str, max_leaves: int) -> None:
    """Build the tree, warm the backend up with an unrelated op, then time first calls."""
    tree = h.build(spec)
    leaves, params = h.describe(tree)
    h.warm_backend()
    out: dict[str, Any] = {"leaves": leaves, "params": params}
    if who == "jaxflat":
        import jaxflat

        t0 = time.perf_counter()
        flat, re = jaxflat.destructure(tree)
        jax.block_until_ready(flat)
        out["flatten"] = [time.perf_counter() - t0]
        out["jaxflat_file"] = jaxflat.__file__
        h.emit(out)
        out["rebuild"] = [h.timed(lambda: re(flat))]
        h.emit(out)
        out["flatten"].append(h.timed(lambda: jaxflat.destructure(tree)[0]))
        out["rebuild"].append(h.timed(lambda: re(flat)))
    else:  # the baselines: ravel's first calls, then the floor (compiled first) and copy
        from jax.flatten_util import ravel_pytree

        t0 = time.perf_counter()
        flat, unravel = ravel_pytree(tree)
        jax.block_until_ready(flat)
        out["ravel"] = {"flatten": time.perf_counter() - t0}
        if leaves <= max_leaves:
            out["ravel"]["rebuild"] = h.timed(lambda: unravel(flat))
        h.emit(out)
        floor = h.Floor(tree, jit=leaves <= max_leaves)
        for op, fns in (("flatten", floor.flatten()), ("rebuild", floor.rebuild(False))):
            for name in ("jit", "copy"):
                fn = fns[name]
                out.setdefault(name, {})[op] = None if fn is None else h.timed(fn)
    h.emit(out)


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.out("## Cold: first call of a new structure (fresh process)")
    rep.out()
    rep.out(
        "ms. Each workload runs in two fresh processes, which build the tree and warm the "
        "backend up with an unrelated tiny jitted op first. jaxflat: `call 1` is the first "
        "`destructure(tree)` / `re(flat)`, `call 2` the next. The other process: eager "
        "`ravel_pytree`'s first calls (`ravel`), then the jitted concat / split compiled "
        "beforehand and run once (`jit`, the floor), and a numpy copy of the vector's "
        f"bytes (`copy`). Above {cfg.baseline_max_leaves} leaves ravel's rebuild and the "
        "jitted floor are skipped (their compiles take minutes). Ratios are of call 1."
    )
    rep.out()
    rows, table = [], []
    for spec in cfg.cold:
        h.log(f"cold {spec}")
        arg = {"spec": spec, "max_leaves": cfg.baseline_max_leaves}
        jf = h.spawn("sections.cold:child", {"who": "jaxflat", **arg}, cfg.timeout)
        base = h.spawn("sections.cold:child", {"who": "baselines", **arg}, cfg.timeout)
        rows.append({"workload": spec, "jaxflat": jf, "baselines": base})
        for op in ("flatten", "rebuild"):
            calls = jf.get(op, [])
            call1 = calls[0] if calls else jf["status"]
            res = {k: base.get(k, {}).get(op) for k in ("ravel", "jit", "copy")}
            table.append(
                [spec, str(jf.get("leaves", "?")), op, h.ms(call1)]
                + [h.ms(calls[1]) if len(calls) > 1 else "n/a"]
                + [h.ms(res[k]) for k in ("ravel", "jit", "copy")]
                + h.ratios(call1, res)
            )
    rep.table(
        ["workload", "leaves", "op", "call 1", "call 2", "ravel", "jit", "copy"] + h.RATIO_HEADERS,
        table,
    )
    rep.data["sections"]["cold"] = rows
