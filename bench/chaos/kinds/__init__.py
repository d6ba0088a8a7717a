"""The 13 kinds of faults. Each kind is drawn (its parameters, from a seeded random.Random) and run
(against real orch processes in a Workspace of its own); running returns the census.Outcome of that fault.

    saves.py     1 a kill inside each save phase, 4 a full disk, 5 a corrupted checkpoint, 12 stale leftovers
    signals.py   2 stop signals at each phase, 9 a hung rank, 10 a non-finite loss, 11 a wall-clock jump
    cluster.py   3 a node lost on the local two-node Slurm
    control.py   6 control-plane kills, 7 cancel/resume storms, 8 registry contention
    cancels.py   13 `orch cancel` and `orch pipeline cancel` on Slurm
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench.chaos.census import Outcome, fault_fired, finish, settle, shm_blocks
from bench.chaos.config import MAX_STEPS
from bench.chaos.reference import References
from bench.chaos.watch import Watch
from bench.chaos.workspace import Workspace


@dataclass
class Fault:
    kind: int
    seed: int
    executor: str  # where it runs: local | slurm
    point: str  # what strikes where: an ORCH_FAULT spec, or the harness's action
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"kind {self.kind} ({self.executor}) {self.point} {self.params or ''}".strip()


@dataclass
class Context:
    """What every fault of one benchmark run shares: the prepared data, the reference runs, a folder for each
    fault's workspace."""

    root: Path
    data_dir: Path
    references: References
    count: int = 0
    started: str = field(default_factory=lambda: time.strftime("%H%M%S"))

    def workspace(self, fault: Fault) -> Workspace:
        self.count += 1
        # a folder of its own: a job of an earlier benchmark that Slurm requeued still names its old folder
        folder = self.root / "faults" / f"{self.count:03d}-k{fault.kind}-{fault.seed}-{self.started}"
        return Workspace(folder, self.data_dir, fault.executor)


@dataclass
class Kind:
    number: int
    name: str
    draw: Callable[[random.Random, str], Fault]  # (rng, the executor asked for) -> a fault
    run: Callable[[Fault, Context], Outcome]
    executors: tuple[str, ...] = ("local", "slurm")  # where it can run; the first is used when the other is asked


def executor_for(kind_executors: tuple[str, ...], asked: str) -> str:
    return asked if asked in kind_executors else kind_executors[0]


def measured(
    ctx: Context, fault: Fault, body: Callable, setup: Optional[Callable] = None, teardown: Optional[Callable] = None
) -> Outcome:
    """Run `body(ws, watch, out)` in a fresh workspace under a Watch, then count orphans and leftovers whatever
    happened; an exception in the body (a timeout, a command that failed) becomes a note of the outcome."""
    ws = ctx.workspace(fault)
    out, before = Outcome(), shm_blocks()
    try:
        if setup:
            setup(ws)
        with Watch(ws) as watch:
            body(ws, watch, out)
    except Exception as e:
        out.notes.append(f"error: {type(e).__name__}: {e}")
    finally:
        finish(ws, out, before)
        if teardown:
            teardown(ws)
    return out


def one_run(
    ctx: Context,
    fault: Fault,
    *extra: str,
    spec: str = "",
    act: Optional[Callable] = None,
    retries: int = 0,
    restarts: Optional[int] = None,
    floor: Optional[int] = None,
    spared: tuple = (),
    reference_fault: str = "",
    final_state: str = "COMPLETED",
    step: int = MAX_STEPS,
    env_extra: Optional[dict] = None,
    setup: Optional[Callable] = None,
    teardown: Optional[Callable] = None,
) -> Outcome:
    """The common shape of a fault: submit the chaos job (with ORCH_FAULT=spec, firing once), let `act(ws, watch,
    run_id, out)` do the harness's part (it returns when the fault struck, in watch seconds, or None to use the
    first fault line), wait until the run has ended, and measure it against its reference run.

    retries: the retries the fault implies, exactly; restarts: the restarts it implies at least (default: one
    per retry); floor, spared: see census.settle. A spec that never fired fails the fault (not_fired)."""
    reference = ctx.references.get(*extra, fault=reference_fault)

    def body(ws, watch, out):
        run_id, _ = ws.submit(*extra, env=ws.env(spec, **(env_extra or {})))
        fault_at = act(ws, watch, run_id, out) if act else None
        ws.wait_finished(run_id)
        watch.tick()
        score(
            ws,
            watch,
            run_id,
            reference,
            out,
            spec=spec,
            fault_at=fault_at,
            retries=retries,
            restarts=restarts,
            floor=floor,
            spared=spared,
            step=step,
            final_state=final_state,
        )

    return measured(ctx, fault, body, setup, teardown)


def score(
    ws: Workspace,
    watch: Watch,
    run_id: str,
    reference: Path,
    out: Outcome,
    *,
    spec: str = "",
    fault_at: Optional[float] = None,
    retries: int = 0,
    restarts: Optional[int] = None,
    floor: Optional[int] = None,
    spared: tuple = (),
    step: int = MAX_STEPS,
    final_state: str = "COMPLETED",
) -> Outcome:
    """Score a run of a fault that has ended (see one_run): did its spec fire, then census.settle."""
    if fault_at is None and spec:
        struck = watch.first("fault", run_id=run_id)
        fault_at = struck[0] if struck else None
    if spec and not fault_fired(ws, spec):
        out.not_fired = True
        out.notes.append(f"the fault {spec} never fired")
    return settle(
        ws,
        watch,
        run_id,
        reference,
        out,
        step=step,
        retries_expected=retries,
        restarts_expected=retries if restarts is None else restarts,
        resume_floor=floor,
        spared=spared,
        fault_at=fault_at,
        final_state=final_state,
    )


def _kinds() -> dict[int, Kind]:
    from bench.chaos.kinds import cancels, cluster, control, saves, signals

    return {
        1: Kind(1, "kill inside a save phase", saves.draw_save_kill, saves.run_save_kill),
        2: Kind(2, "stop signal at a phase", signals.draw_stop_signal, signals.run_stop_signal),
        3: Kind(3, "node lost", cluster.draw_node_lost, cluster.run_node_lost, ("slurm",)),
        4: Kind(4, "disk full", saves.draw_disk_full, saves.run_disk_full),
        5: Kind(5, "corrupted checkpoint", saves.draw_corruption, saves.run_corruption),
        6: Kind(6, "control-plane kill", control.draw_control_kill, control.run_control_kill, ("local",)),
        7: Kind(7, "cancel/resume storm", control.draw_storm, control.run_storm, ("local",)),
        8: Kind(8, "registry contention", control.draw_contention, control.run_contention, ("local",)),
        9: Kind(9, "hung rank", signals.draw_hung_rank, signals.run_hung_rank),
        10: Kind(10, "non-finite loss", signals.draw_nonfinite, signals.run_nonfinite),
        11: Kind(11, "wall-clock jump in calibration", signals.draw_clock_jump, signals.run_clock_jump, ("local",)),
        12: Kind(12, "stale leftovers", saves.draw_leftovers, saves.run_leftovers, ("local",)),
        13: Kind(13, "cancel on Slurm", cancels.draw_slurm_cancel, cancels.run_slurm_cancel, ("slurm",)),
    }


KINDS = _kinds()
