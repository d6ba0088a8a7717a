"""Follow many metrics.jsonl files cheaply: each refresh reads only the bytes appended since the last one.

A `MetricsTail` keeps, per file, the byte offset it has read up to and a small summary of what it saw
(the newest value of every key, the last few losses for the sparkline). A half-written last line is
left for the next refresh. A file that shrank (a run folder reused) is read again from the start.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

SPARK_POINTS = 24


@dataclass
class MetricsSummary:
    latest: dict = field(default_factory=dict)  # newest value of every key seen (train and val records)
    last_train: dict = field(default_factory=dict)  # the newest record that has a training loss
    losses: deque = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    offset: int = 0
    inode: Optional[int] = None


class MetricsTail:
    def __init__(self):
        self.files: dict[str, MetricsSummary] = {}

    def read(self, path: str) -> MetricsSummary:
        summary = self.files.setdefault(path, MetricsSummary())
        try:
            stat = os.stat(path)
        except OSError:
            return summary
        if stat.st_size < summary.offset or (summary.inode is not None and stat.st_ino != summary.inode):
            self.files[path] = summary = MetricsSummary()  # rewritten: start over
        summary.inode = stat.st_ino
        if stat.st_size == summary.offset:
            return summary
        with open(path, "rb") as f:
            f.seek(summary.offset)
            chunk = f.read(stat.st_size - summary.offset)
        end = chunk.rfind(b"\n") + 1  # whole lines only; a partial one waits for the next refresh
        summary.offset += end
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a corrupt line costs one point, not the dashboard
            if not isinstance(record, dict):
                continue
            summary.latest.update(record)
            if isinstance(record.get("loss"), (int, float)):
                summary.last_train = record
                summary.losses.append(float(record["loss"]))
        return summary
