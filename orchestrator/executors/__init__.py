"""Backends that run jobs, one file each behind the Executor protocol (base.py):

    local.py   this machine: a detached supervisor per run (local_supervisor.py), one per pipeline
               (local_pipeline.py)
    slurm.py   a Slurm cluster through submitit and sbatch; slurm_job.py is what runs inside the job

A third backend is one more file and one more line in BACKENDS.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from orchestrator.executors.base import Executor, Observation
from orchestrator.registry import Registry, Run

BACKENDS = {
    "local": "orchestrator.executors.local:LocalExecutor",
    "slurm": "orchestrator.executors.slurm:SlurmExecutor",
}


def resolve(name: str) -> str:
    """auto -> slurm when sbatch is on PATH and slurmctld answers, else local."""
    if name != "auto":
        return name
    from orchestrator.cluster import slurm_available

    return "slurm" if slurm_available() else "local"


def executor_for(name: str, registry: Registry) -> Executor:
    """The executor of that name (a run's `executor` column), working on this registry."""
    import importlib

    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(registry)


def observe_all(registry: Registry, runs: Sequence[Run]) -> dict[str, Observation]:
    """What each run's executor observes of it now, by run id (one question per backend). Reads only."""
    seen: dict[str, Observation] = {}
    for name in {r.executor for r in runs if not r.finished}:
        seen.update(executor_for(name, registry).observe([r for r in runs if r.executor == name]))
    return seen


def observed(registry: Registry, runs: Sequence[Run]) -> list[Run]:
    """The runs as their executors see them now: copies whose state, reason and attempts are what each
    backend observes (a dead supervisor, a job sacct has seen end). Reads only: for dashboards and listings."""
    seen = observe_all(registry, runs)
    out = []
    for run in runs:
        o = seen.get(run.id)
        if o is not None:
            run = dataclasses.replace(
                run,
                state=o.state,
                reason=o.reason if o.reason is not None else run.reason,
                attempts=o.attempts if o.attempts is not None else run.attempts,
            )
        out.append(run)
    return out


__all__ = ["BACKENDS", "Executor", "Observation", "executor_for", "observe_all", "observed", "resolve"]
