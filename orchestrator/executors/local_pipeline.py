"""A pipeline on this machine: one detached process runs the stages one after another, parents first.

    python -m orchestrator.executors.local_pipeline PIPELINE_ID    # started by LocalExecutor.submit_pipeline

Each stage runs under its own local supervisor (retries, cancel, resume), so a stage behaves exactly like a
job submitted alone. This process owns the pipeline: when a stage ends FAILED or CANCELLED, it marks every
stage that depends on it, directly or not, CANCELLED with the reason "dependency <stage> failed".
"""

from __future__ import annotations

import signal
import sys

from jobspec.faults import fault
from orchestrator.dependencies import cancel_dependents, parents_first_runs
from orchestrator.executors.local import LocalExecutor
from orchestrator.registry import Registry


def supervise(pipeline_id: str) -> int:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # blocked by spawn_detached
    registry = Registry()
    executor = LocalExecutor(registry)
    stages = parents_first_runs(registry.list(pipeline_id=pipeline_id))
    for stage in [*stages, None]:
        # a stage that failed, or that `orch cancel` cancelled while pending: what depends on it never starts
        for cancelled in cancel_dependents(registry, stages):
            print(f"[pipeline] stage {cancelled.stage} CANCELLED: {cancelled.reason}", flush=True)
        run = registry.get(stage.id) if stage else None
        if run is None or run.state != "PENDING":
            continue
        print(f"[pipeline] starting stage {run.stage} ({run.id})", flush=True)
        supervisor = executor.start(run)
        fault("pipeline.stage_started")
        supervisor.wait()
        print(f"[pipeline] stage {run.stage} {registry.get(run.id).state}", flush=True)
    ok = all(registry.get(s.id).state == "COMPLETED" for s in stages)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1]))
