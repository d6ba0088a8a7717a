"""Registering a run: its id, its folder with config.yaml, and its registry row (state PENDING).

`orch submit` registers one run, a pipeline one per stage; an executor then starts them.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from jobspec.contract import RunFolder
from jobspec.faults import fault
from jobspec.processes import this_process
from jobspec.loading import save_config
from orchestrator import code_snapshot
from orchestrator.registry import Registry, Run, now


def new_run_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def run_folder(cfg: DictConfig, run_id: str) -> Path:
    return (Path(cfg.runs_dir) / run_id).resolve()


def register_run(
    registry: Registry,
    cfg: DictConfig,
    executor: str,
    run_id: Optional[str] = None,
    *,
    pipeline_id: Optional[str] = None,
    stage: Optional[str] = None,
    depends_on: Optional[str] = None,
) -> Run:
    """Create the run folder (it must not exist), write its config.yaml, add the PENDING row. A run of its own is
    owned by this process until its executor starts it: if we die first, `orch runs` shows it LOST, not PENDING
    forever (a pipeline's stages are its supervisor's, named by the pipeline's pid file)."""
    run_id = run_id or new_run_id(cfg.name)
    folder = RunFolder(run_folder(cfg, run_id))
    folder.path.mkdir(parents=True)
    save_config(cfg, folder.config)
    code_snapshot.for_submit(cfg, str(folder.path))  # resources.code: the code its processes will run
    fault("submit.run_folder")
    run = Run(
        id=run_id,
        name=cfg.name,
        kind=cfg.kind,
        executor=executor,
        state="PENDING",
        run_dir=str(folder.path),
        created_at=now(),
        pipeline_id=pipeline_id,
        stage=stage,
        depends_on=depends_on,
        **({} if pipeline_id else this_process()),
    )
    registry.add(run)
    return run
