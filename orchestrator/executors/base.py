"""What every executor provides: how runs are started, stopped, observed and followed on one kind of backend.

A backend is one file implementing this Protocol (local.py: this machine; slurm.py: a Slurm cluster) and one
line in executors/__init__.py. Callers never branch on the backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

from omegaconf import DictConfig

from jobspec.run_lock import describe, holder
from orchestrator.registry import Registry, Run

CANCELLED_BY_USER = "cancelled by user"


@dataclass(frozen=True)
class Observation:
    """What is true of a run right now, as the backend sees it (the registry may lag behind)."""

    state: str  # PENDING | RUNNING | CANCELLING | COMPLETED | FAILED | CANCELLED | LOST
    reason: Optional[str] = None
    attempts: Optional[int] = None  # starts so far, when the backend counts them
    word: Optional[str] = None  # the backend's own word for the state, when it has a finer one (REQUEUED, TIMEOUT)
    where: Optional[str] = None  # where it runs: "local", a Slurm node list


class Executor(Protocol):
    name: str
    registry: Registry

    def check(self, cfg: DictConfig, source: str) -> None:
        """Before a run is registered: ValueError (exit 2, naming `source`, the job file) for what this backend
        can't run; a warning printed for what it runs at a risk (a runs_dir whose locks it can't trust)."""

    def submit(self, run: Run, cfg: DictConfig) -> str:
        """Start a registered PENDING run; returns how to refer to it in messages ("slurm job 12")."""

    def dry_run(self, run: Run, cfg: DictConfig) -> str:
        """What `submit` would hand the backend for this run, as text (`orch submit --dry-run`): the batch script
        sbatch would receive, the command line the local supervisor would run. Writes and starts nothing."""

    def submit_pipeline(self, pipeline_id: str, runs: Sequence[Run], cfgs: dict[str, DictConfig]) -> None:
        """Start a pipeline's registered stages (parents first in `runs`), each after its parent COMPLETED.
        `cfgs` maps a stage's name to its config."""

    def cancel(self, run: Run, reason: str = CANCELLED_BY_USER) -> None:
        """Ask an unfinished run to stop (it saves a checkpoint first): CANCELLING until the backend says it has
        stopped, then CANCELLED with `reason`. Returns at once."""

    def resume(self, run: Run) -> str:
        """Start a finished run again on its folder: it continues from its newest checkpoint. RuntimeError while
        a trainer still holds the folder (`refuse_if_held`), or the backend still runs a job of it."""

    def observe(self, runs: Sequence[Run]) -> dict[str, Observation]:
        """The current state of each unfinished run, by id. Reads only: the registry is left as it is."""

    def refresh(self, runs: Sequence[Run]) -> None:
        """Record what `observe` sees in the registry. Called by the processes that own runs."""

    def log_path(self, run: Run) -> Path:
        """The log `orch logs` shows: the trainer's, or rank 0's."""


def refuse_if_held(run: Run) -> None:
    """Every resume asks first: one trainer per run folder (jobspec/run_lock.py), whoever started the other."""
    busy = holder(run.run_dir)
    if busy is not None:
        raise RuntimeError(
            f"{run.id} can't be resumed: a trainer still holds {run.run_dir} ({describe(busy)}); "
            f"`orch cancel {run.id}` stops it after a checkpoint"
        )
