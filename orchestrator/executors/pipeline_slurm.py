"""A pipeline on Slurm: every stage is submitted at once, each held with `--dependency=afterok:<parent job>`,
so the cluster starts a stage when its parent has COMPLETED, with no process of ours running meanwhile.

When a parent fails, Slurm (without `kill_invalid_depend` in SchedulerParameters, as on our cluster) leaves
its dependents PENDING forever with the reason DependencyNeverSatisfied. `check` (called by `orch runs`,
`orch pipeline wait|status` and `orch submit --follow`) finds them from the parent's FAILED/CANCELLED state
in sacct, scancels them and records CANCELLED "dependency <stage> failed".
"""

from __future__ import annotations

from typing import Sequence

from orchestrator.registry import Registry, Run, now


def submit_all(registry: Registry, runs: Sequence[Run], cfgs: dict) -> None:
    """Submit the stages, parents first, each depending on its parent's job. If one submission fails, the
    ones already submitted are cancelled and every stage is marked so, then the error is raised."""
    from orchestrator.executors import slurm

    job_ids: dict[str, str] = {}
    try:
        for run in runs:
            deps = (job_ids[run.depends_on],) if run.depends_on else ()
            job_id = str(slurm.submit(run, registry, cfgs[run.stage], dependency_job_ids=deps))
            registry.update(run.id, slurm_job_id=job_id)
            job_ids[run.id] = job_id
    except BaseException as e:
        why = f"the pipeline could not be submitted: {str(e).splitlines()[0] if str(e) else repr(e)}"
        for run in runs:
            if run.id in job_ids:
                slurm.cancel(registry.get(run.id))
            registry.update(run.id, state="CANCELLED", ended_at=now(), reason=why)
        raise


def check(registry: Registry, runs: Sequence[Run]) -> None:
    """States from sacct (one call), then scancel + CANCELLED for every stage downstream of a FAILED or
    CANCELLED one. A failed attempt that will be retried is requeued under the same job id (slurm_job.py),
    so it never shows FAILED here, and its dependents' `afterok` still names the right job."""
    from orchestrator.executors import slurm
    from orchestrator.pipeline import cancel_dependents

    live = [r for r in runs if not r.finished]
    if not live:
        return
    slurm.refresh(registry, live)
    cancel_dependents(registry, runs, cancel_one=slurm.cancel)
