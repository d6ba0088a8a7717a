"""Experiment trackers beside metrics.jsonl: every numeric scalar a run logs goes to each backend of
`logging.backends` (jsonl, the run's own record, is always on).

TensorBoard writes event files to <run folder>/tensorboard, so `tensorboard --logdir runs/` shows every run and a
pipeline's stages side by side (their folders share the pipeline id). A resumed or requeued run continues the
same folder; the steps it computes again after its last checkpoint are not shown twice: the writer opens at the
first step this process logs with `purge_step` = that step, and TensorBoard's readers drop what an earlier process
wrote from that step on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from jobspec import SpecError


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...  # one metrics.jsonl record: {"step": N, "loss": ..., ...}

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, as a tracker plots them (time and step are the axes, flags are not curves)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


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


def open_trackers(run_dir: Path, backends: list[str], config_yaml: str) -> list[Tracker]:
    """The trackers of `logging.backends` besides jsonl (which MetricsLogger writes itself)."""
    trackers: list[Tracker] = []
    for name in backends:
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise SpecError(
                    "logging.backends names tensorboard, but the tensorboard package is not installed "
                    "where the job runs: pip install tensorboard (or orch[tensorboard]) there"
                )
            trackers.append(TensorBoardTracker(run_dir, config_yaml))
    return trackers
