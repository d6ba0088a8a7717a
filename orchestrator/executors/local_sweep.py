"""A sweep on this machine: one detached process runs its members, `parallel` at a time, then fits the law.

    python -m orchestrator.executors.local_sweep SWEEP_ID SWEEP_FOLDER PARALLEL   # started by orch submit|resume

Each member runs under its own local supervisor (retries, cancel, resume), as a job submitted alone. Only
members still PENDING are started: a member cancelled meanwhile (`orch pipeline cancel SWEEP`) or completed
before a resume is left as it is. When none is left running, the members with a final loss are fitted
(orchestrator/sweeps/fit.py): fit.json and report.md in the sweep's folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from orchestrator.executors.local import LocalExecutor
from orchestrator.registry import Registry
from orchestrator.sweeps import SWEEP_PLAN


def _wait_one(running: dict) -> None:
    """Block until one of our members' supervisors exits (the kernel says so), and forget it."""
    pid, _ = os.waitpid(-1, 0)
    proc = running.pop(pid, None)
    if proc is not None:
        proc.returncode = 0  # reaped here: Popen must not wait on it again


def supervise(sweep_id: str, folder: str, parallel: int) -> int:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # blocked by spawn_detached
    registry = Registry()
    executor = LocalExecutor(registry)
    running: dict = {}
    plan = json.loads((Path(folder) / SWEEP_PLAN).read_text())
    for member in plan["members"]:  # in the plan's order
        while len(running) >= parallel:
            _wait_one(running)
        run = registry.get(member["id"])
        if run.state != "PENDING" or run.pid is not None:
            continue
        print(f"[sweep] starting {run.stage} ({run.id})", flush=True)
        proc = executor.start(run)
        running[proc.pid] = proc
    while running:
        _wait_one(running)
    members = registry.list(pipeline_id=sweep_id)
    counts = {s: sum(r.state == s for r in members) for s in sorted({r.state for r in members})}
    print(f"[sweep] members ended: {counts}", flush=True)
    from orchestrator.sweeps.fit import (
        run as fit,  # numpy and scipy: once every member has ended
    )

    try:
        fit_path, report, missing = fit(folder)
        print(
            f"[sweep] fit: {fit_path}, report: {report}"
            + (f" ({len(missing)} member(s) without a loss)" if missing else ""),
            flush=True,
        )
    except (ValueError, ArithmeticError, OSError) as e:  # too few members to fit, a degenerate law: said, and
        print(f"[sweep] no fit: {e}", flush=True)  # `orch sweep fit` can be run again by hand
    return 0 if all(r.state == "COMPLETED" for r in members) else 1


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1], sys.argv[2], int(sys.argv[3])))
