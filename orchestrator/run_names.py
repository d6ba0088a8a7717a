"""Run names, for job keys that take a run (jobspec/starting_points.py): `pretrain` is the newest COMPLETED run
named pretrain, `pretrain-3f2a1c` is that run, whatever its state (its folder is checked for a checkpoint next)."""

from __future__ import annotations

import difflib
from typing import Optional

from orchestrator import executors
from orchestrator.registry import Registry, orch_home

NEAREST = 5  # runs named in the error when a name finds none


def finder(registry: Optional[Registry] = None):
    """find_run(name) -> the run folder it names, or a LookupError saying what was looked for and the nearest runs.
    Without a registry, $ORCH_HOME's is opened when a name is first looked up (never created: `orch config` looks)."""

    def find_run(name: str) -> str:
        nonlocal registry
        if registry is None:
            path = orch_home() / "registry.db"
            if not path.is_file():
                raise LookupError(f"which names no run: no run is registered yet (no registry at {path})")
            registry = Registry(path)
        runs = registry.list()
        by_id = [r for r in runs if r.id == name]
        if by_id:
            return by_id[0].run_dir
        named = executors.observed(registry, [r for r in runs if r.name == name])  # Slurm's word on unfinished ones
        completed = [r for r in named if r.state == "COMPLETED"]  # newest first, as the registry lists them
        if completed:
            return completed[0].run_dir
        close = difflib.get_close_matches(name, list(dict.fromkeys([r.name for r in runs] + [r.id for r in runs])))
        near = [r for r in runs if (r.name in close or r.id in close) and r.name != name][:NEAREST]
        said = []
        if named:
            said.append(f"runs named {name!r}: {', '.join(f'{r.id} ({r.state})' for r in named[:NEAREST])}")
        if near:
            said.append(f"the nearest runs: {', '.join(f'{r.id} ({r.state})' for r in near)}")
        raise LookupError(
            f"which names no COMPLETED run in the registry {registry.path} (looked for a run named {name!r}, newest "
            f"COMPLETED first, or a run whose id is {name!r}); {'; '.join(said) or 'no run has a name near it'}"
        )

    return find_run
