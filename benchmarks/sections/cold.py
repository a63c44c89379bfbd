"""Cold: the first flatten and rebuild of a new structure in a fresh process."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import harness as h


def child(who: str, spec: str, max_leaves: int) -> None:
    """Build the tree, warm the backend up with an unrelated op, time first calls."""
    tree = h.build(spec)
    leaves, params = h.describe(tree)
    h.warm_backend()
    out: dict[str, Any] = {"leaves": leaves, "params": params}
    if who == "jaxflat":
        import jaxflat

        out["jaxflat_file"] = jaxflat.__file__

        t0 = time.perf_counter()
        flat, re = jaxflat.destructure(tree)
        out["flatten"] = [time.perf_counter() - t0 + h.timed(lambda: flat)]
        out["rebuild"] = [h.timed(lambda: re(flat))]
        h.emit(out)
        out["flatten"].append(h.timed(lambda: jaxflat.destructure(tree)[0]))
        out["rebuild"].append(h.timed(lambda: re(flat)))
    else:  # ravel's first calls, then the floor (compiled first) and the copy, once each
        from jax.flatten_util import ravel_pytree

        t0 = time.perf_counter()
        flat, unravel = ravel_pytree(tree)
        out["ravel"] = {"flatten": time.perf_counter() - t0 + h.timed(lambda: flat)}
        if leaves <= max_leaves:
            out["ravel"]["rebuild"] = h.timed(lambda: unravel(flat))
        h.emit(out)
        floor = h.Floor(tree, jit=leaves <= max_leaves)
        for op, fns in (("flatten", floor.flatten()), ("rebuild", floor.rebuild(False))):
            for k in ("jit", "copy"):
                out.setdefault(k, {})[op] = None if fns[k] is None else h.timed(fns[k])
    h.emit(out)


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.section(
        "Cold: first call of a new structure (fresh process)",
        "Two fresh processes per workload build the tree and warm the backend up with an "
        "unrelated tiny jitted op. jaxflat's: `call 1` is the first `destructure(tree)` / "
        "`re(flat)`, `call 2` the next. The other: eager `ravel_pytree`'s first calls, "
        "then the jitted floor (compiled first) and the copy, one call each. Above "
        f"{cfg.baseline_max_leaves} leaves ravel's rebuild and the floor are skipped "
        "(their compiles take minutes). Ratios are of call 1.",
    )
    rows, table = [], []
    for spec in cfg.cold:
        h.log(f"cold {spec}")
        arg = {"spec": spec, "max_leaves": cfg.baseline_max_leaves}
        jf = h.spawn("sections.cold:child", {"who": "jaxflat", **arg}, cfg.timeout)
        base = h.spawn("sections.cold:child", {"who": "baselines", **arg}, cfg.timeout)
        rows.append({"workload": spec, "jaxflat": jf, "baselines": base})
        for op in ("flatten", "rebuild"):
            calls = [*jf.get(op, [jf["status"]]), "n/a"]
            res = {k: base.get(k, {}).get(op) for k in ("ravel", "jit", "copy")}
            table.append(
                [spec, str(jf.get("leaves", "?")), op, h.ms(calls[0]), h.ms(calls[1])]
                + [h.ms(res[k]) for k in res]
                + h.ratios(calls[0], res)
            )
    rep.table(
        ["workload", "leaves", "op", "call 1", "call 2", "ravel", "jit", "copy"] + h.RATIO_HEADERS,
        table,
    )
    rep.data["sections"]["cold"] = rows
