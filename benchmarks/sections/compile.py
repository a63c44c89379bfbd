"""Compile: XLA's time for a jitted loss through ``re`` against the loss on the
tree, and a jitted SGD step of a GPT-2-sized model through ``re`` against the
nested step."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import harness as h
import jax

import jaxflat


def compile_s(fn: Any, arg: Any) -> float:
    t0 = time.perf_counter()
    jax.jit(fn).lower(arg).compile()
    return time.perf_counter() - t0


def gpt2_step(quick: bool, reps: int) -> dict[str, Any]:
    """Steady time of one jitted SGD step, nested (on ``nnx.state``) and flat."""
    import optax
    from curvature import gpt2_model
    from flax import nnx

    model, _, tokens = gpt2_model(quick)

    def loss(m: Any) -> jax.Array:
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    graphdef, state = nnx.split(model)
    flat, re = jaxflat.destructure(model)
    del model

    def nested(s: Any) -> Any:
        g = jax.grad(lambda s: loss(nnx.merge(graphdef, s)))(s)
        return jax.tree.map(lambda p, d: p - 1e-3 * d, s, g)

    def through_re(v: Any) -> Any:
        return v - 1e-3 * jax.grad(lambda v: loss(re(v)))(v)

    out: dict[str, Any] = {"params": int(flat.size)}
    for name, fn, arg in (("nested", nested, state), ("re", through_re, flat)):
        t0 = time.perf_counter()
        step = jax.jit(fn).lower(arg).compile()
        out[f"{name}_compile"] = time.perf_counter() - t0
        jax.block_until_ready(step(arg))
        out[name] = h.medians({"x": lambda s=step, a=arg: s(a)}, reps, warmup=1, sample_s=0.0)["x"]
    return out


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.section(
        "Compile time of a jitted loss through `re`",
        "`tree`: `jax.jit(loss).lower(tree).compile()`; `re`: "
        "`jax.jit(lambda v: loss(re(v))).lower(flat).compile()`, `loss = sum(leaf ** 2)`, "
        "seconds, each a new function (nothing cached).",
    )
    rows, table = [], []
    for spec in cfg.compile:
        h.log(f"compile {spec}")
        tree = h.build(spec)
        leaves, params = h.describe(tree)
        flat, re = jaxflat.destructure(tree)
        t_tree = compile_s(h.sq_loss, tree)
        t_re = compile_s(lambda v, re=re: h.sq_loss(re(v)), flat)
        rows.append(
            {"workload": spec, "leaves": leaves, "params": params, "tree": t_tree, "re": t_re}
        )
        table.append([spec, str(leaves), f"{t_tree:.2f}", f"{t_re:.2f}", h.x(t_re, t_tree)])
    rep.table(["workload", "leaves", "tree s", "re s", "re/tree"], table)
    h.log("gpt2 sgd step")
    g = gpt2_step(cfg.quick_gpt2, max(3, cfg.reps // 3))
    rep.out(
        f"Jitted SGD step (`v - lr * grad(loss o re)(v)` against the same step on "
        f"`nnx.state`), GPT-2-sized NNX model, {g['params']:,} parameters: nested "
        f"{h.ms(g['nested'])} ms (compile {g['nested_compile']:.1f} s), through re "
        f"{h.ms(g['re'])} ms (compile {g['re_compile']:.1f} s): re/nested "
        f"{h.x(g['re'], g['nested'])}.\n"
    )
    rep.data["sections"]["compile"] = {"loss": rows, "gpt2_step": g}
