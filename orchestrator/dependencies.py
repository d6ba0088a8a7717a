"""A pipeline's stages as runs that depend on each other: their order, and which can no longer run.

Pure bookkeeping on registry rows, shared by whoever owns a pipeline (the local pipeline supervisor,
`orch pipeline wait|reconcile`, the Slurm executor naming why a stage was cancelled).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from jobspec.pipeline_file import parents_first
from orchestrator.registry import Registry, Run, now


def parents_first_runs(runs: Sequence[Run]) -> list[Run]:
    """A pipeline's runs, each after the run it depends on (ties: oldest first)."""
    return parents_first(sorted(runs, key=lambda r: r.created_at), key=lambda r: r.id, parent=lambda r: r.depends_on)


def dependency_reason(parent: Run, blame: Optional[dict[str, str]] = None) -> str:
    """'dependency sft failed': names the stage where the chain broke, not just the direct parent."""
    if blame and parent.id in blame:
        return blame[parent.id]
    if parent.state == "CANCELLED" and parent.reason and parent.reason.startswith("dependency "):
        return parent.reason
    return f"dependency {parent.stage} {'cancelled' if parent.state == 'CANCELLED' else 'failed'}"


def blocked(runs: Sequence[Run]) -> list[tuple[Run, str]]:
    """(run, reason) for every unfinished run with a FAILED or CANCELLED ancestor, parents first."""
    current = {r.id: r for r in runs}
    blame: dict[str, str] = {}  # run id -> the reason its dependents can't run
    found = []
    for run in parents_first_runs(list(current.values())):
        parent = current.get(run.depends_on) if run.depends_on else None
        if run.reason and run.reason.startswith("dependency "):
            blame[run.id] = run.reason
        if parent is None or parent.state not in ("FAILED", "CANCELLED") and parent.id not in blame:
            continue
        reason = dependency_reason(parent, blame)
        blame[run.id] = reason
        if not run.finished:
            found.append((run, reason))
    return found


def cancel_dependents(
    registry: Registry, runs: Sequence[Run], cancel_one: Optional[Callable[[Run], None]] = None
) -> list[Run]:
    """Mark CANCELLED every pending or running stage downstream of a FAILED or CANCELLED one, then call
    `cancel_one(run)` for each (a backend that must be told: scancel a job Slurm still holds). Returns the stages
    cancelled now."""
    cancelled = []
    for run, reason in blocked([registry.get(r.id) for r in runs]):
        # a CANCELLING stage was asked to stop already: its executor records CANCELLED once its backend has
        if registry.transition(run.id, ("PENDING", "RUNNING"), state="CANCELLED", reason=reason, ended_at=now()):
            cancelled.append(registry.get(run.id))
            if cancel_one is not None:
                cancel_one(cancelled[-1])
    return cancelled
