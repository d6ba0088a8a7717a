"""A sweep's life once its file is checked (jobspec/sweep_file.py): register every member, write the sweep's
folder, hand the members to a supervisor that runs `parallel` of them at a time, and resume the unfinished.

The members are registered as one pipeline whose stages depend on nothing (pipeline id = sweep id, stage = the
member's name): `orch pipeline status|wait SWEEP` and the dashboard cover a sweep as they cover a chain.
Locally a detached supervisor runs them (executors/local_sweep.py); on Slurm they are one job array and a fit
job after it (executors/slurm_sweep.py). The sweep's folder, <runs_dir>/<sweep id>/, holds sweep.json (each
member's id, run folder, N, D, C and steps) and, once the members have ended, fit.json and report.md
(orchestrator/sweeps/fit.py).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from pathlib import Path

from jobspec.faults import fault
from jobspec.loading import SpecError
from jobspec.processes import process_start, this_process
from jobspec.sweep_file import Sweep
from orchestrator import executors
from orchestrator.executors.base import refuse_if_held
from orchestrator.executors.local import pipeline_files, spawn_detached
from orchestrator.registry import TERMINAL, Registry, Run, now
from orchestrator.runs import register_run, run_folder
from orchestrator.sweeps import SWEEP_PLAN


def submit(sweep: Sweep, registry: Registry) -> tuple[str, Path, list[Run]]:
    """Register every member PENDING, write sweep.json, start the sweep's supervisor. Returns the sweep id, its
    folder and the members' runs."""
    executor = executors.resolve(sweep.executor)
    if executor not in SUPERVISORS:  # refused before anything is registered
        raise SpecError(
            f"{sweep.path}: key 'executor' resolves to {executor!r}, but sweeps run on {' or '.join(SUPERVISORS)} only."
        )
    executors.executor_for(executor, registry).check(sweep.members[0].cfg, sweep.path)  # runs_dir usable
    if executor in SIZE_CHECKS:  # `orch submit` asked before each member's job was checked; an API caller now
        SIZE_CHECKS[executor](sweep.path, sweep.plan_key, len(sweep.members))
    sweep_id = f"{sweep.name}-{secrets.token_hex(3)}"
    folder = run_folder(sweep.members[0].cfg, sweep_id)
    runs = []
    for m in sweep.members:
        m.cfg.executor = executor
        runs.append(register_run(registry, m.cfg, executor, f"{sweep_id}-{m.name}", pipeline_id=sweep_id, stage=m.name))
    folder.mkdir(parents=True)
    plan = {
        "sweep": sweep_id,
        "path": str(Path(sweep.path).resolve()),
        "job": sweep.job,
        "flops": sweep.flops,
        "parallel": sweep.parallel,
        "fit_budgets": sweep.fit_budgets,
        "members": [
            {
                "id": r.id,
                "name": m.name,
                "run_dir": r.run_dir,
                "n_layer": m.n_layer,
                "d_model": m.d_model,
                "n_head": m.n_head,
                "N": m.N,
                "D": m.D,
                "C": m.C,
                "steps": m.steps,
            }
            for m, r in zip(sweep.members, runs)
        ],
    }
    (folder / SWEEP_PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    fault("submit.registered")
    SUPERVISORS[executor](registry, sweep_id, folder, sweep.parallel)
    return sweep_id, folder, [registry.get(r.id) for r in runs]


def start_supervisor(registry: Registry, sweep_id: str, folder: Path, parallel: int) -> None:
    """The detached process that runs the members (executors/local_sweep.py); the pipeline pid file names it, so
    members waiting for a supervisor that died show CANCELLED, as a pipeline's stages do."""
    log, pid_file = pipeline_files(registry, sweep_id)
    proc = spawn_detached(["orchestrator.executors.local_sweep", sweep_id, str(folder), str(parallel)], log, registry)
    pid_file.write_text(f"{proc.pid} {process_start(proc.pid)} {socket.gethostname()}\n")


def submit_array(registry: Registry, sweep_id: str, folder: Path, parallel: int) -> None:
    """Every PENDING member not yet given to Slurm, as one job array (`parallel` at a time) and a fit job."""
    from orchestrator.executors import slurm, slurm_sweep

    runs = [r for r in registry.list(pipeline_id=sweep_id) if r.state == "PENDING" and not r.slurm_job_id]
    if runs:
        slurm_sweep.submit_runs(registry, runs, slurm.executor_parameters)


def check_array_size(path: str, plan_key: str, members: int) -> None:
    """SpecError (exit 2) for more members than one job array of this cluster holds (MaxArraySize)."""
    from orchestrator.executors import slurm_sweep

    slurm_sweep.check_size(path, plan_key, members, slurm_sweep.max_array_size())


# executor -> what runs a sweep's members there
SUPERVISORS = {"local": start_supervisor, "slurm": submit_array}
# executor -> what refuses a sweep's number of members there (SpecError)
SIZE_CHECKS = {"slurm": check_array_size}


def cancel(registry: Registry, sweep_id: str) -> list[Run]:
    """Cancel every unfinished member. On Slurm the array's pending tasks are cancelled at once (`scancel
    --state=PENDING`): Slurm keeps no record of a task that never started, so those members are recorded CANCELLED
    here; a running or requeued task is scancelled and stays CANCELLING until sacct says it ended (it saves first).
    The fit jobs are cancelled too (`orch resume SWEEP` submits a new one)."""
    from orchestrator import pipelines

    runs = registry.list(pipeline_id=sweep_id)
    on_slurm = [r for r in runs if r.slurm_job_id and not r.finished]  # tasks of a sweep array
    if not on_slurm:
        return pipelines.cancel(registry, sweep_id)
    from orchestrator.executors import slurm, slurm_sweep

    slurm.SlurmExecutor(registry).refresh(on_slurm)  # a task that has completed meanwhile is not cancelled
    on_slurm = [r for r in (registry.get(r.id) for r in on_slurm) if not r.finished]
    if not on_slurm:
        return pipelines.cancel(registry, sweep_id)

    folder = slurm_sweep.folder_of(on_slurm[0])
    arrays = sorted({r.slurm_job_id.split("_")[0] for r in on_slurm})
    fits = [s["fit"] for s in slurm_sweep.submissions(folder) if s.get("fit")] if folder else []
    subprocess.run(["scancel", "--state=PENDING", *arrays], capture_output=True, timeout=60)
    if fits:
        subprocess.run(["scancel", *fits], capture_output=True, timeout=60)
    held = slurm_sweep.held_tasks(arrays)
    try:
        recorded = slurm.sacct_records([r.slurm_job_id for r in on_slurm])
    except slurm.SlurmError:
        recorded = None  # unknown: every task goes the slow way, through sacct
    for run in on_slurm:
        if recorded is not None and run.slurm_job_id not in held and run.slurm_job_id not in recorded:
            registry.transition(
                run.id, ("PENDING",), state="CANCELLED", reason=pipelines.CANCELLED_PIPELINE, ended_at=now()
            )
    return pipelines.cancel(registry, sweep_id)  # the rest: scancel, CANCELLING until sacct says it ended


def resume(registry: Registry, sweep_id: str, folder: Path) -> list[Run]:
    """Every member that ended without completing goes back to PENDING (its trainer resumes from its newest
    checkpoint); completed members are never redone. A new supervisor runs them. Returns the members resumed."""
    plan = json.loads((folder / SWEEP_PLAN).read_text())
    runs = registry.list(pipeline_id=sweep_id)
    again = [r for r in runs if r.finished and r.state != "COMPLETED"]
    if any(r.slurm_job_id for r in again):
        _refuse_if_slurm_holds(sweep_id)
    resumed = []
    for run in again:
        refuse_if_held(run)
        slurm_fields = dict(slurm_job_id=None, attempts=0, **this_process()) if run.slurm_job_id else {}
        if registry.transition(
            run.id,
            TERMINAL,
            state="PENDING",
            ended_at=None,
            exit_code=None,
            reason=None,
            **{"pid": None, "pid_start": None, "host": None, **slurm_fields},
        ):
            from orchestrator.executors.slurm_job import FINAL_REASON, RESTARTS

            for name in (RESTARTS, FINAL_REASON):  # fresh retry and requeue allowances, as `orch resume` gives
                (Path(run.run_dir) / "slurm" / name).unlink(missing_ok=True)
            resumed.append(registry.get(run.id))
    if resumed:
        SUPERVISORS[resumed[0].executor](registry, sweep_id, folder, plan["parallel"])
    return resumed


def _refuse_if_slurm_holds(sweep_id: str) -> None:
    """No task of an earlier array may still be running or pending: it would share a member's folder."""
    from orchestrator.executors.slurm import jobs_held

    held = jobs_held([sweep_id])
    if held:
        jobs = ", ".join(f"{job} {state}" for job, state in sorted(held.items()))
        raise RuntimeError(
            f"sweep {sweep_id} can't be resumed: Slurm still holds tasks of it ({jobs}); "
            f"`orch cancel {sweep_id}`, or wait until they have ended"
        )
