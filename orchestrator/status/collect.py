"""The dashboard's facts, as plain dataclasses: no terminal needed, so tests and `--json` use them directly.

One `Collector.collect()` is one refresh. It reads the run registry, the bytes appended to each run's
metrics.jsonl since the previous refresh (MetricsTail), what each executor observes of the unfinished runs
(a dead local supervisor), and asks Slurm two questions in total, never one per job (slurm_query). Runs
that have ended are read once more after they end and then cached, so a registry of 1,000 old runs costs
a dictionary lookup each. Looking changes nothing: no registry write, no signal, no scancel.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from jobspec.contract import RunFolder, checkpoint_step
from jobspec.pipeline_file import parents_first
from orchestrator import code_snapshot, executors
from orchestrator.executors import Observation
from orchestrator.registry import TERMINAL, Registry, Run
from orchestrator.status import slurm_query
from orchestrator.status.metrics_tail import MetricsTail
from orchestrator.sweeps import SWEEP_PLAN

LOG_LINES = 40
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class JobRow:
    run_id: str
    name: str
    kind: str
    executor: str
    state: str  # Slurm's word while the registry has the run unfinished, else the registry's
    registry_state: str
    slurm_job_id: Optional[str]
    nodes: str
    attempts: int
    pipeline_id: Optional[str]
    stage: Optional[str]
    depends_on: Optional[str]
    created_at: float
    started_at: Optional[float]
    ended_at: Optional[float]
    reason: Optional[str]
    run_dir: str
    step: Optional[int] = None
    max_steps: Optional[int] = None
    loss: Optional[float] = None
    losses: list = field(default_factory=list)  # recent training losses, oldest first, for the sparkline
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    eta_s: Optional[float] = None
    val_loss: Optional[float] = None
    skipped_steps: Optional[int] = None  # steps skipped for a non-finite loss or gradient
    last_checkpoint: Optional[str] = None  # folder name, e.g. step_00000100
    goodput: Optional[dict] = None  # goodput.json's totals (training/goodput.py), + queue_s
    code: Optional[dict] = None  # code.json: the code snapshot it runs, its commit and diff hash (code_snapshot.py)
    finished: bool = False


@dataclass
class PipelineFacts:
    pipeline_id: str
    stages: list[dict]  # {run_id, stage, depends_on, state}, parents before children
    sweep: bool = False  # a scaling-law sweep's members (orchestrator/sweeps/): one row, counts by state
    counts: dict = field(default_factory=dict)  # pending, running, done, failed, cancelled: how many stages each


# a stage's state (Slurm's word while unfinished) -> the count a sweep's row shows it under
COUNTED = {
    "COMPLETED": "done",
    "RUNNING": "running",
    "COMPLETING": "running",
    "CANCELLING": "running",
    "FAILED": "failed",
    "LOST": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "CANCELLED": "cancelled",
}
COUNTS = ("pending", "running", "done", "failed", "cancelled")


def is_sweep(pipeline_id: str, run_dir: str) -> bool:
    """A sweep's folder, with its plan, lies beside its members' folders."""
    return (Path(run_dir).parent / pipeline_id / SWEEP_PLAN).is_file()


@dataclass
class LogTail:
    run_id: str
    path: str
    running: bool
    lines: list[str]


@dataclass
class Frame:
    time: float
    target: Optional[str]  # the run or pipeline id the view is narrowed to
    cluster: slurm_query.ClusterFacts
    jobs: list[JobRow]
    pipelines: list[PipelineFacts]
    log: Optional[LogTail]

    def to_dict(self) -> dict:
        return asdict(self)


def newest_checkpoint(run_dir: str) -> Optional[str]:
    try:
        names = [
            e.name
            for e in os.scandir(RunFolder(run_dir).checkpoints)
            if checkpoint_step(e.name) is not None and e.is_dir()
        ]
    except OSError:
        return None
    return max(names, key=checkpoint_step, default=None)


def read_goodput(run: Run) -> Optional[dict]:
    """The run's goodput totals, with the wait from its registration to its first attempt's start (queue_s)."""
    try:
        record = json.loads(RunFolder(run.run_dir).goodput.read_text())
    except (OSError, ValueError):
        return None
    first = record.get("per_attempt", [{}])[0].get("start")
    totals = {k: record.get(k) for k in ("goodput", "wall_s", "buckets_s", "attempts", "lost_steps")}
    return {**totals, "queue_s": round(max(0.0, first - run.created_at), 3) if first else None}


def read_tail(path: Path, lines: int = LOG_LINES, max_bytes: int = 32 << 10) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode(errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-lines:]


class Collector:
    def __init__(self, registry: Optional[Registry] = None, target: Optional[str] = None, use_slurm: bool = True):
        self.registry = registry or Registry()
        self.target = target
        self.use_slurm = use_slurm
        self.metrics = MetricsTail()
        self._max_steps: dict[str, Optional[int]] = {}
        self._done: dict[str, tuple[tuple, JobRow]] = {}  # ended runs: (registry fields, their row)

    # ---------------------------------------------------------------- which runs

    def runs(self) -> list[Run]:
        if not self.target:
            return self.registry.list()
        runs = self.registry.list(pipeline_id=self.target)
        if runs:
            return runs
        try:
            return self.registry.list(pipeline_id=self.registry.find_pipeline(self.target))
        except LookupError:
            pass
        run = self.registry.find(self.target)  # LookupError naming the choices: the CLI prints it
        return [run]

    # ---------------------------------------------------------------- one run

    def max_steps(self, run_dir: str) -> Optional[int]:
        if run_dir not in self._max_steps:  # the config never changes once written: read it once
            try:
                with open(RunFolder(run_dir).config) as f:
                    cfg = yaml.load(f, Loader=_Loader) or {}
                # an eval job measures, it takes no steps: its row shows none; a data job's total (documents to
                # read) comes with its first metrics record
                self._max_steps[run_dir] = (
                    None if cfg.get("kind") in ("eval", "data") else int(cfg["train"]["max_steps"])
                )
            except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
                self._max_steps[run_dir] = None
        return self._max_steps[run_dir]

    def job_row(self, run: Run, seen: Optional[Observation]) -> JobRow:
        state = run.state
        if seen is not None and run.state not in TERMINAL:
            state = seen.word or seen.state  # the backend's own word (REQUEUED, TIMEOUT) when it has one
        finished = run.state in TERMINAL or (seen is not None and seen.state in TERMINAL)
        key = (run.state, state, run.attempts, run.slurm_job_id, run.ended_at, run.reason)
        cached = self._done.get(run.id)
        if cached and cached[0] == key:
            return cached[1]
        nodes = seen.where if seen is not None and seen.where else "-"
        row = JobRow(
            run_id=run.id,
            name=run.name,
            kind=run.kind,
            executor=run.executor,
            state=state,
            registry_state=run.state,
            slurm_job_id=run.slurm_job_id,
            nodes=nodes,
            attempts=run.attempts,
            pipeline_id=run.pipeline_id,
            stage=run.stage,
            depends_on=run.depends_on,
            created_at=run.created_at,
            started_at=run.started_at,
            ended_at=run.ended_at,
            reason=run.reason or (seen.reason if seen is not None else None),
            run_dir=run.run_dir,
            max_steps=self.max_steps(run.run_dir),
            finished=finished,
        )
        m = self.metrics.read(str(RunFolder(run.run_dir).metrics))
        train = m.last_train
        row.step = m.latest.get("step")
        row.loss = train.get("loss")
        row.losses = list(m.losses)
        row.tokens_per_s = train.get("tokens_per_s")
        row.mfu = train.get("mfu")
        row.eta_s = None if finished else train.get("eta_s")
        # the trainer may end the schedule early (time_budget_min); a data job counts documents, not steps
        if isinstance(m.latest.get("max_steps"), int):
            row.max_steps = m.latest["max_steps"]
        row.val_loss = m.latest.get("val_loss")
        row.skipped_steps = train.get("skipped_steps")
        row.last_checkpoint = newest_checkpoint(run.run_dir)
        row.goodput = read_goodput(run)
        row.code = code_snapshot.as_dict(run.run_dir)
        if finished:
            self._done[run.id] = (key, row)
        return row

    # ---------------------------------------------------------------- the frame

    def collect(self) -> Frame:
        runs = self.runs()
        cluster = (
            slurm_query.cluster_nodes()
            if self.use_slurm
            else slurm_query.this_machine("absent", "Slurm not consulted: showing this machine")
        )
        # what each backend sees of the unfinished runs: a dead local supervisor, Slurm's word and nodes
        live = [r for r in runs if not r.finished and (self.use_slurm and cluster.slurm == "up" or not r.slurm_job_id)]
        seen = executors.observe_all(self.registry, live)
        jobs = [self.job_row(r, seen.get(r.id)) for r in runs]
        jobs.sort(key=lambda j: (j.finished, j.state != "RUNNING", -(j.started_at or j.created_at)))
        return Frame(
            time=time.time(),
            target=self.target,
            cluster=cluster,
            jobs=jobs,
            pipelines=pipelines_of(jobs),
            log=self.log_tail(runs, jobs),
        )

    def log_tail(self, runs: list[Run], jobs: list[JobRow]) -> Optional[LogTail]:
        """The newest running job's log; when none runs, the most recently active job's."""
        if not jobs:
            return None
        running = [j for j in jobs if j.state == "RUNNING"]
        pick = max(running or jobs, key=lambda j: j.ended_at or j.started_at or j.created_at)
        run = next(r for r in runs if r.id == pick.run_id)
        path = executors.executor_for(run.executor, self.registry).log_path(run)
        return LogTail(run_id=run.id, path=str(path), running=bool(running), lines=read_tail(path))


def pipelines_of(jobs: list[JobRow]) -> list[PipelineFacts]:
    """Pipelines, those with a stage still to finish first, then the newest; stages parents first."""
    groups: dict[str, list[JobRow]] = {}
    for job in jobs:
        if job.pipeline_id:
            groups.setdefault(job.pipeline_id, []).append(job)
    result = []
    for pid, members in groups.items():
        ordered = parents_first(
            sorted(members, key=lambda j: j.created_at), key=lambda j: j.run_id, parent=lambda j: j.depends_on
        )
        counts = dict.fromkeys(COUNTS, 0)
        for j in members:
            counts[COUNTED.get(j.state, "pending")] += 1
        result.append(
            PipelineFacts(
                pid,
                [
                    {
                        "run_id": j.run_id,
                        "stage": j.stage or j.name,
                        "depends_on": j.depends_on,
                        "state": j.state,
                        "step": j.step,
                        "max_steps": j.max_steps,
                        "reason": j.reason,
                    }
                    for j in ordered
                ],
                sweep=is_sweep(pid, members[0].run_dir),
                counts=counts,
            )
        )
    active = {j.pipeline_id for j in jobs if j.pipeline_id and not j.finished}
    newest = {pid: max(j.created_at for j in members) for pid, members in groups.items()}
    result.sort(key=lambda p: (p.pipeline_id not in active, -newest[p.pipeline_id]))
    return result
