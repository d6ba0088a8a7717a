"""A sweep on this machine, end to end: real trainers, two at a time, then the fit in the sweep's folder; a
resume after completion redoes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.registry import Registry
from tests.conftest import REPO, TINY, env_for


def orch(tmp_path, *args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_local_sweep_runs_every_member_then_fits_and_resume_redoes_nothing(tmp_path, tiny_data):
    # 2 budgets x 3 depths of the tiny model (512 tokens a step): 3 to 118 steps each
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "kind": "sweep",
                "name": "tiny",
                "executor": "local",
                "job": str(REPO / "jobs" / "pretrain.yaml"),
                "overrides": [
                    *TINY,
                    f"data.dir={tiny_data}",
                    f"runs_dir={tmp_path / 'runs'}",
                    "resources.max_retries=0",
                ],
                "parallel": 2,
                "shape": {"width_per_layer": 32, "head_dim": 16},
                "isoflop": {"budgets": [3.0e9, 6.0e9], "n_layer": [1, 2, 3]},
                "fit_budgets": [1.0e12],
            },
            sort_keys=False,
        )
    )
    result = orch(tmp_path, "submit", str(sweep))
    assert result.returncode == 0, result.stderr
    sweep_id = result.stdout.split()[2]
    folder = tmp_path / "runs" / sweep_id
    plan = json.loads((folder / "sweep.json").read_text())
    assert len(plan["members"]) == 6 and plan["parallel"] == 2

    result = orch(tmp_path, "pipeline", "wait", sweep_id, "--timeout", "800")
    assert result.returncode == 0, result.stdout[-3000:]
    registry = Registry(tmp_path / ".orch" / "registry.db")
    runs = registry.list(pipeline_id=sweep_id)
    assert {r.state for r in runs} == {"COMPLETED"} and len(runs) == 6
    for member in plan["members"]:  # each trained exactly its planned steps
        summary = json.loads((Path(member["run_dir"]) / "summary.json").read_text())
        assert summary["step"] == member["steps"] and summary["tokens_seen"] == member["D"]

    # the supervisor fits once the last member has ended; `orch pipeline wait` returns when the members have
    log = tmp_path / ".orch" / "pipelines" / f"{sweep_id}.log"
    deadline = time.monotonic() + 300
    while "[sweep] fit:" not in log.read_text():  # polling the supervisor's own record of the fit
        assert "[sweep] no fit" not in log.read_text() and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    fit = json.loads((folder / "fit.json").read_text())
    assert len(fit["members"]) == 6 and fit["compute_optimal"][0]["C"] == 1e12
    assert (folder / "report.md").exists()

    status = orch(tmp_path, "sweep", "status", sweep_id)
    assert status.returncode == 0 and "COMPLETED 6" in status.stdout, status.stdout + status.stderr
    resumed = orch(tmp_path, "resume", sweep_id)  # a sweep id: every member that did not complete
    assert resumed.returncode == 0 and "every member had completed" in resumed.stdout, resumed.stderr
    assert [r.attempts for r in registry.list(pipeline_id=sweep_id)] == [r.attempts for r in runs]


@pytest.mark.slow
def test_cancelling_a_sweep_then_resuming_it_finishes_the_rest_and_redoes_no_completed_member(tmp_path, tiny_data):
    # one member at a time: b0-L1 (a few steps) completes, b1-L1 (hundreds) is cancelled mid-run, b0/b1-L2 never start
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "kind": "sweep",
                "name": "cut",
                "executor": "local",
                "job": str(REPO / "jobs" / "pretrain.yaml"),
                "overrides": [
                    *TINY,
                    f"data.dir={tiny_data}",
                    f"runs_dir={tmp_path / 'runs'}",
                    "resources.max_retries=0",
                    "checkpoint.every=20",
                ],
                "parallel": 1,
                "shape": {"width_per_layer": 32, "head_dim": 16},
                "isoflop": {"budgets": [6.0e8, 3.0e10], "n_layer": [1, 2]},
            },
            sort_keys=False,
        )
    )
    result = orch(tmp_path, "submit", str(sweep))
    assert result.returncode == 0, result.stderr
    sweep_id = result.stdout.split()[2]
    registry = Registry(tmp_path / ".orch" / "registry.db")
    member = {r.stage: r for r in registry.list(pipeline_id=sweep_id)}
    long_run = Path(member["b1-L1"].run_dir)
    deadline = time.monotonic() + 600
    while not (long_run / "checkpoints" / "step_00000020").is_dir():  # polling its first committed checkpoint
        assert time.monotonic() < deadline and registry.get(member["b1-L1"].id).state in ("PENDING", "RUNNING")
        time.sleep(0.2)

    cancelled = orch(tmp_path, "cancel", sweep_id)
    assert cancelled.returncode == 0 and "cancelling sweep" in cancelled.stdout, cancelled.stderr
    orch(tmp_path, "pipeline", "wait", sweep_id, "--timeout", "300")
    states = {r.stage: r.state for r in registry.list(pipeline_id=sweep_id)}
    assert states == {"b0-L1": "COMPLETED", "b1-L1": "CANCELLED", "b0-L2": "CANCELLED", "b1-L2": "CANCELLED"}
    done = Path(member["b0-L1"].run_dir) / "summary.json"
    before = done.stat().st_mtime_ns

    resumed = orch(tmp_path, "resume", sweep_id)
    assert resumed.returncode == 0 and "3 member(s) again" in resumed.stdout, resumed.stdout + resumed.stderr
    result = orch(tmp_path, "pipeline", "wait", sweep_id, "--timeout", "800")
    assert result.returncode == 0, result.stdout[-3000:]
    assert {r.state for r in registry.list(pipeline_id=sweep_id)} == {"COMPLETED"}
    assert done.stat().st_mtime_ns == before  # the completed member was not run again
    assert "resumed from" in (long_run / "logs" / "train.log").read_text()  # the cut one went on from its checkpoint
