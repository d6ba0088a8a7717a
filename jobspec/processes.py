"""Process identity: a pid plus its start time names one process, so a pid the kernel reused is never
mistaken for (or signalled as) the process that once had it."""

from __future__ import annotations

import os
import socket
from typing import Optional


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing ')'
    return stat[stat.rindex(")") + 2 :].split()


def process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if no such process."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def same_process(pid: Optional[int], start: Optional[str], host: Optional[str] = None) -> Optional[bool]:
    """True while that very process runs, False once it is gone (or a zombie); None when it runs on another
    host, which this machine can't tell."""
    if not pid:
        return False
    if host and host != socket.gethostname():
        return None
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return start is None or fields[19] == start


def this_process() -> dict:
    """This process's identity as the registry records an owner: pid, pid_start, host."""
    return {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": socket.gethostname()}


def signal_process(pid: Optional[int], start: Optional[str], sig: int) -> bool:
    """Send `sig` to the process only if it is still the same process; True if sent."""
    if not same_process(pid, start):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
