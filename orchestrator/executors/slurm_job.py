"""What runs inside a Slurm job submitted by orchestrator/executors/slurm.py (the data-plane side).

Two pieces, both in the job's batch script that submitit writes:

1. `TrainingJob`, the function submitit pickles and runs once per srun task. It maps Slurm's task variables
   onto torch.distributed's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls the same
   entry point torchrun runs, `training.main.run`. No torchrun inside srun: one srun task per process.
2. `after_srun`, run by the batch script once srun has returned (submitit's `teardown` lines). It decides
   whether the job is over or goes back to the queue with `scontrol requeue` (the job keeps its id, so
   `--dependency=afterok` on it still holds), like the local supervisor's retry loop:

   - exit 0: done (COMPLETED);
   - a user error (logs/user_error.txt, exit 2, a full disk): a bad config or data; retrying won't help (FAILED);
   - the trainer stopped on SIGUSR2/SIGTERM after saving a checkpoint (exit 3, the time-limit warning):
     requeue, at most `resources.max_requeues` times;
   - anything else (a task killed by SIGKILL, a crash): requeue, at most `resources.max_retries` times.

   The restarted job resumes from its newest checkpoint: the trainer does that by itself.
   Preemption brings SIGUSR2 as well (preempt_send_user_signal), so it goes the same way when the trainer
   saves within the QOS GraceTime. `scontrol requeue` and node failures are requeued by Slurm itself
   (`--requeue`); the trainer checkpoints on the SIGTERM they bring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from submitit.helpers import Checkpointable

from jobspec.contract import EXIT_REQUEUE, EXIT_USER_ERROR, RunFolder, user_error

# Files under run_dir/slurm/ (beside submitit's own): our bookkeeping, JSON and text, never pickle.
TRAINER_EXIT = "trainer_exit.txt"  # rank 0's exit code from training.main.run, read by after_srun
RESTARTS = "restarts.json"  # {"requeues": n, "retries": m}: what after_srun has used up
FINAL_REASON = "final_reason.txt"  # why after_srun gave up; `orch runs` shows it


def master_port(job_id: str, restart: int) -> int:
    """A port every task of the job computes alike; differs between jobs and between restarts, so a requeued
    job never meets its previous attempt's socket still in TIME_WAIT."""
    digits = int("".join(c for c in job_id if c.isdigit()) or 0)
    return 20000 + (digits * 7 + restart * 101) % 20000


def one_machine(hostnames: list[str]) -> bool:
    """True when all the job's nodes resolve to one address (virtual nodes of one host)."""
    import socket

    try:
        return len({socket.gethostbyname(h) for h in hostnames}) == 1
    except OSError:
        return False


class TrainingJob(Checkpointable):
    """One srun task of a training job. Checkpointable: if submitit's own SIGUSR2 handler fires (a signal that
    arrives before the trainer has installed its handlers), it requeues the same call; once the trainer runs,
    the trainer catches the signal itself, checkpoints and exits 3, which `after_srun` requeues."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        local_rank, local_world = job.local_rank, max(1, job.num_tasks // job.num_nodes)
        if job.num_nodes > 1 and one_machine(job.hostnames):
            # Slurm nodes that are one machine (the local test cluster): its processes share one /dev/shm,
            # so they must be one node to the data loader, or two "local leaders" claim the same memory.
            local_rank, local_world = job.global_rank, job.num_tasks
        os.environ.update(
            RANK=str(job.global_rank),
            WORLD_SIZE=str(job.num_tasks),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(local_world),
            MASTER_ADDR=job.hostnames[0],
            MASTER_PORT=str(master_port(job.job_id, restart)),
        )
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        from training.main import run

        config = str(RunFolder(self.run_dir).config)
        if job.global_rank == 0:  # left by an earlier attempt, perhaps since fixed (`orch resume`)
            RunFolder(self.run_dir).user_error.unlink(missing_ok=True)
        code = run([config, "--run-dir", self.run_dir])
        if job.global_rank == 0:
            (Path(self.run_dir) / "slurm" / TRAINER_EXIT).write_text(f"{code}\n")
        if code:
            sys.exit(code)  # srun (and after_srun) must see the trainer's status; submitit would exit 0
        return 0


def read_restarts(run_dir: Path) -> dict:
    path = run_dir / "slurm" / RESTARTS
    if path.is_file():
        return json.loads(path.read_text())
    return {"requeues": 0, "retries": 0}


def after_srun(srun_code: int, run_dir: Path) -> int:
    """Decide, once srun has returned, whether this job ends or requeues itself; returns the batch script's
    exit status (Slurm records the job COMPLETED for 0, FAILED otherwise)."""
    from omegaconf import OmegaConf

    slurm_dir = run_dir / "slurm"
    trainer_exit_file = slurm_dir / TRAINER_EXIT
    trainer_code = int(trainer_exit_file.read_text()) if trainer_exit_file.is_file() else None
    trainer_exit_file.unlink(missing_ok=True)
    if srun_code == 0:
        return 0
    why = user_error(RunFolder(run_dir))
    if why or trainer_code == EXIT_USER_ERROR:
        print(f"[orch] user error, not retrying: {why or f'exit code {trainer_code}'}", flush=True)
        return srun_code
    resources = OmegaConf.load(RunFolder(run_dir).config).resources
    restarts = read_restarts(run_dir)
    if trainer_code == EXIT_REQUEUE:
        kind, noun, limit = "requeues", "requeue", resources.max_requeues
        why = "stopped by a signal after saving a checkpoint"
    else:
        kind, noun, limit = "retries", "retry", resources.max_retries
        why = f"failed (srun exit code {srun_code})"
    if restarts[kind] >= limit:
        reason = f"{why}; resources.max_{kind}={limit} used up (`orch resume` continues from the checkpoint)"
        (slurm_dir / FINAL_REASON).write_text(reason + "\n")
        print(f"[orch] {reason}", flush=True)
        return srun_code
    restarts[kind] += 1
    (slurm_dir / RESTARTS).write_text(json.dumps(restarts) + "\n")
    job_id = os.environ["SLURM_JOB_ID"]
    print(f"[orch] job {job_id} {why}: requeueing ({noun} {restarts[kind]} of {limit})", flush=True)
    # Slurm kills this script as it requeues the job; the new start resumes from the newest checkpoint.
    subprocess.run(["scontrol", "requeue", job_id], timeout=60)
    return srun_code


if __name__ == "__main__":
    # python -m orchestrator.executors.slurm_job after-srun SRUN_EXIT_CODE RUN_DIR  (from the batch script)
    if len(sys.argv) != 4 or sys.argv[1] != "after-srun":
        sys.exit("usage: python -m orchestrator.executors.slurm_job after-srun SRUN_EXIT_CODE RUN_DIR")
    sys.exit(after_srun(int(sys.argv[2]), Path(sys.argv[3])))
