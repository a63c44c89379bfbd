"""Eager jax.grad through re against jax.grad on the tree."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import harness as h
import jax
from jax.flatten_util import ravel_pytree

import jaxflat


def grad_of(rebuild: Any, v: Any) -> Any:
    return lambda: jax.grad(lambda u: h.sq_loss(rebuild(u)))(v)


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.section(
        "Eager `jax.grad` through `re`",
        "Steady state, no `jit` around the calls, `loss = sum(leaf ** 2)`: `re` is "
        "`jax.grad(lambda v: loss(re(v)))(flat)`, `tree` is `jax.grad(loss)(tree)`; "
        "`ravel` / `jit` the same gradient through ravel_pytree's unravel / the jitted "
        "split; `re/tree` the cost of going through the flat vector.",
    )
    rows, table = [], []
    for spec in cfg.grad:
        h.log(f"grad {spec}")
        tree = h.build(spec)
        leaves, params = h.describe(tree)
        flat, re = jaxflat.destructure(tree)
        small = leaves <= cfg.baseline_max_leaves
        floor = h.Floor(tree, jit=small)
        fns = {
            "re": grad_of(re, flat),
            "tree": lambda t=tree: jax.grad(h.sq_loss)(t),
            "ravel": grad_of(ravel_pytree(tree)[1], flat) if small else None,
            "jit": grad_of(floor.jit_split, flat) if small else None,
            "copy": floor.buffer.copy,
        }
        res = h.medians(fns, max(3, cfg.reps // 2))
        rows.append({"workload": spec, "leaves": leaves, "params": params, **res})
        table.append(
            [spec, str(leaves), *(h.ms(res[k]) for k in fns), h.x(res["re"], res["tree"])]
            + h.ratios(res["re"], res)
        )
    rep.table(
        ["workload", "leaves", "re", "tree", "ravel", "jit", "copy", "re/tree", *h.RATIO_HEADERS],
        table,
    )
    rep.data["sections"]["grad"] = rows
