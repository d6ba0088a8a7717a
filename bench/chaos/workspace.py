"""One fault's world: a folder with its own runs_dir and registry (ORCH_HOME), the environment its processes get
(the fault, its once-marker and release file), orch commands run as a user runs them, and waiting on real state
(registry rows, log lines, files), each wait bounded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from bench.chaos.config import JOB, REPO, overrides
from jobspec.contract import RunFolder
from orchestrator.registry import Registry, Run


class ChaosError(AssertionError):
    """The fault did not go the way its kind expects (a timeout, a command that failed): the row says why."""


def wait_for(predicate: Callable, what: str, timeout: float = 300, interval: float = 0.25):
    """Poll real state until `predicate()` is truthy; ChaosError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise ChaosError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


class Workspace:
    def __init__(self, root: Path, data_dir: Path, executor: str = "local"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.executor = Path(data_dir), executor
        self.runs_dir = self.root / "runs"
        self.home = self.root / ".orch"
        self.once = self.root / "fault-fired"  # ORCH_FAULT_ONCE: a restarted attempt runs clean
        self.release_file = self.root / "release"  # ORCH_FAULT_RELEASE: lets a process held at a `wait` go on
        self.registry = Registry(self.home / "registry.db")

    # ------------------------------------------------------------ processes

    def env(self, fault: str = "", **extra: str) -> dict:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            ORCH_HOME=str(self.home),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            ORCH_FAULT_ONCE=str(self.once),
            ORCH_FAULT_RELEASE=str(self.release_file),
        )
        env.pop("ORCH_FAULT", None)
        if fault:
            env["ORCH_FAULT"] = fault
        env.update(extra)
        return env

    def orch(
        self, *args: str, fault: str = "", env: Optional[dict] = None, timeout: float = 300, check: bool = False
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=self.root,
            env=env or self.env(fault),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ChaosError(
                f"`orch {' '.join(args[:2])}` exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-600:]}"
            )
        return result

    def job_overrides(self, *extra: str, executor: Optional[str] = None) -> list[str]:
        return overrides(self.data_dir, f"runs_dir={self.runs_dir}", f"executor={executor or self.executor}", *extra)

    def submit(
        self,
        *extra: str,
        fault: str = "",
        executor: Optional[str] = None,
        env: Optional[dict] = None,
        check: bool = True,
    ) -> tuple[Optional[str], subprocess.CompletedProcess]:
        """`orch submit` the chaos job; (run id or None, the command's result)."""
        result = self.orch(
            "submit", str(JOB), *self.job_overrides(*extra, executor=executor), fault=fault, env=env, check=check
        )
        found = re.search(r"^submitted (\S+) ", result.stdout, re.MULTILINE)
        return (found.group(1) if found else None), result

    def release(self) -> None:
        self.release_file.touch()

    # ------------------------------------------------------------ runs

    def run(self, run_id: str) -> Run:
        return self.registry.get(run_id)

    def refresh(self, run_id: str) -> Run:
        """The run's row. A Slurm run's row is brought up to date from sacct first, as `orch logs -f` does; a local
        run's supervisor records its own states, so nothing is done for it (a stale row is what we measure)."""
        run = self.run(run_id)
        if run.executor == "slurm" and not run.finished:
            from orchestrator.executors import executor_for

            executor_for("slurm", self.registry).refresh([run])
            run = self.run(run_id)
        return run

    def wait_finished(self, run_id: str, timeout: float = 600) -> Run:
        return wait_for(lambda: (r := self.refresh(run_id)).finished and r, f"{run_id} to finish", timeout, 0.5)

    def wait_state(self, run_id: str, states: tuple[str, ...], timeout: float = 300) -> Run:
        return wait_for(
            lambda: (r := self.refresh(run_id)).state in states and r,
            f"{run_id} to be {'/'.join(states)}",
            timeout,
            0.5,
        )

    def log_files(self, run: Run) -> list[Path]:
        """Every log its trainers wrote: the local executor's train.log, or each Slurm task's log of each job."""
        folder = RunFolder(run.run_dir)
        slurm = sorted((Path(run.run_dir) / "slurm").glob("*_log.out"))
        return slurm + [folder.train_log] if folder.train_log.exists() else slurm

    def log_text(self, run: Run) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_files(run))
