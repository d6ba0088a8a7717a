"""One trainer per run folder: an exclusive lock on `<run>/.lock`, held for the trainer's whole life.

The trainer (rank 0) takes it before touching the folder; the kernel drops it when that process dies, however
it dies, so a killed trainer never leaves a stale lock. The file also says who holds it (host, pid, the pid's
start time, since when), so that `orch` can name the holder, and signal it only if that pid is still the
same process. The control plane asks `holder()` (a non-blocking probe that changes nothing).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from jobspec.contract import RunFolder
from jobspec.processes import process_start


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """`with RunLock(run_dir):` holds the lock; RunFolderBusy (naming the holder) if another process has it."""

    def __init__(self, run_dir: str | Path):
        self.path = RunFolder(run_dir).lock
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(self.path.parent)
            raise RunFolderBusy(f"{self.path.parent} is in use by another trainer ({describe(who)}): "
                                "one run folder takes one trainer at a time. Wait for it to stop "
                                "(`orch cancel` stops it after a checkpoint), then resume.") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock; the file stays (it is tiny)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: str | Path) -> Optional[dict]:
    """Who holds the run folder's lock ({host, pid, pid_start, since}), or None when nobody does."""
    path = RunFolder(run_dir).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: read who holds it
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(info: Optional[dict]) -> str:
    if not info:
        return "holder unknown"
    since = time.strftime("%H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"pid {info.get('pid')} on {info.get('host')}, since {since}"
