"""Restartable tasks: each writes into a temporary folder and publishes it with one rename, a done marker inside.

A task whose folder exists has finished (a rename is atomic); anything else is redone from scratch, so a task
killed halfway (a preempted Slurm array task, a dead worker) leaves only a temporary folder that the next
attempt removes. ORCH_CURATE_STOP=STEP/INDEX kills the process right after that task publishes: the tests'
way to stop a run at a named point.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from jobspec import atomic
from training.data.curate.plan import curate_dir

DONE = "done.json"
STOP_ENV = "ORCH_CURATE_STOP"
STOP_EXIT = 17  # the exit status of a process stopped by ORCH_CURATE_STOP


def task_dir(run_dir: Path, step: str, index: Optional[int] = None) -> Path:
    base = curate_dir(run_dir) / step
    return base if index is None else base / f"{index:05d}"


def done_record(folder: Path) -> Optional[dict]:
    """The task's done marker (its summary), or None when it has not finished."""
    try:
        return json.loads((folder / DONE).read_text())
    except FileNotFoundError:
        return None


@contextmanager
def publishing(final: Path, summary: dict) -> Iterator[Path]:
    """Yields a fresh temporary folder; on success writes `summary` (filled in by the caller) as the done
    marker and renames the folder to `final`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ours: left by a killed process with this pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        summary.setdefault("finished_at", time.time())
        summary.setdefault("pid", os.getpid())
        write_json(tmp / DONE, summary)
        try:
            os.rename(tmp, final)
        except OSError:
            if done_record(final) is None:  # not another attempt of the same task publishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = f"{final.parent.name}/{final.name}" if final.name.isdigit() else final.name
    if os.environ.get(STOP_ENV) == name:
        print(f"[curate] stopping after {name} ({STOP_ENV})", flush=True)
        os._exit(STOP_EXIT)  # like a kill: no cleanup, no further tasks


def write_json(path: Path, value) -> None:
    atomic.write_json(path, value)


def append_progress(run_dir: Path, record: dict) -> None:
    """One metrics.jsonl line, as the trainer writes them: `step` is documents read, `max_steps` the total.
    One write() of a short line in append mode: whole even when array tasks on one file system append at once."""
    line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
    fd = os.open(Path(run_dir) / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
