"""Which file system a path is on (from /proc/mounts), and what that means for orch's two locks:

- the registry (SQLite, in ORCH_HOME) needs POSIX locks and shared memory that work: SQLite's own documentation
  warns against network file systems, whose locks are often broken. `warn_if_shared` says so, once a process.
- one trainer per run folder (jobspec/run_lock.py) is an flock(2) on `<run>/.lock`. On a cluster a second trainer
  may start on another node, so that lock must hold across nodes. It does on NFS (emulated with byte-range locks
  through the server), Lustre mounted with `flock`, GPFS, CephFS; it holds on one node only on NFS mounted with
  `local_lock=flock|all` or `nolock`, Lustre with `localflock`, and BeeGFS unless its client sets
  `tuneUseGlobalFileLocks`; Lustre with `noflock` fails it with ENOSYS (a Lustre mount showing neither `flock`
  nor `localflock` may be either: older releases default to noflock). `flock_scope` reads that off the mount.

The mount table is the submitting machine's: a cluster normally mounts the shared file system alike on every node.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MOUNTS = "/proc/mounts"

# File systems whose files other machines share: what SQLite advises against for its database.
NETWORK = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "beegfs",
    "gpfs",
    "ceph",
    "glusterfs",
    "ocfs2",
    "gfs2",
    "afs",
    "9p",
    "orangefs",
    "pvfs2",
    "panfs",
    "wekafs",
    "davfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "fuse.ceph",
    "fuse.ceph-fuse",
    "fuse.juicefs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.rclone",
    "fuse.beegfs",
}


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: tuple[str, ...]

    def option(self, name: str) -> Optional[str]:
        """The option's value ("" for a flag), None when the mount does not have it."""
        for option in self.options:
            key, eq, value = option.partition("=")
            if key == name:
                return value if eq else ""
        return None

    def __str__(self) -> str:
        return f"{self.point} ({self.fstype}, {','.join(self.options)})"


def _unescape(field: str) -> str:
    """/proc/mounts writes a space, tab, newline and backslash in a path as \\040, \\011, \\012, \\134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            mounts.append(Mount(_unescape(parts[1]), parts[2], tuple(parts[3].split(","))))
    return mounts


def mount_of(path: str | Path, mounts_file: str = MOUNTS) -> Optional[Mount]:
    """The mount that holds `path` (which need not exist yet): the deepest mount point above it, the last one
    mounted there when several are stacked. None when the mount table can't be read (not Linux)."""
    try:
        table = parse_mounts(Path(mounts_file).read_text())
    except OSError:
        return None
    path = Path(path).resolve()
    best: Optional[Mount] = None
    for mount in table:
        point = Path(mount.point)
        deeper = best is None or len(point.parts) >= len(Path(best.point).parts)
        if (point == path or point in path.parents) and deeper:
            best = mount
    return best


def flock_scope(mount: Mount) -> tuple[str, str]:
    """How far an flock(2) taken on this mount reaches: ("cluster" | "node" | "none", why). Local disks say
    "cluster": the lock holds for every process that can see the folder at all."""
    kind = mount.fstype
    if kind in ("nfs", "nfs4"):
        if mount.option("nolock") is not None:
            return "node", "mounted with nolock, so locks stay on the node that takes them"
        if mount.option("local_lock") in ("flock", "all"):
            return "node", f"mounted with local_lock={mount.option('local_lock')}, so flock() stays on the node"
        return "cluster", "the NFS server holds flock() locks"
    if kind == "lustre":
        if mount.option("flock") is not None:
            return "cluster", "mounted with flock"
        if mount.option("localflock") is not None:
            return "node", "mounted with localflock, so flock() stays on the node"
        if mount.option("noflock") is not None:
            return "none", "mounted with noflock, so flock() fails with ENOSYS"
        return "node", "mounted with neither flock nor localflock, so flock() may fail (ENOSYS) or stay on the node"
    if kind == "ocfs2" and mount.option("localflocks") is not None:
        return "node", "mounted with localflocks, so flock() stays on the node"
    if kind in ("beegfs", "fuse.beegfs"):
        return "node", "BeeGFS keeps flock() on the node unless its client sets tuneUseGlobalFileLocks=true"
    return "cluster", f"{kind} locks are coherent"


_warned: set[str] = set()


def warn_if_shared(orch_home: Path, mounts_file: str = MOUNTS) -> Optional[str]:
    """Warn (once a process) when ORCH_HOME is on a network file system; returns the warning, or None."""
    mount = mount_of(orch_home, mounts_file)
    if mount is None or mount.fstype not in NETWORK or str(orch_home) in _warned:
        return None
    _warned.add(str(orch_home))
    message = (
        f"warning: ORCH_HOME={orch_home} is on {mount.point}, a {mount.fstype} file system: the run registry "
        "there is SQLite, whose locks network file systems often break (a corrupt registry, or orch commands "
        "failing with `database is locked`). Set ORCH_HOME to a folder on a local disk of the machine where "
        "you type orch commands (see docs/slurm.md); the run folders can stay on the shared file system."
    )
    print(message, file=sys.stderr)
    return message


def check_runs_dir(runs_dir: str, source: str, across_nodes: bool, mounts_file: str = MOUNTS) -> Optional[str]:
    """Before a run is registered: ValueError (exit 2) when the trainer's flock() would fail on runs_dir; when the
    run may start on another node (`across_nodes`) and that lock would hold on one node only, a warning (printed
    and returned). Nothing otherwise."""
    mount = mount_of(runs_dir, mounts_file)
    if mount is None:
        return None
    scope, why = flock_scope(mount)
    if scope == "none":
        raise ValueError(
            f"{source}: runs_dir={runs_dir!r} is on {mount.point}, {why}; each trainer takes an flock() "
            "on its run folder (one trainer per folder), so none could start. Put runs_dir on a file "
            "system with flock (Lustre: mount with -o flock) and submit again."
        )
    if scope == "node" and across_nodes:
        message = (
            f"warning: {source}: runs_dir={runs_dir!r} is on {mount.point} ({mount.fstype}), {why}: a trainer "
            "on one node would not see the run-folder lock of a trainer on another, so nothing but orch's "
            "own checks (it refuses `orch resume` while Slurm holds a job of the run) keeps two trainers off "
            "one folder. Prefer a file system whose flock holds across nodes (docs/slurm.md)."
        )
        print(message, file=sys.stderr)
        return message
    return None
