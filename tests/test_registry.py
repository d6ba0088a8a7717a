"""The run registry under contention and odd input, through the real `orch` command and real SQLite files:
readers never wait for a stuck writer, a lock not had in time is a clear message, run ids are matched as
prefixes (not LIKE patterns), and a recorded pid whose start time is unknown is never signalled."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.registry import Registry, Run
from tests.conftest import env_for


def orch(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env={**env_for(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / ".orch" / "registry.db")


def add_run(reg: Registry, tmp_path: Path, run_id: str, state: str = "RUNNING", **values) -> Run:
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(
        id=run_id,
        name=run_id.rsplit("-", 1)[0],
        kind="pretrain",
        executor="local",
        state=state,
        run_dir=str(run_dir),
        created_at=time.time(),
        **values,
    )
    reg.add(run)
    return run


def stuck_writer(tmp_path: Path, run_id: str) -> subprocess.Popen:
    """`orch cancel RUN` held at the registry.write fault point, inside its write transaction (the write lock
    held) until the file `release` exists; returns once it is there."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "cancel", run_id, "--no-wait"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env_for(tmp_path), "ORCH_FAULT": "registry.write:wait", "ORCH_FAULT_RELEASE": str(tmp_path / "release")},
    )
    line = proc.stdout.readline()  # the fault point announces itself before it waits
    assert line.startswith("[orch fault] registry.write"), line + proc.stdout.read()
    return proc


def test_readers_go_on_while_a_writer_is_stuck_and_a_writer_that_waits_too_long_says_why(tmp_path):
    reg = registry(tmp_path)
    add_run(reg, tmp_path, "held-000001")
    writer = stuck_writer(tmp_path, "held-000001")
    try:
        started = time.monotonic()
        result = orch(tmp_path, "runs")  # was: a write transaction at start-up, waiting 60 s, then a traceback
        assert result.returncode == 0, result.stderr
        assert "held-000001" in result.stdout and time.monotonic() - started < 20
        assert orch(tmp_path, "logs", "held-000001").returncode == 0

        with pytest.raises(RuntimeError) as e:  # RegistryLocked
            Registry(reg.path, write_timeout_s=0.5).update("held-000001", reason="x")
        assert str(reg.path) in str(e.value) and "locked" in str(e.value) and "nothing was changed" in str(e.value)
    finally:
        (tmp_path / "release").touch()
        assert writer.wait(timeout=30) == 0
    assert reg.get("held-000001").state == "CANCELLING"  # the stuck writer's change, committed once released


def test_a_registry_that_cannot_be_read_is_a_clear_error_not_a_traceback(tmp_path):
    reg = registry(tmp_path)
    add_run(reg, tmp_path, "locked-000001")
    holder = sqlite3.connect(reg.path, isolation_level=None)  # a process holding the file exclusively
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE runs SET reason = 'x'")
    holder.execute("COMMIT")  # exclusive mode keeps the lock after the commit
    try:
        result = orch(tmp_path, "runs")
    finally:
        holder.close()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the run registry ") and str(reg.path) in result.stderr
    assert "is locked" in result.stderr and "fuser" in result.stderr
    assert orch(tmp_path, "runs").returncode == 0  # the lock gone, it reads again


def test_run_and_pipeline_ids_match_as_prefixes_not_patterns(tmp_path):
    reg = registry(tmp_path)
    add_run(reg, tmp_path, "a_b-000001", state="FAILED", pipeline_id="p_1-aaaaaa", stage="x")
    add_run(reg, tmp_path, "axb-000002", state="FAILED", pipeline_id="px1-bbbbbb", stage="x")
    add_run(reg, tmp_path, "100%-000003", state="FAILED")
    add_run(reg, tmp_path, "100x-000004", state="FAILED")
    assert reg.find("a_b").id == "a_b-000001"  # '_' is no wildcard
    assert reg.find("100%").id == "100%-000003"  # nor '%'
    assert reg.find_pipeline("p_1") == "p_1-aaaaaa"
    with pytest.raises(LookupError, match="no run matches"):
        reg.find("A_B")  # ids are case-sensitive
    with pytest.raises(LookupError, match="matches 2 runs"):
        reg.find("100")


def _pending_signals(pid: int) -> int:
    """The process's blocked, pending signals (ShdPnd of /proc/PID/status) as a bit mask."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no ShdPnd in /proc/{pid}/status")


def test_a_pid_recorded_without_its_start_time_is_never_signalled(tmp_path):
    # Another process now has the pid the registry recorded (a registry older than pid_start, a reused pid).
    # It blocks SIGTERM, so a signal sent to it stays pending where /proc shows it.
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys; "
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
            "print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline() == "ready\n"
        reg = registry(tmp_path)
        add_run(reg, tmp_path, "old-000001", pid=other.pid, pid_start=None, host=socket.gethostname())
        result = orch(tmp_path, "cancel", "old-000001", "--no-wait")
        assert result.returncode == 0, result.stderr
        assert not _pending_signals(other.pid) & (1 << (signal.SIGTERM - 1)), "SIGTERM sent to a stranger"
        assert reg.get("old-000001").state == "CANCELLING"
    finally:
        other.kill()
        other.wait()
