"""Pipelines: a chain of jobs, e.g. pretrain -> sft -> dpo -> grpo -> eval, each stage starting from the
final checkpoint of the stage it names in `after`.

    kind: pipeline
    name: demo
    executor: auto          # local | slurm | auto (slurm when a cluster answers, else local)
    overrides: []           # key=value applied to every stage
    stages:
      pretrain: {job: pretrain.yaml}
      sft:      {job: sft.yaml, after: pretrain}
      dpo:      {job: dpo.yaml, after: sft, overrides: ["train.max_steps=50"]}

A stage's config is its job YAML, then the pipeline's `overrides`, then the stage's `overrides`, then the
command line (`orch submit PIPELINE key=value` for every stage, `stages.NAME.key=value` for one). A stage
with `after: X` gets `checkpoint.init_from` = X's run folder: the trainer starts from its newest checkpoint.
When X is a data stage (kind: data) it gets `data.sources` = X's cleaned corpus (X/corpus) instead, and it and
every stage after it get `data.dir` = X/tokenized: pretraining tokenizes the corpus there, eval reads its val split.
`job:` paths are relative to the pipeline file's folder, else to the current folder.

Every stage is checked before anything is registered; then all are registered PENDING at once and handed
to an executor: executors/pipeline_local.py runs them one after another on this machine, and
executors/pipeline_slurm.py submits them all with `--dependency=afterok:<parent job>`.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from orchestrator.registry import Registry, Run, now
from orchestrator.spec import SpecError, load_spec
from orchestrator.spec.loading import _did_you_mean, _read_yaml
from orchestrator.spec.schema import CURATED_CORPUS_DIR

TOKENIZED_DIR = "tokenized"  # in a data stage's run folder: the stages after it tokenize its corpus there

TOP_KEYS = ("kind", "name", "executor", "overrides", "stages")
STAGE_KEYS = ("job", "after", "overrides")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # it becomes part of run ids and folder names


@dataclass
class Stage:
    name: str
    job: str  # the job YAML, as found on disk
    after: Optional[str] = None  # the stage whose final checkpoint this one starts from
    overrides: list[str] = field(default_factory=list)  # every override, in the order applied
    cfg: Optional[DictConfig] = None  # the resolved job config (init_from is set at submit time)


@dataclass
class Pipeline:
    path: str
    name: str
    executor: str  # as written: auto | local | slurm
    stages: list[Stage]  # parents before children


def is_pipeline_file(path: str) -> bool:
    """True when the YAML file says `kind: pipeline` (anything unreadable is left to load_spec to explain)."""
    try:
        raw = _read_yaml(path)
    except SpecError:
        return False
    return raw.get("kind") == "pipeline"


# ------------------------------------------------------------------ loading and validation


def _strings(value, path: str, key: str) -> list[str]:
    """A list of key=value strings, or an error naming the key."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SpecError(f"{path}: key '{key}' has the value {value!r}, but it must be a list of key=value "
                        "strings, e.g. [\"train.max_steps=50\"].")
    return list(value)


