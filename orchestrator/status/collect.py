"""The dashboard's facts, as plain dataclasses: no terminal needed, so tests and `--json` use them directly.

One `Collector.collect()` is one refresh. It reads the run registry, the bytes appended to each run's
metrics.jsonl since the previous refresh (MetricsTail), and asks Slurm two questions in total, never
one per job (slurm_query). Runs that have ended are read once more after they end and then cached, so
a registry of 1,000 old runs costs a dictionary lookup each.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from orchestrator.pipeline import check_pipelines
from orchestrator.registry import TERMINAL, Registry, Run
from orchestrator.status import slurm_query
from orchestrator.status.metrics_tail import MetricsTail

LOG_LINES = 40
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class JobRow:
    run_id: str
    name: str
    kind: str
    executor: str
    state: str                      # Slurm's word while the registry has the run unfinished, else the registry's
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
    losses: list = field(default_factory=list)   # recent training losses, oldest first, for the sparkline
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    eta_s: Optional[float] = None
    val_loss: Optional[float] = None
    last_checkpoint: Optional[str] = None        # folder name, e.g. step_00000100
    finished: bool = False


@dataclass
class PipelineFacts:
    pipeline_id: str
    stages: list[dict]              # {run_id, stage, depends_on, state}, parents before children


@dataclass
class LogTail:
    run_id: str
    path: str
    running: bool
    lines: list[str]


@dataclass
class Frame:
    time: float
    target: Optional[str]           # the run or pipeline id the view is narrowed to
    cluster: slurm_query.ClusterFacts
    jobs: list[JobRow]
    pipelines: list[PipelineFacts]
    log: Optional[LogTail]

    def to_dict(self) -> dict:
        return asdict(self)


def _slurm_log_path() -> Optional[Callable[[Run], object]]:
    """The slurm executor's own idea of where a run's log is, when it has one."""
    try:
        from orchestrator.executors import slurm
    except Exception:  # not written yet, or broken: the train.log fallback still works
        return None
    for name in ("log_file", "log_path"):  # slurm.log_file(run): rank 0's submitit log, or None
        if callable(getattr(slurm, name, None)):
            return getattr(slurm, name)
    return None


def newest_checkpoint(run_dir: str) -> Optional[str]:
    try:
        names = [e.name for e in os.scandir(Path(run_dir) / "checkpoints") if e.name.startswith("step_") and e.is_dir()]
    except OSError:
        return None
    return max(names, key=lambda n: int(n.split("_")[1]) if n.split("_")[1].isdigit() else -1, default=None)


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
        self._done: dict[str, tuple[tuple, JobRow]] = {}   # ended runs: (registry fields, their row)
        self._log_path = _slurm_log_path()

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
                with open(Path(run_dir) / "config.yaml") as f:
                    cfg = yaml.load(f, Loader=_Loader) or {}
                # an eval job measures, it takes no steps: its row shows none; a data job's total (documents to
                # read) comes with its first metrics record
                self._max_steps[run_dir] = None if cfg.get("kind") in ("eval", "data") else int(cfg["train"]["max_steps"])
            except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
                self._max_steps[run_dir] = None
        return self._max_steps[run_dir]

    def job_row(self, run: Run, slurm_job: Optional[slurm_query.JobFacts]) -> JobRow:
        state = run.state
        if slurm_job is not None and run.state not in TERMINAL:
            state = slurm_job.state
        finished = state in TERMINAL or run.state in TERMINAL
        key = (run.state, state, run.attempts, run.slurm_job_id, run.ended_at, run.reason)
        cached = self._done.get(run.id)
        if cached and cached[0] == key:
            return cached[1]
        nodes = slurm_job.nodes if slurm_job and slurm_job.nodes not in ("", "None assigned") else (
            "local" if run.executor == "local" else "-")
        slurm_reason = slurm_job.reason if slurm_job and slurm_job.reason not in ("None", "") else None
        row = JobRow(run_id=run.id, name=run.name, kind=run.kind, executor=run.executor, state=state,
                     registry_state=run.state, slurm_job_id=run.slurm_job_id, nodes=nodes, attempts=run.attempts,
                     pipeline_id=run.pipeline_id, stage=run.stage, depends_on=run.depends_on,
                     created_at=run.created_at, started_at=run.started_at, ended_at=run.ended_at,
                     reason=run.reason or slurm_reason,
                     run_dir=run.run_dir, max_steps=self.max_steps(run.run_dir), finished=finished)
        m = self.metrics.read(os.path.join(run.run_dir, "metrics.jsonl"))
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
        row.last_checkpoint = newest_checkpoint(run.run_dir)
        if finished:
            self._done[run.id] = (key, row)
        return row

    # ---------------------------------------------------------------- the frame

    def collect(self) -> Frame:
        # Cancel the dependents of a failed pipeline stage (Slurm would leave them PENDING forever) while
        # someone watches: one registry query when no pipeline is active.
        check_pipelines(self.registry)
        runs = self.runs()
        cluster = slurm_query.cluster_nodes() if self.use_slurm else slurm_query.this_machine(
            "absent", "Slurm not consulted: showing this machine")
        live_slurm = [r.slurm_job_id for r in runs if r.slurm_job_id and r.state not in TERMINAL]
        slurm_jobs = slurm_query.job_states(live_slurm) if self.use_slurm and cluster.slurm == "up" else {}
        jobs = [self.job_row(r, slurm_jobs.get(r.slurm_job_id or "")) for r in runs]
        jobs.sort(key=lambda j: (j.finished, j.state != "RUNNING", -(j.started_at or j.created_at)))
        return Frame(time=time.time(), target=self.target, cluster=cluster, jobs=jobs,
                     pipelines=pipelines_of(jobs), log=self.log_tail(runs, jobs))

    def log_tail(self, runs: list[Run], jobs: list[JobRow]) -> Optional[LogTail]:
        """The newest running job's log; when none runs, the most recently active job's."""
        if not jobs:
            return None
        running = [j for j in jobs if j.state == "RUNNING"]
        pick = max(running or jobs, key=lambda j: j.ended_at or j.started_at or j.created_at)
        run = next(r for r in runs if r.id == pick.run_id)
        path = Path(run.run_dir) / "logs" / "train.log"
        if run.executor == "slurm" and self._log_path is not None:
            try:
                candidate = self._log_path(run)
                if candidate is not None and Path(candidate).is_file():
                    path = Path(candidate)
            except Exception:  # a helper that can't answer for this run: train.log still may
                pass
        return LogTail(run_id=run.id, path=str(path), running=bool(running), lines=read_tail(path))


def pipelines_of(jobs: list[JobRow]) -> list[PipelineFacts]:
    """Pipelines, those with a stage still to finish first, then the newest; stages parents first."""
    groups: dict[str, list[JobRow]] = {}
    for job in jobs:
        if job.pipeline_id:
            groups.setdefault(job.pipeline_id, []).append(job)
    result = []
    for pid, members in groups.items():
        by_id = {j.run_id: j for j in members}
        ordered: list[JobRow] = []
        seen: set[str] = set()

        def visit(job: JobRow) -> None:
            if job.run_id in seen:
                return
            seen.add(job.run_id)
            if job.depends_on in by_id:
                visit(by_id[job.depends_on])
            ordered.append(job)

        for job in sorted(members, key=lambda j: j.created_at):
            visit(job)
        result.append(PipelineFacts(pid, [{"run_id": j.run_id, "stage": j.stage or j.name, "depends_on": j.depends_on,
                                           "state": j.state, "step": j.step, "max_steps": j.max_steps,
                                           "reason": j.reason}
                                          for j in ordered]))
    active = {j.pipeline_id for j in jobs if j.pipeline_id and not j.finished}
    newest = {pid: max(j.created_at for j in members) for pid, members in groups.items()}
    result.sort(key=lambda p: (p.pipeline_id not in active, -newest[p.pipeline_id]))
    return result
