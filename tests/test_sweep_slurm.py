"""A sweep on the real local two-node Slurm (slurm/cluster.sh): one job array with a fit job after it, a member
killed mid-run retried from its checkpoint to the same fit as an undisturbed sweep's, cancel and resume acting
on every member, an array larger than the cluster's MaxArraySize refused at submit; and the dashboard's one row
per sweep (no cluster needed).

Synchronisation is by polling the registry (refreshed from sacct), squeue and the files the jobs write, each
with a bounded timeout. The Slurm tests are skipped without root (no cluster), failed under CI=true.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.executors import slurm, slurm_sweep
from orchestrator.registry import Registry, Run
from orchestrator.status.collect import Collector
from orchestrator.status.render import render
from tests.conftest import REPO, TINY, env_for
from tests.test_slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (the session fixture)

JOB = str(REPO / "jobs" / "pretrain.yaml")


def orch(tmp: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp,
        env={**env_for(tmp), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_file(tmp: Path, data_dir: str, name: str, *overrides: str, file: str = "sweep.yaml", **keys) -> Path:
    """6 members of the tiny model (2 budgets x 3 depths: 3 to 119 steps), the fewest Approach 2 fits too."""
    path = tmp / file
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "sweep",
                "name": name,
                "executor": "slurm",
                "job": JOB,
                "overrides": [
                    *TINY,
                    f"data.dir={data_dir}",
                    f"runs_dir={tmp / 'runs'}",
                    "train.deterministic=true",  # a resumed member must end where an undisturbed one does
                    "checkpoint.every=20",
                    *overrides,
                ],
                "parallel": 3,
                "max_retries_per_member": 1,
                "shape": {"width_per_layer": 32, "head_dim": 16},
                "isoflop": {"budgets": [3.0e9, 6.0e9], "n_layer": [1, 2, 3]},
                "fit_budgets": [1.0e12],
                **keys,
            },
            sort_keys=False,
        )
    )
    return path


def submitted(tmp: Path, result: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_id = result.stdout.split()[2]  # "submitted sweep <id> (...)"
    return sweep_id, tmp / "runs" / sweep_id


def members(tmp: Path, sweep_id: str, refresh: bool = True) -> dict[str, Run]:
    registry = Registry(tmp / ".orch" / "registry.db")
    if refresh:
        slurm.SlurmExecutor(registry).refresh(registry.list(pipeline_id=sweep_id))
    return {r.stage: r for r in registry.list(pipeline_id=sweep_id)}


# ------------------------------------------------------------------------------------- no cluster needed


def test_array_script_runs_the_member_of_its_task_id_requeues_and_skips_finished_members(tmp_path):
    from jobspec import load_spec

    cfg = load_spec(JOB, ["resources.time_min=30", "resources.partition=debug", "resources.sbatch_extra=[--exclusive]"])
    run = Run(
        id="s-abc-b0-L1", name="s", kind="pretrain", executor="slurm", state="PENDING", run_dir="/r/a", created_at=0
    )
    params = slurm.executor_parameters(run, cfg.resources)
    plan = {
        "sweep": "s-abc",
        "parallel": 3,
        "members": [{"id": f"s-abc-m{i}", "run_dir": f"/r/m{i}"} for i in range(9)],
    }
    script = slurm_sweep.array_script(tmp_path, plan, [0, 1, 2, 5, 7, 8], params)
    lines = script.splitlines()
    for line in (
        "#SBATCH --array=0-2,5,7-8%3",  # the members given, `parallel` at a time
        "#SBATCH --job-name=s-abc",
        "#SBATCH --requeue",
        "#SBATCH --time=30",
        "#SBATCH --partition=debug",
        "#SBATCH --exclusive",
        f"#SBATCH --signal=USR2@{slurm.signal_delay_s(30)}",
    ):
        assert line in lines, (line, script)
    assert "RUN_DIRS=(/r/m0 /r/m1 /r/m2 /r/m3 /r/m4 /r/m5 /r/m6 /r/m7 /r/m8)" in script  # sweep.json's order
    assert 'RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"' in lines
    assert [line for line in lines if line.startswith("export PYTHONPATH=")] == params["setup"][:1]  # the run's code
    skip, train = script.index('if [ -f "$RUN_DIR/summary.json" ]'), script.index("slurm_sweep train")
    assert skip < train < script.index("slurm_job after-srun")  # a completed member is never trained again
    # a requeue names the task, not the array (`scontrol requeue <array id>` would requeue every task)
    assert 'SLURM_JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" \\' in lines
    fit = slurm_sweep.fit_script(tmp_path, plan, "123", params).splitlines()
    assert "#SBATCH --dependency=afterany:123" in fit and "#SBATCH --partition=debug" in fit
    assert not any(line.startswith(("#SBATCH --array", "#SBATCH --requeue")) for line in fit)


def test_status_shows_a_sweep_as_one_row_of_counts_and_its_members_when_narrowed_to_it(tmp_path):
    registry = Registry(tmp_path / ".orch" / "registry.db")
    runs = tmp_path / "runs"
    (runs / "sw-0a0b0c").mkdir(parents=True)
    (runs / "sw-0a0b0c" / "sweep.json").write_text("{}")
    states = {"b0-L1": "COMPLETED", "b0-L2": "RUNNING", "b1-L1": "FAILED", "b1-L2": "PENDING", "b2-L1": "PENDING"}
    for i, (stage, state) in enumerate(states.items()):
        run_id = f"sw-0a0b0c-{stage}"
        (runs / run_id).mkdir()
        registry.add(
            Run(
                id=run_id,
                name=run_id,
                kind="pretrain",
                executor="slurm",
                state=state,
                run_dir=str(runs / run_id),
                created_at=time.time() - i,
                slurm_job_id=f"77_{i}",
                pipeline_id="sw-0a0b0c",
                stage=stage,
            )
        )

    def text(target=None):
        frame = Collector(registry, target=target, use_slurm=False).collect()
        console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
        console.print(render(frame, width=120))
        return frame, console.export_text()

    frame, overview = text()
    assert "sweep sw-0a0b0c  5 members: 2 pending, 1 running, 1 done, 1 failed" in overview, overview
    assert "sw-0a0b0c-b1-L2" not in overview  # one row, not five
    assert frame.pipelines[0].sweep and frame.pipelines[0].counts["pending"] == 2
    assert len(frame.jobs) == 5  # --json keeps every member
    _, narrowed = text("sw-0a0b0c")
    assert "5 members" in narrowed and all(f"sw-0a0b0c-{stage}" in narrowed for stage in states), narrowed


# ------------------------------------------------------------------------------------------- on Slurm


@pytest.mark.slurm
def test_a_sweep_larger_than_max_array_size_is_refused_before_anything_is_queued(slurm_cluster, tmp_path):  # noqa: F811
    limit = slurm_sweep.max_array_size()
    assert limit is not None and limit < 5000, limit
    tokens = [1.0e6 + 1000 * i for i in range(limit // 2 + 1)]  # 2 depths: limit + 1 or + 2 members
    path = sweep_file(tmp_path, str(tmp_path / "no-data"), "big")
    raw = yaml.safe_load(path.read_text())
    del raw["isoflop"]
    raw["overrides"] = [o for o in raw["overrides"] if not o.startswith("data.dir")]  # checked per member: never
    raw["grid"] = {"n_layer": [1, 2], "tokens": tokens}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    result = orch(tmp_path, "submit", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"key 'grid' makes {2 * len(tokens):,} members" in result.stderr, result.stderr
    assert f"MaxArraySize is {limit:,}" in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "runs").exists() and not Registry(tmp_path / ".orch" / "registry.db").list()
    after = subprocess.run(["squeue", "-h", "-n", "big", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert not set(after) - set(before)


@pytest.mark.slurm
@pytest.mark.slow
def test_member_killed_mid_run_is_retried_and_the_fit_equals_an_undisturbed_sweeps(
    slurm_cluster,  # noqa: F811  (the fixture, imported above)
    tiny_data,
    tmp_path,
):
    """The undisturbed sweep: the same members, each trained once from the start. Five of them are this sweep's
    own (never interrupted: one attempt each, asserted); the sixth, the one killed, is trained again alone, beside
    the sweep, from its config.yaml. Both fits are written by orch from those rows and must be equal."""
    # Only b1-L1 (119 steps) reaches step 80: killed there once (SIGKILL's exit), after its step-60 checkpoint.
    fault = {"ORCH_FAULT": "train.after_optimizer_step#80:kill", "ORCH_FAULT_ONCE": str(tmp_path / "fired")}
    sweep_id, folder = submitted(
        tmp_path, orch(tmp_path, "submit", str(sweep_file(tmp_path, tiny_data, "law", parallel=4)), env=fault)
    )
    plan = json.loads((folder / "sweep.json").read_text())
    assert [m["steps"] for m in plan["members"]][:2] == [59, 119]
    runs = members(tmp_path, sweep_id, refresh=False)
    array = runs["b0-L1"].slurm_job_id.split("_")[0]
    assert {r.slurm_job_id for r in runs.values()} == {f"{array}_{i}" for i in range(6)}  # ONE array
    assert "#SBATCH --array=0-5%4" in (folder / "slurm" / "array-0.sh").read_text().splitlines()
    reference_dir = tmp_path / "b1-L1-undisturbed"
    reference = subprocess.Popen(
        [sys.executable, "-m", "training.main", str(Path(runs["b1-L1"].run_dir) / "config.yaml")]
        + ["--run-dir", str(reference_dir)],
        cwd=tmp_path,
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )

    done = wait_until(
        lambda: (m := members(tmp_path, sweep_id)) and all(r.finished for r in m.values()) and m,
        600,
        f"sweep {sweep_id}'s members to end",
        interval=3,
    )
    assert {r.state for r in done.values()} == {"COMPLETED"}, {s: (r.state, r.reason) for s, r in done.items()}
    wait_until(lambda: (folder / "fit.json").is_file(), 180, f"sweep {sweep_id}'s fit job")
    killed = done["b1-L1"]
    history = [r["State"].split()[0] for r in slurm.sacct_records([killed.slurm_job_id])[killed.slurm_job_id]]
    assert history == ["REQUEUED", "COMPLETED"] and killed.attempts == 2, (history, killed)
    log = slurm.log_file(killed).read_text()
    assert "requeueing (retry 1 of 1)" in log and "resumed from" in log, log
    assert all(r.attempts == 1 for s, r in done.items() if s != "b1-L1"), done

    assert reference.wait(timeout=300) == 0
    fit = json.loads((folder / "fit.json").read_text())
    undisturbed = json.loads((reference_dir / "summary.json").read_text())
    rows = [
        dict(r, loss=undisturbed["val_loss"], D=undisturbed["tokens_seen"]) if r["member"] == killed.id else r
        for r in fit["members"]
    ]
    (tmp_path / "undisturbed.json").write_text(json.dumps(rows))
    refit = orch(tmp_path, "sweep", "fit", str(tmp_path / "undisturbed.json"), "--budgets", "1e12")
    assert refit.returncode == 0, refit.stdout + refit.stderr
    assert json.loads((tmp_path / "fit.json").read_text()) == fit

    status = json.loads(orch(tmp_path, "status", sweep_id, "--json").stdout)
    assert status["pipelines"][0]["sweep"] and status["pipelines"][0]["counts"]["done"] == 6
    resumed = orch(tmp_path, "resume", sweep_id)  # nothing left to do: no new array
    assert resumed.returncode == 0 and "every member had completed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert len(slurm_sweep.submissions(folder)) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_stops_every_member_and_resume_resubmits_only_the_unfinished(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    # b1-L1 (119 steps) is held at step 70 until the cancel is sent: b0-L1 (59 steps) and the others (<= 20) never
    # reach it, and the resumed b1-L1 passes it (ORCH_FAULT_ONCE); no race with the checkpoints pruned as it trains
    hold = {
        "ORCH_FAULT": "train.after_optimizer_step#70:wait",
        "ORCH_FAULT_RELEASE": str(tmp_path / "release"),
        "ORCH_FAULT_ONCE": str(tmp_path / "held"),
    }
    sweep = sweep_file(tmp_path, tiny_data, "cut", "checkpoint.every=10", parallel=1)
    sweep_id, folder = submitted(tmp_path, orch(tmp_path, "submit", str(sweep), env=hold))
    try:
        _cancel_then_resume(tmp_path, sweep_id, folder)
    finally:  # a failed test leaves no task behind
        (tmp_path / "release").touch()
        orch(tmp_path, "cancel", sweep_id)


def _cancel_then_resume(tmp_path: Path, sweep_id: str, folder: Path) -> None:
    # one task at a time, in the plan's order: b0-L1 completes, b1-L1 is cancelled mid-run, the rest never start
    checkpoint = Path(members(tmp_path, sweep_id, refresh=False)["b1-L1"].run_dir) / "checkpoints" / "step_00000060"
    held = tmp_path / "held"  # written as the fault fires: b1-L1 is at step 70, its step 60 saved and kept
    wait_until(
        lambda: members(tmp_path, sweep_id)["b0-L1"].state == "COMPLETED" and held.exists() and checkpoint.is_dir(),
        300,
        "the sweep's first member to complete and the second to be held at step 70",
        interval=0.5,
    )
    cancelled = orch(tmp_path, "cancel", sweep_id)
    (tmp_path / "release").touch()  # b1-L1 goes on, sees the stop signal Slurm sent, saves and stops
    assert cancelled.returncode == 0 and "cancelling sweep" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    now = members(tmp_path, sweep_id, refresh=False)
    # Slurm keeps no record of a pending task it cancelled: `orch cancel` records those CANCELLED itself
    assert {s: r.state for s, r in now.items() if s not in ("b0-L1", "b1-L1")} == dict.fromkeys(
        ("b0-L2", "b1-L2", "b0-L3", "b1-L3"), "CANCELLED"
    ), now
    ended = wait_until(
        lambda: (m := members(tmp_path, sweep_id)) and all(r.finished for r in m.values()) and m,
        120,
        "every member to end",
        interval=2,
    )
    assert ended["b0-L1"].state == "COMPLETED" and ended["b1-L1"].state == "CANCELLED", ended
    assert not subprocess.run(["squeue", "-h", "-n", sweep_id], capture_output=True, text=True).stdout.strip()
    summary = Path(ended["b0-L1"].run_dir) / "summary.json"
    before = summary.stat().st_mtime_ns

    resumed = orch(tmp_path, "resume", sweep_id)
    assert resumed.returncode == 0 and "5 member(s) again" in resumed.stdout, resumed.stdout + resumed.stderr
    again = members(tmp_path, sweep_id, refresh=False)
    second = slurm_sweep.submissions(folder)[1]
    assert second["members"] == [1, 2, 3, 4, 5]  # sweep.json's order: b0-L1 is member 0, not resubmitted
    assert {s: r.slurm_job_id for s, r in again.items() if s != "b0-L1"} == {
        s: f"{second['array']}_{i}" for i, s in enumerate(("b1-L1", "b0-L2", "b1-L2", "b0-L3", "b1-L3"), start=1)
    }
    assert again["b0-L1"].slurm_job_id == ended["b0-L1"].slurm_job_id and again["b0-L1"].state == "COMPLETED"
    resumed_member = wait_until(
        lambda: (r := members(tmp_path, sweep_id)["b1-L1"]).finished and r, 300, "b1-L1 to end again", interval=2
    )
    assert resumed_member.state == "COMPLETED", resumed_member
    assert "resumed from" in slurm.log_file(resumed_member).read_text()
    assert orch(tmp_path, "cancel", sweep_id).returncode == 0
    wait_until(
        lambda: all(r.finished for r in members(tmp_path, sweep_id).values()), 120, "the members to end", interval=2
    )
    assert summary.stat().st_mtime_ns == before  # the completed member was not trained again
