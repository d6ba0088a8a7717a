"""The local executor: runs a job on this machine, detached from the terminal that submitted it.

`orch submit` starts a supervisor process in its own session (it survives the terminal closing)
and returns. The supervisor launches the trainer (`torchrun` when several processes are asked for),
records state transitions in the registry, and restarts a failed attempt under the retry policy;
the trainer resumes from its newest checkpoint by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.registry import Registry, Run, now

EXIT_REQUEUE = 3  # training.trainer.EXIT_REQUEUE: stopped by a signal after saving a checkpoint


def trainer_command(run: Run, nproc: int) -> list[str]:
    config = str(Path(run.run_dir) / "config.yaml")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "training.main", config, "--run-dir", run.run_dir]
    return [sys.executable, "-m", "training.main", config, "--run-dir", run.run_dir]


def launch(run: Run, registry: Registry) -> int:
    """Start the supervisor for a registered run; returns its pid."""
    return start_supervisor(run, registry).pid


def start_supervisor(run: Run, registry: Registry) -> subprocess.Popen:
    """Start the supervisor process (records its pid); a pipeline's supervisor waits on it."""
    log_dir = Path(run.run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ORCH_HOME=str(registry.path.parent), PYTHONUNBUFFERED="1")
    with open(log_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.executors.local", run.id],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    registry.update(run.id, pid=proc.pid)
    return proc


def supervise(run_id: str) -> int:
    """Body of the detached supervisor: run attempts until success, cancellation or retries run out."""
    from omegaconf import OmegaConf

    registry = Registry()
    run = registry.get(run_id)
    cfg = OmegaConf.load(Path(run.run_dir) / "config.yaml")
    nproc = cfg.resources.nproc_per_node
    max_attempts = 1 + cfg.resources.max_retries
    log_path = Path(run.run_dir) / "logs" / "train.log"
    child = None

    def forward(signum, frame):  # `orch cancel` signals us; the trainer checkpoints and stops
        registry.update(run_id, state="CANCELLED", reason="cancelled by user", ended_at=now())
        if child and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 1
    for attempt in range(1, max_attempts + 1):
        if registry.get(run_id).state == "CANCELLED":
            return 1
        registry.update(run_id, state="RUNNING", attempts=attempt, started_at=run.started_at or now())
        user_error = Path(run.run_dir) / "logs" / "user_error.txt"  # training.main.USER_ERROR
        user_error.unlink(missing_ok=True)  # left by an earlier attempt, perhaps since fixed
        with open(log_path, "ab") as log:
            if attempt > 1:
                log.write(f"\n[orch] attempt {attempt}: restarting after exit code {code}\n".encode())
                log.flush()
            child = subprocess.Popen(trainer_command(run, nproc), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            code = child.wait()
        if registry.get(run_id).state == "CANCELLED":
            registry.update(run_id, exit_code=code)
            return code
        if code == 0:
            registry.update(run_id, state="COMPLETED", exit_code=0, ended_at=now())
            return 0
        if user_error.is_file():  # a bad config, bad data, no valid checkpoint: retrying won't help
            registry.update(run_id, state="FAILED", exit_code=code, ended_at=now(),
                            reason=user_error.read_text().strip())
            return code
    registry.update(run_id, state="FAILED", exit_code=code, ended_at=now(),
                    reason=f"exit code {code}; see {log_path}")
    return code


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1]))
