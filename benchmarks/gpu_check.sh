#!/usr/bin/env bash
# One prepared check for a machine with a GPU (the `device` tool's H100/H200):
# the test suite, the quick benchmark on the GPU, and destructure/rebuild of a
# 1 GB model against a plain device copy. Bounded: ~8 minutes in all.
#
#   bash benchmarks/gpu_check.sh            (from the repository root)
#
# The test suite itself runs on simulated CPU devices (tests/conftest.py pins
# JAX_PLATFORMS=cpu for the 8-device mesh tests); the benchmarks run on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxflat-gpu}
mkdir -p "$OUT"
nvidia-smi -L || true
python -m pip install -q --no-deps -e . 2>&1 | tail -n 2
python - <<'PY'
import jax; print("jax", jax.__version__, jax.devices())
PY

echo "== tests (CPU-simulated devices), 240 s max"
timeout 240 python -m pytest -q -x -p no:cacheprovider --continue-on-collection-errors \
    tests 2>&1 | tail -n 25

echo "== quick benchmark on the GPU (children inherit JAX_PLATFORMS), 150 s max"
JAX_PLATFORMS=cuda timeout 150 python benchmarks/bench.py --quick \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | grep -v '^\[bench' | tail -n 80

echo "== 1 GB model: destructure / rebuild against a device copy, 90 s max"
JAX_PLATFORMS=cuda timeout 90 python - <<'PY'
import time
import jax, jax.numpy as jnp, numpy as np
import jaxflat

def median(f, n=10):
    jax.block_until_ready(f())
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

# 1 GB of float32 in 1000 leaves (an MLP-like tree).
n_leaves, total = 1000, 2 ** 28
size = total // n_leaves
tree = {f"l{i:04d}": jnp.full((size,), i, jnp.float32) for i in range(n_leaves)}
gb = n_leaves * size * 4 / 1e9
t0 = time.perf_counter(); flat, re = jaxflat.destructure(tree); flat.block_until_ready()
cold_f = time.perf_counter() - t0
t0 = time.perf_counter(); jax.block_until_ready(re(flat)); cold_r = time.perf_counter() - t0
copy = jax.jit(lambda x: x + 0)
tf, tr, tc = median(lambda: jaxflat.destructure(tree)[0]), median(lambda: re(flat)), median(lambda: copy(flat))
print(f"model {gb:.2f} GB, {n_leaves} leaves")
print(f"cold: destructure {cold_f:.3f} s, rebuild {cold_r:.3f} s")
for name, t in [("destructure", tf), ("rebuild", tr), ("device copy", tc)]:
    # a copy reads and writes every byte: 2 * size / time
    print(f"{name:12s} {t * 1e3:8.2f} ms  {2 * gb / t:7.1f} GB/s  ({t / tc:.2f}x the copy)")
PY
