"""The Slurm executor: submits a run as one Slurm job through submitit, and reads its state back from sacct.

    submit(run, registry, cfg, dependency_job_ids=())  -> Slurm job id (recorded, state PENDING)
    refresh(registry, runs)                             -> registry states from ONE `sacct --parsable2` call
    cancel(run)                                         -> scancel

The job runs one srun task per process (resources.nodes x resources.nproc_per_node), each calling the same
entry point as torchrun (see slurm_job.TrainingJob). Slurm sends SIGUSR2 `signal_delay_s` before the time
limit; the trainer saves a checkpoint and exits 3, and the batch script requeues the job (slurm_job.after_srun),
which keeps its id and resumes from that checkpoint. submitit's files (the batch script, our pickled job
function, the logs `<job id>_<task>_log.out`) live in run_dir/slurm/.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from omegaconf import OmegaConf

from orchestrator.registry import Registry, Run, now

REPO = Path(__file__).resolve().parents[2]

# sacct's states -> the registry's. Anything not listed (TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED,
# BOOT_FAIL, DEADLINE, FAILED) is FAILED, with Slurm's word for it in the reason.
STATES = {
    "PENDING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "CONFIGURING": "RUNNING", "SUSPENDED": "RUNNING",
    "RESIZING": "RUNNING", "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING", "STOPPED": "RUNNING",
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
}


class SlurmError(RuntimeError):
    """sbatch/sacct/scancel failed; the message says which command and why."""


def signal_delay_s(time_min: int) -> int:
    """Seconds between the SIGUSR2 warning and the time limit: a tenth of the limit, 15 s to 5 min. slurmctld
    checks limits every 30 s, so the warning comes 0-30 s earlier still; the trainer needs only a few seconds
    to save a checkpoint."""
    return max(15, min(300, time_min * 6))


def sbatch_extra_parameters(flags: Iterable[str]) -> dict:
    """resources.sbatch_extra (["--exclusive", "--reservation=r1"]) -> submitit's additional_parameters."""
    params = {}
    for flag in flags:
        if not flag.startswith("--"):
            raise ValueError(f"resources.sbatch_extra has the value {flag!r}, but each entry must be one long sbatch "
                             "option, --name or --name=value (e.g. \"--exclusive\", \"--reservation=r1\")")
        name, _, value = flag[2:].partition("=")
        params[name] = value if value else True
    return params


def executor_parameters(run: Run, resources, dependency_job_ids: Sequence[str] = ()) -> dict:
    """submitit SlurmExecutor parameters for a run: its resources, the requeue hook, the dependencies."""
    python = shlex.quote(sys.executable)
    params = dict(
        job_name=run.id,
        nodes=resources.nodes,
        ntasks_per_node=resources.nproc_per_node,
        cpus_per_task=resources.cpus_per_task,
        time=resources.time_min,
        signal_delay_s=signal_delay_s(resources.time_min),
        stderr_to_stdout=True,  # one log per task: run_dir/slurm/<job id>_<task>_log.out
        # One task dying (SIGKILL, a crash) ends the step at once, instead of the others waiting in a collective.
        srun_args=["--kill-on-bad-exit=1"],
        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # Right after srun: "$?" is its exit status; after_srun requeues or ends the job (see slurm_job.py).
        teardown=["ORCH_SRUN_STATUS=$?",
                  f"{python} -m orchestrator.executors.slurm_job after-srun \"$ORCH_SRUN_STATUS\" "
                  f"{shlex.quote(run.run_dir)}"],
        additional_parameters={"requeue": True},  # node failures and preemptions put the job back in the queue
    )
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem"] = f"{resources.mem_gb}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(resources, key):
            params[key] = getattr(resources, key)
    if dependency_job_ids:
        params["dependency"] = "afterok:" + ":".join(str(j) for j in dependency_job_ids)
    params["additional_parameters"].update(sbatch_extra_parameters(resources.sbatch_extra))
    return params


def submit(run: Run, registry: Registry, cfg, dependency_job_ids: Sequence[str] = ()) -> str:
    """Submit a registered run as a Slurm job; records its job id, state PENDING, executor "slurm"."""
    if cfg.kind == "data":  # the curation stage: job arrays over its shards
        from orchestrator.executors import slurm_array

        return slurm_array.submit(run, registry, cfg, dependency_job_ids)
    import submitit

    from orchestrator.executors.slurm_job import TrainingJob

    run_dir = Path(run.run_dir)
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    if not (run_dir / "config.yaml").is_file():
        OmegaConf.save(cfg, run_dir / "config.yaml")
    try:
        executor = submitit.SlurmExecutor(folder=slurm_dir, max_num_timeout=cfg.resources.max_requeues)
        executor.update_parameters(**executor_parameters(run, cfg.resources, dependency_job_ids))
        job = executor.submit(TrainingJob(str(run_dir)))
    except (subprocess.CalledProcessError, RuntimeError) as e:  # submitit's FailedJobError carries sbatch's stderr
        detail = getattr(e, "stderr", None) or str(e)
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        detail = "; ".join(line.strip() for line in detail.splitlines() if line.strip()) or repr(e)
        error = SlurmError(f"sbatch refused run {run.id} ({run_dir}/config.yaml): {detail}")
        registry.update(run.id, state="FAILED", reason=str(error), ended_at=now())
        raise error from None
    except ValueError as e:  # a bad resources.sbatch_extra entry
        registry.update(run.id, state="FAILED", reason=str(e), ended_at=now())
        raise ValueError(f"{run_dir}/config.yaml: {e}") from None
    registry.update(run.id, executor="slurm", state="PENDING", slurm_job_id=str(job.job_id))
    return str(job.job_id)


