"""What a fault is measured by, once its runs have settled: the issue's figures, one Outcome per fault.

finished          the run reached its final step and the registry says COMPLETED
bitwise_equal     its final checkpoint equals the reference run's: the weights and AdamW moments bit for bit,
                  trainer_state.json (less the seconds it spent), and each rank's RNG states (rng/rank_R.json:
                  the trainer seeds the global generators from the seed and rank, checkpoints restore them)
checkpoints_lost  a committed, complete checkpoint that disappeared (other than by pruning beyond keep_last):
                  a restart that resumed from before the newest checkpoint committed by then, by the trainer's
                  own records (its "resumed from" line; a restart without one started from step 0)
crash_loops       restarts burned on an error that retrying can't fix (more retries than the fault explains)
not_fired         the fault never struck: a run that went through untouched tested nothing
wrong_restarts    fewer retries, or fewer restarts (retries, requeues, resumes), than the fault implies
orphans           processes of the fault left running once its runs ended (trainers, supervisors, torchrun)
leftovers         `.tmp-*` and `.trash-*` folders in checkpoints/ (an interrupted save or prune that no trainer
                  cleared), /dev/shm blocks that our loaders made and nobody maps
wrong_state       the registry's final state is not what it should be
"""

from __future__ import annotations

import json
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
    not_fired: bool = False
    wrong_restarts: int = 0  # retries or restarts missing: the fault did not do what it was drawn to do
    two_trainers: int = 0  # times the process table showed two trainers on one run folder
    bound_exceeded: bool = False  # a hung rank was noticed later than its documented bound
    recovery_s: Optional[float] = None  # from the fault to training going again
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.finished
            and self.bitwise_equal
            and not self.checkpoints_lost
            and not self.crash_loops
            and not self.orphans
            and not self.leftovers
            and not self.wrong_state
            and not self.two_trainers
            and not self.bound_exceeded
            and not self.not_fired
            and not self.wrong_restarts
        )

    def problems(self) -> list[str]:
        found = ["not fired"] if self.not_fired else []
        found += [] if self.finished else ["not finished"]
        found += [] if self.bitwise_equal or not self.finished else ["not bitwise equal"]
        found += [
            f"{k.replace('_', ' ')}: {v}"
            for k, v in (
                ("checkpoints_lost", self.checkpoints_lost),
                ("crash_loops", self.crash_loops),
                ("orphans", self.orphans),
                ("leftovers", self.leftovers),
                ("wrong_restarts", self.wrong_restarts),
                ("two_trainers", self.two_trainers),
            )
            if v
        ]
        return (
            found + (["wrong state"] if self.wrong_state else []) + (["bound exceeded"] if self.bound_exceeded else [])
        )

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


TIMING_KEYS = ("budget_used_s",)  # what trainer_state.json may differ in: seconds, which no two runs share


def states(checkpoint: Path, pattern: str) -> dict[str, object]:
    """A checkpoint's JSON files matching `pattern`, parsed, by path; trainer_state.json less TIMING_KEYS."""
    out = {}
    for path in sorted(checkpoint.glob(pattern)):
        value = json.loads(path.read_text())
        if path.name == "trainer_state.json":
            value = {k: v for k, v in value.items() if k not in TIMING_KEYS}
        out[str(path.relative_to(checkpoint))] = value
    return out


def same_states(ours: Path, theirs: Path, pattern: str) -> tuple[bool, str]:
    a, b = states(ours, pattern), states(theirs, pattern)
    if not a or a.keys() != b.keys():
        return False, f"{ours.name}: other {pattern} than the reference's ({sorted(a)} vs {sorted(b)})"
    for name in a:
        if a[name] != b[name]:
            keys = sorted(k for k in set(a[name]) | set(b[name]) if a[name].get(k) != b[name].get(k))
            return False, f"{ours.name}/{name} differs from the reference's in {', '.join(keys)}"
    return True, ""


def rng_equal(run_dir: Path, reference: Path, step: int) -> tuple[bool, str]:
    name = checkpoint_name(step)
    return same_states(Path(run_dir) / "checkpoints" / name, Path(reference) / "checkpoints" / name, "rng/*.json")


def bitwise_equal(run_dir: Path, reference: Path, step: int) -> tuple[bool, str]:
    """The final checkpoint against the reference's: every tensor's bits, then the trainer's state (step, tokens
    seen, the data loader's position, skipped steps...), which a run trained again from an earlier point could
    get wrong while its tensors agree, then the RNG states."""
    ours, theirs = (
        Path(run_dir) / "checkpoints" / checkpoint_name(step),
        Path(reference) / "checkpoints" / checkpoint_name(step),
    )
    if not ours.is_dir():
        return False, f"no final checkpoint {ours.name}"
    a, b = tensors(ours), tensors(theirs)
    if not a or a.keys() != b.keys():
        return False, f"{ours.name}: other tensors than the reference's ({len(a)} vs {len(b)})"
    differ = [f"{f}:{n}" for (f, n) in a if a[(f, n)] != b[(f, n)]]
    if differ:
        return False, f"{len(differ)} tensors differ, e.g. {differ[0]}"
    same, why = same_states(ours, theirs, "trainer_state.json")
    return (same, why) if not same else rng_equal(run_dir, reference, step)


