"""Where a run's wall time went, across all its attempts: <run folder>/goodput.json, rewritten (atomically) at every
logged step and at the end, so a killed attempt keeps its accounting up to its last log.

The buckets follow Meta's effective training time ratio (Llama 3: productive time over wall time, recomputed steps
and restarts excluded) and split an attempt's wall time (its process start to its last record) into:
    productive   training steps that moved the run past any step reached before
    lost         steps trained again after an interruption (the work since the last checkpoint, recomputed)
    checkpoint   the training thread waiting on saves
    validation   validation and evaluation passes
    restart      process start to the first step: imports, data, model build, checkpoint load, compiling
    other        the rest of the attempt (shutdown, logging)
and, between attempts, `interrupted`: from an attempt's last record to the next one's process start (the work a
killed attempt did after its last record, and the wait for its restart). goodput = productive / wall.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from jobspec import atomic
from jobspec.contract import RunFolder

BUCKETS = ("productive", "lost", "checkpoint", "validation", "restart", "other")


def process_started_at() -> float:
    """This process's start on the wall clock: its start in clock ticks since boot (/proc/self/stat) against the
    time since boot now (CLOCK_BOOTTIME), to a tick; /proc/stat's boot time is whole seconds, too coarse to
    split a restart from the attempt before it. Now, where /proc can't say."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def summarize(attempts: list[dict]) -> dict:
    """The run's totals: each bucket summed over attempts, the gaps between them, wall time and goodput."""
    totals = {b: sum(a["buckets"].get(b, 0.0) for a in attempts) for b in BUCKETS}
    totals["interrupted"] = sum(
        max(0.0, later["start"] - earlier["last"]) for earlier, later in zip(attempts, attempts[1:])
    )
    wall = attempts[-1]["last"] - attempts[0]["start"] if attempts else 0.0
    return {
        "wall_s": round(wall, 3),
        "buckets_s": {k: round(v, 3) for k, v in totals.items()},
        "goodput": round(totals["productive"] / wall, 4) if wall > 0 else None,
        "attempts": len(attempts),
        "lost_steps": sum(a.get("lost_steps", 0) for a in attempts),
    }


class Goodput:
    """Rank 0's account of this attempt, appended to the run's earlier ones."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled = RunFolder(run_dir).goodput, enabled
        earlier = self._read() if enabled else {}
        self.attempts: list[dict] = earlier.get("per_attempt", [])
        self.reached = max((a.get("reached_step", 0) for a in self.attempts), default=0)  # before this attempt
        self.now = {
            "start": process_started_at(),
            "last": time.time(),
            "buckets": dict.fromkeys(BUCKETS, 0.0),
            "lost_steps": 0,
            "reached_step": self.reached,
        }
        self.attempts.append(self.now)
        self._step_started: Optional[float] = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or written by a version without per-attempt records
            return {}

    def training_starts(self) -> None:
        """The first step is about to run: everything since the process started was restart cost."""
        self.now["buckets"]["restart"] = time.time() - self.now["start"]

    @contextmanager
    def timing(self, bucket: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.now["buckets"][bucket] += time.perf_counter() - start

    def step_done(self, step: int, seconds: float) -> None:
        """A step that ended at `step`: productive, or lost work when an earlier attempt had already reached it."""
        if step <= self.reached:
            self.now["buckets"]["lost"] += seconds
            self.now["lost_steps"] += 1
        else:
            self.now["buckets"]["productive"] += seconds
        self.now["reached_step"] = max(self.now["reached_step"], step)

    def flush(self) -> None:
        if not self.enabled:
            return
        self.now["last"] = time.time()
        b = self.now["buckets"]
        b["other"] = 0.0
        b["other"] = max(0.0, (self.now["last"] - self.now["start"]) - sum(b.values()))
        record = {**summarize(self.attempts), "per_attempt": self.attempts}
        atomic.write_json(self.path, record)
