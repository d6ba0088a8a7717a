"""Pipeline files (`kind: pipeline`): a chain of jobs, e.g. pretrain -> sft -> dpo -> grpo -> eval, each stage
starting from the final checkpoint of the stage it names in `after`.

    kind: pipeline
    name: demo
    executor: auto          # local | slurm | auto (slurm when a cluster answers, else local)
    overrides: []           # key=value applied to every stage
    stages:
      pretrain: {job: pretrain.yaml}
      sft:      {job: sft.yaml, after: pretrain}
      dpo:      {job: dpo.yaml, after: sft, overrides: ["train.max_steps=50"]}

A stage's config is its job YAML, then the pipeline's `overrides`, then the stage's `overrides`, then the
command line (`orch submit PIPELINE key=value` for every stage, `stages.NAME.key=value` for one).
`job:` paths are relative to the pipeline file's folder, else to the current folder. This module reads and
checks such a file; nothing is registered or written (orchestrator/pipelines.py does that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, TypeVar

from omegaconf import DictConfig

from jobspec.checks import NAME, NAME_RULE, check_plain_values
from jobspec.loading import Origins, SpecError, did_you_mean, load_spec, read_yaml
from jobspec.starting_points import FindRun

T = TypeVar("T")


def parents_first(
    items: Sequence[T], key: Callable[[T], Hashable], parent: Callable[[T], Optional[Hashable]]
) -> list[T]:
    """Items ordered so that each comes after its parent (the one topological sort of pipelines: stages,
    runs and dashboard rows all use it). Ties keep the given order. Raises CycleError naming the loop."""
    by_key = {key(item): item for item in items}
    done: list[T] = []
    placed: set = set()
    for start in items:
        chain, item = [], start
        while item is not None and key(item) not in placed:
            if any(key(c) == key(item) for c in chain):
                names = [key(c) for c in chain]
                loop = names[names.index(key(item)) :] + [key(item)]
                raise CycleError(loop)
            chain.append(item)
            item = by_key.get(parent(item))
        for c in reversed(chain):
            placed.add(key(c))
            done.append(c)
    return done


class CycleError(ValueError):
    def __init__(self, loop: list):
        super().__init__(" -> ".join(str(x) for x in reversed(loop)))
        self.loop = loop


TOP_KEYS = ("kind", "name", "executor", "overrides", "stages")
STAGE_KEYS = ("job", "after", "overrides")


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
        raw = read_yaml(path)
    except SpecError:
        return False
    return raw.get("kind") == "pipeline"


# ------------------------------------------------------------------ loading and validation


def _strings(value, path: str, key: str) -> list[str]:
    """A list of key=value strings, or an error naming the key."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SpecError(
            f"{path}: key '{key}' has the value {value!r}, but it must be a list of key=value "
            "strings, e.g. [\"train.max_steps=50\"]."
        )
    return list(value)


