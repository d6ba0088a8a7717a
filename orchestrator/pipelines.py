"""A pipeline's life once its file is checked (jobspec/pipeline_file.py): register the stages, hand them to an
executor, cancel them, follow them, and settle the states of stages that can no longer run.

Each stage with `after: X` gets `checkpoint.init_from` = X's run folder (the trainer starts from its newest
checkpoint); an eval stage with no `eval.compare` compares every model stage it descends from. When X is a data
stage (kind: data) the stage gets `data.sources` = X's cleaned corpus (X/corpus) instead, and it and every stage
after it get `data.dir` = X/tokenized: pretraining tokenizes the corpus there, eval reads its val split.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from jobspec.contract import CURATED_CORPUS, TOKENIZED
from jobspec.faults import fault
from jobspec.pipeline_file import Pipeline, Stage
from orchestrator import executors
from orchestrator.dependencies import cancel_dependents, parents_first_runs
from orchestrator.registry import Registry, Run
from orchestrator.runs import register_run, run_folder

CANCELLED_PIPELINE = "pipeline cancelled by user"


def submit(pipeline: Pipeline, registry: Registry) -> tuple[str, list[Run]]:
    """Register every stage PENDING (parents first), write each run folder's config.yaml, and hand the
    pipeline to its executor. Returns the pipeline id and the stages' runs."""
    executor = executors.resolve(pipeline.executor)
    for stage in pipeline.stages:  # before anything is registered
        executors.executor_for(executor, registry).check(stage.cfg, f"{pipeline.path} (stage {stage.name})")
    pipeline_id = f"{pipeline.name}-{secrets.token_hex(3)}"
    runs: list[Run] = []
    run_dirs: dict[str, str] = {}
    for stage in pipeline.stages:
        run_id = f"{pipeline_id}-{stage.name}"
        stage.cfg.executor = executor
        if "logging" in stage.cfg and stage.cfg.logging.group is None:  # one group in W&B and MLflow (not data jobs)
            stage.cfg.logging.group = pipeline_id
        if stage.after and _by_name(pipeline, stage.after).cfg.kind == "data":
            # A data stage's output is a corpus, not a checkpoint: this stage reads it
            stage.cfg.data.sources = [str(Path(run_dirs[stage.after]) / CURATED_CORPUS)]
        elif stage.after:  # the trainer loads the newest valid checkpoint of this folder
            stage.cfg.checkpoint.init_from = run_dirs[stage.after]
            if stage.cfg.kind == "eval" and not stage.cfg.eval.compare:
                stage.cfg.eval.compare = _ancestors(pipeline, stage, run_dirs)
        curated = _data_ancestor(pipeline, stage)
        if curated is not None:  # its tokenized form lives beside it: pretraining writes it, eval reads its val split
            stage.cfg.data.dir = str(Path(run_dirs[curated.name]) / TOKENIZED)
        run_dirs[stage.name] = str(run_folder(stage.cfg, run_id))
        parent = f"{pipeline_id}-{stage.after}" if stage.after else None
        runs.append(
            register_run(
                registry, stage.cfg, executor, run_id, pipeline_id=pipeline_id, stage=stage.name, depends_on=parent
            )
        )
    fault("submit.registered")
    executors.executor_for(executor, registry).submit_pipeline(
        pipeline_id, runs, {s.name: s.cfg for s in pipeline.stages}
    )
    return pipeline_id, [registry.get(r.id) for r in runs]


def _ancestors(pipeline: Pipeline, stage: Stage, run_dirs: dict[str, str]) -> list[str]:
    """["pretrain=RUN_FOLDER", "sft=RUN_FOLDER", ...]: the model stages an eval stage descends from, first to
    last, so that its report.md compares every stage of the chain on every metric (a data stage has no model)."""
    by_name = {s.name: s for s in pipeline.stages}
    chain, name = [], stage.after
    while name is not None:
        if by_name[name].cfg.kind != "data":
            chain.append(f"{name}={run_dirs[name]}")
        name = by_name[name].after
    return list(reversed(chain))


def _by_name(pipeline: Pipeline, name: str) -> Stage:
    return next(s for s in pipeline.stages if s.name == name)


def _data_ancestor(pipeline: Pipeline, stage: Stage) -> Optional[Stage]:
    """The nearest data stage this one descends from (through `after`), if any."""
    name = stage.after
    while name is not None:
        parent = _by_name(pipeline, name)
        if parent.cfg.kind == "data":
            return parent
        name = parent.after
    return None


def stages(registry: Registry, pipeline_id: str) -> list[Run]:
    return parents_first_runs(registry.list(pipeline_id=pipeline_id))