# ---------------------------------------------------------------- leftovers

SHM_NAME = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
    r"epoch_shape|epoch_data)$"
)  # streaming's shared-memory blocks (streaming/base/constant.py)


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
    tmp = (
        [
            str(p.relative_to(ws.runs_dir))
            for pattern in ("*/checkpoints/.tmp-*", "*/checkpoints/.trash-*")
            for p in ws.runs_dir.glob(pattern)
        ]
        if ws.runs_dir.is_dir()
        else []
    )
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
    return len(left) + len(jobs), (
        [f"orphan pid {p.pid}: {p.text[:120]}" for p in left] + [f"Slurm job {j} still queued" for j in jobs]
    )


# ---------------------------------------------------------------- did the fault strike


def fault_fired(ws: Workspace, spec: str, *texts: str) -> bool:
    """Whether every fault of an ORCH_FAULT spec struck: each prints `[orch fault] point@rank#n:action` where it
    fires, into a log under the fault's folder (a trainer's, a supervisor's, a pipeline's) or into the output of
    the orch command it killed (`texts`)."""
    seen = "\n".join(
        [
            *texts,
            *(
                p.read_text(errors="replace")
                for p in ws.root.rglob("*")
                if p.suffix in (".log", ".out") and p.is_file()
            ),
        ]
    )
    return all(re.search(pattern, seen) for pattern in firings(spec))


def firings(spec: str) -> list[str]:
    """What each fault of a spec prints when it fires, as a pattern: `train.loss#3:nan` -> `[orch fault]
    train.loss@<any rank>#3:nan`."""
    out = []
    for one in filter(None, (s.strip() for s in spec.split(","))):
        rest, _, action = one.partition(":")
        rest, _, n = rest.partition("#")
        point, _, rank = rest.partition("@")
        rank = rank or r"\d+"
        out.append(rf"\[orch fault\] {re.escape(point)}@{rank}#{n or 1}:{action or 'kill'}")
    return out


# ---------------------------------------------------------------- restarts, from the trainer's own records


@dataclass
class Restart:
    at: float  # when its training started (seconds on the watch)
    resumed_from: int  # the step of its "resumed from" record; 0 when it had none (it started from scratch)
    saved: tuple  # the steps its run's trainers had reported saved ("checkpoint saved") before it


def restarts_of(watch: Watch, run_id: str) -> list[Restart]:
    """Every attempt of the run after the first that started training ("model: ... parameters"), in order, with
    the resume that preceded it in the log."""
    saved, resumed, attempts, out = [], None, 0, []
    for at, name, value, rid in watch.events:
        if rid != run_id:
            continue
        if name == "saved":
            saved.append(int(value))
        elif name == "resumed":
            resumed = int(value)
        elif name == "started":
            attempts += 1
            if attempts > 1:
                out.append(Restart(at, resumed or 0, tuple(saved)))
            resumed = None
    return out


# ---------------------------------------------------------------- one run, measured


def settle(
    ws: Workspace,
    watch: Watch,
    run_id: str,
    reference: Path,
    out: Outcome,
    *,
    step: int,
    retries_expected: int = 0,
    restarts_expected: int = 0,
    resume_floor: Optional[int] = None,
    spared: tuple = (),
    fault_at: Optional[float] = None,
    final_state: str = "COMPLETED",
) -> Outcome:
    """Measure one run that has ended: its state, its final checkpoint against the reference, the restarts it
    used and where each resumed.

    retries_expected: the retries the fault implies (exactly: more are crash loops, fewer a fault that did not
    do its work); restarts_expected: the restarts it implies at least (retries, requeues, `orch resume`).
    Every restart must resume from the newest checkpoint its trainers had reported saved before it, and those
    after the fault from resume_floor at least (the newest committed when it struck, known from the fault's
    plan even where the log could not say it); spared: checkpoints the fault destroyed on purpose (a corrupted
    one), which may not be resumed from. fault_at: when the fault struck (seconds on the watch), for recovery."""
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
    elif retries < retries_expected:
        out.notes.append(f"{retries} retries, but the fault implies {retries_expected}")
    restarts = restarts_of(watch, run_id)
    if len(restarts) < restarts_expected:
        out.notes.append(f"{len(restarts)} restarts, but the fault implies {restarts_expected} at least")
    # a retry is a restart too: a missing one counts once
    out.wrong_restarts += max(0, retries_expected - retries, restarts_expected - len(restarts))
    for r in restarts:
        floor = max((s for s in r.saved if s not in spared), default=0)
        if resume_floor is not None and (fault_at is None or r.at >= fault_at):
            floor = max(floor, resume_floor)
        if r.resumed_from < floor:
            out.checkpoints_lost += 1
            out.notes.append(f"a restart resumed from step {r.resumed_from}, but step {floor} was committed")
    if fault_at is not None and (resume_floor is not None or retries_expected or restarts_expected):
        # training going again after a restart: the first resume after the fault, else a fresh start
        resumed = watch.first("resumed", after=fault_at, run_id=run_id)
        again = resumed or watch.first("started", after=fault_at, run_id=run_id)
        out.recovery_s = round(again[0] - fault_at, 2) if again else None
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
