"""One trainer per run folder (jobspec/run_lock.py), on real files and real processes: the control plane's probe
never makes a trainer's acquire fail, and a second trainer is refused while any node of the first holds the folder."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from jobspec.run_lock import RunFolderBusy, RunLock, holder
from tests.conftest import REPO

PROBE = """
import sys
from pathlib import Path
from jobspec.run_lock import holder
run, stop, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
n = 0
while not stop.exists():
    holder(run)
    n += 1
    if n == 100:
        ready.touch()
print(n)
"""


def test_a_probe_never_makes_an_acquire_fail(tmp_path):
    """`orch runs`, `orch status` and `orch resume` probe the lock; a trainer starting meanwhile must get it."""
    run, stop, ready = tmp_path / "run", tmp_path / "stop", tmp_path / "ready"
    run.mkdir()
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(run), str(stop), str(ready)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # the prober is probing in a loop from now on
            assert prober.poll() is None and time.monotonic() < deadline, "the prober did not start"
            time.sleep(0.01)
        refused = 0
        for _ in range(1000):
            lock = RunLock(run)
            try:
                lock.acquire()
            except RunFolderBusy:
                refused += 1
            finally:
                lock.release()
    finally:
        stop.touch()
        probes = int(prober.communicate(timeout=60)[0])
    assert refused == 0, f"{refused} of 1000 acquires refused while only {probes} probes ran"


def test_a_held_folder_is_refused_and_named_and_a_probe_sees_every_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        assert holder(tmp_path)["pid"] is not None
        node = RunLock(tmp_path).join()  # another node's local rank 0 holds it with rank 0
        first.release()
        assert holder(tmp_path) is not None, "the folder looked free while a node of its trainer still held it"
        started = time.monotonic()
        with pytest.raises(RunFolderBusy, match="in use by another trainer"):
            RunLock(tmp_path).acquire()
        assert time.monotonic() - started < 10, "a refusal must come after a bounded retry"
        node.release()
        assert holder(tmp_path) is None
        RunLock(tmp_path).acquire().release()
    finally:
        first.release()
