"""The run registry: one SQLite file that records every run the control plane started.

Progress (step, loss) is not stored here: it lives in each run folder's metrics.jsonl, written
by the trainer. The registry holds what only the control plane knows: which runs exist,
where their folders are, how they were launched, and how they ended.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Optional

from jobspec.faults import fault
from orchestrator.filesystems import warn_if_shared

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
# PENDING -> RUNNING -> COMPLETED | FAILED, or -> CANCELLING (asked to stop, still saving) -> CANCELLED.
UNFINISHED = ("PENDING", "RUNNING", "CANCELLING")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    executor     TEXT NOT NULL,
    state        TEXT NOT NULL,
    run_dir      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    started_at   REAL,
    ended_at     REAL,
    pid          INTEGER,
    pid_start    TEXT,
    host         TEXT,
    slurm_job_id TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    exit_code    INTEGER,
    pipeline_id  TEXT,
    stage        TEXT,
    depends_on   TEXT,
    reason       TEXT
);
CREATE INDEX IF NOT EXISTS runs_pipeline ON runs(pipeline_id);
"""


@dataclass
class Run:
    id: str
    name: str
    kind: str
    executor: str
    state: str
    run_dir: str
    created_at: float
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    # The process that owns the run now, with its start time and host (one process, never a reused pid): the
    # `orch submit` or `orch resume` starting it until its executor has, then the local supervisor. A pipeline's
    # stage has none until its pipeline's supervisor starts it.
    pid: Optional[int] = None
    pid_start: Optional[str] = None
    host: Optional[str] = None
    slurm_job_id: Optional[str] = None
    attempts: int = 0
    exit_code: Optional[int] = None
    pipeline_id: Optional[str] = None
    stage: Optional[str] = None
    depends_on: Optional[str] = None
    reason: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


def orch_home() -> Path:
    """Where the registry lives: $ORCH_HOME, else ./.orch beside the runs (like .git)."""
    return Path(os.environ.get("ORCH_HOME", ".orch")).resolve()


class RegistryLocked(RuntimeError):
    """The registry could not be read or written within its lock timeout; the message says what to do."""


WRITE_TIMEOUT_S = 60  # a writer waits this long for another's write lock (writes are short: milliseconds)
READ_TIMEOUT_S = 5  # readers never wait for a writer in WAL mode; only for a crashed writer's recovery


