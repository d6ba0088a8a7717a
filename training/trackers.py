"""Experiment trackers beside metrics.jsonl: every numeric scalar a run logs goes to each backend of
`logging.backends` (jsonl, the run's own record, is always on).

TensorBoard writes event files to <run folder>/tensorboard, so `tensorboard --logdir runs/` shows every run and a
pipeline's stages side by side (their folders share the pipeline id). A resumed or requeued run continues the
same folder; the steps it computes again after its last checkpoint are not shown twice: the writer opens at the
first step this process logs with `purge_step` = that step, and TensorBoard's readers drop what an earlier process
wrote from that step on.

W&B (training/tracker_wandb.py) and MLflow (training/tracker_mlflow.py) get the same numbers, the resolved config
as hyperparameters and, from an eval job, its metrics; their run ids are kept in the run folder (trackers.json,
training/tracker_state.py) so that a resumed run continues the same tracker run. They are optional extras:
pip install orch[wandb] or orch[mlflow] where the job runs.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Protocol

import yaml

from jobspec import SpecError
from training.tracker_state import scalars


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...  # one metrics.jsonl record: {"step": N, "loss": ..., ...}

    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config_yaml: str):
        self.folder = run_dir / "tensorboard"
        self.config_yaml = config_yaml
        self.writer = None  # opened at the first record, once the first step of this process is known

    def log(self, record: dict) -> None:
        step = record["step"]
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=step)
            self.writer.add_text("config", f"```yaml\n{self.config_yaml}\n```", global_step=step)
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step, walltime=record.get("time"))
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# backend: (its package, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def open_trackers(run_dir: Path, backends: list[str], config_yaml: str) -> list[Tracker]:
    """The trackers of `logging.backends` besides jsonl (which MetricsLogger writes itself)."""
    config = yaml.safe_load(config_yaml) or {}
    group = (config.get("logging") or {}).get("group")
    trackers: list[Tracker] = []
    for name in backends:
        if name not in PACKAGES:
            continue  # jsonl
        package, extra = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise SpecError(
                f"logging.backends names {name}, but the {package} package is not installed where the job runs: "
                f"pip install orch[{extra}] there"
            )
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, config_yaml))
        elif name == "wandb":
            from training.tracker_wandb import WandbTracker

            trackers.append(WandbTracker(run_dir, config, group))
        else:
            from training.tracker_mlflow import MlflowTracker

            trackers.append(MlflowTracker(run_dir, config, group))
    return trackers


def log_results(run_dir: Path, backends: list[str], config_yaml: str, metrics: dict, step: int = 0) -> None:
    """A job's final numbers (an eval job's metrics, named "<stage>/<set or task>/<metric>") to its trackers."""
    trackers = open_trackers(run_dir, backends, config_yaml)
    for tracker in trackers:
        tracker.log({"time": time.time(), "step": step, **metrics})
        tracker.close()
