"""Running model-generated code (the eval job's `passes` checks): never in our folder, never unbounded.

Every candidate program runs in a fresh interpreter (`python -I`: no environment variables, no user site,
not our folder on sys.path), in a new empty working folder, with resource limits (CPU seconds, address space,
file size, open files, no core dumps, a process count) and in a process group of its own that is killed
(SIGKILL) at the timeout and again when it returns. Where the kernel allows it (root, or unprivileged user
namespaces), it also runs in namespaces of its own (`unshare`):
  - a PID namespace: when the candidate's first process dies, every process it started dies with it, even
    one that left the process group (setsid);
  - a network namespace with no interface up: no network at all;
  - a mount namespace whose root file system is remounted read-only, with a small tmpfs as the only
    writable folder (the working folder).
`isolation()` says which level this machine gives; the eval job records it in eval.json, docs/eval.md
explains it. Root ignores the process-count limit: there, the namespaces and the timeout bound a fork bomb.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Inside the namespaces: the whole tree read-only, a tmpfs as the only writable place, the program from stdin.
INSIDE = """set -e
mount -o remount,bind,ro /
mount -t tmpfs -o size=64m,mode=700 tmpfs "$1"
cd "$1"
cat > candidate.py
exec "$2" -I candidate.py < /dev/null
"""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 64


@dataclass(frozen=True)
class Outcome:
    returncode: int  # negative: killed by that signal (-9 at the timeout)
    timed_out: bool
    stdout: bytes
    stderr: bytes


def _namespaces() -> list[str]:
    """The unshare command that gives PID, network and mount namespaces here, or [] when none can be made."""
    if shutil.which("unshare") is None:
        return []
    command = ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount"]
    if os.geteuid() != 0:
        command[1:1] = ["--user", "--map-root-user"]
    try:
        probe = subprocess.run([*command, "sh", "-c", "mount -o remount,bind,ro / && mount -t tmpfs tmpfs /mnt"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return command if probe.returncode == 0 else []


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' (PID, network, read-only mounts, plus limits) or 'limits' (resource limits and a
    temporary working folder only)."""
    return "namespaces" if _namespaces() else "limits"


@functools.lru_cache(maxsize=1)
def _prefix() -> tuple[str, ...]:
    return tuple(_namespaces())


def _limit(limits: Limits) -> None:
    """In the child, before exec: the limits, inherited by everything it starts."""
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits.processes)):
        resource.setrlimit(which, (value, value))


def run_untrusted(program: str, timeout_s: float = 10.0, limits: Limits = Limits()) -> Outcome:
    """Run a Python program confined as described above; its exit status and output."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="orch-candidate-") as folder:
        env.update(HOME=folder, TMPDIR=folder)
        prefix = _prefix()
        if prefix:
            argv, stdin = [*prefix, "sh", "-c", INSIDE, "sh", folder, sys.executable], program.encode()
        else:
            with open(os.path.join(folder, "candidate.py"), "w", encoding="utf-8") as f:
                f.write(program)
            argv, stdin = [sys.executable, "-I", "candidate.py"], b""
        proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=lambda: _limit(limits))
        timed_out = False
        try:
            out, err = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        _kill_group(proc.pid)  # whatever it left running in its group
        return Outcome(proc.returncode, timed_out, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
