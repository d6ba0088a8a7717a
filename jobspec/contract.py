"""The contract between the planes: what a run folder holds and what the trainer's exit codes mean.

The control plane (orchestrator/) writes a run folder and launches the trainer on it; the data plane
(training/) fills it and exits with one of the codes below; the control plane then reads both. This file
is the one place where either side learns those names and numbers.

    <runs_dir>/<run id>/
        config.yaml          the resolved job config (written once, atomically, before the trainer starts)
        model.json           the model's shape as trained (post-training takes its source's), by the trainer
        tokenizer.json       the tokenizer the run trained with, copied in by the trainer
        metrics.jsonl        one JSON object per logged step (loss, lr, validation, ...), by rank 0
        summary.json         the final step, checkpoint and validation numbers, by rank 0 at the end
        goodput.json         where the run's wall time went, attempt by attempt (training/goodput.py)
        trackers.json        each experiment tracker's run id and last logged step: a resumed run continues them
        checkpoints/step_NNNNNNNN/   committed checkpoints (training/checkpoint.py)
        logs/train.log       the trainer's output (local executor)
        logs/user_error.txt  written when the trainer stops on a user error: executors must not retry
        logs/trainer_exit.txt  rank 0's exit code, written as it returns (torchrun reports any failure as 1)
        logs/traceback.txt   the traceback of an unexpected exception (exit 1; other ranks: traceback_rankN.txt)
        logs/save_seconds.txt  the longest checkpoint save of the trainer's last run, in seconds: launchers size the
                             time between their stop signal and SIGKILL by it (stop_grace_s)
        .lock                held (flock) by the trainer for its whole life: one trainer per run folder
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

# Exit codes of `python -m training.main`.
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception (a bug, a flaky node): retried per resources.max_retries
EXIT_USER_ERROR = 2  # a bad config, bad data, no valid checkpoint, a run folder in use: retrying won't help
EXIT_REQUEUE = 3  # stopped by a signal (preemption, time limit, cancel) after saving a checkpoint: requeue


class UserError(Exception):
    """A job that can't run as given (its config, its data, where it starts from), found by a check that says so in
    one sentence for the user: the trainer exits EXIT_USER_ERROR and executors never retry it. Any other exception
    is a bug: EXIT_BUG, retried."""


CONFIG = "config.yaml"
MODEL = "model.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
GOODPUT = "goodput.json"  # where the run's wall time went, by attempt (training/goodput.py)
TRACKERS = "trackers.json"  # W&B's and MLflow's run ids and last logged steps (training/tracker_state.py)
CHECKPOINTS = "checkpoints"
LOGS = "logs"
TRAIN_LOG = "train.log"
USER_ERROR = "user_error.txt"
TRAINER_EXIT = "trainer_exit.txt"
SAVE_SECONDS = "save_seconds.txt"
LOCK = ".lock"
CHECKPOINT_PREFIX = "step_"
# A data run (kind: data): the cleaned corpus (train/ and val/ .jsonl, what a pretrain stage after it reads) and,
# in a pipeline, where the stages after it tokenize that corpus (their data.dir).
CURATED_CORPUS = "corpus"
TOKENIZED = "tokenized"


class RunFolder:
    """Paths inside one run folder. Pure path arithmetic: nothing is read or created."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def goodput(self) -> Path:
        return self.path / GOODPUT

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def train_log(self) -> Path:
        return self.logs / TRAIN_LOG

    @property
    def user_error(self) -> Path:
        return self.logs / USER_ERROR

    @property
    def trainer_exit(self) -> Path:
        return self.logs / TRAINER_EXIT

    @property
    def save_seconds(self) -> Path:
        return self.logs / SAVE_SECONDS

    @property
    def lock(self) -> Path:
        return self.path / LOCK


# Below this much free space, a run folder's disk counts as full: a trainer that died there may not have had room
# to write logs/user_error.txt, and a restart would only fail again.
DISK_FULL_BYTES = 1 << 20


def disk_full(path: str | Path) -> Optional[str]:
    """A sentence saying the file system holding `path` is full, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= DISK_FULL_BYTES:
        return None
    return (
        f"the disk holding {path} is full ({free} bytes free): the trainer could not write there. Free space "
        "(or lower checkpoint.keep_last), then resume; its checkpoints are untouched"
    )


def user_error(folder: RunFolder) -> Optional[str]:
    """Why the trainer stopped on an error that retrying can't fix, or None: its own sentence in logs/user_error.txt,
    else a full disk (where the trainer may have had no room to write that sentence). The executors ask this after
    an attempt fails, and don't retry when it answers."""
    try:
        said = folder.user_error.read_text().strip()
    except OSError:
        said = None
    if said:
        return said
    full = disk_full(folder.path)
    if full or said is None:
        return full
    return f"the trainer stopped on a user error but {folder.user_error} is empty; see {folder.logs}"


def trainer_exit(folder: RunFolder) -> Optional[int]:
    """The exit code rank 0 of the trainer recorded as it returned; None if it did not (killed, crashed)."""
    try:
        return int(folder.trainer_exit.read_text().strip())
    except (OSError, ValueError):
        return None


# torchrun's own wait between SIGTERM and SIGKILL: enough for a small model's save, used until one is timed.
STOP_GRACE_S = 30


def save_seconds(folder: RunFolder) -> Optional[float]:
    """The longest checkpoint save the trainer timed in this folder (logs/save_seconds.txt), or None."""
    try:
        saved = float(folder.save_seconds.read_text())
    except (OSError, ValueError):
        return None
    return saved if math.isfinite(saved) and saved >= 0 else None


def stop_grace_s(folder: RunFolder, untimed: int = STOP_GRACE_S) -> int:
    """How long a launcher should wait after its stop signal before SIGKILL: STOP_GRACE_S for the step under way,
    plus twice the longest save the trainer timed in this folder (a background save may be in flight when the
    stop comes, and the stop's own save follows it); `untimed` while no save has been timed."""
    saved = save_seconds(folder)
    return untimed if saved is None else STOP_GRACE_S + math.ceil(2 * saved)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a committed checkpoint folder's name (step_00000100 -> 100); None for any other name,
    so that a user's `step_00000100.bak` is never taken for one of ours."""
    digits = name[len(CHECKPOINT_PREFIX) :]
    if not name.startswith(CHECKPOINT_PREFIX) or len(digits) < 8 or not digits.isdigit():
        return None
    return int(digits)