def _timestamp(value: str) -> Optional[float]:
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "Unknown", "None" for a job not started or not ended
        return None


def _exit_code(value: str) -> Optional[int]:
    """sacct's "code:signal" -> an exit status in the shell's style (128 + signal when killed)."""
    code, _, sig = value.partition(":")
    if not code.isdigit():
        return None
    return 128 + int(sig) if int(code) == 0 and sig.isdigit() and int(sig) else int(code)


def sacct_records(job_ids: Sequence[str]) -> dict[str, list[dict]]:
    """Every record of each job, oldest first: one per start (-D keeps the records of requeued starts)."""
    fields = ["JobIDRaw", "State", "ExitCode", "Start", "End", "Reason"]
    cmd = ["sacct", "--parsable2", "--noheader", "-X", "-D", "-j", ",".join(job_ids), "-o", ",".join(fields)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {e}") from None
    if proc.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()} "
                         "(sacct needs slurmdbd: is accounting configured?)")
    records: dict[str, list[dict]] = {}
    for line in proc.stdout.splitlines():
        values = line.split("|")
        if len(values) == len(fields):
            record = dict(zip(fields, values))
            records.setdefault(record["JobIDRaw"], []).append(record)
    return records


def refresh(registry: Registry, runs: Sequence[Run]) -> None:
    """Bring the registry up to date for these Slurm runs, from one sacct call."""
    runs = [r for r in runs if r.executor == "slurm" and r.slurm_job_id]
    if not runs:
        return
    try:
        records = sacct_records([r.slurm_job_id for r in runs])
    except SlurmError as e:
        print(f"warning: Slurm states not refreshed: {e}", file=sys.stderr)
        return
    for run in runs:
        history = records.get(run.slurm_job_id)
        if not history:  # submitted moments ago: slurmdbd has not heard of it yet
            continue
        last = history[-1]
        slurm_state = last["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        state = STATES.get(slurm_state, "FAILED")
        values = dict(state=state, attempts=sum(1 for r in history if _timestamp(r["Start"])),
                      started_at=_timestamp(history[0]["Start"]) or run.started_at)
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            values.update(ended_at=_timestamp(last["End"]) or now(), exit_code=_exit_code(last["ExitCode"]))
        if state == "FAILED":
            values["reason"] = failure_reason(run, slurm_state, last["ExitCode"])
        elif state == "CANCELLED":
            values["reason"] = run.reason if run.state == "CANCELLED" and run.reason else "cancelled (scancel)"
        elif state == "PENDING" and last["Reason"] not in ("", "None"):
            values["reason"] = f"Slurm: {last['Reason']}"  # e.g. Resources, Dependency, BeginTime
        else:
            values["reason"] = None
        registry.update(run.id, **values)


def failure_reason(run: Run, slurm_state: str, exit_code: str) -> str:
    from orchestrator.executors.slurm_job import FINAL_REASON, USER_ERROR

    for path in (Path(run.run_dir) / "logs" / USER_ERROR, Path(run.run_dir) / "slurm" / FINAL_REASON):
        if path.is_file():
            return path.read_text().strip()
    return f"Slurm job {run.slurm_job_id} {slurm_state} (exit {exit_code}); see `orch logs {run.id}`"


def cancel(run: Run) -> None:
    """scancel the run's job (the trainer checkpoints on the SIGTERM it brings); refresh records CANCELLED."""
    if not run.slurm_job_id:
        return
    from orchestrator.executors.slurm_array import job_ids  # a data run's array jobs too

    proc = subprocess.run(["scancel", str(run.slurm_job_id), *job_ids(run)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SlurmError(f"scancel {run.slurm_job_id} failed: {proc.stderr.strip()}")


def resume(run: Run, registry: Registry) -> str:
    """Submit a finished run again on the same folder: a new job that resumes from the newest checkpoint,
    with fresh requeue and retry allowances."""
    from orchestrator.executors.slurm_job import FINAL_REASON, RESTARTS

    run_dir = Path(run.run_dir)
    for name in (RESTARTS, FINAL_REASON):
        (run_dir / "slurm" / name).unlink(missing_ok=True)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    registry.update(run.id, state="PENDING", ended_at=None, exit_code=None, reason=None, attempts=0)
    return submit(registry.get(run.id), registry, cfg)


def log_file(run: Run) -> Optional[Path]:
    """Rank 0's log (submitit's stdout+stderr of task 0, appended by every start of the job): the current job's,
    else the newest one in run_dir/slurm/."""
    slurm_dir = Path(run.run_dir) / "slurm"
    if run.slurm_job_id and (slurm_dir / f"{run.slurm_job_id}_0_log.out").is_file():
        return slurm_dir / f"{run.slurm_job_id}_0_log.out"
    logs = sorted(slurm_dir.glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None