class Registry:
    def __init__(self, path: Optional[Path] = None, write_timeout_s: float = WRITE_TIMEOUT_S):
        self.path = Path(path) if path else orch_home() / "registry.db"
        self.write_timeout_s = write_timeout_s
        warn_if_shared(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._current():  # only a new or an older registry is written here: looking takes no write lock
            self._create()

    def _current(self) -> bool:
        """True when the file has the runs table with every column, in WAL mode (read without a write lock)."""
        if not self.path.is_file():
            return False
        with self._connect() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            wal = db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        return wal and have >= {f.name for f in fields(Run)}

    def _create(self) -> None:
        try:
            db = sqlite3.connect(self.path, timeout=self.write_timeout_s, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # persists in the file: readers never wait for a writer
                db.executescript(SCHEMA)
            finally:
                db.close()
        except sqlite3.OperationalError as e:
            raise self._error(e, write=True) from None
        with self._connect(write=True) as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for name, kind in (("pid_start", "TEXT"), ("host", "TEXT")):  # registries made before these columns
                if name not in have:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")

    def _error(self, e: sqlite3.OperationalError, write: bool) -> RegistryLocked:
        if "locked" not in str(e) and "busy" not in str(e):
            return RegistryLocked(f"the run registry {self.path} can't be {'written' if write else 'read'}: {e}")
        waited = self.write_timeout_s if write else READ_TIMEOUT_S
        return RegistryLocked(
            f"the run registry {self.path} is locked: another process has held its lock for over {waited:.0f}s, so "
            f"nothing was {'changed' if write else 'read'}. Most likely an orch command is stuck or stopped in the "
            f"middle of a write (`fuser -v {self.path}*` names it; end it, and its write is rolled back), or "
            "ORCH_HOME is on a network file system whose locks SQLite can't use (keep it on a local disk: see "
            "docs/slurm.md). Then run the command again."
        )

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction. WAL lets readers go on while one process writes; writers take the write lock up
        front (BEGIN IMMEDIATE), so two never deadlock upgrading a read, and wait up to a minute for it. A lock
        not had in time is a RegistryLocked that says so, not SQLite's traceback."""
        try:
            db = sqlite3.connect(
                self.path, timeout=self.write_timeout_s if write else READ_TIMEOUT_S, isolation_level=None
            )
        except sqlite3.OperationalError as e:
            raise self._error(e, write) from None
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # BEGIN takes no lock: the first read does
            try:
                yield db
                if write:
                    fault("registry.write")  # a writer killed here dies holding the write lock, mid-transaction
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise self._error(e, write) from None
        finally:
            db.close()

    def add(self, run: Run) -> None:
        cols = [f.name for f in fields(Run)]
        with self._connect(write=True) as db:
            db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [getattr(run, c) for c in cols],
            )

    def update(self, run_id: str, **values) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._connect(write=True) as db:
            db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*values.values(), run_id])

    def transition(self, run_id: str, from_states: tuple[str, ...], **values) -> bool:
        """Update the run only if its state is one of `from_states`, atomically; True if it was.
        Two processes racing to move a run (a supervisor finishing, `orch cancel`) can't both win."""
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" * len(from_states))
        with self._connect(write=True) as db:
            cursor = db.execute(
                f"UPDATE runs SET {sets} WHERE id = ? AND state IN ({marks})", [*values.values(), run_id, *from_states]
            )
            return cursor.rowcount == 1

    def get(self, run_id: str) -> Optional[Run]:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Run(**dict(row)) if row else None

    def find(self, prefix: str) -> Run:
        """A run by id, id prefix, or run-folder path; LookupError naming the choices otherwise."""
        path = str(Path(prefix).resolve())
        with self._connect() as db:
            # a prefix compared as such: LIKE would read '_' and '%' in an id as wildcards, and ignore case
            rows = db.execute(
                "SELECT * FROM runs WHERE substr(id, 1, ?) = ? OR run_dir = ? ORDER BY created_at DESC",
                (len(prefix), prefix, path),
            ).fetchall()
        if len(rows) == 1:
            return Run(**dict(rows[0]))
        exact = [r for r in rows if r["id"] == prefix or r["run_dir"] == path]
        if len(exact) == 1:
            return Run(**dict(exact[0]))
        if not rows:
            raise LookupError(f"no run matches {prefix!r} in {self.path} (see `orch runs`)")
        raise LookupError(
            f"{prefix!r} matches {len(rows)} runs: {', '.join(r['id'] for r in rows[:5])}; give more of the id"
        )

    def list(self, limit: Optional[int] = None, pipeline_id: Optional[str] = None) -> list[Run]:
        query, args = "SELECT * FROM runs", []
        if pipeline_id:
            query, args = query + " WHERE pipeline_id = ?", [pipeline_id]
        query += " ORDER BY created_at DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._connect() as db:
            return [Run(**dict(r)) for r in db.execute(query, args).fetchall()]

    def active_pipelines(self) -> list[str]:
        """Ids of pipelines with a stage not yet finished."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT DISTINCT pipeline_id FROM runs WHERE pipeline_id IS NOT NULL AND state IN "
                "('PENDING', 'RUNNING', 'CANCELLING')"
            ).fetchall()
        return [r[0] for r in rows]

    def find_pipeline(self, prefix: str) -> str:
        """A pipeline id from a prefix of it; LookupError naming the choices otherwise."""
        with self._connect() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT pipeline_id FROM runs WHERE substr(pipeline_id, 1, ?) = ?", (len(prefix), prefix)
                ).fetchall()
            ]
        if prefix in ids or len(ids) == 1:
            return prefix if prefix in ids else ids[0]
        if not ids:
            raise LookupError(f"no pipeline matches {prefix!r} in {self.path} (see `orch runs`)")
        raise LookupError(f"{prefix!r} matches {len(ids)} pipelines: {', '.join(ids[:5])}; give more of the id")


def now() -> float:
    return time.time()
