"""Running model-generated code (the eval job's `passes` checks): never in our folder, never unbounded.

Every candidate program runs in a fresh interpreter (`python -I`, the program read from stdin) with an empty
environment, in a new empty working folder, with resource limits (CPU seconds, address space, file size, open
files, no core dumps, a process count), in a process group of its own that is killed (SIGKILL) at the timeout,
when its output passes `Limits.output_bytes` (we read no further), and again when it returns. Where the kernel
allows it (root, or unprivileged user namespaces), it also runs in namespaces of its own (`unshare`):
  - a PID namespace with a fresh /proc: it sees only its own processes, and when its first process dies,
    every process it started dies with it, even one that left the process group (setsid);
  - a network namespace with no interface up: no network at all;
  - a mount namespace whose root is a new tmpfs holding only what Python needs, bound read-only (/usr, the
    /bin, /lib... links or folders, the interpreter's prefix, /dev/null, zero, random, urandom); the host's
    tree is unmounted (pivot_root), so our checkout, home and run folders are not there at all; every mount
    is read-only but the working folder (a 64 MiB tmpfs) and /proc;
  - as nobody (uid 65534) where we are root, with no capabilities: it cannot remount anything writable.
`isolation()` says which level this machine gives; docs/eval.md says what holds at each. `passes()` counts a
test as passed only when a random token, written after the test, comes out: a program that exits 0 before its
test ran (sys.exit(0), os._exit(0)) fails.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Inside the namespaces, as root of the mount namespace: $1 the new root (an empty folder), $2 the interpreter,
# $3 the working folder (the same path as outside, which the host deletes afterwards), $4 the user switch for
# setpriv, then further folders Python needs (its prefix when outside /usr). The program comes on stdin.
INSIDE = r"""set -eu
root=$1 python=$2 work=$3 user=$4
shift 4
mount -t tmpfs -o size=1m,mode=755 sandbox "$root"
mkdir -p "$root/proc" "$root/dev" "$root/.old" "$root$work"
for path in /usr /bin /sbin /lib /lib32 /lib64 /libx32 "$@"; do
    if [ -L "$path" ]; then ln -s "$(readlink "$path")" "$root$path"
    elif [ -d "$path" ]; then mkdir -p "$root$path"; mount --bind "$path" "$root$path"; fi
done
for dev in null zero random urandom; do
    touch "$root/dev/$dev"; mount --bind "/dev/$dev" "$root/dev/$dev"
done
mount -t tmpfs -o size=64m,mode=1777 work "$root$work"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
cd "$root"
pivot_root . .old
cd /
umount -l /.old
rmdir /.old
for m in $(cut -d' ' -f5 /proc/self/mountinfo); do
    if [ "$m" != "$work" ] && [ "$m" != /proc ]; then mount -o remount,bind,ro,nosuid "$m"; fi
done
cd "$work"
exec setpriv $user --bounding-set=-all --inh-caps=-all --no-new-privs env -i "$python" -I -
"""
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
NOBODY = "--reuid=65534 --regid=65534 --clear-groups"


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 64
    output_bytes: int = 1 << 20  # stdout + stderr held; past it the program is killed


@dataclass(frozen=True)
class Outcome:
    returncode: int  # negative: killed by that signal (-9 at the timeout or past the output limit)
    timed_out: bool
    stdout: bytes
    stderr: bytes
    output_capped: bool = False  # it wrote more than Limits.output_bytes: killed, the rest unread


def _python() -> tuple[str, list[str]]:
    """The base interpreter (not our virtualenv's, which lives in the checkout) and the folders it needs
    beyond the system's."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    inside = any(prefix == s or prefix.startswith(s + "/") for s in map(os.path.realpath, SYSTEM) if os.path.isdir(s))
    return python, [] if inside else [prefix]


def _unshare() -> list[str]:
    command = ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount"]
    return command if os.geteuid() == 0 else [command[0], "--user", "--map-root-user", *command[1:]]


def _inside_argv(folder: str) -> list[str]:
    python, extra = _python()
    os.mkdir(os.path.join(folder, "root"))
    user = NOBODY if os.geteuid() == 0 else ""  # a user namespace maps only our own uid
    return [*_unshare(), "sh", "-c", INSIDE, "sh", os.path.join(folder, "root"), python, folder, user, *extra]


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' (PID, network and mount namespaces, a fresh /proc, only Python's files, read-only, plus
    everything below) or 'limits' (an empty environment, resource limits, a temporary working folder, capped
    output). The namespace level is used only when the whole setup runs here: we try it once."""
    try:
        probe = run_untrusted("import os; print(os.getpid())", timeout_s=30, namespaces=True)
    except OSError:
        return "limits"
    return "namespaces" if probe.returncode == 0 and probe.stdout.strip() == b"1" else "limits"


def _limit(limits: Limits) -> None:
    """In the child, before exec: the limits, inherited by everything it starts."""
    for which, value in (
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, limits.processes),
    ):
        resource.setrlimit(which, (value, value))


def run_untrusted(
    program: str, timeout_s: float = 10.0, limits: Limits = Limits(), namespaces: bool | None = None
) -> Outcome:
    """Run a Python program confined as described above; its exit status and (at most limits.output_bytes of)
    its output. namespaces: None = whatever isolation() found here; False = the 'limits' level."""
    if namespaces is None:
        namespaces = isolation() == "namespaces"
    with tempfile.TemporaryDirectory(prefix="orch-candidate-") as folder:
        if namespaces:  # the setup needs a PATH; the program gets none (env -i)
            argv, env = _inside_argv(folder), {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        else:
            argv, env = [_python()[0], "-I", "-"], {}
        proc = subprocess.Popen(
            argv,
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _limit(limits),
        )
        try:
            out, err, timed_out, capped = _exchange(proc, program.encode(), timeout_s, limits.output_bytes)
        finally:
            _kill_group(proc.pid)  # at the timeout, past the output limit, or whatever it left in its group
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
        return Outcome(proc.returncode, timed_out, out, err, capped)


def _exchange(proc: subprocess.Popen, program: bytes, timeout_s: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Write the program to stdin and read stdout and stderr until both close, the deadline, or cap bytes in
    all (no more is ever held). Returns (stdout, stderr, timed out, capped)."""
    deadline = time.monotonic() + timeout_s
    held = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total, pending = 0, memoryview(program)
    os.set_blocking(proc.stdin.fileno(), False)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        for f in held:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(held[proc.stdout]), bytes(held[proc.stderr]), True, False
            for key, _ in sel.select(left):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pending = pending[os.write(f.fileno(), pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it stopped reading: its own business
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 65536)
                if not chunk:
                    sel.unregister(f)
                    continue
                held[f] += chunk[: cap - total]
                total += len(chunk)
                if total > cap:
                    return bytes(held[proc.stdout]), bytes(held[proc.stderr]), False, True
    return bytes(held[proc.stdout]), bytes(held[proc.stderr]), False, False


def passes(program: str, timeout_s: float = 10.0) -> bool:
    """Run a program (the candidate and its test) confined: True only if it exits 0 within the time limit
    and the random token written after the test comes out (so the test ran to its end)."""
    token = secrets.token_hex(16)
    ending = f"\n\nimport os as _orch_os\n_orch_os.write(1, b'\\n{token}\\n')\n"
    outcome = run_untrusted(program + ending, timeout_s)
    return (
        outcome.returncode == 0
        and not outcome.timed_out
        and not outcome.output_capped
        and token.encode() in outcome.stdout.splitlines()
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
