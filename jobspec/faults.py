"""Named fault points: deterministic places where a test or the chaos benchmark makes orch fail on purpose.

    ORCH_FAULT="checkpoint.shard_write@1#2:kill"        # rank 1, the 2nd time it writes a shard: SIGKILL itself
    ORCH_FAULT="train.loss#7:nan,submit.registered:kill" # two faults, comma-separated

A spec is `point[@rank][#n][:action]`:
  point   a name passed to `fault()` in the code (FAULT_POINTS lists them all, with where they are);
  @rank   only on that rank (RANK, as torchrun and our Slurm tasks set it; 0 for a lone process);
  #n      the n-th time this process reaches the point (default 1); where the code passes `step=`, the fault
          fires at that training step instead;
  action  kill (default; os._exit(137), as SIGKILL would), sigterm, sigusr2 (Slurm's time-limit warning),
          hang (sleep forever, like a stuck rank), wait (block until the file named by ORCH_FAULT_RELEASE
          exists: a test holds a process at a point while it acts, then lets it go), nan (the caller makes its
          value non-finite), enospc (raise OSError(ENOSPC), a full disk), enolck (raise OSError(ENOLCK), a
          file system mounted without flock), error / valueerror (raise a plain RuntimeError / ValueError: a bug,
          which the trainer exits 1 on and the executors retry).
With ORCH_FAULT_ONCE=<file> a fault fires only if that file does not exist yet, and creates it: the run that
restarts after the fault then runs clean. The environment is read once, at the first `fault()` call; when
ORCH_FAULT is unset a call costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

ACTIONS = ("kill", "sigterm", "sigusr2", "hang", "wait", "nan", "enospc", "enolck", "error", "valueerror")

FAULT_POINTS = {
    # data plane (training/)
    "data.prepare": "training/data/prepare.py, as the trainer makes sure its data is prepared (before any shard is "
    "written, when it has to write them)",
    "model.build": "training/trainer.py, after the model is built and before it is initialized or resumed",
    "train.loss": "training/trainer.py, each micro-batch's loss (nan: the loss becomes NaN)",
    "train.before_optimizer_step": "training/trainer.py, after backward, before optimizer.step()",
    "train.after_optimizer_step": "training/trainer.py, after optimizer.step(), before the step counts",
    "train.validation": "training/trainer.py, at the start of a validation pass",
    "checkpoint.staging": "training/async_checkpoint.py, while the state is copied for a background save",
    "checkpoint.shard_write": "training/safetensors_writer.py, each safetensors file written (enospc: the disk fills)",
    "checkpoint.manifest": "training/checkpoint.py, before the manifest is written",
    "checkpoint.commit": "training/checkpoint.py, between the manifest and the rename into place",
    "checkpoint.prune": "training/checkpoint.py, after the commit, before older checkpoints are pruned",
    "checkpoint.trash_remove": "training/checkpoint.py, each file removed from a pruned checkpoint (renamed to "
    ".trash-step_N first)",
    "serve.decode_step": "training/serve/engine.py, before each decode step of the batch (wait: a test holds the "
    "server mid-generation while its clients act)",
    "run_lock.held": "training/main.py, once the run folder's lock is held (rank 0; each node's local rank 0)",
    "run_lock.flock": "jobspec/run_lock.py, before each flock of the run folder's lock (enolck: the file system "
    "has no flock)",
    "atomic.written": "jobspec/atomic.py, each atomic file write, once its temporary holds the new bytes, before "
    "the rename",
    "atomic.replaced": "jobspec/atomic.py, each atomic file write, after the rename, before its folder is synced",
    # control plane (orchestrator/)
    "submit.run_folder": "orchestrator/runs.py, after the run folder and config.yaml, before the registry row",
    "submit.registered": "orchestrator/cli.py (pipelines: orchestrator/pipelines.py), after the registry rows, before "
    "the executor starts them",
    "supervisor.started": "orchestrator/executors/local_supervisor.py, before the first attempt",
    "supervisor.trainer_exited": "orchestrator/executors/local_supervisor.py, after an attempt, before its state",
    "pipeline.stage_started": "orchestrator/executors/local_pipeline.py, after starting a stage",
    "registry.write": "orchestrator/registry.py, inside each write transaction, before its COMMIT",
}


@dataclass(frozen=True)
class Fault:
    point: str
    rank: Optional[int]
    n: int
    action: str


class FaultSpecError(ValueError):
    pass


def parse(text: str) -> list[Fault]:
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        rest, _, action = spec.partition(":")
        rest, _, n = rest.partition("#")
        point, _, rank = rest.partition("@")
        action = action or "kill"
        if point not in FAULT_POINTS:
            raise FaultSpecError(
                f"ORCH_FAULT={text!r}: unknown fault point {point!r}; known: {', '.join(FAULT_POINTS)}"
            )
        if action not in ACTIONS:
            raise FaultSpecError(f"ORCH_FAULT={text!r}: unknown action {action!r}; known: {', '.join(ACTIONS)}")
        try:
            faults.append(Fault(point, int(rank) if rank else None, int(n) if n else 1, action))
        except ValueError:
            raise FaultSpecError(f"ORCH_FAULT={text!r}: in {spec!r}, @rank and #n must be integers") from None
    return faults


_armed: Optional[dict[str, list[Fault]]] = None
_seen: dict[str, int] = {}


def _load() -> dict[str, list[Fault]]:
    global _armed
    if _armed is None:
        _armed = {}
        for f in parse(os.environ.get("ORCH_FAULT", "")):
            _armed.setdefault(f.point, []).append(f)
    return _armed


def _claim() -> bool:
    """With ORCH_FAULT_ONCE, only the first process to get here fires."""
    marker = os.environ.get("ORCH_FAULT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def fault(point: str, step: Optional[int] = None) -> Optional[str]:
    """Fire the fault armed at this point, if any. kill/sigterm/sigusr2/hang/enospc act here; for `nan` the
    caller gets "nan" back and makes its value non-finite. Returns None when nothing fires."""
    armed = _load().get(point)
    if not armed:
        return None
    _seen[point] = _seen.get(point, 0) + 1
    rank = int(os.environ.get("RANK", "0"))
    for f in armed:
        if (f.rank is None or f.rank == rank) and (step if step is not None else _seen[point]) == f.n and _claim():
            try:
                print(f"[orch fault] {point}@{rank}#{f.n}:{f.action}", flush=True)
            except OSError:  # the log is on a disk a test has filled: the fault still fires
                pass
            return _act(f.action)
    return None


def _act(action: str) -> Optional[str]:
    if action == "kill":
        os._exit(137)
    if action in ("sigterm", "sigusr2"):
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGUSR2)
        return None
    if action == "hang":
        while True:
            time.sleep(3600)
    if action == "wait":
        release = os.environ.get("ORCH_FAULT_RELEASE", "")
        while not (release and os.path.exists(release)):
            time.sleep(0.05)  # polls a file the test creates: the test decides when we go on
        return None
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (fault point)")
    if action == "enolck":
        raise OSError(errno.ENOLCK, "No locks available (fault point)")
    if action == "error":
        raise RuntimeError("an unexpected error (fault point)")
    if action == "valueerror":
        raise ValueError("an unexpected value (fault point)")
    return action  # nan: the caller's business
