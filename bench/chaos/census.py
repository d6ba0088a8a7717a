"""What a fault is measured by, once its runs have settled: the issue's figures, one Outcome per fault.

    finished          the run reached its final step and the registry says COMPLETED
    bitwise_equal     its final checkpoint's weights and AdamW moments equal the reference run's, bit for bit
    checkpoints_lost  a committed, complete checkpoint that disappeared (other than by pruning beyond keep_last):
                      a restart resumed from before the newest checkpoint committed at the fault
    crash_loops       restarts burned on an error that retrying can't fix (more retries than the fault explains)
    orphans           processes of the fault left running once its runs ended (trainers, supervisors, torchrun)
    leftovers         `.tmp-*` folders in checkpoints/, /dev/shm blocks that our loaders made and nobody maps
    wrong_state       the registry's final state is not what it should be
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from bench.chaos.watch import Watch, processes_of
from bench.chaos.workspace import Workspace
from jobspec.contract import checkpoint_name


@dataclass
class Outcome:
    finished: bool = False
    bitwise_equal: bool = False
    checkpoints_lost: int = 0
    crash_loops: int = 0
    orphans: int = 0
    leftovers: int = 0
    wrong_state: bool = False
    two_trainers: int = 0  # times the process table showed two trainers on one run folder
    bound_exceeded: bool = False  # a hung rank was noticed later than its documented bound
    recovery_s: Optional[float] = None  # from the fault to training going again
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.finished and self.bitwise_equal and not self.checkpoints_lost and not self.crash_loops
                and not self.orphans and not self.leftovers and not self.wrong_state and not self.two_trainers
                and not self.bound_exceeded)

    def problems(self) -> list[str]:
        found = [] if self.finished else ["not finished"]
        found += [] if self.bitwise_equal or not self.finished else ["not bitwise equal"]
        found += [f"{k.replace('_', ' ')}: {v}" for k, v in (("checkpoints_lost", self.checkpoints_lost),
                  ("crash_loops", self.crash_loops), ("orphans", self.orphans), ("leftovers", self.leftovers),
                  ("two_trainers", self.two_trainers)) if v]
        return found + (["wrong state"] if self.wrong_state else []) + (["bound exceeded"] if self.bound_exceeded else [])

    def row(self) -> dict:
        row = asdict(self)
        row["outcome"] = "ok" if self.ok else "; ".join(self.problems())
        return row


# ---------------------------------------------------------------- bitwise

def tensors(checkpoint: Path) -> dict[tuple[str, str], bytes]:
    """Every tensor of a checkpoint's model/ and optim/ safetensors files, as raw bytes, by (file, name)."""
    import torch
    from safetensors import safe_open

    out = {}
    for path in sorted(checkpoint.glob("*/*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                raw = f.get_tensor(name).contiguous().view(-1).view(torch.uint8)  # bits, so NaN == NaN
                out[(str(path.relative_to(checkpoint)), name)] = raw.numpy().tobytes()
    return out


def bitwise_equal(run_dir: Path, reference: Path, step: int) -> tuple[bool, str]:
    ours, theirs = Path(run_dir) / "checkpoints" / checkpoint_name(step), Path(reference) / "checkpoints" / checkpoint_name(step)
    if not ours.is_dir():
        return False, f"no final checkpoint {ours.name}"
    a, b = tensors(ours), tensors(theirs)
    if not a or a.keys() != b.keys():
        return False, f"{ours.name}: other tensors than the reference's ({len(a)} vs {len(b)})"
    differ = [f"{f}:{n}" for (f, n) in a if a[(f, n)] != b[(f, n)]]
    return (not differ), (f"{len(differ)} tensors differ, e.g. {differ[0]}" if differ else "")


# ---------------------------------------------------------------- leftovers

SHM_NAME = re.compile(r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
                      r"epoch_shape|epoch_data)$")  # streaming's shared-memory blocks (streaming/base/constant.py)


def shm_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if SHM_NAME.match(p.name)}


def mapped_shm() -> set[str]:
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(re.findall(r"/dev/shm/(\S+)", maps.read_text()))
        except OSError:
            pass
    return mapped


def stale_blocks_of(data_dir: Path, before: set[str]) -> list[str]:
    """Blocks made since `before` by loaders of `data_dir` that no live process maps."""
    new = shm_blocks() - before
    if not new:
        return []
    mapped = mapped_shm()
    ours = set()
    for name in new:
        if name.endswith("_locals"):
            try:
                if str(data_dir).encode() in Path("/dev/shm", name).read_bytes():
                    ours.add(name[:6])
            except OSError:
                pass
    return sorted(n for n in new if n[:6] in ours and n not in mapped)


def leftovers(ws: Workspace, shm_before: set[str]) -> tuple[int, list[str]]:
    tmp = [str(p.relative_to(ws.runs_dir)) for p in ws.runs_dir.glob("*/checkpoints/.tmp-*")] if ws.runs_dir.is_dir() else []
    shm = stale_blocks_of(ws.data_dir, shm_before)
    notes = ([f"left {', '.join(tmp)}"] if tmp else []) + ([f"left /dev/shm/{', '.join(shm)}"] if shm else [])
    return len(tmp) + len(shm), notes


# ---------------------------------------------------------------- orphans

def slurm_jobs_left(ws: Workspace) -> list[str]:
    """The fault's Slurm jobs that Slurm still holds (pending, requeued, running)."""
    ids = [r.slurm_job_id for r in ws.registry.list() if r.slurm_job_id]
    if not ids:
        return []
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def orphans(ws: Workspace, grace_s: float = 30) -> tuple[int, list[str]]:
    """Processes of the fault still alive `grace_s` after its runs ended (a process that is exiting gets that
    long), and Slurm jobs still queued; they are then killed and cancelled, so that the next fault starts clean."""
    deadline = time.monotonic() + grace_s
    while (processes_of(ws) or slurm_jobs_left(ws)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left, jobs = processes_of(ws), slurm_jobs_left(ws)
    for proc in left:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
    return len(left) + len(jobs), ([f"orphan pid {p.pid}: {p.text[:120]}" for p in left]
                                   + [f"Slurm job {j} still queued" for j in jobs])


# ---------------------------------------------------------------- one run, measured

def settle(ws: Workspace, watch: Watch, run_id: str, reference: Path, out: Outcome, *, step: int,
           retries_expected: int = 0, resume_floor: Optional[int] = None, fault_at: Optional[float] = None,
           final_state: str = "COMPLETED") -> Outcome:
    """Measure one run that has ended: its state, its final checkpoint against the reference, the restarts it
    used and where it resumed. resume_floor: the newest checkpoint committed when the fault struck (the first
    resume after it must not start earlier); fault_at: when it struck (seconds on the watch), for recovery."""
    run = ws.run(run_id)
    out.finished = run.state == "COMPLETED" and (Path(run.run_dir) / "checkpoints" / checkpoint_name(step)).is_dir()
    if run.state != final_state:
        out.wrong_state = True
        out.notes.append(f"{run_id} ended {run.state}: {run.reason}")
    if out.finished:
        out.bitwise_equal, why = bitwise_equal(Path(run.run_dir), reference, step)
        if why:
            out.notes.append(why)
    retries = len(watch.values("retry", run_id))
    if retries > retries_expected:
        out.crash_loops += retries - retries_expected
        out.notes.append(f"{retries} retries for {retries_expected} expected")
    if fault_at is not None and (resume_floor is not None or retries_expected):
        # training going again after a restart: the first resume after the fault, else a fresh start
        resumed = watch.first("resumed", after=fault_at, run_id=run_id)
        again = resumed or watch.first("started", after=fault_at, run_id=run_id)
        out.recovery_s = round(again[0] - fault_at, 2) if again else None
        step_from = int(resumed[2]) if resumed else 0
        # (no restart at all: the attempt the fault struck went on to the end, e.g. a stop signal during the
        # final save, and nothing was resumed, so nothing could be lost)
        if resume_floor is not None and again is not None and step_from < resume_floor:
            out.checkpoints_lost += 1
            out.notes.append(f"resumed from step {step_from}, but step {resume_floor} was committed")
    out.two_trainers = len(watch.two_trainers)
    if watch.two_trainers:
        out.notes.append(f"two trainers on one run folder, first seen: {watch.two_trainers[0]}")
    if watch.wrong_holder:
        out.wrong_state = True
        out.notes.append(f"the run folder's lock named another process than its trainer: {watch.wrong_holder[0]}")
    return out


def finish(ws: Workspace, out: Outcome, shm_before: set[str]) -> Outcome:
    """Orphans and leftovers, once every run of the fault has ended."""
    out.orphans, notes = orphans(ws)
    out.notes += notes
    out.leftovers, notes = leftovers(ws, shm_before)
    out.notes += notes
    return out