def _check_keys(raw: dict, allowed: Sequence[str], path: str, where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            raise SpecError(
                f"{path}: unknown key '{where}{key}' (value {raw[key]!r}).{hint} Valid keys: {', '.join(allowed)}."
            )


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
                raise SpecError(
                    f"command line override {ov!r}: stage '{name}' is not in this pipeline."
                    f"{did_you_mean(name, stage_names)} Stages: {', '.join(stage_names)}. "
                    "Write stages.STAGE.key=value to change one stage, key=value for all."
                )
            per_stage[parts[1]].append(f"{parts[2]}={value}")
        else:
            common.append(ov)
    return common, per_stage


def _order(stages: dict[str, dict], path: str) -> list[str]:
    """Stage names, each after the stage it names; SpecError on a cycle."""
    try:
        return parents_first(list(stages), key=lambda name: name, parent=lambda name: stages[name].get("after"))
    except CycleError as e:
        raise SpecError(
            f"{path}: the stages' 'after' keys form a cycle: {e}. Each stage starts from the checkpoint "
            "of the stage it names, so one of them must come first: remove one of these 'after' keys."
        ) from None


def load_pipeline(path: str, overrides: Sequence[str] = (), find_run: Optional[FindRun] = None) -> Pipeline:
    """Read and check a pipeline file and every stage's job; nothing is registered or written. A stage's run names
    (checkpoint.init_from: pretrain) are resolved by `find_run`, except the init_from its `after:` stage fills in."""
    lines: dict[str, int] = {}
    raw = read_yaml(path, lines)
    origin = Origins(path, lines)
    check_plain_values(raw, origin)  # as a job file's: finite numbers, no control character in any value
    _check_keys(raw, TOP_KEYS, path, "")
    if raw.get("kind") != "pipeline":
        raise SpecError(
            f"{path}: key 'kind' has the value {raw.get('kind')!r}, but a pipeline file says kind: pipeline."
        )
    name = raw.get("name") or Path(path).stem
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(f"{origin('name')}: key 'name' has the value {name!r}, but it must be {NAME_RULE}.")
    executor = raw.get("executor", "auto")
    if executor not in ("auto", "local", "slurm"):
        raise SpecError(f"{path}: key 'executor' has the value {executor!r}, but it must be one of auto, local, slurm.")
    common_file = _strings(raw.get("overrides"), path, "overrides")

    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise SpecError(
            f"{path}: key 'stages' has the value {stages!r}, but it must map stage names to "
            "{job: FILE, after: STAGE, overrides: [...]}, with at least one stage."
        )
    names = [str(n) for n in stages]
    for stage_name, body in stages.items():
        where = f"stages.{stage_name}"
        if not NAME.fullmatch(str(stage_name)):
            raise SpecError(f"{origin(where)}: stage name {stage_name!r} must be {NAME_RULE}.")
        if not isinstance(body, dict):
            raise SpecError(
                f"{path}: key '{where}' has the value {body!r}, but a stage must be a mapping "
                "like {job: sft.yaml, after: pretrain}."
            )
        _check_keys(body, STAGE_KEYS, path, where + ".")
        if not isinstance(body.get("job"), str):
            raise SpecError(
                f"{path}: key '{where}.job' has the value {body.get('job')!r}, but every stage needs "
                "a job YAML file (job: pretrain.yaml)."
            )
        after = body.get("after")
        if after is not None and (not isinstance(after, str) or after not in stages or after == stage_name):
            why = (
                "but a stage cannot start from itself"
                if after == stage_name
                else f"which names no stage.{did_you_mean(str(after), names)} Stages: {', '.join(names)}"
                if isinstance(after, str)
                else "but it must name one stage"
            )
            raise SpecError(f"{path}: key '{where}.after' has the value {after!r}, {why}.")
        _strings(body.get("overrides"), path, where + ".overrides")

    common_cli, per_stage_cli = _split_cli(overrides, names)
    for ov in common_cli:  # `orch submit PIPELINE executor=local` picks the pipeline's executor
        if ov.split("=", 1)[0].strip() == "executor":
            executor = ov.split("=", 1)[1].strip()
            if executor not in ("auto", "local", "slurm"):
                raise SpecError(
                    f"command line override {ov!r}: key 'executor' has the value {executor!r}, "
                    "but it must be one of auto, local, slurm."
                )
    result = []
    for stage_name in _order(stages, path):
        body = stages[stage_name]
        job = _find_job(body["job"], path)
        if job is None:
            raise SpecError(
                f"{path}: key 'stages.{stage_name}.job' has the value {body['job']!r}, but no such job "
                f"file exists (looked in {Path(path).resolve().parent} and {Path.cwd()})."
            )
        stage_overrides = [*common_file, *(body.get("overrides") or []), *common_cli, *per_stage_cli[stage_name]]
        after = body.get("after")
        from_parent = after is not None and next(s.cfg for s in result if s.name == after).kind != "data"
        try:
            cfg = load_spec(
                job,
                stage_overrides,
                launch=True,
                find_run=find_run,
                set_later=("checkpoint.init_from",) if from_parent else (),  # orchestrator/pipelines.py sets it
            )
        except SpecError as e:
            raise SpecError(f"{path}, stage '{stage_name}': {e}") from None
        result.append(Stage(stage_name, job, body.get("after"), stage_overrides, cfg))
    return Pipeline(path, name, executor, result)
