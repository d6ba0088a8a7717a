"""Where a job starts from: `checkpoint.init_from` and `eval.source`, checked and resolved to a path at submit.

Each accepts a run folder, one of its checkpoint folders (checkpoints/step_N), a Hugging Face folder, or a run
name: `pretrain` is the newest COMPLETED run of that name, `pretrain-3f2a1c` is that run. Names live in the run
registry, which the control plane owns: it passes `find_run` (orchestrator/run_names.py), and the path found is
what the run's config.yaml holds, so the nodes never look a name up. Without `find_run` (a trainer started by
hand) a name is an error that says to submit with orch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from jobspec.contract import CHECKPOINTS, checkpoint_step
from jobspec.checks import NAME

KEYS = ("checkpoint.init_from", "eval.source")
MANIFEST = "manifest.json"  # a committed checkpoint's list of files (training/checkpoint.py writes it last)

# name -> the run folder it means; raises LookupError whose message says what was looked for and the nearest runs
FindRun = Callable[[str], str]


def is_run_name(value: str) -> bool:
    """A value that names a run rather than a folder: a bare name (no path separator) that is not a folder here."""
    return "/" not in value and NAME.fullmatch(value) is not None and not Path(value).exists()


def missing_model(folder: Path) -> Optional[str]:
    """None when the folder holds something to start from (a committed checkpoint, or a Hugging Face config.json
    with safetensors weights); else what it lacks, in a phrase."""
    if not folder.is_dir():
        return "no such folder exists"
    if (folder / "config.json").is_file():
        if any(folder.glob("*.safetensors")):
            return None
        return "it is a Hugging Face folder (config.json) without *.safetensors weights"
    if (folder / MANIFEST).is_file():
        return None  # a checkpoint folder
    steps = [p for p in (folder / CHECKPOINTS).glob("*") if checkpoint_step(p.name) is not None]
    if any((p / MANIFEST).is_file() for p in steps):
        return None  # a run folder with a committed checkpoint (the trainer verifies its files when it loads)
    if steps or (folder / CHECKPOINTS).is_dir():
        return f"it holds no committed checkpoint ({folder / CHECKPOINTS} has no step_N folder with {MANIFEST})"
    return (
        "it is neither a run folder (no checkpoints/), a checkpoint folder (no manifest.json) nor a Hugging Face "
        "folder (no config.json)"
    )


def resolve_starting_points(cfg, bad, find_run: Optional[FindRun], skip: tuple[str, ...] = ()) -> None:
    """Check each starting point the job names and write a run name's folder in its place. `bad(key, why)` builds
    the SpecError; keys in `skip` are set later by whoever submits (a pipeline stage's `after:`)."""
    for key in KEYS:
        section, name = key.split(".")
        if key in skip or section not in cfg or not cfg[section][name]:
            continue
        value = str(cfg[section][name])
        if is_run_name(value):
            if find_run is None:
                raise bad(
                    key,
                    "which names a run: give its folder here (run names are looked up in the run registry by "
                    "`orch submit` and `orch config`)",
                )
            try:
                value = find_run(value)
            except LookupError as e:
                raise bad(key, str(e).rstrip(".")) from None
            cfg[section][name] = value
        problem = missing_model(Path(value))
        if problem is not None:
            raise bad(
                key,
                f"but {problem}. Give a run folder, a checkpoint folder, a Hugging Face folder or a run name "
                "(`pretrain` = its newest COMPLETED run, `pretrain-3f2a1c` = that run; `orch runs` lists them)",
            )
