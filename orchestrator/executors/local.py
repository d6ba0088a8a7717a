"""The local executor: runs jobs on this machine, detached from the terminal that submitted them.

`orch submit` starts a supervisor process (local_supervisor.py) in its own session and returns. The
supervisor launches the trainer, records each state change in the registry, restarts a failed attempt
under the retry policy and a requeued one (exit 3) under the requeue allowance; the trainer resumes
from its newest checkpoint by itself. A pipeline gets one more process (local_pipeline.py) that runs its
stages one after another.

What this machine can tell about a run without asking anyone: whether its supervisor (pid + start time)
is alive, and whether a trainer holds the run folder's lock. `observe` reads those; it never writes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from jobspec.checks import refuse_slurm_only
from jobspec.contract import RunFolder
from jobspec.processes import process_start, same_process, signal_process, this_process
from jobspec.run_lock import describe, holder
from orchestrator import code_snapshot
from orchestrator.executors.base import CANCELLED_BY_USER, Observation, refuse_if_held
from orchestrator.filesystems import check_runs_dir
from orchestrator.registry import TERMINAL, Registry, Run, now


def _block_stop_signals() -> None:
    """In a new supervisor, before it runs Python: SIGTERM/SIGINT wait (blocked) until it has installed its
    handlers, so an `orch cancel` that arrives during start-up is handled, not fatal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def spawn_detached(argv: list[str], log_path: Path, registry: Registry, env: Optional[dict] = None) -> subprocess.Popen:
    """A process in its own session (it outlives the terminal), its output appended to log_path; `env` is added to
    ours (a run's code snapshot)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ORCH_HOME=str(registry.path.parent), PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_block_stop_signals,
        )


def pipeline_files(registry: Registry, pipeline_id: str) -> tuple[Path, Path]:
    """(log, pid file) of a local pipeline's supervisor."""
    folder = registry.path.parent / "pipelines"
    return folder / f"{pipeline_id}.log", folder / f"{pipeline_id}.pid"


# `orch submit` writes a pipeline's pid file right after registering its stages; a pipeline older than
# this without one lost its submitter before the supervisor started.
PIPELINE_START_GRACE_S = 60


def pipeline_supervisor_gone(registry: Registry, run: Run) -> bool:
    """True when the local pipeline supervisor that should start this stage is known to be gone."""
    _, pid_file = pipeline_files(registry, run.pipeline_id)
    try:
        pid, start, host = pid_file.read_text().split()
    except (OSError, ValueError):
        return now() - run.created_at > PIPELINE_START_GRACE_S
    return same_process(int(pid), start, host) is False


def _signal(pid, start) -> bool:
    """SIGTERM that process if it is still the one recorded. A pid without its start time (a registry older than
    the pid_start column, a process gone before it was read) is never signalled: the kernel may have given that
    pid to any process since."""
    return start is not None and signal_process(pid, start, signal.SIGTERM)


