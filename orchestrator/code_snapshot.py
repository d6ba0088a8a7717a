"""Code that travels with the job: at submit, a copy of the code orch runs, which the run's processes run.

    take(runs_dir)          -> Snapshot: the code, copied once into runs_dir/.code/<sha256>/ (content-addressed)
    record(run_dir, snap)   -> run_dir/code.json: the snapshot's folder, hash, commit and diff hash
    environment(run_dir)    -> the variables that make a process import the run's snapshot ({} for a live run)

What is copied: the packages and the data they find beside their own files (jobs/ holds the eval tasks and the
default job, slurm/ the local cluster's script), as NeMo-Run's packagers do. In a git checkout that is
`git ls-files -co --exclude-standard` under those folders (tracked files as they are now, uncommitted edits and
untracked-but-not-ignored files included); otherwise (an installed package, or a snapshot itself) every file
under them but caches. The snapshot's name is the sha256 of its files' names, modes and contents, so a second
submit of the same code reuses it; it is written into a temporary folder and renamed into place, so a reader
never sees half of one. Its files are read-only: nobody edits the code a run was submitted with.

A process imports the snapshot when PYTHONPATH names it first and PYTHONSAFEPATH=1 keeps `python -m` from
putting the current folder (perhaps the checkout) before it; the current folder itself does not change, so the
job's relative paths (data.dir, runs_dir) mean what they meant at submit. The local supervisor, its trainer, a
Slurm job's tasks and its requeue hook all run so; `orch resume` runs the run's snapshot again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from jobspec import atomic

ROOT = Path(__file__).resolve().parents[1]  # the code orch runs: a checkout, site-packages, or a snapshot
CODE_DIRS = ("jobspec", "model", "orchestrator", "training", "jobs", "slurm")
CACHE = ".code"  # under runs_dir: shared by the nodes as runs_dir is
MANIFEST = ".orch-code.json"  # in each snapshot: what it was taken from
RUN_FILE = "code.json"  # in each run folder: which code the run runs
SKIPPED = ("__pycache__",)
GIT_TIMEOUT_S = 30


class CodeSnapshotError(RuntimeError):
    """A run's snapshot is missing or can't be written; the message names the folder."""


@dataclass(frozen=True)
class Snapshot:
    mode: str  # snapshot | live
    path: str  # the folder put on PYTHONPATH (live: the code root)
    hash: Optional[str] = None  # sha256 of the files (names, modes, contents)
    commit: Optional[str] = None  # HEAD of the checkout it was taken from; None outside git
    diff_hash: Optional[str] = None  # sha256 of the uncommitted changes under CODE_DIRS; None when there are none
    source: Optional[str] = None  # the folder it was taken from


def _git(root: Path, *args: str) -> Optional[bytes]:
    """git's stdout, or None when root is not a checkout (or git is missing). --no-optional-locks: looking at a
    checkout never takes its index lock from someone committing."""
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _checkout_head(root: Path) -> tuple[bool, Optional[str]]:
    """(whether root is the top of a git checkout, its HEAD commit or None before the first commit)."""
    out = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    if out is None:  # not a checkout, or one without a commit yet (HEAD unknown): ask again for the top alone
        out = _git(root, "rev-parse", "--show-toplevel")
        return out is not None and Path(out.decode().strip()).resolve() == root.resolve(), None
    top, commit = out.decode().split()[:2]
    return Path(top).resolve() == root.resolve(), commit


def _walk(root: Path) -> list[str]:
    files = []
    for name in CODE_DIRS:
        for folder, dirs, names in os.walk(root / name):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not n.endswith(".pyc")]
    return files


def _listing(root: Path) -> tuple[list[str], Optional[str], Optional[str]]:
    """(files relative to root, commit, diff hash) of the code under root."""
    is_checkout, commit = _checkout_head(root)
    if is_checkout:
        # -t tags each name: "H " tracked, "? " untracked (not ignored); a deleted tracked file is listed too
        listed = _git(root, "ls-files", "-co", "-t", "--exclude-standard", "-z", "--", *CODE_DIRS) or b""
        tagged = [(entry[:1], entry[2:]) for entry in listed.decode().split("\0") if entry]
        files = sorted({name for _, name in tagged if (root / name).is_file()})
        untracked = sorted(name for tag, name in tagged if tag == "?" and (root / name).is_file())
        diff = _git(root, "diff", "HEAD", "--binary", "--", *CODE_DIRS) if commit else None
        changes = hashlib.sha256(diff or b"")
        for name in untracked:
            changes.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
        dirty = bool(diff) or bool(untracked) or commit is None
        return files, commit, changes.hexdigest() if dirty else None
    taken_from = root / MANIFEST  # a snapshot of a snapshot keeps the checkout's commit and diff hash
    meta = json.loads(taken_from.read_text()) if taken_from.is_file() else {}
    return sorted(_walk(root)), meta.get("commit"), meta.get("diff_hash")


def _read(root: Path, files: list[str]) -> tuple[str, list[tuple[str, int, bytes]]]:
    """(hash, [(name, mode, bytes)]): each file read once, so what is hashed is what is copied."""
    digest = hashlib.sha256()
    contents = []
    for name in files:
        path = root / name
        data = path.read_bytes()
        mode = 0o555 if os.access(path, os.X_OK) else 0o444
        contents.append((name, mode, data))
        digest.update(f"{name}\0{mode:o}\0{len(data)}\0".encode() + data)
    return digest.hexdigest(), contents


def take(runs_dir: str, root: Optional[Path] = None, write: bool = True) -> Snapshot:
    """The snapshot of the code under root (the code orch runs) in runs_dir/.code/: reused when it exists, else
    written (write=False: only named, as `orch submit --dry-run` shows it)."""
    root = root or ROOT
    files, commit, diff_hash = _listing(root)
    digest, contents = _read(root, files)
    cache = Path(runs_dir).resolve() / CACHE
    dest = cache / digest
    snap = Snapshot("snapshot", str(dest), digest, commit, diff_hash, str(root))
    if not write or (dest / MANIFEST).is_file():
        return snap
    tmp = cache / f".tmp-{digest[:12]}-{secrets.token_hex(4)}"
    try:
        for name, mode, data in contents:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        (tmp / MANIFEST).write_text(json.dumps({**asdict(snap), "files": len(contents)}, indent=1) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another submit renamed the same code into place first: theirs is ours
            if not (dest / MANIFEST).is_file():
                raise
    except OSError as e:
        raise CodeSnapshotError(f"the code snapshot {dest} could not be written: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return snap


def record(run_dir: str, snap: Snapshot) -> None:
    """run_dir/code.json, written atomically."""
    atomic.write_json(Path(run_dir) / RUN_FILE, asdict(snap))


def for_submit(cfg, run_dir: str) -> Snapshot:
    """What `resources.code` asks of a run being registered, recorded in its folder."""
    mode = getattr(getattr(cfg, "resources", None), "code", "snapshot")
    snap = take(cfg.runs_dir) if mode == "snapshot" else Snapshot("live", str(ROOT), source=str(ROOT))
    record(run_dir, snap)
    return snap


def read(run_dir: str) -> Optional[Snapshot]:
    """The run's code.json; None for a run registered before snapshots (it runs live)."""
    try:
        return Snapshot(**json.loads((Path(run_dir) / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def environment(run_dir: str) -> dict[str, str]:
    """PYTHONPATH and PYTHONSAFEPATH for a process that must run the run's snapshot; {} for a live run."""
    snap = read(run_dir)
    if snap is None or snap.mode != "snapshot":
        return {}
    if not (Path(snap.path) / MANIFEST).is_file():
        raise CodeSnapshotError(
            f"{run_dir}/{RUN_FILE} names the code snapshot {snap.path}, which is gone: the run can't run the code "
            "it was submitted with; submit it again (resources.code=live runs the checkout as it is)"
        )
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (snap.path, rest) if p), "PYTHONSAFEPATH": "1"}


def shell_exports(run_dir: str, live_root: Path = ROOT, mode: Optional[str] = None) -> list[str]:
    """The batch script's lines that make its commands import the run's code (the snapshot, or live_root). A run
    not registered (`orch submit --dry-run`) under mode=snapshot gets the snapshot its submit would take."""
    snap = read(run_dir)
    if snap is None and mode == "snapshot" and not Path(run_dir).exists():
        snap = take(str(Path(run_dir).parent), write=False)
    elif snap is None or snap.mode != "snapshot":
        return [f"export PYTHONPATH={shlex.quote(str(live_root))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    else:
        environment(run_dir)  # refuses a snapshot that is gone
    return [f"export PYTHONPATH={shlex.quote(snap.path)}${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONSAFEPATH=1"]


def as_dict(run_dir: str) -> Optional[dict]:
    """code.json for `--json` (mode, path, hash, commit, diff_hash, source); None for a run without one."""
    snap = read(run_dir)
    return asdict(snap) if snap else None


def describe(snap: Optional[Snapshot]) -> str:
    """A short cell for `orch runs`: commit[:8], +diff hash[:8] when there were uncommitted changes; live; -."""
    if snap is None:
        return "-"
    if snap.mode != "snapshot":
        return "live"
    commit = snap.commit[:8] if snap.commit else "no-git"
    return commit + (f"+{snap.diff_hash[:8]}" if snap.diff_hash else "")
