#!/usr/bin/env python
"""Benchmarks of jaxflat against ``jax.flatten_util.ravel_pytree``, the best
jitted concat / split and a plain memory copy. See benchmarks/README.md.

    python benchmarks/bench.py --quick                 # smoke run, well under a minute
    python benchmarks/bench.py --markdown out.md       # every section (long)
    python benchmarks/bench.py --only hot,cold         # a subset
    python benchmarks/bench.py --jaxflat-src /work/before/src   # another checkout
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

SECTIONS = ("hot", "cold", "grad", "compile", "memory", "churn", "checkpoint")
MODES = {
    "default": dict(
        reps=15,
        calls=10,  # the hot section times calls 1..calls of a structure one by one
        settled=200,  # ... and its steady state after this many calls (issue 17)
        hot=["mlp:100:1e6", "mlp:1000:1e6", "nnx:1000:1e6"],
        cold=["mlp:100:1e6", "mlp:1000:1e6", "mlp:10000:1e6", "nnx:1000:1e6"],
        baseline_max_leaves=1000,  # above: no ravel rebuild, no jit (compiles take minutes)
        grad=["mlp:100:1e6", "mlp:1000:1e6", "nnx:100:1e6"],
        compile=["mlp:100:1e6", "mlp:1000:1e6"],
        quick_gpt2=False,  # the compile section's SGD step: GPT-2-sized (124M parameters)
        memory="mlp:10:1e8",
        churn=5000,
        churn_ravel=300,  # ravel compiles eager ops for each structure: ~0.3 s each
        checkpoint=["mlp:100:1e6", "nnx:100:1e6"],
        timeout=600.0,
    ),
    "quick": dict(
        reps=5,
        calls=10,
        settled=20,
        hot=["mlp:10:1e4", "mlp:100:1e4", "nnx:10:1e4"],
        cold=["mlp:100:1e4"],
        baseline_max_leaves=100,
        grad=["mlp:10:1e4", "nnx:10:1e4"],
        compile=["mlp:10:1e4"],
        quick_gpt2=True,
        memory="mlp:10:1e6",
        churn=50,
        churn_ravel=10,
        checkpoint=["nnx:10:1e4"],
        timeout=120.0,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument(
        "--jaxflat-src",
        default=os.environ.get("JAXFLAT_SRC"),
        help="measure the jaxflat under this folder (another worktree's src; env JAXFLAT_SRC)",
    )
    p.add_argument("--reps", type=int, default=None, help="samples per median")
    p.add_argument("--churn", type=int, default=None, help="structures in the churn section")
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after a structure's first calls before its steady state is "
        "timed (lets background work of an old jaxflat finish; default 0)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--arg", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--hard-exit", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def use_src(src: str | None) -> None:
    """Make ``import jaxflat`` find the package under ``src``, here and in children."""
    if not src:
        return
    src = str(Path(src).resolve())
    if not (Path(src) / "jaxflat" / "__init__.py").is_file():
        raise SystemExit(f"--jaxflat-src {src}: no jaxflat/__init__.py there")
    os.environ["JAXFLAT_SRC"] = src
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, src)


def child(args: argparse.Namespace) -> None:
    module, func = args.child.split(":")
    getattr(importlib.import_module(module), func)(**json.loads(args.arg))
    if args.hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_src(args.jaxflat_src)  # before anything imports jaxflat
    if args.child:
        return child(args)
    import harness as h

    mode = "quick" if args.quick else "default"
    cfg = SimpleNamespace(**MODES[mode], settle=args.settle)
    cfg.reps = args.reps or cfg.reps
    cfg.churn = args.churn or cfg.churn
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(only) - set(SECTIONS):
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}; have {SECTIONS}")
    rep = h.Report(args.markdown)
    info = h.machine_info()
    rep.data.update(mode=mode, machine=info, config=vars(cfg), loadavg_start=h.loadavg())
    rep.out(f"# jaxflat benchmarks ({mode})\n")
    rep.out(f"- Machine: {info['cpu']}; {info['os']}; {info['backend']}")
    rep.out("- Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    rep.out(f"- jaxflat: {info['jaxflat']}")
    rep.out(f"- Load average at start: {rep.data['loadavg_start']}; {time.strftime('%F %T %Z')}")
    rep.out(f"- Command: `python benchmarks/bench.py {' '.join(sys.argv[1:])}`\n")
    rep.out(
        "Ratios `jf/X` are jaxflat's time over X's in the same run (lower is better; below "
        "1.0 jaxflat is faster): `ravel` is eager `jax.flatten_util.ravel_pytree` (and its "
        "unravel), `jit` the best jitted concat / split compiled beforehand (the floor), "
        "`copy` a numpy copy of as many bytes as the flat vector. Times are in ms.\n"
    )
    start = time.perf_counter()
    for name in SECTIONS:
        if name in only:
            t0 = time.perf_counter()
            importlib.import_module(f"sections.{name}").run(rep, cfg)
            rep.data.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            h.log(f"{name} done in {time.perf_counter() - t0:.1f} s")
    rep.data["loadavg_end"] = h.loadavg()
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in rep.data.get("seconds", {}).items())
    rep.out(f"Load average at the end: {rep.data['loadavg_end']}. ")
    rep.out(f"Wall time {time.perf_counter() - start:.0f} s ({secs}).")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep.data, indent=1, default=str) + "\n")
        h.log(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
