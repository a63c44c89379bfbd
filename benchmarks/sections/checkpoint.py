"""save / load / loadmodel against plain Orbax and jax.tree.map(device_put)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness as h
import jax

import jaxflat


def pairs(spec: str, tree: Any, src: Any, tmp: Path) -> dict[str, tuple[Any, Any]]:
    """operation -> (jaxflat's callable, the plain equivalent)."""
    import orbax.checkpoint as ocp

    graphdef, state = (None, tree)
    if spec.startswith("nnx"):
        from flax import nnx

        graphdef, state = nnx.split(tree)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    jpath, opath = tmp / "jaxflat", (tmp / "orbax").resolve()
    ckptr = ocp.StandardCheckpointer()

    def osave() -> None:
        ckptr.save(opath, state, force=True)
        ckptr.wait_until_finished()

    def orestore_like() -> Any:
        restored = ckptr.restore(opath, abstract)
        if graphdef is None:
            return restored
        from flax import nnx

        return nnx.merge(graphdef, restored)

    jaxflat.save(jpath, tree, overwrite=True)
    osave()
    st = jaxflat.state(src)
    device_put = lambda: jax.tree.map(jax.device_put, src)  # noqa: E731
    return {
        "save": (lambda: jaxflat.save(jpath, tree, overwrite=True), osave),
        "load(like=tree) / restore(abstract)": (
            lambda: jaxflat.load(jpath, like=tree),
            orestore_like,
        ),
        "load() / restore()": (lambda: jaxflat.load(jpath), lambda: ckptr.restore(opath)),
        "loadmodel(dst, src) / tree.map(device_put)": (
            lambda: jaxflat.loadmodel(tree, src),
            device_put,
        ),
        "loadmodel(dst, state(src)) / tree.map(device_put)": (
            lambda: jaxflat.loadmodel(tree, st),
            device_put,
        ),
    }


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.out("## Checkpoints: save, load, loadmodel against plain Orbax")
    rep.out()
    rep.out(
        "ms, medians of interleaved samples. `jaxflat.save(path, tree, overwrite=True)`, "
        "`jaxflat.load(path, like=tree)`, `jaxflat.load(path)`, `jaxflat.loadmodel(dst, src)` "
        "against Orbax's `StandardCheckpointer` save (`force=True`, waited for) and restore "
        "(with an abstract target and without; for NNX of `nnx.state(model)`, merged back) "
        "and `jax.tree.map(jax.device_put, src)`; `copy`: a numpy copy of the model's bytes. "
        "No ravel / jit columns: neither saves nor loads."
    )
    rep.out()
    rows, table = [], []
    tmp = Path(tempfile.mkdtemp(prefix="jaxflat-bench-"))
    try:
        for spec in cfg.checkpoint:
            h.log(f"checkpoint {spec}")
            tree, src = h.build(spec, 0), h.build(spec, 1)
            copy = h.Floor(tree, jit=False).buffer.copy
            for op, (jf, plain) in pairs(spec, tree, src, tmp / spec.replace(":", "_")).items():
                res = h.medians(
                    {"jaxflat": jf, "plain": plain, "copy": copy}, max(3, cfg.reps // 3), warmup=1
                )
                rows.append({"workload": spec, "op": op, **res})
                table.append(
                    [spec, op]
                    + [h.ms(res[k]) for k in res]
                    + [h.x(res["jaxflat"], res["plain"]), h.x(res["jaxflat"], res["copy"])]
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.table(["workload", "operation", "jaxflat", "plain", "copy", "jf/plain", "jf/copy"], table)
    rep.data["sections"]["checkpoint"] = rows