def _check_keys(raw: dict, allowed: Sequence[str], path: str, where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = _did_you_mean(str(key), allowed)
            raise SpecError(f"{path}: unknown key '{where}{key}' (value {raw[key]!r}).{hint} "
                            f"Valid keys: {', '.join(allowed)}.")


def _find_job(job: str, pipeline_path: str) -> Optional[str]:
    for base in (Path(pipeline_path).resolve().parent, Path.cwd()):
        candidate = base / job
        if candidate.is_file():
            return str(candidate)
    return None


def _split_cli(overrides: Sequence[str], stage_names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides: `stages.NAME.key=value` goes to one stage, anything else to all."""
    common, per_stage = [], {name: [] for name in stage_names}
    for ov in overrides:
        if ov.startswith("stages.") and "=" in ov:
            key, value = ov.split("=", 1)
            parts = key.split(".", 2)
            if len(parts) < 3 or parts[1] not in per_stage:
                name = parts[1] if len(parts) > 1 else ""
                raise SpecError(f"command line override {ov!r}: stage '{name}' is not in this pipeline."
                                f"{_did_you_mean(name, stage_names)} Stages: {', '.join(stage_names)}. "
                                "Write stages.STAGE.key=value to change one stage, key=value for all.")
            per_stage[parts[1]].append(f"{parts[2]}={value}")
        else:
            common.append(ov)
    return common, per_stage


def _order(stages: dict[str, dict], path: str) -> list[str]:
    """Stage names, each after the stage it names; SpecError on a cycle."""
    ordered: list[str] = []
    for start in stages:
        chain, name = [], start
        while name is not None and name not in ordered:
            if name in chain:
                loop = chain[chain.index(name):] + [name]
                raise SpecError(f"{path}: the stages' 'after' keys form a cycle: {' -> '.join(reversed(loop))}. "
                                "Each stage starts from the checkpoint of the stage it names, so one of them must "
                                "come first: remove one of these 'after' keys.")
            chain.append(name)
            name = stages[name].get("after")
        ordered += reversed(chain)
    return ordered


def load_pipeline(path: str, overrides: Sequence[str] = ()) -> Pipeline:
    """Read and check a pipeline file and every stage's job; nothing is registered or written."""
    raw = _read_yaml(path)
    _check_keys(raw, TOP_KEYS, path, "")
    if raw.get("kind") != "pipeline":
        raise SpecError(f"{path}: key 'kind' has the value {raw.get('kind')!r}, "
                        "but a pipeline file says kind: pipeline.")
    name = raw.get("name") or Path(path).stem
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{path}: key 'name' has the value {name!r}, but it must be letters, digits, '_', '.' or '-'.")
    executor = raw.get("executor", "auto")
    if executor not in ("auto", "local", "slurm"):
        raise SpecError(f"{path}: key 'executor' has the value {executor!r}, but it must be one of auto, local, slurm.")
    common_file = _strings(raw.get("overrides"), path, "overrides")

    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise SpecError(f"{path}: key 'stages' has the value {stages!r}, but it must map stage names to "
                        "{job: FILE, after: STAGE, overrides: [...]}, with at least one stage.")
    names = [str(n) for n in stages]
    for stage_name, body in stages.items():
        where = f"stages.{stage_name}"
        if not NAME_RE.match(str(stage_name)):
            raise SpecError(f"{path}: stage name {stage_name!r} must be letters, digits, '_', '.' or '-'.")
        if not isinstance(body, dict):
            raise SpecError(f"{path}: key '{where}' has the value {body!r}, but a stage must be a mapping "
                            "like {job: sft.yaml, after: pretrain}.")
        _check_keys(body, STAGE_KEYS, path, where + ".")
        if not isinstance(body.get("job"), str):
            raise SpecError(f"{path}: key '{where}.job' has the value {body.get('job')!r}, but every stage needs "
                            "a job YAML file (job: pretrain.yaml).")
        after = body.get("after")
        if after is not None and (not isinstance(after, str) or after not in stages or after == stage_name):
            why = ("but a stage cannot start from itself" if after == stage_name else
                   f"which names no stage.{_did_you_mean(str(after), names)} Stages: {', '.join(names)}"
                   if isinstance(after, str) else "but it must name one stage")
            raise SpecError(f"{path}: key '{where}.after' has the value {after!r}, {why}.")
        _strings(body.get("overrides"), path, where + ".overrides")

    common_cli, per_stage_cli = _split_cli(overrides, names)
    for ov in common_cli:  # `orch submit PIPELINE executor=local` picks the pipeline's executor
        if ov.split("=", 1)[0].strip() == "executor":
            executor = ov.split("=", 1)[1].strip()
            if executor not in ("auto", "local", "slurm"):
                raise SpecError(f"command line override {ov!r}: key 'executor' has the value {executor!r}, "
                                "but it must be one of auto, local, slurm.")
    result = []
    for stage_name in _order(stages, path):
        body = stages[stage_name]
        job = _find_job(body["job"], path)
        if job is None:
            raise SpecError(f"{path}: key 'stages.{stage_name}.job' has the value {body['job']!r}, but no such job "
                            f"file exists (looked in {Path(path).resolve().parent} and {Path.cwd()}).")
        stage_overrides = [*common_file, *(body.get("overrides") or []), *common_cli, *per_stage_cli[stage_name]]
        try:
            cfg = load_spec(job, stage_overrides)
        except SpecError as e:
            raise SpecError(f"{path}, stage '{stage_name}': {e}") from None
        result.append(Stage(stage_name, job, body.get("after"), stage_overrides, cfg))
    return Pipeline(path, name, executor, result)


# ------------------------------------------------------------------ submitting


def submit(pipeline: Pipeline, registry: Registry) -> tuple[str, list[Run]]:
    """Register every stage PENDING (parents first), write each run folder's config.yaml, and hand the
    pipeline to its executor. Returns the pipeline id and the stages' runs."""
    from orchestrator.cli import resolve_executor  # auto: slurm when a cluster answers, like a single job

    executor = resolve_executor(pipeline.executor)
    pipeline_id = f"{pipeline.name}-{secrets.token_hex(3)}"
    runs: list[Run] = []
    run_dirs: dict[str, str] = {}
    for stage in pipeline.stages:
        run_id = f"{pipeline_id}-{stage.name}"
        run_dir = (Path(stage.cfg.runs_dir) / run_id).resolve()
        stage.cfg.executor = executor
        if stage.after and _by_name(pipeline, stage.after).cfg.kind == "data":
            # A data stage's output is a corpus, not a checkpoint: this stage reads it
            stage.cfg.data.sources = [str(Path(run_dirs[stage.after]) / CURATED_CORPUS_DIR)]
        elif stage.after:  # the trainer loads the newest valid checkpoint of this folder
            stage.cfg.checkpoint.init_from = run_dirs[stage.after]
            if stage.cfg.kind == "eval" and not stage.cfg.eval.compare:
                stage.cfg.eval.compare = _ancestors(pipeline, stage, run_dirs)
        curated = _data_ancestor(pipeline, stage)
        if curated is not None:  # its tokenized form lives beside it: pretraining writes it, eval reads its val split
            stage.cfg.data.dir = str(Path(run_dirs[curated.name]) / TOKENIZED_DIR)
        run_dir.mkdir(parents=True)
        OmegaConf.save(stage.cfg, run_dir / "config.yaml")
        run_dirs[stage.name] = str(run_dir)
        parent = f"{pipeline_id}-{stage.after}" if stage.after else None
        runs.append(Run(id=run_id, name=stage.cfg.name, kind=stage.cfg.kind, executor=executor, state="PENDING",
                        run_dir=str(run_dir), created_at=now(), pipeline_id=pipeline_id, stage=stage.name,
                        depends_on=parent))
        registry.add(runs[-1])
    if executor == "local":
        from orchestrator.executors import pipeline_local

        pipeline_local.launch(pipeline_id, registry)
    else:
        from orchestrator.executors import pipeline_slurm

        pipeline_slurm.submit_all(registry, runs, {s.name: s.cfg for s in pipeline.stages})
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


# ------------------------------------------------------------------ stages that can no longer run


def ordered(runs: Sequence[Run]) -> list[Run]:
    """A pipeline's runs, each after the run it depends on."""
    by_id = {r.id: r for r in runs}
    done: list[Run] = []
    seen: set[str] = set()

    def visit(run: Run) -> None:
        if run.id in seen:
            return
        seen.add(run.id)
        if run.depends_on in by_id:
            visit(by_id[run.depends_on])
        done.append(run)

    for run in sorted(runs, key=lambda r: r.created_at):
        visit(run)
    return done


def dependency_reason(parent: Run, blame: dict[str, str]) -> str:
    """'dependency sft failed': names the stage where the chain broke, not just the direct parent."""
    if parent.id in blame:
        return blame[parent.id]
    return f"dependency {parent.stage} {'cancelled' if parent.state == 'CANCELLED' else 'failed'}"


def cancel_dependents(registry: Registry, runs: Sequence[Run], cancel_one=None) -> list[Run]:
    """Mark CANCELLED every unfinished stage whose parent FAILED or was CANCELLED (transitively), calling
    `cancel_one(run)` first for each (Slurm: scancel). Returns the stages cancelled now."""
    current = {r.id: registry.get(r.id) for r in runs}
    blame: dict[str, str] = {}  # run id -> the reason its dependents are cancelled
    cancelled = []
    for run in ordered(list(current.values())):
        parent = current.get(run.depends_on) if run.depends_on else None
        if run.reason and run.reason.startswith("dependency "):
            blame[run.id] = run.reason
        if run.finished or parent is None or parent.state not in ("FAILED", "CANCELLED"):
            continue
        reason = dependency_reason(parent, blame)
        if cancel_one is not None:
            cancel_one(run)
        registry.update(run.id, state="CANCELLED", reason=reason, ended_at=now())
        current[run.id] = registry.get(run.id)
        blame[run.id] = reason
        cancelled.append(current[run.id])
    return cancelled


def check_pipelines(registry: Registry, pipeline_id: Optional[str] = None) -> None:
    """Bring unfinished pipelines' stages up to date: Slurm states from sacct/squeue, dependents of a failed
    stage cancelled (Slurm leaves them PENDING forever), stages of a vanished local supervisor cancelled.
    `orch runs`, `orch pipeline wait|status` and `orch submit --follow` call it."""
    ids = [pipeline_id] if pipeline_id else registry.active_pipelines()
    for pid in ids:
        runs = registry.list(pipeline_id=pid)
        if not any(not r.finished for r in runs):
            continue
        if runs[0].executor == "slurm":
            from orchestrator.executors import pipeline_slurm

            pipeline_slurm.check(registry, runs)
        else:
            from orchestrator.executors import pipeline_local

            pipeline_local.check(registry, pid, runs)


def cancel(registry: Registry, pipeline_id: str) -> list[Run]:
    """Cancel every unfinished stage: pending ones at once, running ones by signal (local) or scancel."""
    runs = ordered(registry.list(pipeline_id=pipeline_id))
    for run in runs:  # pending first, so no supervisor starts them in the meantime
        if run.state == "PENDING":
            registry.update(run.id, state="CANCELLED", reason="pipeline cancelled by user", ended_at=now())
    for run in runs:  # `run` is the state before the loop above
        if run.finished:
            continue
        if run.executor == "slurm":
            from orchestrator.executors import slurm

            slurm.cancel(run)
        elif run.state == "RUNNING" and run.pid:
            import signal

            try:
                os.kill(run.pid, signal.SIGTERM)  # the stage's supervisor stops the trainer after a checkpoint
                continue  # and records CANCELLED itself
            except ProcessLookupError:
                pass
        if run.state == "RUNNING":
            registry.update(run.id, state="CANCELLED", reason="pipeline cancelled by user", ended_at=now())
    return [registry.get(r.id) for r in runs]


# ------------------------------------------------------------------ following


def wait(registry: Registry, pipeline_id: str, *, stream: bool = True, timeout: Optional[float] = None,
         poll_s: float = 1.0) -> int:
    """Print stage state changes (and, with stream, each stage's log lines) until every stage has ended.
    Returns 0 when all COMPLETED, else 1 (2 on timeout)."""
    positions: dict[str, int] = {}
    last_state: dict[str, str] = {}
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        check_pipelines(registry, pipeline_id)
        runs = ordered(registry.list(pipeline_id=pipeline_id))
        for run in runs:
            if stream:
                _tail(run, positions)
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


def _tail(run: Run, positions: dict[str, int]) -> None:
    from orchestrator.cli import log_path  # the trainer's log (local) or rank 0's (Slurm)

    log = log_path(run)
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
    rows = []
    for run in ordered(registry.list(pipeline_id=pipeline_id)):
        parent = run.depends_on[len(pipeline_id) + 1:] if run.depends_on else "-"
        detail = run.reason if run.state in ("FAILED", "CANCELLED") and run.reason else run.run_dir
        rows.append((run.stage, run.id, run.kind, parent, run.state, run.slurm_job_id or "-", detail))
    return rows


# ------------------------------------------------------------------ command line (called by orchestrator.cli)


def submit_from_cli(path: str, overrides: Sequence[str], follow: bool) -> int:
    pipeline = load_pipeline(path, overrides)
    registry = Registry()
    pipeline_id, runs = submit(pipeline, registry)
    print(f"submitted pipeline {pipeline_id} ({runs[0].executor}, {len(runs)} stages)")
    for run in runs:
        after = f" after {run.depends_on[len(pipeline_id) + 1:]}" if run.depends_on else ""
        job = f" slurm job {run.slurm_job_id}" if run.slurm_job_id else ""
        print(f"  {run.stage}: {run.id}{after}{job}")
    if not follow:
        print(f"  follow it: orch pipeline wait {pipeline_id}")
        return 0
    return wait(registry, pipeline_id)


def print_configs(path: str, overrides: Sequence[str]) -> int:
    """`orch config PIPELINE`: each stage's resolved config (init_from is filled in at submit time)."""
    pipeline = load_pipeline(path, overrides)
    for stage in pipeline.stages:
        takes = "data.sources = its corpus" if stage.after and _by_name(pipeline, stage.after).cfg.kind == "data" \
            else "checkpoint.init_from = its run folder"
        after = f" (after {stage.after}: {takes})" if stage.after else ""
        print(f"# ---- stage {stage.name}: {stage.job}{after}")
        print(OmegaConf.to_yaml(stage.cfg), end="")
    return 0