def cancel(registry: Registry, pipeline_id: str) -> list[Run]:
    """Cancel every unfinished stage through its executor, last stages first, so that no parent finishing
    meanwhile starts one (the local pipeline supervisor, Slurm's afterok). Each executor records CANCELLED once
    its backend has stopped the stage (a local stage not started yet: at once; a Slurm job: when sacct says it
    ended); until then the stage is CANCELLING. Every stage is asked even if one backend refuses."""
    runs = stages(registry, pipeline_id)
    failures = []
    for run in (registry.get(r.id) for r in reversed(runs)):
        if run.finished:
            continue
        try:
            executors.executor_for(run.executor, registry).cancel(run, reason=CANCELLED_PIPELINE)
        except RuntimeError as e:  # scancel failed: the other stages are still cancelled
            failures.append(f"stage {run.stage}: {e}")
    if failures:
        raise RuntimeError(f"pipeline {pipeline_id} not wholly cancelled: {'; '.join(failures)}")
    return [registry.get(r.id) for r in runs]


def reconcile(registry: Registry, pipeline_id: Optional[str] = None) -> None:
    """Settle unfinished pipelines' stages: states from their executor (Slurm's sacct, a vanished local
    supervisor), then every stage downstream of a failed or cancelled one CANCELLED. Run by the processes
    that own pipelines (`orch pipeline wait|reconcile`, `orch submit --follow`), never by looking."""
    for pid in [pipeline_id] if pipeline_id else registry.active_pipelines():
        runs = registry.list(pipeline_id=pid)
        live = [r for r in runs if not r.finished]
        if not live:
            continue
        for name in {r.executor for r in live}:
            executors.executor_for(name, registry).refresh([r for r in runs if r.executor == name])
        # and tell each backend (Slurm may not have cancelled the job itself yet)
        cancel_dependents(registry, runs, cancel_one=lambda r: executors.executor_for(r.executor, registry).cancel(r))


def wait(
    registry: Registry, pipeline_id: str, *, stream: bool = True, timeout: Optional[float] = None, poll_s: float = 1.0
) -> int:
    """Print stage state changes (and, with stream, each stage's log lines) until every stage has ended.
    Returns 0 when all COMPLETED, else 1 (2 on timeout)."""
    positions: dict[str, int] = {}
    last_state: dict[str, str] = {}
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        reconcile(registry, pipeline_id)
        runs = stages(registry, pipeline_id)
        for run in runs:
            if stream:
                _tail(registry, run, positions)
            if last_state.get(run.id, "PENDING") != run.state:
                extra = f": {run.reason}" if run.reason and run.state in ("FAILED", "CANCELLED") else ""
                print(f"[orch] stage {run.stage} ({run.id}) {run.state}{extra}", flush=True)
            last_state[run.id] = run.state
        if all(r.finished for r in runs):
            ok = all(r.state == "COMPLETED" for r in runs)
            print(f"[orch] pipeline {pipeline_id} {'COMPLETED' if ok else 'FAILED'}", flush=True)
            for run in runs:  # what a user opens next: each stage's folder, and an eval stage's report
                report = Path(run.run_dir) / "report.md"
                shown = report if report.is_file() else run.run_dir
                print(f"[orch]   {run.stage:<10} {run.state:<10} {shown}", flush=True)
            return 0 if ok else 1
        if deadline and time.monotonic() > deadline:
            print(f"[orch] pipeline {pipeline_id}: still running after {timeout:.0f}s", file=sys.stderr)
            return 2
        time.sleep(poll_s)  # polling the registry and the cluster: the states decide when to stop


def _tail(registry: Registry, run: Run, positions: dict[str, int]) -> None:
    log = executors.executor_for(run.executor, registry).log_path(run)
    if not log.exists():
        return
    with open(log, "rb") as f:
        f.seek(positions.get(run.id, 0))
        chunk = f.read()
    # only whole lines, each prefixed with the stage, so that stages' logs stay apart
    end = chunk.rfind(b"\n") + 1
    positions[run.id] = positions.get(run.id, 0) + end
    for line in chunk[:end].decode(errors="replace").splitlines():
        print(f"[{run.stage}] {line}")
    sys.stdout.flush()


def status_rows(registry: Registry, pipeline_id: str) -> list[tuple[str, ...]]:
    """`orch pipeline status`: one row per stage, as the executors see it now (nothing is written)."""
    rows = []
    for run in executors.observed(registry, stages(registry, pipeline_id)):
        parent = run.depends_on[len(pipeline_id) + 1 :] if run.depends_on else "-"
        detail = run.reason if run.state in ("FAILED", "CANCELLED", "LOST") and run.reason else run.run_dir
        rows.append((run.stage, run.id, run.kind, parent, run.state, run.slurm_job_id or "-", detail))
    return rows
