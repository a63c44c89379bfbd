"""Crash safety: a save killed at any moment leaves the old or the new checkpoint."""

import contextlib
import importlib.util
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxflat

WRITER = Path(__file__).with_name("_crash_writer.py")
KILLS = 24
BUDGET_S = 60.0
# Even runs are killed at a random moment after the writer starts (often in its
# first save, which overwrites the last run's checkpoint); odd runs wait for the
# writer's first finished save, then are killed at a random moment in the next ones.
DELAY_AFTER_START_S = (0.0, 0.8)
DELAY_AFTER_SAVE_S = (0.0, 0.3)

_spec = importlib.util.spec_from_file_location("_crash_writer", WRITER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)


class Writer:
    """The helper process: spawns, and reaps, writers on request."""

    def __init__(self, path, log):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
        )
        self.lines = queue.Queue()
        self.saves = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def stderr(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {word!r} from the writer within {timeout} s\n{self.stderr()}")
            if line is None or line == "error":
                pytest.fail(f"the writer failed ({line!r})\n{self.stderr()}")
            if line.startswith("saved "):
                self.saves += 1
                if word == "saved":
                    return line.split()[1:]
            elif line.split()[0] == word:
                return line.split()[1:]

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        self.proc.stdout.close()


def check(path, saves):
    """The checkpoint is state 1 or state 2, whole; or absent before any save."""
    try:
        got = jaxflat.load(path)
    except FileNotFoundError:
        assert saves == 0, f"{saves} saves had finished, yet load raised FileNotFoundError"
        return None
    tag = got["tag"]
    assert tag in (1, 2), f"tag {tag!r}"
    want = writer.make_state(tag)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    seen = {
        jax.tree_util.keystr(p): np.unique(np.asarray(x)).tolist()
        for p, x in jax.tree_util.tree_leaves_with_path(got)
        if hasattr(x, "shape")
    }
    assert all(v == [tag] for v in seen.values()), f"a mix of states (tag {tag}): {seen}"
    assert got["name"] == f"state-{tag}"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert getattr(a, "dtype", None) == getattr(b, "dtype", None)
    return tag


@pytest.mark.slow
def test_killed_saves_leave_old_or_new_checkpoint(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "ckpt"
    start = time.monotonic()
    outcomes = []
    pid = None
    with open(tmp_path / "writer.log", "w+") as log:
        w = Writer(path, log)
        try:
            w.expect("ready", timeout=45)
            for k in range(KILLS):
                w.send("spawn")
                pid = int(w.expect("pid", timeout=10)[0])
                if k % 2:
                    w.expect("saved", timeout=30)
                    time.sleep(rng.uniform(*DELAY_AFTER_SAVE_S))
                else:
                    time.sleep(rng.uniform(*DELAY_AFTER_START_S))
                os.kill(pid, signal.SIGKILL)
                w.send(f"reap {pid}")
                status = int(w.expect("reaped", timeout=10)[1])
                pid = None
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                    f"kill {k}: the writer ended on its own (status {status})\n{w.stderr()}"
                )
                try:
                    outcomes.append(check(path, w.saves))
                except AssertionError as e:
                    raise AssertionError(f"kill {k} (seed {seed}, {w.saves} saves): {e}") from None
                elapsed = time.monotonic() - start
                assert elapsed < BUDGET_S, f"{k + 1} kills took {elapsed:.1f} s"
        finally:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            w.close()
    assert len(outcomes) == KILLS
    assert w.saves >= KILLS // 2, f"only {w.saves} saves finished in {KILLS} runs"
    assert outcomes.count(None) <= 1 and None not in outcomes[1:], outcomes
