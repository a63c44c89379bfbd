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


def pairs(tree: Any, src: Any, tmp: Path) -> dict[str, tuple[Any, Any]]:
    """operation -> (jaxflat's callable, the plain equivalent)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    graphdef, state = nnx.split(tree) if isinstance(tree, nnx.Module) else (None, tree)
    like = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    jpath, opath, ckptr = tmp / "jaxflat", (tmp / "orbax").resolve(), ocp.StandardCheckpointer()

    def osave() -> None:
        ckptr.save(opath, state, force=True)
        ckptr.wait_until_finished()

    def orestore_like() -> Any:
        restored = ckptr.restore(opath, like)
        return restored if graphdef is None else nnx.merge(graphdef, restored)

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
        "loadmodel(dst, src) / device_put": (lambda: jaxflat.loadmodel(tree, src), device_put),
        "loadmodel(dst, state(src)) / device_put": (
            lambda: jaxflat.loadmodel(tree, st),
            device_put,
        ),
    }


def run(rep: h.Report, cfg: SimpleNamespace) -> None:
    rep.section(
        "Checkpoints: save, load, loadmodel against plain Orbax",
        "Medians of interleaved samples: `jaxflat.save(path, tree, overwrite=True)`, "
        "`load(path, like=tree)`, `load(path)`, `loadmodel(dst, src)` (`plain`:) Orbax's "
        "`StandardCheckpointer` save (`force=True`, waited for) and restore (with an "
        "abstract target and without; for NNX of `nnx.state(model)`, merged back) and "
        "`jax.tree.map(jax.device_put, src)`. No ravel / jit columns: they do not save.",
    )
    rows, table = [], []
    tmp = Path(tempfile.mkdtemp(prefix="jaxflat-bench-"))
    try:
        for spec in cfg.checkpoint:
            h.log(f"checkpoint {spec}")
            tree, src = h.build(spec, 0), h.build(spec, 1)
            copy = h.Floor(tree, jit=False).buffer.copy
            for op, (jf, plain) in pairs(tree, src, tmp / spec.replace(":", "_")).items():
                fns = {"jaxflat": jf, "plain": plain, "copy": copy}
                res = h.medians(fns, max(3, cfg.reps // 3), warmup=1)
                rows.append({"workload": spec, "op": op, **res})
                table.append(
                    [spec, op, *(h.ms(v) for v in res.values())]
                    + [h.x(res["jaxflat"], res["plain"]), h.x(res["jaxflat"], res["copy"])]
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.table(["workload", "operation", "jaxflat", "plain", "copy", "jf/plain", "jf/copy"], table)
    rep.data["sections"]["checkpoint"] = rows
