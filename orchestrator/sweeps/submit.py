"""A sweep's life once its file is checked (jobspec/sweep_file.py): register every member, write the sweep's
folder, hand the members to a supervisor that runs `parallel` of them at a time, and resume the unfinished.

The members are registered as one pipeline whose stages depend on nothing (pipeline id = sweep id, stage = the
member's name): `orch pipeline status|wait|cancel SWEEP` and the dashboard's pipeline rows cover a sweep as
they cover a chain. The sweep's folder, <runs_dir>/<sweep id>/, holds sweep.json (each member's id, run folder,
N, D, C and steps) and, once the members have ended, fit.json and report.md (orchestrator/sweeps/fit.py).
"""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

from jobspec.faults import fault
from jobspec.loading import SpecError
from jobspec.processes import process_start
from jobspec.sweep_file import Sweep
from orchestrator import executors
from orchestrator.executors.local import pipeline_files, spawn_detached
from orchestrator.registry import TERMINAL, Registry, Run
from orchestrator.runs import register_run, run_folder
from orchestrator.sweeps import SWEEP_PLAN


def submit(sweep: Sweep, registry: Registry) -> tuple[str, Path, list[Run]]:
    """Register every member PENDING, write sweep.json, start the sweep's supervisor. Returns the sweep id, its
    folder and the members' runs."""
    executor = executors.resolve(sweep.executor)
    if executor not in SUPERVISORS:  # refused before anything is registered
        raise SpecError(
            f"{sweep.path}: key 'executor' resolves to {executor!r}, but sweeps run on this machine "
            "only for now (a Slurm job array per sweep is not built yet): set executor: local."
        )
    executors.executor_for(executor, registry).check(sweep.members[0].cfg, sweep.path)  # runs_dir usable
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


# executor -> what runs a sweep's members there (a Slurm job array would be one more entry)
SUPERVISORS = {"local": start_supervisor}


def resume(registry: Registry, sweep_id: str, folder: Path) -> list[Run]:
    """Every member that ended without completing goes back to PENDING (its trainer resumes from its newest
    checkpoint); completed members are never redone. A new supervisor runs them. Returns the members resumed."""
    plan = json.loads((folder / SWEEP_PLAN).read_text())
    resumed = []
    for run in registry.list(pipeline_id=sweep_id):
        if (
            run.finished
            and run.state != "COMPLETED"
            and registry.transition(
                run.id,
                TERMINAL,
                state="PENDING",
                ended_at=None,
                exit_code=None,
                reason=None,
                pid=None,
                pid_start=None,
                host=None,
            )
        ):
            resumed.append(registry.get(run.id))
    if resumed:
        SUPERVISORS[resumed[0].executor](registry, sweep_id, folder, plan["parallel"])
    return resumed
