"""A pipeline on this machine: one detached process runs the stages one after another, parents first.

Each stage runs under the local executor's own supervisor (retries, cancel, resume), so a stage behaves
exactly like a job submitted alone. When a stage ends FAILED or CANCELLED, every stage that depends on it,
directly or not, is marked CANCELLED with the reason "dependency <stage> failed" and never starts.

    python -m orchestrator.executors.pipeline_local PIPELINE_ID    # what `orch submit PIPELINE` starts
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.executors import local
from orchestrator.registry import Registry, Run, now


def _files(registry: Registry, pipeline_id: str) -> tuple[Path, Path]:
    folder = registry.path.parent / "pipelines"
    return folder / f"{pipeline_id}.log", folder / f"{pipeline_id}.pid"


def launch(pipeline_id: str, registry: Registry) -> int:
    """Start the pipeline's supervisor, detached from this terminal; returns its pid."""
    log_path, pid_path = _files(registry, pipeline_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ORCH_HOME=str(registry.path.parent), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.executors.pipeline_local", pipeline_id],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    pid_path.write_text(str(proc.pid))
    return proc.pid


def supervise(pipeline_id: str) -> int:
    """Run each PENDING stage whose parent COMPLETED; cancel the dependents of one that did not."""
    from orchestrator.pipeline import cancel_dependents, ordered

    registry = Registry()
    stages = ordered(registry.list(pipeline_id=pipeline_id))
    for stage in [*stages, None]:
        # a stage that failed, or that `orch cancel` cancelled while pending: what depends on it never starts
        for cancelled in cancel_dependents(registry, stages):
            print(f"[pipeline] stage {cancelled.stage} CANCELLED: {cancelled.reason}", flush=True)
        run = registry.get(stage.id) if stage else None
        if run is None or run.state != "PENDING":
            continue
        print(f"[pipeline] starting stage {run.stage} ({run.id})", flush=True)
        local.start_supervisor(run, registry).wait()
        print(f"[pipeline] stage {run.stage} {registry.get(run.id).state}", flush=True)
    ok = all(registry.get(s.id).state == "COMPLETED" for s in stages)
    return 0 if ok else 1


def check(registry: Registry, pipeline_id: str, runs: list[Run]) -> None:
    """If the pipeline's supervisor is gone (killed, machine rebooted), its PENDING stages would wait
    forever: mark them CANCELLED, saying so."""
    _, pid_path = _files(registry, pipeline_id)
    if not pid_path.exists() and now() - max(r.created_at for r in runs) < 60:
        return  # just registered: `orch submit` is starting the supervisor
    try:
        os.kill(int(pid_path.read_text()), 0)
        return  # alive
    except (OSError, ValueError):
        pass
    # read the registry again: the supervisor may have finished (and exited) since `runs` was read
    for run in (registry.get(r.id) for r in runs):
        if run.state == "PENDING":
            registry.update(run.id, state="CANCELLED", ended_at=now(),
                            reason=f"the pipeline's supervisor is gone (see {pid_path.with_suffix('.log')}); "
                                   "submit the pipeline again")


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1]))
