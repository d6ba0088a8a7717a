"""The local two-node Slurm cluster (slurm/cluster.sh) really schedules, accounts and requeues jobs.

Runs against the real daemons, never a mock. Skipped (with the reason) when the cluster cannot be had:
not root and no cluster already up, or Slurm not installed. With CI=true those cases fail instead.
Synchronisation is by polling files the jobs write and sacct, each with a bounded timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cluster import ClusterError, cluster_status, cluster_up, slurm_available

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def _skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true, so the Slurm tests must run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """The local cluster, started once per session (`slurm/cluster.sh up`, idempotent)."""
    is_root = os.geteuid() == 0
    if not is_root:
        if not slurm_available():
            _skip_or_fail("needs root to start the local Slurm cluster (or run `sudo bash slurm/cluster.sh up` first)")
    else:
        if shutil.which("sbatch") is None and not IN_CI:
            _skip_or_fail("Slurm is not installed: run `sudo bash slurm/cluster.sh up` (installs it), then the tests")
        try:
            cluster_up()
        except ClusterError as e:
            pytest.fail(f"slurm/cluster.sh up failed: {e}", pytrace=False)
    status = cluster_status()
    assert status["up"], status
    assert set(status["nodes"]) == {"node1", "node2"}, status
    return status


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def sbatch(*args: str, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def sacct_state(job_id: str) -> str:
    """The job's state in the accounting database ("" until slurmdbd has it)."""
    out = subprocess.run(
        ["sacct", "--parsable2", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True
    )
    lines = out.stdout.splitlines()
    return lines[-1].split()[0] if lines and lines[-1].strip() else ""  # "CANCELLED by 0" -> "CANCELLED"


def wait_terminal(job_id: str, timeout: float = 120) -> str:
    return wait_until(lambda: (s := sacct_state(job_id)) in TERMINAL and s, timeout, f"job {job_id} to finish")


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={out}",
        "--wrap",
        "srun bash -c 'echo node=$SLURMD_NODENAME'",
        cwd=tmp_path,
    )
    assert wait_terminal(job) == "COMPLETED", out.read_text() if out.exists() else "(no output)"
    nodes = {line.split("=", 1)[1] for line in out.read_text().split() if line.startswith("node=")}
    assert nodes == {"node1", "node2"}


def test_failing_job_ends_failed(slurm_cluster, tmp_path):
    job = sbatch(f"--output={tmp_path / 'out.txt'}", "--wrap", "echo about to fail; exit 3", cwd=tmp_path)
    assert wait_terminal(job) == "FAILED"
    exit_code = subprocess.run(
        ["sacct", "--parsable2", "-n", "-X", "-j", job, "-o", "ExitCode"], capture_output=True, text=True
    ).stdout.strip()
    assert exit_code == "3:0"


def add(a: int, b: int) -> int:
    return a + b


def die_hard() -> None:
    os._exit(7)  # no result file: submitit can only learn the outcome from sacct


def test_submitit_job_returns_result(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # The job unpickles `add` by reference: it must import this module (jobs get the submitting env).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(REPO)]))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm", slurm_python=sys.executable)
    executor.update_parameters(
        timeout_min=5, slurm_partition="debug", nodes=1, tasks_per_node=1, cpus_per_task=1, name="orch-test-submitit"
    )
    job = executor.submit(add, 2, 3)
    assert job.result() == 5
    # The result file appears before the job has ended, and slurmctld reports to slurmdbd asynchronously:
    # poll sacct (through submitit's watcher) until it says COMPLETED.
    wait_until(
        lambda: job.get_info(mode="force").get("State") == "COMPLETED", 60, "sacct to report COMPLETED", interval=1
    )

    crash = executor.submit(die_hard)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="FAILED"):
        crash.result()
    assert crash.state == "FAILED"


REQUEUE_SCRIPT = """#!/bin/bash
echo "${SLURM_RESTART_COUNT:-0}" >> "$WORK/count"
while [ ! -e "$WORK/release" ]; do sleep 0.2; done
echo done
"""


def test_scontrol_requeue_runs_the_job_again(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("WORK", str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(REQUEUE_SCRIPT)
    count = tmp_path / "count"
    job = sbatch("--requeue", f"--output={tmp_path / 'out-%j.txt'}", str(script), cwd=tmp_path)
    try:
        wait_until(lambda: count.exists() and count.read_text().split() == ["0"], 60, "the first run")
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True)
        # A requeued job may start again only after AuthInfo=cred_expire (15 s in slurm.conf).
        wait_until(lambda: count.read_text().split() == ["0", "1"], 120, "the requeued run (SLURM_RESTART_COUNT=1)")
        (tmp_path / "release").touch()
        assert wait_terminal(job) == "COMPLETED"
    finally:
        (tmp_path / "release").touch()
        subprocess.run(["scancel", job], capture_output=True)
    history = subprocess.run(
        ["sacct", "--parsable2", "-n", "-X", "--duplicates", "-j", job, "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history


PREEMPTIBLE_SCRIPT = """#!/bin/bash
trap 'echo "USR1 ${SLURM_RESTART_COUNT:-0}" >> "$WORK/signals.$SLURM_JOB_ID"' USR1
trap 'echo "TERM ${SLURM_RESTART_COUNT:-0}" >> "$WORK/signals.$SLURM_JOB_ID"; exit 0' TERM
echo "${SLURM_RESTART_COUNT:-0}" >> "$WORK/runs.$SLURM_JOB_ID"
while [ ! -e "$WORK/release" ]; do sleep 0.2; done
"""


def test_qos_high_preempts_with_warning_signal_and_requeues(slurm_cluster, tmp_path, monkeypatch):
    """A --qos=high job requeues a running normal job, which first gets its --signal (USR1) and SIGTERM."""
    monkeypatch.setenv("WORK", str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(PREEMPTIBLE_SCRIPT)
    # Jobs left by earlier tests would take the CPUs this test fills: wait for an idle cluster.
    wait_until(
        lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip(),
        180,
        "the cluster to be idle (squeue empty)",
        interval=1,
    )
    # Fill both nodes (2 CPUs each) so the high job can only run by preempting one of them.
    jobs = [
        sbatch("--requeue", "--cpus-per-task=2", "--signal=B:USR1@60", "--output=/dev/null", str(script), cwd=tmp_path)
        for _ in range(2)
    ]
    try:
        wait_until(lambda: all((tmp_path / f"runs.{j}").exists() for j in jobs), 60, "both jobs to start")
        high = sbatch("--qos=high", "--cpus-per-task=2", "--output=/dev/null", "--wrap", "true", cwd=tmp_path)
        assert wait_terminal(high) == "COMPLETED"
        # Slurm may pick (and warn) a second candidate too; every requeued job must have had its warning.
        victims = wait_until(
            lambda: [j for j in jobs if (tmp_path / f"runs.{j}").read_text().split() == ["0", "1"]],
            120,
            "a preempted job to run again (SLURM_RESTART_COUNT=1)",
        )
        for victim in victims:
            record = tmp_path / f"signals.{victim}"
            signals = record.read_text().splitlines() if record.exists() else ["(no signal recorded)"]
            assert "USR1 0" in signals and "TERM 0" in signals, signals
        (tmp_path / "release").touch()
        for j in jobs:
            assert wait_terminal(j) == "COMPLETED"
    finally:
        (tmp_path / "release").touch()
        subprocess.run(["scancel", *jobs], capture_output=True)
