"""The local supervisor: one detached process per run, started by LocalExecutor.

    python -m orchestrator.executors.local_supervisor RUN_ID

It runs the trainer (torchrun when several processes are asked for) until it succeeds, is cancelled, or
its allowances run out, recording each state change in the registry:
  - exit 0: COMPLETED;
  - a user error (exit 2, logs/user_error.txt, or a full disk): FAILED with the trainer's sentence, never retried;
  - exit 3, stopped by a signal after saving (not a cancel): restarted, at most resources.max_requeues times;
  - anything else (a crash, SIGKILL): restarted, at most resources.max_retries times.
On SIGTERM (`orch cancel`) the run is CANCELLING until the trainer has saved and exited, then CANCELLED.
The trainer dies with its supervisor (it gets SIGTERM when the supervisor dies), so a killed supervisor
never leaves a trainer nobody watches.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from jobspec.contract import EXIT_REQUEUE, EXIT_USER_ERROR, RunFolder, stop_grace_s, trainer_exit, user_error
from jobspec.faults import fault
from orchestrator.executors.base import CANCELLED_BY_USER
from orchestrator.registry import Registry, Run, now

PR_SET_PDEATHSIG = 1


def trainer_command(run: Run, nproc: int, python: str | None = None) -> list[str]:
    """The trainer's command line; python: the job's resources.python (default: the interpreter running orch)."""
    folder = RunFolder(run.run_dir)
    config = str(folder.config)
    python = python or sys.executable
    if nproc > 1:
        # torchrun's wait between its SIGTERM to the ranks and SIGKILL: long enough for the save they then make
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--shutdown-timeout={stop_grace_s(folder)}",
            "-m",
            "training.main",
            config,
            "--run-dir",
            run.run_dir,
        ]
    return [python, "-m", "training.main", config, "--run-dir", run.run_dir]


def trainer_env(resources) -> dict[str, str]:
    """Ours, plus the job's resources.env (a run folder written before that key has none)."""
    return dict(os.environ, **{str(k): str(v) for k, v in (resources.get("env") or {}).items()})


def _die_with_parent() -> None:
    """In the trainer, before exec: SIGTERM when the supervisor dies (the trainer then saves and stops)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, run_id: str):
        self.registry = Registry()
        self.run = self.registry.get(run_id)
        self.folder = RunFolder(self.run.run_dir)
        self.resources = OmegaConf.load(self.folder.config).resources
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def on_stop_signal(self, signum, frame) -> None:
        """`orch cancel` (which has recorded CANCELLING) or Ctrl-C: tell the trainer. No registry write here:
        the handler may interrupt one, and the loop records the outcome once the trainer has exited."""
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank

    def cancelled(self) -> bool:
        return self.stopping or self.registry.get(self.run.id).state in ("CANCELLING", "CANCELLED")

    def attempt(self, number: int, note: str) -> int:
        self.folder.user_error.unlink(missing_ok=True)  # left by an earlier attempt, perhaps since fixed
        self.folder.trainer_exit.unlink(missing_ok=True)
        with open(self.folder.train_log, "ab") as log:
            if note:
                try:
                    log.write(f"\n[orch] attempt {number}: {note}\n".encode())
                    log.flush()
                except OSError:  # a full disk: the attempt still runs, and its outcome goes to the registry
                    pass
            self.child = subprocess.Popen(
                trainer_command(self.run, self.resources.nproc_per_node, self.resources.get("python")),
                env=trainer_env(self.resources),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            return self.child.wait()

    def finish(self, state: str, code: int, reason: str | None) -> int:
        values = dict(state=state, exit_code=code, ended_at=now())
        if reason is not None:
            values["reason"] = reason
        self.registry.transition(self.run.id, ("PENDING", "RUNNING", "CANCELLING"), **values)
        return code

    def run_attempts(self) -> int:
        retries = requeues = 0
        code, note = 0, ""
        fault("supervisor.started")
        for number in range(1, 2 + self.resources.max_retries + self.resources.max_requeues):
            if self.cancelled():
                return self.finish("CANCELLED", code, CANCELLED_BY_USER)
            if not self.registry.transition(
                self.run.id,
                ("PENDING", "RUNNING"),
                state="RUNNING",
                attempts=number,
                started_at=self.run.started_at or now(),
            ):
                return self.finish("CANCELLED", code, CANCELLED_BY_USER)  # cancelled between the check and here
            try:
                code = self.attempt(number, note)
            except OSError as e:  # the log can't even be opened: nothing can run in this folder
                return self.finish(
                    "FAILED", EXIT_USER_ERROR, user_error(self.folder) or f"{self.folder.train_log}: {e}"
                )
            if code != 0:  # under torchrun any rank's failure is exit 1: rank 0's own code says what it was
                code = trainer_exit(self.folder) or code
            fault("supervisor.trainer_exited")
            if self.cancelled():
                return self.finish("CANCELLED", code, CANCELLED_BY_USER)
            if code == 0:
                return self.finish("COMPLETED", 0, None)
            why = user_error(self.folder)
            if code == EXIT_USER_ERROR or why:
                return self.finish("FAILED", code, why or f"exit code {code}; see {self.folder.train_log}")
            if code == EXIT_REQUEUE:
                requeues += 1
                if requeues > self.resources.max_requeues:
                    return self.finish(
                        "FAILED",
                        code,
                        "stopped by a signal after saving a checkpoint; "
                        f"resources.max_requeues={self.resources.max_requeues} used up "
                        f"(`orch resume {self.run.id}` continues from the checkpoint)",
                    )
                note = f"requeued after a stop signal ({requeues} of {self.resources.max_requeues})"
            else:
                retries += 1
                if retries > self.resources.max_retries:
                    return self.finish("FAILED", code, f"exit code {code}; see {self.folder.train_log}")
                note = f"restarting after exit code {code}"
        return self.finish("FAILED", code, f"exit code {code}; see {self.folder.train_log}")


def supervise(run_id: str) -> int:
    supervisor = Supervisor(run_id)
    signal.signal(signal.SIGTERM, supervisor.on_stop_signal)
    signal.signal(signal.SIGINT, supervisor.on_stop_signal)
    # the executor started us with these blocked, so that a cancel during start-up waits for the handlers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    Path(supervisor.folder.logs).mkdir(parents=True, exist_ok=True)
    return supervisor.run_attempts()


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1]))
