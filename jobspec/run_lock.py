"""One trainer per run folder: a lock on `<run>/.lock` (flock), held for the trainer's whole life.

Rank 0 takes it exclusively before touching the folder, which refuses a second trainer, then turns it into a
shared lock; every other node's local rank 0 then takes it shared too, so the folder stays held until the
trainer's processes on every node are gone (a lost rank 0 does not free it while another node still writes).
The kernel drops a process's lock when it dies, however it dies, so a killed trainer never leaves a stale lock.
The file also says who holds it (host, pid, the pid's start time, since when), so that `orch` can name the
holder, and signal it only if that pid is still the same process. The control plane asks `holder()` (a
non-blocking probe that changes nothing; an acquire that meets the probe's instant tries again).

The lock must hold across the nodes that share the run folder: a file system without flock (ENOSYS, ENOLCK)
is refused with a sentence saying so (docs/reliability.md), not retried.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from jobspec.contract import RunFolder
from jobspec.faults import fault
from jobspec.processes import process_start

# holder()'s probe holds the lock for an instant, and an acquire that meets it would be refused: each acquire
# tries again for this long before refusing.
ACQUIRE_RETRY_S = 2.0
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class LockUnsupported(RuntimeError):
    """The file system holding the run folder refuses flock."""


def _flock(fd: int, path: Path, operation: int) -> bool:
    """flock(fd, operation | LOCK_NB), tried again for ACQUIRE_RETRY_S; False if still refused."""
    deadline = time.monotonic() + ACQUIRE_RETRY_S
    while True:
        try:
            fault("run_lock.flock")
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)  # a probe holds it for microseconds; a trainer holds it for hours
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            raise LockUnsupported(
                f"{path}: the file system holding the run folder does not support flock ({errno.errorcode[e.errno]}: "
                f"{e.strerror}). orch takes an flock there so that one run folder has one trainer, on every node "
                "that shares it (docs/reliability.md): mount it with locks that work across nodes (NFS without "
                "`nolock`, Lustre with `flock`), or put runs_dir on a file system that has them."
            ) from None


class RunLock:
    """`with RunLock(run_dir):` holds the lock; RunFolderBusy (naming the holder) if another process has it."""

    def __init__(self, run_dir: str | Path):
        self.path = RunFolder(run_dir).lock
        self._fd: Optional[int] = None

    def _busy(self) -> RunFolderBusy:
        return RunFolderBusy(
            f"{self.path.parent} is in use by another trainer ({describe(holder(self.path.parent))}): "
            "one run folder takes one trainer at a time. Wait for it to stop "
            "(`orch cancel` stops it after a checkpoint), then resume."
        )

    def _open(self, operation: int) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock(fd, self.path, operation):
                raise self._busy()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def acquire(self) -> "RunLock":
        """The trainer's rank 0: refused (RunFolderBusy) while any process of another trainer holds the folder."""
        fd = self._open(fcntl.LOCK_EX)
        try:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": process_start(os.getpid()),
                "since": time.time(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            # Shared from now on, so that the other nodes can hold it with us (join); a second trainer's exclusive
            # acquire is still refused. flock may release before it converts: then a probe, or another trainer,
            # got in first.
            if not _flock(fd, self.path, fcntl.LOCK_SH):
                raise self._busy()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def join(self) -> "RunLock":
        """Every other node's local rank 0, once rank 0 holds the lock: holds the folder with it."""
        self._fd = self._open(fcntl.LOCK_SH)
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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a trainer holds it shared (see RunLock.acquire)
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
