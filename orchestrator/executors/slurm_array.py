"""A data job (kind: data) on Slurm: the curation stage's steps as four dependent Slurm jobs, the per-shard steps
as job arrays (training/data/curate/tasks.py):

    analyze  array of one task per shard                      (after the pipeline parent, if any)
    dedup    one job                                          --dependency=afterok:<analyze array>
    write    array of one task per shard                      --dependency=afterok:<dedup>
    report   one job: stats.json, removed.jsonl, report.md    --dependency=afterok:<write array>

The shards are planned here, at submit time (curate/plan.json: file listing and record counts, no reading), so the
arrays' sizes are known. Each array task calls the same function the local pool calls, with its
SLURM_ARRAY_TASK_ID as the shard; a task that finished is skipped, so a requeued task (node failure, preemption:
`--requeue`; time limit: submitit requeues a Checkpointable) or a resubmitted run (`orch resume`) redoes only the
shards that had not finished. A failed task leaves its dependents unsatisfiable; `--kill-on-invalid-dep=yes`
cancels them rather than leave them pending.

The run's registry entry follows the report job (`slurm_job_id`): the run is COMPLETED when the report is.
run_dir/slurm/jobs.json records all four job ids, for `orch cancel` (SlurmExecutor.cancel). Wiring:
SlurmExecutor.submit hands a kind-data run here, so `orch submit`, pipelines (submit_pipeline) and `orch resume`
all take this path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from submitit.helpers import Checkpointable

from jobspec.contract import RunFolder
from orchestrator.registry import Registry, Run, now

JOBS = "jobs.json"  # in run_dir/slurm/: {"analyze": id, "dedup": id, "write": id, "report": id}
STEPS = ("analyze", "dedup", "write", "report")


class CurateStep(Checkpointable):
    """One step of the stage, called as step(index) in an array task or step() in a single job. Checkpointable:
    at the time limit submitit requeues the same call, which redoes the unfinished task from the start."""

    def __init__(self, step: str, run_dir: str):
        self.step, self.run_dir = step, run_dir

    def __call__(self, index: int | None = None) -> dict:
        from training.data.curate import tasks

        function = getattr(tasks, self.step)
        return function(self.run_dir) if index is None else function(self.run_dir, index)


def array_parameters(run_parameters: dict, run: Run, step: str) -> dict:
    """The run's Slurm parameters (partition, time, ...) for one step: one process per task, no srun teardown
    (the tasks' restarts are Slurm's and submitit's, not after_srun's)."""
    params = dict(run_parameters, additional_parameters=dict(run_parameters["additional_parameters"]))
    params.update(job_name=f"{run.id}-{step}", nodes=1, ntasks_per_node=1, teardown=[])
    params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return params


def submit(
    run: Run, registry: Registry, cfg, parameters: Callable[..., dict], dependency_job_ids: Sequence[str] = ()
) -> dict[str, str]:
    """Plan the shards, submit the four jobs, record the report job as the run's; returns {step: job id}.
    `parameters(run, resources, dependency_job_ids)` gives a run's submitit parameters (slurm.executor_parameters)."""
    import submitit

    from training.data.curate.plan import make_plan

    run_dir = Path(run.run_dir)
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    RunFolder(run_dir).logs.mkdir(exist_ok=True)
    plan = make_plan(cfg, run_dir, workers=max(1, cfg.curate.workers or cfg.resources.nodes))
    shards = range(len(plan["shards"]))
    executor = submitit.SlurmExecutor(folder=slurm_dir, max_num_timeout=cfg.resources.max_requeues)
    ids: dict[str, str] = {}
    dependency = list(dependency_job_ids)
    try:
        for step in STEPS:
            executor.update_parameters(**array_parameters(parameters(run, cfg.resources, dependency), run, step))
            if step in ("analyze", "write"):
                executor.update_parameters(array_parallelism=len(shards))
                jobs = executor.map_array(CurateStep(step, str(run_dir)), shards)
                ids[step] = str(jobs[0].job_id).split("_")[0]  # "123_0" -> the array's id, 123
            else:
                ids[step] = str(executor.submit(CurateStep(step, str(run_dir))).job_id)
            dependency = [ids[step]]
    except (subprocess.CalledProcessError, RuntimeError) as e:  # submitit's FailedJobError carries sbatch's stderr
        cancel_ids(ids.values())
        error = RuntimeError(f"sbatch refused data run {run.id} ({run_dir}/config.yaml): {e}")
        registry.update(run.id, state="FAILED", reason=str(error), ended_at=now())
        raise error from None
    (slurm_dir / JOBS).write_text(json.dumps(ids) + "\n")
    registry.update(run.id, executor="slurm", state="PENDING", slurm_job_id=ids["report"])
    return ids


def job_ids(run: Run) -> list[str]:
    """Every Slurm job of a data run (empty for other runs)."""
    path = Path(run.run_dir) / "slurm" / JOBS
    return list(json.loads(path.read_text()).values()) if path.is_file() else []


def cancel_ids(ids) -> None:
    ids = [i for i in ids if i]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