class LocalExecutor:
    name = "local"

    def __init__(self, registry: Registry):
        self.registry = registry

    # ------------------------------------------------------------ starting

    def start(self, run: Run) -> subprocess.Popen:
        """Start the run's supervisor and record it (pid, start time, host); a pipeline waits on the process."""
        proc = spawn_detached(
            ["orchestrator.executors.local_supervisor", run.id],
            RunFolder(run.run_dir).logs / "supervisor.log",
            self.registry,
            env=code_snapshot.environment(run.run_dir),  # the supervisor and its trainer run the submitted code
        )
        self.registry.update(run.id, pid=proc.pid, pid_start=process_start(proc.pid), host=socket.gethostname())
        return proc

    def check(self, cfg: DictConfig, source: str) -> None:
        check_runs_dir(cfg.runs_dir, source, across_nodes=False)  # one machine: a node-local flock() will do
        refuse_slurm_only(cfg, lambda *keys: source, why=f"executor: {cfg.executor}")  # setup lines, a container

    def dry_run(self, run: Run, cfg: DictConfig) -> str:
        """The trainer's command line, with the job's resources.env before it."""
        import shlex

        from orchestrator.executors.local_supervisor import trainer_command

        env = [f"{name}={value}" for name, value in cfg.resources.env.items()]
        argv = trainer_command(run, cfg.resources.nproc_per_node, cfg.resources.python)
        return shlex.join([*(["env", *env] if env else []), *argv]) + "\n"

    def submit(self, run: Run, cfg: DictConfig) -> str:
        self.start(run)
        return "local"

    def submit_pipeline(self, pipeline_id: str, runs: Sequence[Run], cfgs: dict[str, DictConfig]) -> None:
        """One detached process runs the stages in order (local_pipeline.py); its pid file names it."""
        log, pid_file = pipeline_files(self.registry, pipeline_id)
        proc = spawn_detached(["orchestrator.executors.local_pipeline", pipeline_id], log, self.registry)
        pid_file.write_text(f"{proc.pid} {process_start(proc.pid)} {socket.gethostname()}\n")

    def resume(self, run: Run) -> str:
        refuse_if_held(run)
        if not self.registry.transition(
            run.id, TERMINAL, state="PENDING", ended_at=None, exit_code=None, reason=None, **this_process()
        ):  # ours until its supervisor runs
            raise RuntimeError(f"{run.id} was resumed by someone else meanwhile ({self.registry.get(run.id).state})")
        self.start(self.registry.get(run.id))
        return "local"

    # ------------------------------------------------------------ stopping

    def cancel(self, run: Run, reason: str = CANCELLED_BY_USER) -> None:
        """PENDING with no supervisor (a pipeline stage not started): CANCELLED at once. Otherwise CANCELLING,
        and the supervisor is told (SIGTERM); it stops the trainer after a checkpoint and records CANCELLED."""
        alive = same_process(run.pid, run.pid_start, run.host)
        if run.state == "PENDING" and not alive:
            if self.registry.transition(run.id, ("PENDING",), state="CANCELLED", reason=reason, ended_at=now()):
                return
            run = self.registry.get(run.id)  # it started meanwhile: cancel it as a running one
        if run.finished:
            return
        self.registry.transition(run.id, ("PENDING", "RUNNING"), state="CANCELLING", reason=reason)
        if _signal(run.pid, run.pid_start):
            return
        trainer = holder(run.run_dir)  # no supervisor: a trainer it left behind still gets the message
        if trainer and trainer.get("host") == socket.gethostname():
            _signal(trainer.get("pid"), trainer.get("pid_start"))

    # ------------------------------------------------------------ looking

    def observe(self, runs: Sequence[Run]) -> dict[str, Observation]:
        seen = {}
        for run in runs:
            if run.executor != self.name or run.finished:
                continue
            if run.state == "PENDING" and run.pid is None:  # a pipeline stage waiting for its turn
                if run.pipeline_id and pipeline_supervisor_gone(self.registry, run):
                    log, _ = pipeline_files(self.registry, run.pipeline_id)
                    seen[run.id] = Observation(
                        "CANCELLED", f"the pipeline's supervisor is gone (see {log}); submit the pipeline again"
                    )
                continue
            if same_process(run.pid, run.pid_start, run.host) is not False:  # alive, or on another host
                seen[run.id] = Observation(run.state, where="local")
                continue
            trainer = holder(run.run_dir)
            if trainer is not None:
                seen[run.id] = Observation(
                    run.state, f"its supervisor is gone; its trainer ({describe(trainer)}) still runs", where="local"
                )
            elif run.state == "CANCELLING":
                seen[run.id] = Observation("CANCELLED", CANCELLED_BY_USER)
            else:
                seen[run.id] = Observation(
                    "LOST",
                    f"its supervisor (or the orch command starting it; pid {run.pid}) "
                    "and its trainer are gone (killed, or the machine restarted); "
                    f"`orch resume {run.id}` continues from its checkpoint",
                )
        return seen

    def refresh(self, runs: Sequence[Run]) -> None:
        for run_id, seen in self.observe(runs).items():
            if seen.state == "LOST":
                self.registry.transition(
                    run_id, ("PENDING", "RUNNING"), state="FAILED", reason=seen.reason, ended_at=now()
                )
            elif seen.state == "CANCELLED" and seen.reason:
                self.registry.transition(
                    run_id, ("PENDING", "CANCELLING"), state="CANCELLED", reason=seen.reason, ended_at=now()
                )

    def log_path(self, run: Run) -> Path:
        return RunFolder(run.run_dir).train_log
