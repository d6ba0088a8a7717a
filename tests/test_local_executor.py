"""The local executor: detached runs, the registry's record of them, cancel, and retry after a crash."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.registry import Registry
from tests.conftest import REPO, env_for, tiny_overrides

pytestmark = pytest.mark.slow


def orch(tmp_path, *args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        **kw,
    )


def submit(tmp_path, data_dir, *extra):
    result = orch(
        tmp_path,
        "submit",
        str(REPO / "jobs" / "pretrain.yaml"),
        *tiny_overrides(data_dir, f"runs_dir={tmp_path / 'runs'}", "executor=local", *extra),
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[1]
    return run_id, Registry(tmp_path / ".orch" / "registry.db")


def wait_for(predicate, what: str, timeout: float = 300):
    """Poll a condition on real state (registry rows, files) with a deadline."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max((json.loads(line).get("step", 0) for line in open(path).read().splitlines() if line), default=0)


def test_submit_returns_at_once_and_the_run_completes(tmp_path, tiny_data):
    run_id, registry = submit(tmp_path, tiny_data, "train.max_steps=10")
    assert registry.get(run_id).state in ("PENDING", "RUNNING")
    result = orch(tmp_path, "logs", run_id, "--follow", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    run = registry.get(run_id)
    assert run.state == "COMPLETED" and run.exit_code == 0 and run.attempts == 1
    assert (tmp_path / "runs" / run_id / "checkpoints" / "step_00000010" / "manifest.json").is_file()


def test_cancel_stops_the_run_after_a_checkpoint(tmp_path, tiny_data):
    run_id, registry = submit(tmp_path, tiny_data, "train.max_steps=100000")
    run_dir = registry.get(run_id).run_dir
    wait_for(lambda: logged_steps(run_dir) >= 5, "training to start")
    assert orch(tmp_path, "cancel", run_id).returncode == 0
    wait_for(lambda: registry.get(run_id).exit_code is not None, "the run to stop")
    run = registry.get(run_id)
    assert run.state == "CANCELLED" and run.reason == "cancelled by user"
    assert list((tmp_path / "runs" / run_id / "checkpoints").glob("step_*/manifest.json")), "saved on the way out"
    assert "CANCELLED" in orch(tmp_path, "runs").stdout


def test_a_killed_trainer_is_restarted_and_resumes(tmp_path, tiny_data):
    run_id, registry = submit(tmp_path, tiny_data, "train.max_steps=40", "checkpoint.every=10")
    run_dir = registry.get(run_id).run_dir
    wait_for(lambda: os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000010")), "the first checkpoint")
    trainer = subprocess.run(
        ["pgrep", "-f", f"training.main .*{run_id}"], capture_output=True, text=True
    ).stdout.split()
    assert trainer
    os.kill(int(trainer[0]), signal.SIGKILL)
    wait_for(lambda: registry.get(run_id).finished, "the run to finish", timeout=600)
    run = registry.get(run_id)
    assert run.state == "COMPLETED" and run.attempts == 2
    log = open(os.path.join(run_dir, "logs", "train.log")).read()
    assert "attempt 2" in log and "resumed from" in log
