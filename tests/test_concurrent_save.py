"""Concurrent saves and loads of one checkpoint, from separate processes.

Two writer processes save distinguishable trees to one path with
``overwrite=True`` while a reader process loads it in a loop
(tests/_concurrent_worker.py). Every save must complete (or fail with a
clear error), every load must return one whole checkpoint, nothing may be
left beside the checkpoint, and every process must exit in time; all of
them are killed if the test fails or runs out of time.
"""

import contextlib
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import jaxflat

WORKER = Path(__file__).with_name("_concurrent_worker.py")
WRITERS = 2
SAVES = 10
START_TIMEOUT_S = 60.0  # three JAX imports on two cores
RUN_TIMEOUT_S = 60.0  # a normal run of the saves takes a few seconds

_spec = importlib.util.spec_from_file_location("_concurrent_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


class Proc:
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [
            threading.Thread(target=self._drain, args=(s, dst), daemon=True)
            for s, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _drain(stream, dst):
        for line in stream:
            dst.append(line.rstrip("\n"))

    def wait(self, deadline):
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.proc.args[2:4]} did not exit in time\n{self.log()}"
            ) from None
        for t in self.threads:
            t.join(timeout=10)
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}\n{self.log()}"

    def log(self):
        return "\n".join(self.out[-20:] + self.err[-30:])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for t in self.threads:
            t.join(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def _wait_for_files(paths, procs, timeout):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for p in procs:
            assert p.proc.poll() is None, f"a worker died while starting\n{p.log()}"
        assert time.monotonic() < deadline, f"workers not ready within {timeout} s"
        time.sleep(0.05)


def test_two_writers_and_a_reader_never_tear_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    jaxflat.save(path, worker.make_tree(0))
    procs = []
    try:
        procs.append(Proc("read", tmp_path, path, 0))
        for i in range(1, WRITERS + 1):
            procs.append(Proc("write", tmp_path, path, i, SAVES))
        ready = [tmp_path / "ready-read-0"] + [
            tmp_path / f"ready-write-{i}" for i in range(1, WRITERS + 1)
        ]
        _wait_for_files(ready, procs, START_TIMEOUT_S)
        start = time.monotonic()
        (tmp_path / "go").touch()
        deadline = start + RUN_TIMEOUT_S
        for p in procs[1:]:
            p.wait(deadline)
        saving_s = time.monotonic() - start
        (tmp_path / "stop").touch()
        procs[0].wait(deadline)
    finally:
        for p in procs:
            p.kill()

    reader, writers = procs[0], procs[1:]
    for i, w in enumerate(writers, 1):
        want = {f"saved {i * 100 + k}" for k in range(SAVES)}
        got = set(w.out)
        failed = [line for line in w.out if line.startswith("failed")]
        assert not failed, f"writer {i}: {failed[:3]}\n{w.log()}"
        assert got == want, f"writer {i}: {sorted(want - got)} missing\n{w.log()}"
    bad = [line for line in reader.out if not line.startswith("ok ")]
    assert not bad, f"{len(bad)} of {len(reader.out)} loads failed or were torn: {bad[:5]}"
    seen = {int(line.split()[1]) for line in reader.out}
    assert len(reader.out) >= 3, f"only {len(reader.out)} loads in {saving_s:.1f} s"
    assert len(seen) >= 2, f"the reader saw only the checkpoints {seen}"
    # The last save of one of the writers is what is left, whole.
    final = worker.check(jaxflat.load(path))
    assert final in {i * 100 + SAVES - 1 for i in range(1, WRITERS + 1)}, final
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt"))
    assert left == [], f"left beside the checkpoint: {left}"
    inside = sorted(p.name for p in path.iterdir())
    assert len(inside) == 3 and inside[0] == ".jaxflat.lock" and inside[2] == "jaxflat.json", inside
    assert inside[1] == json.loads((path / "jaxflat.json").read_text())["version"], inside
